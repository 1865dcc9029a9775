"""The gated delta rule for TPU in Pallas (Mosaic): chunked forward and backward kernels.

Layout inside the kernels is heads-major, q/k [B,H,T,Dk] and v/y [B,H,T,Dv]; per-token
values (beta, cumulative log decay, segment counter) come twice, as columns [..., T, 1]
and as rows [..., T/C, 1, C], so that every block's last two dims are either full dims
or (chunk, head_dim) tiles: legal Mosaic blocks without in-kernel transposes.

Forward: grid (B, H, chunk), the chunk axis "arbitrary" (sequential): the state is
carried in VMEM scratch from chunk to chunk; each step runs one chunk's WY form (see
`chunked.chunk_forward`). For the gradient the forward also writes the state before
every chunk, [B, H, T/C, Dk, Dv] float32: O(T/C * Dk * Dv) memory, no other residuals.

Backward: grid (B, H, chunk) with the chunks visited last to first; dL/dS is carried in
VMEM scratch, and each step recomputes its chunk's WY factors from the stored state and
applies `chunked.chunk_backward`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.delta_rule import chunked


def delta_rule(q, k, v, beta, *, log_decay, segment_starts, initial_state, chunk_size, interpret=False):
    """q, k [B,T,H,Dk], v [B,T,H,Dv], beta and log_decay [B,T,H], segment_starts bool
    [B,T] or None, initial_state [B,H,Dk,Dv] float32; chunk_size a power of two >= 16 ->
    (y [B,T,H,Dv] in v's dtype, final state [B,H,Dk,Dv] float32).

    interpret: run the kernels in the Pallas interpreter (CPU).
    """
    chunked.check_chunk_size(chunk_size, "TPU")
    seq_len = q.shape[1]
    inputs = chunked.prepare_inputs(chunk_size, q, k, v, beta, log_decay, segment_starts)
    config = chunked.KernelConfig(chunk_size, inputs.segment_counter is not None, interpret)
    y, final_state = _delta_rule(config, *inputs, initial_state.astype(jnp.float32))
    return y[:, :seq_len], final_state


# --- layouts -------------------------------------------------------------------------


def _heads_major(x):
    """[B,T,H,D] -> [B,H,T,D]."""
    return x.transpose(0, 2, 1, 3)


def _token_columns(x):
    """Per-token values [B,T,H] -> [B,H,T,1]."""
    return x.transpose(0, 2, 1)[..., None]


def _token_rows(x, chunk_size):
    """Per-token values [B,T,H] -> [B,H,T/C,1,C]."""
    batch, padded_len, heads = x.shape
    return x.transpose(0, 2, 1).reshape(batch, heads, padded_len // chunk_size, 1, chunk_size)


def _kernel_inputs(config, q, k, v, beta, gamma, segment_counter):
    """The per-chunk input arrays in kernel layout, in the order of `_chunk_specs`."""
    c = config.chunk_size
    arrays = [
        _heads_major(q),
        _heads_major(k),
        _heads_major(v),
        _token_columns(beta),
        _token_rows(beta, c),
        _token_columns(gamma),
        _token_rows(gamma, c),
    ]
    if config.has_segments:
        batch, padded_len = segment_counter.shape
        arrays.append(segment_counter[..., None])
        arrays.append(segment_counter.reshape(batch, padded_len // c, 1, c))
    return arrays


def _chunk_specs(config, q, v, chunk):
    """BlockSpecs matching `_kernel_inputs`, on grid (b, h, n), reading chunk(n)."""
    c, key_dim, value_dim = config.chunk_size, q.shape[-1], v.shape[-1]
    specs = [
        pl.BlockSpec((None, None, c, key_dim), lambda b, h, n: (b, h, chunk(n), 0)),
        pl.BlockSpec((None, None, c, key_dim), lambda b, h, n: (b, h, chunk(n), 0)),
        pl.BlockSpec((None, None, c, value_dim), lambda b, h, n: (b, h, chunk(n), 0)),
    ]
    column = pl.BlockSpec((None, None, c, 1), lambda b, h, n: (b, h, chunk(n), 0))
    row = pl.BlockSpec((None, None, None, 1, c), lambda b, h, n: (b, h, chunk(n), 0, 0))
    specs += [column, row, column, row]
    if config.has_segments:
        specs.append(pl.BlockSpec((None, c, 1), lambda b, h, n: (b, chunk(n), 0)))
        specs.append(pl.BlockSpec((None, None, 1, c), lambda b, h, n: (b, chunk(n), 0, 0)))
    return specs


def _load_chunk(config, refs):
    """Read the per-chunk input refs -> (q, k, v, beta col, beta row, decays), float32."""
    q_ref, k_ref, v_ref, beta_col_ref, beta_row_ref, gamma_col_ref, gamma_row_ref, *segment_refs = refs
    if config.has_segments:
        segment_col, segment_row = (ref[...] for ref in segment_refs)
    else:
        segment_col = segment_row = None
    decays = chunked.chunk_decays(gamma_col_ref[...], gamma_row_ref[...], segment_col, segment_row)
    f32 = lambda ref: ref[...].astype(jnp.float32)
    return f32(q_ref), f32(k_ref), f32(v_ref), beta_col_ref[...], beta_row_ref[...], decays


def _num_chunk_inputs(config):
    return 9 if config.has_segments else 7


_COMPILER_PARAMS = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


# --- forward -------------------------------------------------------------------------


def _forward_kernel(*refs, config, keep_states):
    chunk_refs = refs[: _num_chunk_inputs(config)]
    initial_state_ref, y_ref, final_state_ref, *rest = refs[_num_chunk_inputs(config) :]
    states_ref, state_ref = rest if keep_states else (None, *rest)
    chunk_index = pl.program_id(2)

    @pl.when(chunk_index == 0)
    def _start():
        state_ref[...] = initial_state_ref[...]

    state = state_ref[...]
    if keep_states:
        states_ref[...] = state
    q, k, v, beta_col, beta_row, decays = _load_chunk(config, chunk_refs)
    y, state = chunked.chunk_forward(state, q, k, v, beta_col, beta_row, decays)
    y_ref[...] = y.astype(y_ref.dtype)
    state_ref[...] = state

    @pl.when(chunk_index == pl.num_programs(2) - 1)
    def _finish():
        final_state_ref[...] = state


def _forward(config, q, k, v, beta, gamma, segment_counter, initial_state, *, keep_states):
    """-> (y [B,T',H,Dv], final state, states before each chunk [B,H,N,Dk,Dv] or None)."""
    batch, padded_len, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    num_chunks = padded_len // config.chunk_size
    state_spec = pl.BlockSpec((None, None, key_dim, value_dim), lambda b, h, n: (b, h, 0, 0))
    out_shape = [
        jax.ShapeDtypeStruct((batch, heads, padded_len, value_dim), v.dtype),
        jax.ShapeDtypeStruct((batch, heads, key_dim, value_dim), jnp.float32),
    ]
    out_specs = [
        pl.BlockSpec((None, None, config.chunk_size, value_dim), lambda b, h, n: (b, h, n, 0)),
        state_spec,
    ]
    if keep_states:
        out_shape.append(jax.ShapeDtypeStruct((batch, heads, num_chunks, key_dim, value_dim), jnp.float32))
        out_specs.append(pl.BlockSpec((None, None, None, key_dim, value_dim), lambda b, h, n: (b, h, n, 0, 0)))
    outputs = pl.pallas_call(
        functools.partial(_forward_kernel, config=config, keep_states=keep_states),
        grid=(batch, heads, num_chunks),
        in_specs=[*_chunk_specs(config, q, v, lambda n: n), state_spec],
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((key_dim, value_dim), jnp.float32)],
        compiler_params=_COMPILER_PARAMS,
        interpret=config.interpret,
    )(*_kernel_inputs(config, q, k, v, beta, gamma, segment_counter), initial_state)
    y, final_state = outputs[0].transpose(0, 2, 1, 3), outputs[1]
    return y, final_state, (outputs[2] if keep_states else None)


# --- backward ------------------------------------------------------------------------


def _backward_kernel(*refs, config):
    chunk_refs = refs[: _num_chunk_inputs(config)]
    (
        states_ref,
        dy_ref,
        d_final_state_ref,
        dq_ref,
        dk_ref,
        dv_ref,
        d_beta_ref,
        d_gamma_col_ref,
        d_gamma_row_ref,
        d_initial_state_ref,
        d_state_ref,
    ) = refs[_num_chunk_inputs(config) :]
    step = pl.program_id(2)

    @pl.when(step == 0)
    def _start():
        d_state_ref[...] = d_final_state_ref[...]

    q, k, v, beta_col, beta_row, decays = _load_chunk(config, chunk_refs)
    grads = chunked.chunk_backward(
        states_ref[...], d_state_ref[...], dy_ref[...].astype(jnp.float32), q, k, v, beta_col, beta_row, decays
    )
    dq_ref[...] = grads.q.astype(dq_ref.dtype)
    dk_ref[...] = grads.k.astype(dk_ref.dtype)
    dv_ref[...] = grads.v.astype(dv_ref.dtype)
    d_beta_ref[...] = grads.beta
    d_gamma_col_ref[...] = grads.gamma_col
    d_gamma_row_ref[...] = grads.gamma_row
    d_state_ref[...] = grads.state

    @pl.when(step == pl.num_programs(2) - 1)
    def _finish():
        d_initial_state_ref[...] = grads.state


def _backward(config, q, k, v, beta, gamma, segment_counter, states, dy, d_final_state):
    """-> (dq, dk, dv, dbeta, dgamma, d initial state); per-token grads [B,T',H] float32."""
    batch, padded_len, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    c = config.chunk_size
    num_chunks = padded_len // c

    def reversed_chunk(n):
        return num_chunks - 1 - n

    state_spec = pl.BlockSpec((None, None, key_dim, value_dim), lambda b, h, n: (b, h, 0, 0))
    per_chunk = lambda dim: pl.BlockSpec((None, None, c, dim), lambda b, h, n: (b, h, reversed_chunk(n), 0))
    column = pl.BlockSpec((None, None, c, 1), lambda b, h, n: (b, h, reversed_chunk(n), 0))
    row = pl.BlockSpec((None, None, None, 1, c), lambda b, h, n: (b, h, reversed_chunk(n), 0, 0))
    heads_major = lambda dim, dtype: jax.ShapeDtypeStruct((batch, heads, padded_len, dim), dtype)
    dq, dk, dv, d_beta, d_gamma_col, d_gamma_row, d_initial_state = pl.pallas_call(
        functools.partial(_backward_kernel, config=config),
        grid=(batch, heads, num_chunks),
        in_specs=[
            *_chunk_specs(config, q, v, reversed_chunk),
            pl.BlockSpec(
                (None, None, None, key_dim, value_dim), lambda b, h, n: (b, h, reversed_chunk(n), 0, 0)
            ),
            per_chunk(value_dim),
            state_spec,
        ],
        out_specs=[per_chunk(key_dim), per_chunk(key_dim), per_chunk(value_dim), column, column, row, state_spec],
        out_shape=[
            heads_major(key_dim, q.dtype),
            heads_major(key_dim, k.dtype),
            heads_major(value_dim, v.dtype),
            heads_major(1, jnp.float32),
            heads_major(1, jnp.float32),
            jax.ShapeDtypeStruct((batch, heads, num_chunks, 1, c), jnp.float32),
            jax.ShapeDtypeStruct((batch, heads, key_dim, value_dim), jnp.float32),
        ],
        scratch_shapes=[pltpu.VMEM((key_dim, value_dim), jnp.float32)],
        compiler_params=_COMPILER_PARAMS,
        interpret=config.interpret,
    )(
        *_kernel_inputs(config, q, k, v, beta, gamma, segment_counter),
        states,
        _heads_major(dy),
        d_final_state,
    )
    token_major = lambda x: x.reshape(batch, heads, padded_len).transpose(0, 2, 1)
    return (
        _heads_major(dq),
        _heads_major(dk),
        _heads_major(dv),
        token_major(d_beta),
        token_major(d_gamma_col) + token_major(d_gamma_row),
        d_initial_state,
    )


_delta_rule = chunked.differentiable(_forward, _backward)
