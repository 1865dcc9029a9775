"""One chunk of the Titans memory in the dual form, on 2D values: the math shared by
every chunked implementation (xla.py vmaps it over batch and heads; the Pallas TPU and
GPU kernels run it per program), plus their common plumbing (placing tokens on the
absolute chunk schedule).

A chunk carries (A, W0, S0): the gradient point, weights and momentum before it. Its
tokens' per-layer gradients are all taken at A, and each is rank one,
u_i^l = x_i^l^T delta_i^l (layer input times back-propagated error of k_i's forward pass
through A). With F_t = prod_{j<=t} (1 - alpha_j) and E_t = prod_{j<=t} eta_j within the
chunk, m the validity mask (padding tokens change neither W nor S):

    N[t,s] = [s<=t] m_s F_t/F_s,   P[s,i] = [i<=s] E_s/E_i,   c[t,i] = theta_i m_i (N P)[t,i]
    g_t = sum_s N[t,s] E_s,        W_t = F_t W0 + g_t S0 - sum_i c[t,i] u_i

so a query's pre-activation of layer l under W_t is
    F_t (x_q W0_l) + g_t (x_q S0_l) - sum_i c[t,i] (x_q . x_i^l) delta_i^l,
masked attention-like matmuls, layer after layer; W, S after the chunk use the last
row's coefficients. Without momentum (eta = 0) P keeps only the last valid token at or
before s, and S0 never reaches W.

The chunk math sticks to what Mosaic (TPU) and Triton (GPU) lower: 2D arrays, per-token
values as columns [C, 1], rows made from them with an identity mask and a reduction,
cumulative sums as masked reductions, dot_general at HIGHEST precision, iota masks, and
exponents that are masked and non-positive before exp.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from kernels._matmul import dot, dot_t, sum_columns, sum_rows, t_dot

_GELU_SCALE = math.sqrt(2.0 / math.pi)
_GELU_CUBIC = 0.044715


def _masked_exp(mask, exponent):
    """exp(exponent) where mask, else 0; the exponent is masked first (no overflow)."""
    return jnp.where(mask, jnp.exp(jnp.where(mask, exponent, 0.0)), 0.0)


def activation_and_derivative(name, z):
    """(phi(z), phi'(z)) for "gelu" (tanh approximation, as jax.nn.gelu(approximate=True))
    or "silu", written out so that the kernels lower them (the unused phi'' is dead code
    that every compiler drops)."""
    return activation_derivatives(name, z)[:2]


def activation_derivatives(name, z):
    """(phi(z), phi'(z), phi''(z)); the backward of the keys' error pass needs phi''."""
    if name == "gelu":
        inner = _GELU_SCALE * (z + _GELU_CUBIC * z * z * z)
        t = jnp.tanh(inner)
        d_inner = _GELU_SCALE * (1.0 + 3.0 * _GELU_CUBIC * z * z)
        dd_inner = _GELU_SCALE * 6.0 * _GELU_CUBIC * z
        sech2 = 1.0 - t * t
        value = 0.5 * z * (1.0 + t)
        slope = 0.5 * (1.0 + t) + 0.5 * z * sech2 * d_inner
        curvature = sech2 * (d_inner + 0.5 * z * (dd_inner - 2.0 * t * d_inner * d_inner))
        return value, slope, curvature
    if name == "silu":
        sigmoid = 1.0 / (1.0 + jnp.exp(-z))
        value, slope = z * sigmoid, sigmoid * (1.0 + z * (1.0 - sigmoid))
        return value, slope, sigmoid * (1.0 - sigmoid) * (2.0 + z * (1.0 - 2.0 * sigmoid))
    raise ValueError(f"titans_memory: unknown activation {name!r}")


class Coefficients(NamedTuple):
    """One chunk's mixing coefficients (see the module docstring)."""

    retain: jnp.ndarray  # [C,1]: F_t
    from_momentum: jnp.ndarray | None  # [C,1]: g_t; None without momentum (it is 0)
    updates: jnp.ndarray  # [C,C]: c[t,i]
    last_retain: jnp.ndarray  # [1,1]: F at the chunk's last slot
    last_from_momentum: jnp.ndarray | None  # [1,1]: g there
    last_momentum_decay: jnp.ndarray  # [1,1]: E there (1 without momentum if no token is valid)
    last_updates: jnp.ndarray  # [C,1]: c[last, i] as a column, W's update weights
    last_momentum_updates: jnp.ndarray  # [C,1]: theta_i m_i P[last, i], S's update weights
    last_is_valid: jnp.ndarray  # [1,1] bool: the last slot is a real token (the chunk completes)


def chunk_coefficients(theta, log_retain, log_momentum, mask) -> Coefficients:
    """Per-token columns [C,1], float32: theta, log(1 - alpha), log eta (None: no
    momentum), mask (1 real token, 0 padding)."""
    size = theta.shape[0]
    rows = lax.broadcasted_iota(jnp.int32, (size, size), 0)
    columns = lax.broadcasted_iota(jnp.int32, (size, size), 1)
    lower, upper, identity = rows >= columns, rows <= columns, rows == columns
    is_last_row = lax.broadcasted_iota(jnp.int32, (size, 1), 0) == size - 1

    def as_row(column):
        return sum_columns(jnp.where(identity, column, 0.0))

    def cumulative(column):
        """Inclusive cumulative sum as a column and as a row."""
        return sum_rows(jnp.where(lower, as_row(column), 0.0)), sum_columns(jnp.where(upper, column, 0.0))

    def last_row(matrix):
        return sum_columns(jnp.where(is_last_row, matrix, 0.0))

    def as_column(row):
        return sum_rows(jnp.where(identity, row, 0.0))

    mask_row = as_row(mask)
    retain_col, retain_row = cumulative(log_retain)
    mixing = _masked_exp(lower, retain_col - retain_row) * mask_row  # N
    if log_momentum is None:
        # eta = 0 on real tokens, 1 on padding: momentum reaches back to the last real token.
        count_col, count_row = cumulative(mask)
        carried = jnp.where(lower & (count_col == count_row), 1.0, 0.0)  # P
        momentum_col = jnp.where(count_col == 0.0, 1.0, 0.0)  # E
        from_momentum = None
    else:
        momentum_col, momentum_row = cumulative(log_momentum)
        carried = _masked_exp(lower, momentum_col - momentum_row)
        momentum_col = jnp.exp(momentum_col)
        from_momentum = sum_rows(mixing * jnp.exp(momentum_row))
    step_row = as_row(theta * mask)
    updates = dot(mixing, carried) * step_row
    retain = jnp.exp(retain_col)
    last = lambda column: sum_columns(jnp.where(is_last_row, column, 0.0))
    return Coefficients(
        retain=retain,
        from_momentum=from_momentum,
        updates=updates,
        last_retain=last(retain),
        last_from_momentum=None if from_momentum is None else last(from_momentum),
        last_momentum_decay=last(momentum_col),
        last_updates=as_column(last_row(updates)),
        last_momentum_updates=as_column(last_row(carried) * step_row),
        last_is_valid=last(mask) > 0.0,
    )


class ChunkActivations(NamedTuple):
    """What a chunk's backward reads of its forward, one entry per layer l."""

    key_inputs: tuple  # X_l [C,din]: the keys' layer inputs at the anchor (X_1 = k)
    key_pre_activations: tuple  # Z_l = X_l A_l [C,dout]
    errors: tuple  # Delta_l [C,dout]: the loss's errors back through the anchor
    query_inputs: tuple  # H_l [C,din]: the queries' layer inputs (H_1 = q)
    query_pre_activations: tuple  # the queries' pre-activations [C,dout] (the last is y)
    from_weights: tuple  # H_l W_l [C,dout]
    from_momentum: tuple  # H_l S_l [C,dout], or Nones without momentum


def chunk_pass(carry, q, k, v, theta, log_retain, log_momentum, mask, *, activation, t_dot=t_dot):
    """chunk_forward, also returning the ChunkActivations its backward reads. t_dot: the
    a^T b matmul (XLA passes `t_dot_transposing_first`; Pallas kernels keep the default)."""
    anchor, weights, momentum = carry
    depth = len(weights)
    coefficients = chunk_coefficients(theta, log_retain, log_momentum, mask)

    # The keys' forward pass at the anchor, then the loss's errors back through it.
    key_inputs, key_pre_activations, x = [], [], k
    for layer, a in enumerate(anchor):
        key_inputs.append(x)
        z = dot(x, a)
        key_pre_activations.append(z)
        if layer < depth - 1:
            x = activation_and_derivative(activation, z)[0]
    errors = [None] * depth
    error = 2.0 * (key_pre_activations[-1] - v)
    for layer in reversed(range(depth)):
        errors[layer] = error
        if layer > 0:
            error = dot_t(error, anchor[layer]) * activation_and_derivative(activation, key_pre_activations[layer - 1])[1]

    query_inputs, query_pre_activations, from_weights, from_momentum, x = [], [], [], [], q
    for layer in range(depth):
        query_inputs.append(x)
        from_weights.append(dot(x, weights[layer]))
        z = coefficients.retain * from_weights[-1]
        if coefficients.from_momentum is None:
            from_momentum.append(None)
        else:
            from_momentum.append(dot(x, momentum[layer]))
            z = z + coefficients.from_momentum * from_momentum[-1]
        z = z - dot(coefficients.updates * dot_t(x, key_inputs[layer]), errors[layer])
        query_pre_activations.append(z)
        x = activation_and_derivative(activation, z)[0] if layer < depth - 1 else z

    new_weights, new_momentum = [], []
    for layer in range(depth):
        w = coefficients.last_retain * weights[layer]
        s = coefficients.last_momentum_decay * momentum[layer]
        if coefficients.last_from_momentum is not None:
            w = w + coefficients.last_from_momentum * momentum[layer]
        w = w - t_dot(key_inputs[layer], coefficients.last_updates * errors[layer])
        s = s - t_dot(key_inputs[layer], coefficients.last_momentum_updates * errors[layer])
        new_weights.append(w)
        new_momentum.append(s)
    new_anchor = tuple(jnp.where(coefficients.last_is_valid, w, a) for w, a in zip(new_weights, anchor))
    activations = ChunkActivations(
        tuple(key_inputs), tuple(key_pre_activations), tuple(errors), tuple(query_inputs),
        tuple(query_pre_activations), tuple(from_weights), tuple(from_momentum),
    )
    return x, (new_anchor, tuple(new_weights), tuple(new_momentum)), activations


def chunk_forward(carry, q, k, v, theta, log_retain, log_momentum, mask, *, activation):
    """carry = (anchor, weights, momentum), each a tuple of [din,dout] float32 per layer;
    q, k [C,Dk], v [C,Dv] and the per-token columns [C,1] float32 (log_momentum None: no
    momentum) -> (y [C,Dv], carry after the chunk), float32."""
    y, carry, _ = chunk_pass(carry, q, k, v, theta, log_retain, log_momentum, mask, activation=activation)
    return y, carry


def chunk_backward(
    carry, q, k, v, theta, log_retain, log_momentum, mask, activations, d_y, d_carry, *, activation, t_dot=t_dot
):
    """The VJP of chunk_forward, written out: it reads the forward's ChunkActivations
    instead of recomputing them, and costs about two forwards.

    d_y [C,Dv] and d_carry = (dA', dW', dS') are the cotangents of the chunk's outputs.
    Returns (d_carry before the chunk, dq, dk, dv, dtheta, dlog_retain, dlog_momentum or
    None), float32. The C x C coefficients are differentiated by jax.vjp (cheap); the
    matmuls over the memory's widths are written out. t_dot as in chunk_pass."""
    anchor, weights, momentum = carry
    d_new_anchor, d_new_weights, d_new_momentum = d_carry
    depth = len(weights)
    act = activations
    has_momentum = log_momentum is not None

    def differentiable_coefficients(theta, log_retain, log_momentum):
        """The coefficients' float fields, and last_is_valid (a bool) on the side."""
        coefficients = chunk_coefficients(theta, log_retain, log_momentum, mask)
        return coefficients._replace(last_is_valid=None), coefficients.last_is_valid

    # log_momentum None is an empty pytree: its cotangent comes back None.
    coefficients, coefficients_vjp, last_is_valid = jax.vjp(
        differentiable_coefficients, theta, log_retain, log_momentum, has_aux=True
    )

    zeros_like_column = jnp.zeros_like(theta)
    d_retain, d_updates = zeros_like_column, jnp.zeros_like(coefficients.updates)
    d_from_momentum = zeros_like_column if has_momentum else None
    d_last_retain = jnp.zeros((1, 1), jnp.float32)
    d_last_from_momentum = d_last_retain if has_momentum else None
    d_last_momentum_decay = d_last_retain
    d_last_updates, d_last_momentum_updates = zeros_like_column, zeros_like_column

    d_anchor, d_weights, d_momentum = [], [], []
    d_key_inputs, d_errors = [None] * depth, [None] * depth
    # The chunk-end update: A' = W' if the chunk completes, W' = F W + g S - X^T (c_W * Delta),
    # S' = E S - X^T (c_S * Delta).
    for layer in range(depth):
        d_w_new = d_new_weights[layer] + jnp.where(last_is_valid, d_new_anchor[layer], 0.0)
        d_s_new = d_new_momentum[layer]
        d_anchor.append(jnp.where(last_is_valid, 0.0, d_new_anchor[layer]))
        d_weights.append(coefficients.last_retain * d_w_new)
        d_momentum.append(coefficients.last_momentum_decay * d_s_new)
        d_last_retain = d_last_retain + jnp.sum(weights[layer] * d_w_new, keepdims=True)
        d_last_momentum_decay = d_last_momentum_decay + jnp.sum(momentum[layer] * d_s_new, keepdims=True)
        if has_momentum:
            d_momentum[layer] = d_momentum[layer] + coefficients.last_from_momentum * d_w_new
            d_last_from_momentum = d_last_from_momentum + jnp.sum(momentum[layer] * d_w_new, keepdims=True)
        x, error = act.key_inputs[layer], act.errors[layer]
        d_scaled_w = -dot(x, d_w_new)  # d(c_W * Delta)
        d_scaled_s = -dot(x, d_s_new)
        d_key_inputs[layer] = -(
            dot_t(coefficients.last_updates * error, d_w_new) + dot_t(coefficients.last_momentum_updates * error, d_s_new)
        )
        d_errors[layer] = coefficients.last_updates * d_scaled_w + coefficients.last_momentum_updates * d_scaled_s
        d_last_updates = d_last_updates + sum_rows(error * d_scaled_w)
        d_last_momentum_updates = d_last_momentum_updates + sum_rows(error * d_scaled_s)

    # The queries' pass, last layer first:
    # z_l = F (H_l W_l) + g (H_l S_l) - (U * (H_l X_l^T)) Delta_l.
    d_z = d_y
    for layer in reversed(range(depth)):
        h, x, error = act.query_inputs[layer], act.key_inputs[layer], act.errors[layer]
        d_retain = d_retain + sum_rows(act.from_weights[layer] * d_z)
        scaled = coefficients.retain * d_z
        d_weights[layer] = d_weights[layer] + t_dot(h, scaled)
        d_h = dot_t(scaled, weights[layer])
        if has_momentum:
            d_from_momentum = d_from_momentum + sum_rows(act.from_momentum[layer] * d_z)
            scaled = coefficients.from_momentum * d_z
            d_momentum[layer] = d_momentum[layer] + t_dot(h, scaled)
            d_h = d_h + dot_t(scaled, momentum[layer])
        similarity = dot_t(h, x)  # H_l X_l^T [C,C]
        d_errors[layer] = d_errors[layer] - t_dot(coefficients.updates * similarity, d_z)
        d_mixed = -dot_t(d_z, error)  # d(U * (H X^T))
        d_updates = d_updates + d_mixed * similarity
        d_similarity = d_mixed * coefficients.updates
        d_h = d_h + dot(d_similarity, x)
        d_key_inputs[layer] = d_key_inputs[layer] + t_dot(d_similarity, h)
        if layer > 0:
            d_z = d_h * activation_and_derivative(activation, act.query_pre_activations[layer - 1])[1]
    d_q = d_h

    # The keys' pass at the anchor: Delta_L = 2 (Z_L - v),
    # Delta_l = (Delta_{l+1} A_{l+1}^T) * phi'(Z_l), Z_l = X_l A_l, X_{l+1} = phi(Z_l).
    d_key_pre, key_slopes = [None] * depth, [None] * (depth - 1)  # key_slopes[l] = phi'(Z_l)
    for layer in range(depth - 1):  # Delta_1 was made last, so it is undone first
        z = act.key_pre_activations[layer]
        _, slope, curvature = activation_derivatives(activation, z)
        key_slopes[layer] = slope
        back = dot_t(act.errors[layer + 1], anchor[layer + 1])
        d_back = d_errors[layer] * slope
        d_key_pre[layer] = d_errors[layer] * back * curvature
        d_errors[layer + 1] = d_errors[layer + 1] + dot(d_back, anchor[layer + 1])
        d_anchor[layer + 1] = d_anchor[layer + 1] + t_dot(d_back, act.errors[layer + 1])
    d_key_pre[-1] = 2.0 * d_errors[-1]  # Z_L's only use in the error pass is Delta_L
    d_v = -2.0 * d_errors[-1]
    for layer in reversed(range(depth)):
        d_anchor[layer] = d_anchor[layer] + t_dot(act.key_inputs[layer], d_key_pre[layer])
        d_x = d_key_inputs[layer] + dot_t(d_key_pre[layer], anchor[layer])
        if layer > 0:
            d_key_pre[layer - 1] = d_key_pre[layer - 1] + d_x * key_slopes[layer - 1]
    d_k = d_x

    d_coefficients = Coefficients(
        retain=d_retain,
        from_momentum=d_from_momentum,
        updates=d_updates,
        last_retain=d_last_retain,
        last_from_momentum=d_last_from_momentum,
        last_momentum_decay=d_last_momentum_decay,
        last_updates=d_last_updates,
        last_momentum_updates=d_last_momentum_updates,
        last_is_valid=None,
    )
    d_theta, d_log_retain, d_log_momentum = coefficients_vjp(d_coefficients)
    d_carry = (tuple(d_anchor), tuple(d_weights), tuple(d_momentum))
    return d_carry, d_q, d_k, d_v, d_theta, d_log_retain, d_log_momentum


# --- placing tokens on the chunk schedule ----------------------------------------------


@dataclasses.dataclass(frozen=True)
class ChunkConfig:
    """Compile-time settings of one chunked run."""

    chunk_size: int
    activation: str
    has_momentum: bool
    interpret: bool = False


class PlacedInputs(NamedTuple):
    """Tokens at their absolute chunk slots, padded to whole chunks: [B,T',H,...]."""

    q: jnp.ndarray
    k: jnp.ndarray
    v: jnp.ndarray
    theta: jnp.ndarray  # [B,T',H] float32, 0 on padding
    log_retain: jnp.ndarray  # [B,T',H] float32, 0 on padding
    log_momentum: jnp.ndarray | None  # [B,T',H] float32, 0 on padding; None: no momentum
    mask: jnp.ndarray  # [B,T',H] float32: 1 on real tokens


def place_tokens(chunk_size, q, k, v, lr, log_momentum, log_retain, offset, *, aligned):
    """Put token 0 at slot `offset` of the first chunk (front padding), and pad the end
    to a whole chunk; padding is masked. aligned: offset is known to be 0 (static).

    Returns (PlacedInputs, front padding: int32 [], static or traced)."""
    batch, seq_len, heads = lr.shape
    if log_retain is None:
        log_retain = jnp.zeros_like(lr)
    per_token = [lr, log_retain] + ([] if log_momentum is None else [log_momentum])
    arrays = [q, k, v, *per_token, jnp.ones_like(lr)]
    if aligned:
        front = 0
        padded_len = -(-seq_len // chunk_size) * chunk_size
    else:
        # The offset is traced: leave room for a whole chunk of front padding.
        front = offset
        padded_len = -(-(seq_len + chunk_size - 1) // chunk_size) * chunk_size

    def place(x):
        slots = jnp.zeros((batch, padded_len, *x.shape[2:]), x.dtype)
        return lax.dynamic_update_slice_in_dim(slots, x, front, axis=1)

    placed = [place(x) for x in arrays]
    q, k, v, theta, log_retain, *rest = placed
    log_momentum = rest[0] if log_momentum is not None else None
    return PlacedInputs(q, k, v, theta, log_retain, log_momentum, rest[-1]), front


def kernel_token_inputs(placed: PlacedInputs):
    """The per-token arrays a kernel reads, in the order `split_chunk_values` expects."""
    optional = [] if placed.log_momentum is None else [placed.log_momentum]
    return [placed.q, placed.k, placed.v, placed.theta, placed.log_retain, *optional, placed.mask]


def split_chunk_values(values, has_momentum):
    """One chunk's values of `kernel_token_inputs` -> (q, k, v, theta, log_retain,
    log_momentum or None, mask), float32."""
    q, k, v, theta, log_retain, *rest = (x.astype(jnp.float32) for x in values)
    return q, k, v, theta, log_retain, (rest[0] if has_momentum else None), rest[-1]


def flatten_carry(carry):
    """(A, W, S) tuples of layers -> one list: A_1..A_L, W_1..W_L, S_1..S_L."""
    return [x for part in carry for x in part]


def unflatten_carry(values, depth):
    """The inverse of `flatten_carry`."""
    return tuple(tuple(values[i * depth : (i + 1) * depth]) for i in range(3))


def take_tokens(y, front, seq_len):
    """The real tokens' outputs back from the chunk slots [B,T',H,Dv] -> [B,T,H,Dv]."""
    return lax.dynamic_slice_in_dim(y, front, seq_len, axis=1)


def next_offset(offset, seq_len, chunk_size):
    """The state's offset after seq_len more tokens."""
    return ((offset + seq_len) % chunk_size).astype(jnp.int32)
