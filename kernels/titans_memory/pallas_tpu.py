"""The Titans memory for TPU in Pallas (Mosaic): the chunked forward kernel.

Layout inside the kernel is heads-major, q/k [B,H,T',Dk], v/y [B,H,T',Dv], per-token
values as columns [B,H,T',1]: every block's last two dims are a (chunk, dim) tile or
full dims. Grid (B, H, chunk), the chunk axis "arbitrary" (sequential): the carry
(A, W, S) of every layer lives in VMEM scratch from chunk to chunk, and each step runs
one chunk's dual form (`chunked.chunk_forward`). Memory depths 1 and 2.

Backward: a jax.custom_vjp whose backward is the VJP of the XLA form
(`xla.run_chunks`), which recomputes the forward in checkpointed groups of chunks; the
kernel itself keeps no residuals.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.titans_memory import chunked, xla

_COMPILER_PARAMS = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def titans_memory(q, k, v, lr, log_momentum, log_retain, state, *, chunk_size, activation, aligned, interpret=False):
    """q, k [B,T,H,Dk], v [B,T,H,Dv], lr [B,T,H], log_momentum and log_retain [B,T,H]
    float32 or None, state a float32 TitansMemoryState of depth 1 or 2; chunk_size a
    power of two -> (y [B,T,H,Dv] in v's dtype, final state).

    interpret: run the kernel in the Pallas interpreter (CPU).
    """
    xla.check_pallas_arguments(chunk_size, state, "TPU")
    return xla.run_placed(
        _run, q, k, v, lr, log_momentum, log_retain, state, chunk_size=chunk_size, activation=activation,
        aligned=aligned, interpret=interpret,
    )


def _heads_major(x):
    """[B,T,H,D] -> [B,H,T,D]; per-token [B,T,H] -> columns [B,H,T,1]."""
    x = jnp.swapaxes(x, 1, 2)
    return x if x.ndim == 4 else x[..., None]


def _kernel(*refs, config, depth, num_token_inputs):
    token_refs = refs[:num_token_inputs]
    carry_refs = refs[num_token_inputs : num_token_inputs + 3 * depth]
    y_ref = refs[num_token_inputs + 3 * depth]
    final_refs = refs[num_token_inputs + 3 * depth + 1 : num_token_inputs + 6 * depth + 1]
    scratch_refs = refs[num_token_inputs + 6 * depth + 1 :]
    chunk_index = pl.program_id(2)

    @pl.when(chunk_index == 0)
    def _start():
        for scratch_ref, carry_ref in zip(scratch_refs, carry_refs):
            scratch_ref[...] = carry_ref[...]

    chunk = chunked.split_chunk_values([ref[...] for ref in token_refs], config.has_momentum)
    carry = chunked.unflatten_carry([ref[...] for ref in scratch_refs], depth)
    y, carry = chunked.chunk_forward(carry, *chunk, activation=config.activation)
    y_ref[...] = y
    new_values = chunked.flatten_carry(carry)
    for scratch_ref, value in zip(scratch_refs, new_values):
        scratch_ref[...] = value

    @pl.when(chunk_index == pl.num_programs(2) - 1)
    def _finish():
        for final_ref, value in zip(final_refs, new_values):
            final_ref[...] = value


def _forward(config: chunked.ChunkConfig, placed: chunked.PlacedInputs, carry):
    """placed [B,T',H,...], carry (A, W, S) tuples of [B,H,din,dout] float32 ->
    (y [B,T',H,Dv] float32, carry after the last chunk)."""
    batch, padded_len, heads, _ = placed.q.shape
    value_dim = placed.v.shape[-1]
    c = config.chunk_size
    depth = len(carry[0])
    token_inputs = [_heads_major(x) for x in chunked.kernel_token_inputs(placed)]
    token_spec = lambda dim: pl.BlockSpec((None, None, c, dim), lambda b, h, n: (b, h, n, 0))
    carry_arrays = chunked.flatten_carry(carry)
    carry_spec = lambda x: pl.BlockSpec((None, None, *x.shape[2:]), lambda b, h, n: (b, h, 0, 0))
    outputs = pl.pallas_call(
        functools.partial(_kernel, config=config, depth=depth, num_token_inputs=len(token_inputs)),
        grid=(batch, heads, padded_len // c),
        in_specs=[token_spec(x.shape[-1]) for x in token_inputs] + [carry_spec(x) for x in carry_arrays],
        out_specs=[token_spec(value_dim)] + [carry_spec(x) for x in carry_arrays],
        out_shape=[jax.ShapeDtypeStruct((batch, heads, padded_len, value_dim), jnp.float32)]
        + [jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in carry_arrays],
        scratch_shapes=[pltpu.VMEM(x.shape[2:], jnp.float32) for x in carry_arrays],
        compiler_params=_COMPILER_PARAMS,
        interpret=config.interpret,
    )(*token_inputs, *carry_arrays)
    return jnp.swapaxes(outputs[0], 1, 2), chunked.unflatten_carry(outputs[1:], depth)


_run = xla.with_xla_gradient(_forward)
