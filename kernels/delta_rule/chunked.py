"""One chunk of the gated delta rule in the WY (UT) form, forward and backward, on 2D
values: the math shared by every chunked implementation (xla.py vmaps it over batch and
heads; the Pallas TPU and GPU kernels run it per program), plus their common plumbing.

Inside a chunk of C tokens, let gamma_i be the cumulative log decay from the chunk's
start through token i, and S the state before the chunk. Unrolling the recurrence
S_i = exp(g_i) S_{i-1} + k_i^T delta_i, with delta_i = beta_i (v_i - exp(g_i) k_i S_{i-1}):

    A     = strictly_lower(beta_i (k_i . k_j) exp(gamma_i - gamma_j))     [C, C]
    T     = (I + A)^-1                                     (forward substitution)
    U     = T diag(beta) V,   W = T diag(beta exp(gamma)) K       (WY factors)
    delta = U - W S                                (what each token writes)
    y     = diag(exp(gamma)) Q S + lower(Q K^T * exp(gamma_i - gamma_j)) delta
    S'    = exp(gamma_C) S + (diag(exp(gamma_C - gamma)) K)^T delta

A segment start inside the chunk cuts every decay factor that spans it (the factor
becomes 0), which is the same as resetting the state there. The backward is derived by
hand (chunk_backward) and recomputes the chunk's factors from S.

The chunk math sticks to what both Mosaic (TPU) and Triton (GPU) lower: 2D arrays;
per-token values as columns [C, 1] or rows [1, C]; matmuls as dot_general in the three
forms A B, A B^T and A^T B at float32 precision; elementwise ops, reductions that keep
their axis, iota masks and a fori_loop.

Per-token inputs of a chunk: beta; gamma (computed outside the kernels, so the cumsum's
gradient is JAX's); and, with segments, a segment counter (number of segment starts
since the chunk's start, float32): two tokens are in the same segment iff their
counters match.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from kernels._matmul import dot, dot_t, sum_columns, sum_rows, t_dot



class ChunkDecays(NamedTuple):
    """One chunk's decay factors; a segment start cuts every factor that spans it (0)."""

    within: jnp.ndarray  # [C,C]: exp(gamma_i - gamma_j) for j <= i, same segment
    strictly_within: jnp.ndarray  # [C,C]: the same for j < i
    strictly_within_t: jnp.ndarray | None  # [C,C]: strictly_within transposed, if asked for
    from_start: jnp.ndarray  # [C,1]: exp(gamma_i) while no segment started in the chunk
    to_end: jnp.ndarray  # [C,1]: exp(gamma_C - gamma_j) for j in the chunk's last segment
    across: jnp.ndarray  # [1,1]: exp(gamma_C) if no segment starts in the chunk
    is_last_row: jnp.ndarray  # [C,1] bool: the chunk's last token


def chunk_decays(gamma_col, gamma_row, segment_col=None, segment_row=None, *, transposed=True) -> ChunkDecays:
    """gamma as a column [C,1] and a row [1,C]; segment counters likewise, or None.

    transposed: also build strictly_within_t, by a second exp rather than a transpose
    (which Mosaic handles only for some shapes); `inverse_by_substitution` needs it.
    """
    size = gamma_col.shape[0]
    rows = lax.broadcasted_iota(jnp.int32, (size, size), 0)
    columns = lax.broadcasted_iota(jnp.int32, (size, size), 1)
    is_last_lane = lax.broadcasted_iota(jnp.int32, (1, size), 1) == size - 1
    is_last_row = lax.broadcasted_iota(jnp.int32, (size, 1), 0) == size - 1
    gamma_last = sum_rows(jnp.where(is_last_lane, gamma_row, 0.0))
    lower, strictly_lower, strictly_upper = rows >= columns, rows > columns, rows < columns
    if segment_col is None:
        from_start_mask = to_end_mask = across_mask = True
    else:
        same_segment = segment_col == segment_row
        lower = lower & same_segment
        strictly_lower = strictly_lower & same_segment
        strictly_upper = strictly_upper & same_segment
        segment_last = sum_rows(jnp.where(is_last_lane, segment_row, 0.0))
        from_start_mask = segment_col == 0.0
        to_end_mask = segment_col == segment_last
        across_mask = segment_last == 0.0
    within = _masked_exp(lower, gamma_col - gamma_row)
    strictly_within_t = None
    if transposed:
        strictly_within_t = _masked_exp(strictly_upper, gamma_row - gamma_col)
    return ChunkDecays(
        within=within,
        strictly_within=jnp.where(strictly_lower, within, 0.0),
        strictly_within_t=strictly_within_t,
        from_start=jnp.where(from_start_mask, jnp.exp(gamma_col), 0.0),
        to_end=_masked_exp(to_end_mask, gamma_last - gamma_col),
        across=jnp.where(across_mask, jnp.exp(gamma_last), 0.0),
        is_last_row=is_last_row,
    )


def _masked_exp(mask, exponent):
    """exp(exponent) where mask, else 0. The exponent is masked too: a masked-out one may
    be large and positive (overflow), and exp(-inf) is a slow path on CPU."""
    return jnp.where(mask, jnp.exp(jnp.where(mask, exponent, 0.0)), 0.0)


def inverse_by_substitution(key_products, beta_col, beta_row, decays: ChunkDecays):
    """T = (I + A)^-1 for A = diag(beta) (K K^T * strictly_within), strictly lower, by
    forward substitution in float32: row i of T is e_i - sum_j A_ij (row j of T).

    Works on A^T (K K^T is symmetric): its column i, picked with a lane mask, is A's row
    i laid along the sublanes, ready to weight T's rows.
    """
    del beta_col  # A^T scales columns: beta as a row
    a_t = key_products * beta_row * decays.strictly_within_t
    size = a_t.shape[0]
    rows = lax.broadcasted_iota(jnp.int32, (size, size), 0)
    columns = lax.broadcasted_iota(jnp.int32, (size, size), 1)
    lanes = lax.broadcasted_iota(jnp.int32, (1, size), 1)

    def substitute_row(i, inverse):
        a_row_i = sum_rows(jnp.where(columns == i, a_t, 0.0))  # [C,1]: A[i, j] at row j
        row = jnp.where(lanes == i, 1.0, 0.0) - sum_columns(a_row_i * inverse)
        return jnp.where(rows == i, row, inverse)

    return lax.fori_loop(0, size, substitute_row, jnp.zeros((size, size), jnp.float32))


class _WY(NamedTuple):
    key_products: jnp.ndarray  # K K^T
    inverse: jnp.ndarray  # (I + A)^-1
    u: jnp.ndarray
    w: jnp.ndarray
    delta: jnp.ndarray  # U - W S


def _wy(state, k, v, beta_col, beta_row, decays: ChunkDecays, invert) -> _WY:
    key_products = dot_t(k, k)
    inverse = invert(key_products, beta_col, beta_row, decays)
    u = dot(inverse, beta_col * v)
    w = dot(inverse, (beta_col * decays.from_start) * k)
    return _WY(key_products, inverse, u, w, u - dot(w, state))


def chunk_forward(state, q, k, v, beta_col, beta_row, decays: ChunkDecays, invert=inverse_by_substitution):
    """float32 state [Dk,Dv], q, k [C,Dk], v [C,Dv], beta column and row ->
    (y [C,Dv], state after the chunk [Dk,Dv]), both float32.

    invert(K K^T, beta col, beta row, decays) -> (I + A)^-1, as `inverse_by_substitution`."""
    delta = _wy(state, k, v, beta_col, beta_row, decays, invert).delta
    scores = dot_t(q, k) * decays.within
    y = dot(decays.from_start * q, state) + dot(scores, delta)
    new_state = decays.across * state + t_dot(decays.to_end * k, delta)
    return y, new_state


class ChunkGradients(NamedTuple):
    state: jnp.ndarray  # [Dk,Dv]: dL/d(state before the chunk)
    q: jnp.ndarray  # [C,Dk]
    k: jnp.ndarray  # [C,Dk]
    v: jnp.ndarray  # [C,Dv]
    beta: jnp.ndarray  # [C,1]
    gamma_col: jnp.ndarray  # [C,1]: dL/dgamma is gamma_col + gamma_row (transposed)
    gamma_row: jnp.ndarray  # [1,C]


def chunk_backward(
    state, d_new_state, dy, q, k, v, beta_col, beta_row, decays: ChunkDecays, invert=inverse_by_substitution
):
    """Gradients of one chunk given dL/dy [C,Dv] and dL/d(state after it); recomputes the
    chunk's forward from the state before it. All float32."""
    wy = _wy(state, k, v, beta_col, beta_row, decays, invert)
    query_keys = dot_t(q, k)
    scores = query_keys * decays.within
    k_to_end = decays.to_end * k

    # new_state = across S + k_to_end^T delta;  y = from_start Q S + scores delta
    d_delta = dot(k_to_end, d_new_state) + t_dot(scores, dy)
    d_k_to_end = dot_t(wy.delta, d_new_state)
    d_to_end = sum_rows(k * d_k_to_end)
    d_across = sum_columns(sum_rows(state * d_new_state))
    dy_state = dot_t(dy, state)
    d_from_start = sum_rows(q * dy_state)
    d_scores = dot_t(dy, wy.delta)
    d_query_keys = d_scores * decays.within
    dq = decays.from_start * dy_state + dot(d_query_keys, k)
    dk = decays.to_end * d_k_to_end + t_dot(d_query_keys, q)

    # delta = U - W S;  U = T (beta V);  W = T (beta from_start K);  T = (I + A)^-1
    d_w = -dot_t(d_delta, state)
    d_state = (
        decays.across * d_new_state
        + t_dot(decays.from_start * q, dy)
        - t_dot(wy.w, d_delta)
    )
    d_v_scaled = t_dot(wy.inverse, d_delta)
    d_k_scaled = t_dot(wy.inverse, d_w)
    # dA = -T^T (dU (beta V)^T + dW (beta from_start K)^T) T^T = -(dVs U^T + dKs W^T)
    d_a = -(dot_t(d_v_scaled, wy.u) + dot_t(d_k_scaled, wy.w))
    dv = beta_col * d_v_scaled
    k_dot_d_k_scaled = sum_rows(k * d_k_scaled)
    dk = dk + (beta_col * decays.from_start) * d_k_scaled
    d_from_start = d_from_start + beta_col * k_dot_d_k_scaled

    # A = diag(beta) (K K^T * strictly_within)
    d_a_weighted = d_a * wy.key_products * decays.strictly_within
    d_beta = sum_rows(v * d_v_scaled) + decays.from_start * k_dot_d_k_scaled + sum_rows(d_a_weighted)
    d_key_products = beta_col * d_a * decays.strictly_within
    dk = dk + dot(d_key_products, k) + t_dot(d_key_products, k)

    # within_ij = exp(gamma_i - gamma_j): d gamma_i += sum_j E_ij, d gamma_j -= sum_i E_ij
    decay_weighted = d_scores * query_keys * decays.within + beta_col * d_a_weighted
    d_gamma_last = sum_columns(d_to_end * decays.to_end) + d_across * decays.across
    d_gamma_col = (
        sum_rows(decay_weighted)
        + d_from_start * decays.from_start
        - d_to_end * decays.to_end
        + jnp.where(decays.is_last_row, d_gamma_last, 0.0)
    )
    return ChunkGradients(
        state=d_state,
        q=dq,
        k=dk,
        v=dv,
        beta=d_beta,
        gamma_col=d_gamma_col,
        gamma_row=-sum_columns(decay_weighted),
    )


class PreparedInputs(NamedTuple):
    """Inputs padded to whole chunks, with the per-chunk cumulative quantities."""

    q: jnp.ndarray  # [B,T',H,Dk]
    k: jnp.ndarray
    v: jnp.ndarray  # [B,T',H,Dv]
    beta: jnp.ndarray  # [B,T',H] float32
    gamma: jnp.ndarray  # [B,T',H] float32: cumulative log decay within each chunk
    segment_counter: jnp.ndarray | None  # [B,T'] float32, or None without segments


def prepare_inputs(chunk_size, q, k, v, beta, log_decay, segment_starts) -> PreparedInputs:
    """Pad to whole chunks (exact no-op tokens) and accumulate within each chunk."""
    q, k, v, beta, log_decay, segment_starts = _pad_to_chunks(
        chunk_size, q, k, v, beta, log_decay, segment_starts
    )
    batch, padded_len, heads = beta.shape
    num_chunks = padded_len // chunk_size

    def cumsum_within_chunks(x):
        by_chunk = x.reshape(batch, num_chunks, chunk_size, *x.shape[2:])
        return jnp.cumsum(by_chunk, axis=2).reshape(x.shape)

    gamma = cumsum_within_chunks(log_decay.astype(jnp.float32))
    if segment_starts is None:
        segment_counter = None
    else:
        segment_counter = cumsum_within_chunks(segment_starts.astype(jnp.float32))
    return PreparedInputs(q, k, v, beta.astype(jnp.float32), gamma, segment_counter)


def _pad_to_chunks(chunk_size, q, k, v, beta, log_decay, segment_starts):
    """Pad the time axis to a multiple of chunk_size with exact no-op tokens
    (beta = 0, log decay = 0, zero q/k/v, no segment start)."""
    padding = -q.shape[1] % chunk_size
    if padding == 0:
        return q, k, v, beta, log_decay, segment_starts

    def pad(x):
        return jnp.pad(x, [(0, 0), (0, padding)] + [(0, 0)] * (x.ndim - 2))

    starts = None if segment_starts is None else pad(segment_starts)
    return pad(q), pad(k), pad(v), pad(beta), pad(log_decay), starts


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Compile-time settings of one Pallas delta-rule call."""

    chunk_size: int
    has_segments: bool
    interpret: bool


def check_chunk_size(chunk_size, backend_name):
    if chunk_size < 16:
        raise ValueError(
            f"delta_rule: the Pallas {backend_name} kernels need chunk_size >= 16 "
            f"(matmul tiles), got {chunk_size}"
        )


def differentiable(forward: Callable, backward: Callable) -> Callable:
    """The custom_vjp op f(config, q, k, v, beta, gamma, segment_counter, initial_state)
    -> (y, final state) of one chunked implementation (inputs as `prepare_inputs` makes
    them; config is static).

    forward(config, <inputs>, keep_states) -> (y, final state, states before each chunk
    or None); backward(config, q, k, v, beta, gamma, segment_counter, states, dy,
    d_final_state) -> (dq, dk, dv, dbeta, dgamma, d_initial_state). The forward run for
    the gradient keeps the chunk states, the only residual besides the inputs.
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def op(config, q, k, v, beta, gamma, segment_counter, initial_state):
        y, final_state, _ = forward(
            config, q, k, v, beta, gamma, segment_counter, initial_state, keep_states=False
        )
        return y, final_state

    def op_forward(config, q, k, v, beta, gamma, segment_counter, initial_state):
        y, final_state, states = forward(
            config, q, k, v, beta, gamma, segment_counter, initial_state, keep_states=True
        )
        return (y, final_state), (q, k, v, beta, gamma, segment_counter, states)

    def op_backward(config, residuals, cotangents):
        q, k, v, beta, gamma, segment_counter, states = residuals
        dy, d_final_state = cotangents
        dq, dk, dv, d_beta, d_gamma, d_initial_state = backward(
            config, q, k, v, beta, gamma, segment_counter, states, dy, d_final_state
        )
        return dq, dk, dv, d_beta, d_gamma, None, d_initial_state

    op.defvjp(op_forward, op_backward)
    return op
