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
    or "silu", written out so that the kernels lower them."""
    if name == "gelu":
        inner = _GELU_SCALE * (z + _GELU_CUBIC * z * z * z)
        t = jnp.tanh(inner)
        d_inner = _GELU_SCALE * (1.0 + 3.0 * _GELU_CUBIC * z * z)
        return 0.5 * z * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * d_inner
    if name == "silu":
        sigmoid = 1.0 / (1.0 + jnp.exp(-z))
        return z * sigmoid, sigmoid * (1.0 + z * (1.0 - sigmoid))
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


def chunk_forward(carry, q, k, v, theta, log_retain, log_momentum, mask, *, activation):
    """carry = (anchor, weights, momentum), each a tuple of [din,dout] float32 per layer;
    q, k [C,Dk], v [C,Dv] and the per-token columns [C,1] float32 (log_momentum None: no
    momentum) -> (y [C,Dv], carry after the chunk), float32."""
    anchor, weights, momentum = carry
    depth = len(weights)
    coefficients = chunk_coefficients(theta, log_retain, log_momentum, mask)

    # The keys' forward pass at the anchor, then the loss's errors back through it.
    layer_inputs, pre_activations, x = [], [], k
    for layer, a in enumerate(anchor):
        layer_inputs.append(x)
        z = dot(x, a)
        pre_activations.append(z)
        if layer < depth - 1:
            x = activation_and_derivative(activation, z)[0]
    errors = [None] * depth
    error = 2.0 * (pre_activations[-1] - v)
    for layer in reversed(range(depth)):
        errors[layer] = error
        if layer > 0:
            error = dot_t(error, anchor[layer]) * activation_and_derivative(activation, pre_activations[layer - 1])[1]

    x = q
    for layer in range(depth):
        z = coefficients.retain * dot(x, weights[layer])
        if coefficients.from_momentum is not None:
            z = z + coefficients.from_momentum * dot(x, momentum[layer])
        z = z - dot(coefficients.updates * dot_t(x, layer_inputs[layer]), errors[layer])
        x = activation_and_derivative(activation, z)[0] if layer < depth - 1 else z

    new_weights, new_momentum = [], []
    for layer in range(depth):
        w = coefficients.last_retain * weights[layer]
        s = coefficients.last_momentum_decay * momentum[layer]
        if coefficients.last_from_momentum is not None:
            w = w + coefficients.last_from_momentum * momentum[layer]
        w = w - t_dot(layer_inputs[layer], coefficients.last_updates * errors[layer])
        s = s - t_dot(layer_inputs[layer], coefficients.last_momentum_updates * errors[layer])
        new_weights.append(w)
        new_momentum.append(s)
    new_anchor = tuple(jnp.where(coefficients.last_is_valid, w, a) for w, a in zip(new_weights, anchor))
    return x, (new_anchor, tuple(new_weights), tuple(new_momentum))


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
