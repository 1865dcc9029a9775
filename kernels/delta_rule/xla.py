"""The gated delta rule in chunks, pure JAX: the WY (UT) form, linear in T.

The per-chunk math (forward and hand-derived backward) is `kernels.delta_rule.chunked`,
shared with the Pallas kernels and vmapped here over batch and heads; only the
triangular inverse differs: loop-free blocked substitution, cheap inside a loop on CPU.

Forward: a loop over chunks that reads chunk slices of the [B, T, H, D] inputs and
writes chunk slices of the output, so besides inputs and outputs only one chunk's work
is live, plus the per-token float32 cumulative log decay (the size of beta): temp
memory is flat in T. Backward (custom_vjp): the forward run for the
gradient also stores the state before each chunk, [T/C, B, H, Dk, Dv] float32
(O(T/C * Dk * Dv)); the backward walks the chunks in reverse, carrying dL/dS and
recomputing each chunk's factors from its stored state.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from kernels.delta_rule import chunked

# Diagonal blocks of (I + A) up to this size are inverted by unrolled forward
# substitution; larger blocks by merging pairs of inverted blocks with matmuls.
_SUBSTITUTION_BLOCK = 8


def delta_rule(q, k, v, beta, *, log_decay, segment_starts, initial_state, chunk_size):
    """q, k [B,T,H,Dk], v [B,T,H,Dv], beta and log_decay [B,T,H], segment_starts bool
    [B,T] or None, initial_state [B,H,Dk,Dv] float32; chunk_size a power of two ->
    (y [B,T,H,Dv] in v's dtype, final state [B,H,Dk,Dv] float32)."""
    seq_len = q.shape[1]
    inputs = chunked.prepare_inputs(chunk_size, q, k, v, beta, log_decay, segment_starts)
    y, final_state = _delta_rule(chunk_size, *inputs, initial_state.astype(jnp.float32))
    return y[:, :seq_len], final_state


def invert_unit_lower(a):
    """(I + a)^-1 for strictly lower triangular a [..., C, C], C a power of two.

    Forward substitution on small diagonal blocks, then pairs of inverted blocks merge:
    inv([[L11, 0], [L21, L22]]) = [[T11, 0], [-T22 L21 T11, T22]]. No loops.
    """
    size = a.shape[-1]
    block = min(size, _SUBSTITUTION_BLOCK)
    lead = a.shape[:-2]
    inverse = _invert_by_substitution(_diagonal_blocks(a, block))
    while block < size:
        pairs = size // (2 * block)
        inverse = inverse.reshape(*lead, pairs, 2, block, block)
        upper_inverse, lower_inverse = inverse[..., 0, :, :], inverse[..., 1, :, :]
        # L21 of each pair: every other block just below the diagonal.
        coupling = _diagonal_blocks(a[..., block:, :-block], block)[..., ::2, :, :]
        corner = -_matmul(lower_inverse, _matmul(coupling, upper_inverse))
        top = jnp.concatenate([upper_inverse, jnp.zeros_like(upper_inverse)], axis=-1)
        bottom = jnp.concatenate([corner, lower_inverse], axis=-1)
        inverse = jnp.concatenate([top, bottom], axis=-2)
        block *= 2
    return inverse.reshape(a.shape)


def _matmul(a, b):
    return jnp.matmul(a, b, precision=lax.Precision.HIGHEST)


def _diagonal_blocks(a, block):
    """[..., M, M] -> its M // block diagonal blocks [..., M // block, block, block]."""
    count = a.shape[-1] // block
    tiled = a.reshape(*a.shape[:-2], count, block, count, block)
    return jnp.moveaxis(jnp.diagonal(tiled, axis1=-4, axis2=-2), -1, -3)


def _invert_by_substitution(a):
    """(I + a)^-1 for strictly lower a [..., n, n], row by row: T_i = e_i - a_i T."""
    size = a.shape[-1]
    identity = jnp.eye(size, dtype=a.dtype)
    rows = []
    for i in range(size):
        row = jnp.broadcast_to(identity[i], a.shape[:-1])
        for j in range(i):
            row = row - a[..., i, j, None] * rows[j]
        rows.append(row)
    return jnp.stack(rows, axis=-2)


def _blocked_inverse(key_products, beta_col, beta_row, decays):
    """(I + A)^-1 for A = diag(beta) (K K^T * strictly_within), loop-free."""
    del beta_row  # A scales rows: beta as a column
    return invert_unit_lower(beta_col * key_products * decays.strictly_within)


def _per_batch_and_head(chunk_fn, has_segments):
    """chunk_fn(state, q, k, v, beta_col, beta_row, decays, *extra) for one head, taking
    beta, gamma and the segment counter as vectors [C] instead (vmap it over heads and
    batch)."""

    def one_head(state, q, k, v, beta, gamma, segment, *extra):
        segment_col = segment_row = None
        if has_segments:
            segment_col, segment_row = segment[:, None], segment[None, :]
        decays = chunked.chunk_decays(
            gamma[:, None], gamma[None, :], segment_col, segment_row, transposed=False
        )
        return chunk_fn(state, q, k, v, beta[:, None], beta[None, :], decays, *extra)

    return one_head


def _forward(chunk_size, q, k, v, beta, gamma, segment_counter, initial_state, *, keep_states):
    """-> (y [B,T',H,Dv], final state, states before each chunk [N,B,H,Dk,Dv] or None)."""
    batch, padded_len, heads, _ = q.shape
    num_chunks = padded_len // chunk_size
    has_segments = segment_counter is not None

    chunk_forward = functools.partial(chunked.chunk_forward, invert=_blocked_inverse)
    one_head = _per_batch_and_head(chunk_forward, has_segments)
    # state, q, k, v, beta, gamma, segment -> y, new state; heads on axis 0 of the state
    # and axis 1 of [C, H, ...] token arrays.
    segment_axis = 0 if has_segments else None
    per_head = jax.vmap(one_head, in_axes=(0, 1, 1, 1, 1, 1, None), out_axes=(1, 0))
    per_batch = jax.vmap(per_head, in_axes=(0, 0, 0, 0, 0, 0, segment_axis), out_axes=(0, 0))

    def body(index, carry):
        state, y, states = carry
        chunk = _chunk_slices(chunk_size, index, (q, k, v, beta, gamma, segment_counter))
        if keep_states:
            states = lax.dynamic_update_index_in_dim(states, state, index, axis=0)
        y_chunk, state = per_batch(state, *chunk)
        y = lax.dynamic_update_slice_in_dim(y, y_chunk.astype(y.dtype), index * chunk_size, axis=1)
        return state, y, states

    y = jnp.zeros((batch, padded_len, heads, v.shape[-1]), v.dtype)
    states = jnp.zeros((num_chunks, *initial_state.shape), jnp.float32) if keep_states else None
    final_state, y, states = lax.fori_loop(0, num_chunks, body, (initial_state, y, states))
    return y, final_state, states


def _backward(chunk_size, q, k, v, beta, gamma, segment_counter, states, dy, d_final_state):
    """-> (dq, dk, dv, dbeta, dgamma, d initial state)."""
    num_chunks = states.shape[0]
    has_segments = segment_counter is not None

    def chunk_backward(state, q, k, v, beta_col, beta_row, decays, d_new_state, dy):
        grads = chunked.chunk_backward(
            state, d_new_state, dy, q, k, v, beta_col, beta_row, decays, invert=_blocked_inverse
        )
        d_gamma = grads.gamma_col[:, 0] + grads.gamma_row[0]
        return grads.state, grads.q, grads.k, grads.v, grads.beta[:, 0], d_gamma

    one_head = _per_batch_and_head(chunk_backward, has_segments)
    segment_axis = 0 if has_segments else None
    per_head = jax.vmap(one_head, in_axes=(0, 1, 1, 1, 1, 1, None, 0, 1), out_axes=(0, 1, 1, 1, 1, 1))
    per_batch = jax.vmap(per_head, in_axes=(0, 0, 0, 0, 0, 0, segment_axis, 0, 0))

    def body(step, carry):
        d_state, grads = carry
        index = num_chunks - 1 - step
        chunk = _chunk_slices(chunk_size, index, (q, k, v, beta, gamma, segment_counter, dy))
        state = lax.dynamic_index_in_dim(states, index, axis=0, keepdims=False)
        *chunk_inputs, dy_chunk = chunk
        d_state, *d_chunk = per_batch(state, *chunk_inputs, d_state, dy_chunk.astype(jnp.float32))
        grads = tuple(
            lax.dynamic_update_slice_in_dim(grad, d.astype(grad.dtype), index * chunk_size, axis=1)
            for grad, d in zip(grads, d_chunk)
        )
        return d_state, grads

    zeros = tuple(jnp.zeros_like(x) for x in (q, k, v, beta, gamma))
    d_initial_state, (dq, dk, dv, d_beta, d_gamma) = lax.fori_loop(
        0, num_chunks, body, (d_final_state, zeros)
    )
    return dq, dk, dv, d_beta, d_gamma, d_initial_state


def _chunk_slices(chunk_size, index, arrays):
    """The index-th chunk of each [B, T, ...] array (None stays None)."""
    return [
        None if x is None else lax.dynamic_slice_in_dim(x, index * chunk_size, chunk_size, axis=1)
        for x in arrays
    ]


_delta_rule = chunked.differentiable(_forward, _backward)
