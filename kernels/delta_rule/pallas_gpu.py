"""The gated delta rule for GPU in Pallas (Triton lowering): chunked forward and backward.

One program per (batch, head), grid (B, H), walks the chunks with a loop and keeps the
state [Dk, Dv] in registers; blocks are read straight from the [B, T, H, D] inputs
(no transposes). Each chunk runs the same WY-form math as the TPU kernels
(`chunked.chunk_forward` / `chunk_backward`).

For the gradient the forward also writes the state before every chunk,
[B, H, T/C, Dk, Dv] float32 (O(T/C * Dk * Dv) memory); the backward walks the chunks
last to first, carrying dL/dS and recomputing each chunk's WY factors from its state.

Triton's tl.dot wants power-of-two tiles of at least 16: chunk_size, Dk and Dv must be
powers of two >= 16.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels.delta_rule import chunked

_NUM_WARPS = 4


def delta_rule(q, k, v, beta, *, log_decay, segment_starts, initial_state, chunk_size, interpret=False):
    """q, k [B,T,H,Dk], v [B,T,H,Dv], beta and log_decay [B,T,H], segment_starts bool
    [B,T] or None, initial_state [B,H,Dk,Dv] float32 -> (y [B,T,H,Dv] in v's dtype,
    final state [B,H,Dk,Dv] float32).

    interpret: run the kernels in the Pallas interpreter (CPU).
    """
    chunked.check_chunk_size(chunk_size, "GPU")
    for name, dim in (("key", q.shape[-1]), ("value", v.shape[-1])):
        if dim < 16 or dim & (dim - 1):
            raise ValueError(
                f"delta_rule: the Pallas GPU kernels need a {name} head dim that is a power "
                f"of two >= 16 (Triton matmul tiles), got {dim}; use implementation='xla'"
            )
    seq_len = q.shape[1]
    inputs = chunked.prepare_inputs(chunk_size, q, k, v, beta, log_decay, segment_starts)
    config = chunked.KernelConfig(chunk_size, inputs.segment_counter is not None, interpret)
    y, final_state = _delta_rule(config, *inputs, initial_state.astype(jnp.float32))
    return y[:, :seq_len], final_state


def _input_specs(config, q, v):
    """BlockSpecs on grid (b, h): each program sees its head's whole sequence."""
    padded_len, key_dim, value_dim = q.shape[1], q.shape[-1], v.shape[-1]
    sequence = lambda dim: pl.BlockSpec((None, padded_len, None, dim), lambda b, h: (b, 0, h, 0))
    per_token = pl.BlockSpec((None, padded_len, None), lambda b, h: (b, 0, h))
    specs = [sequence(key_dim), sequence(key_dim), sequence(value_dim), per_token, per_token]
    if config.has_segments:
        specs.append(pl.BlockSpec((None, padded_len), lambda b, h: (b, 0)))
    return specs


def _num_inputs(config):
    return 6 if config.has_segments else 5


def _load_chunk(config, refs, chunk_index):
    """One chunk of the input refs -> (q, k, v, beta col, beta row, decays), float32."""
    q_ref, k_ref, v_ref, beta_ref, gamma_ref, *segment_refs = refs
    tokens = pl.ds(chunk_index * config.chunk_size, config.chunk_size)
    f32 = lambda ref: ref[tokens, :].astype(jnp.float32)
    beta, gamma = beta_ref[tokens], gamma_ref[tokens]
    if config.has_segments:
        segment = segment_refs[0][tokens]
        segment_col, segment_row = segment[:, None], segment[None, :]
    else:
        segment_col = segment_row = None
    decays = chunked.chunk_decays(gamma[:, None], gamma[None, :], segment_col, segment_row)
    return f32(q_ref), f32(k_ref), f32(v_ref), beta[:, None], beta[None, :], decays


def _compiler_params():
    # Chunks depend on each other through the carried state: nothing to pipeline.
    return pltriton.CompilerParams(num_warps=_NUM_WARPS, num_stages=1)


# --- forward -------------------------------------------------------------------------


def _forward_kernel(*refs, config, keep_states):
    input_refs = refs[: _num_inputs(config)]
    initial_state_ref, y_ref, final_state_ref, *states_ref = refs[_num_inputs(config) :]
    c = config.chunk_size
    num_chunks = y_ref.shape[0] // c

    def run_chunk(chunk_index, state):
        if keep_states:
            states_ref[0][chunk_index] = state
        q, k, v, beta_col, beta_row, decays = _load_chunk(config, input_refs, chunk_index)
        y, state = chunked.chunk_forward(state, q, k, v, beta_col, beta_row, decays)
        y_ref[pl.ds(chunk_index * c, c), :] = y.astype(y_ref.dtype)
        return state

    final_state_ref[...] = lax.fori_loop(0, num_chunks, run_chunk, initial_state_ref[...])


def _forward(config, q, k, v, beta, gamma, segment_counter, initial_state, *, keep_states):
    """-> (y [B,T',H,Dv], final state, states before each chunk [B,H,N,Dk,Dv] or None)."""
    batch, padded_len, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    num_chunks = padded_len // config.chunk_size
    state_spec = pl.BlockSpec((None, None, key_dim, value_dim), lambda b, h: (b, h, 0, 0))
    out_shape = [
        jax.ShapeDtypeStruct((batch, padded_len, heads, value_dim), v.dtype),
        jax.ShapeDtypeStruct((batch, heads, key_dim, value_dim), jnp.float32),
    ]
    out_specs = [pl.BlockSpec((None, padded_len, None, value_dim), lambda b, h: (b, 0, h, 0)), state_spec]
    if keep_states:
        out_shape.append(jax.ShapeDtypeStruct((batch, heads, num_chunks, key_dim, value_dim), jnp.float32))
        out_specs.append(pl.BlockSpec((None, None, num_chunks, key_dim, value_dim), lambda b, h: (b, h, 0, 0, 0)))
    segment_inputs = [segment_counter] if config.has_segments else []
    outputs = pl.pallas_call(
        functools.partial(_forward_kernel, config=config, keep_states=keep_states),
        grid=(batch, heads),
        in_specs=[*_input_specs(config, q, v), state_spec],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_compiler_params(),
        interpret=config.interpret,
    )(q, k, v, beta, gamma, *segment_inputs, initial_state)
    return outputs[0], outputs[1], (outputs[2] if keep_states else None)


# --- backward ------------------------------------------------------------------------


def _backward_kernel(*refs, config):
    input_refs = refs[: _num_inputs(config)]
    (
        states_ref,
        dy_ref,
        d_final_state_ref,
        dq_ref,
        dk_ref,
        dv_ref,
        d_beta_ref,
        d_gamma_ref,
        d_initial_state_ref,
    ) = refs[_num_inputs(config) :]
    c = config.chunk_size
    num_chunks = dy_ref.shape[0] // c

    def run_chunk(step, d_state):
        chunk_index = num_chunks - 1 - step
        tokens = pl.ds(chunk_index * c, c)
        q, k, v, beta_col, beta_row, decays = _load_chunk(config, input_refs, chunk_index)
        dy = dy_ref[tokens, :].astype(jnp.float32)
        grads = chunked.chunk_backward(
            states_ref[chunk_index], d_state, dy, q, k, v, beta_col, beta_row, decays
        )
        dq_ref[tokens, :] = grads.q.astype(dq_ref.dtype)
        dk_ref[tokens, :] = grads.k.astype(dk_ref.dtype)
        dv_ref[tokens, :] = grads.v.astype(dv_ref.dtype)
        d_beta_ref[tokens] = grads.beta.reshape(c)
        d_gamma_ref[tokens] = grads.gamma_col.reshape(c) + grads.gamma_row.reshape(c)
        return grads.state

    d_initial_state_ref[...] = lax.fori_loop(0, num_chunks, run_chunk, d_final_state_ref[...])


def _backward(config, q, k, v, beta, gamma, segment_counter, states, dy, d_final_state):
    """-> (dq, dk, dv, dbeta, dgamma, d initial state); per-token grads [B,T',H] float32."""
    batch, padded_len, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    num_chunks = padded_len // config.chunk_size
    state_spec = pl.BlockSpec((None, None, key_dim, value_dim), lambda b, h: (b, h, 0, 0))
    sequence = lambda dim: pl.BlockSpec((None, padded_len, None, dim), lambda b, h: (b, 0, h, 0))
    per_token = pl.BlockSpec((None, padded_len, None), lambda b, h: (b, 0, h))
    segment_inputs = [segment_counter] if config.has_segments else []
    return pl.pallas_call(
        functools.partial(_backward_kernel, config=config),
        grid=(batch, heads),
        in_specs=[
            *_input_specs(config, q, v),
            pl.BlockSpec((None, None, num_chunks, key_dim, value_dim), lambda b, h: (b, h, 0, 0, 0)),
            sequence(value_dim),
            state_spec,
        ],
        out_specs=[sequence(key_dim), sequence(key_dim), sequence(value_dim), per_token, per_token, state_spec],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct(k.shape, k.dtype),
            jax.ShapeDtypeStruct(v.shape, v.dtype),
            jax.ShapeDtypeStruct(beta.shape, jnp.float32),
            jax.ShapeDtypeStruct(gamma.shape, jnp.float32),
            jax.ShapeDtypeStruct(d_final_state.shape, jnp.float32),
        ],
        compiler_params=_compiler_params(),
        interpret=config.interpret,
    )(q, k, v, beta, gamma, *segment_inputs, states, dy, d_final_state)


_delta_rule = chunked.differentiable(_forward, _backward)
