"""The Titans memory for GPU in Pallas (Triton lowering): the chunked forward kernel.

One program per (batch, head), grid (B, H), walks the chunks with a loop and keeps the
carry (A, W, S) of every layer in loop carries (registers); blocks are read straight
from the [B, T', H, D] inputs. Each chunk runs the same dual form as the TPU kernel
(`chunked.chunk_forward`). Memory depths 1 and 2.

Backward: a jax.custom_vjp whose backward is the VJP of the XLA form
(`xla.run_chunks`), which recomputes the forward in checkpointed groups of chunks; the
kernel itself keeps no residuals.

Triton's tl.dot wants power-of-two tiles of at least 16: compiled (not interpreted),
chunk_size and every layer width must be powers of two >= 16.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels.titans_memory import chunked, xla

_NUM_WARPS = 4


def titans_memory(q, k, v, lr, log_momentum, log_retain, state, *, chunk_size, activation, aligned, interpret=False):
    """q, k [B,T,H,Dk], v [B,T,H,Dv], lr [B,T,H], log_momentum and log_retain [B,T,H]
    float32 or None, state a float32 TitansMemoryState of depth 1 or 2; chunk_size a
    power of two (>= 16 compiled) -> (y [B,T,H,Dv] in v's dtype, final state).

    interpret: run the kernel in the Pallas interpreter (CPU).
    """
    xla.check_pallas_arguments(chunk_size, state, "GPU")
    if not interpret:
        widths = {"chunk_size": chunk_size}
        widths.update({f"weights[{i}] {side}": w.shape[j] for i, w in enumerate(state.weights)
                       for j, side in ((2, "din"), (3, "dout"))})
        for name, size in widths.items():
            if size < 16 or size & (size - 1):
                raise ValueError(
                    f"titans_memory: the Pallas GPU kernel needs powers of two >= 16 for the chunk "
                    f"size and the memory's layer widths (Triton matmul tiles), got {name} = {size}; "
                    "use implementation='xla'"
                )
    return xla.run_placed(
        _run, q, k, v, lr, log_momentum, log_retain, state, chunk_size=chunk_size, activation=activation,
        aligned=aligned, interpret=interpret,
    )


def _kernel(*refs, config, depth, num_token_inputs):
    token_refs = refs[:num_token_inputs]
    carry_refs = refs[num_token_inputs : num_token_inputs + 3 * depth]
    y_ref = refs[num_token_inputs + 3 * depth]
    final_refs = refs[num_token_inputs + 3 * depth + 1 :]
    c = config.chunk_size
    num_chunks = y_ref.shape[0] // c

    def run_chunk(chunk_index, values):
        tokens = pl.ds(chunk_index * c, c)
        # Per-token values come as [T'] vectors: a chunk of them becomes a column.
        chunk_values = [ref[tokens, :] if i < 3 else ref[tokens][:, None] for i, ref in enumerate(token_refs)]
        chunk = chunked.split_chunk_values(chunk_values, config.has_momentum)
        y, carry = chunked.chunk_forward(chunked.unflatten_carry(values, depth), *chunk, activation=config.activation)
        y_ref[tokens, :] = y
        return tuple(chunked.flatten_carry(carry))

    finals = lax.fori_loop(0, num_chunks, run_chunk, tuple(ref[...] for ref in carry_refs))
    for final_ref, value in zip(final_refs, finals):
        final_ref[...] = value


def _forward(config: chunked.ChunkConfig, placed: chunked.PlacedInputs, carry):
    """placed [B,T',H,...], carry (A, W, S) tuples of [B,H,din,dout] float32 ->
    (y [B,T',H,Dv] float32, carry after the last chunk)."""
    batch, padded_len, heads, _ = placed.q.shape
    value_dim = placed.v.shape[-1]
    depth = len(carry[0])
    token_inputs = chunked.kernel_token_inputs(placed)
    sequence = lambda dim: pl.BlockSpec((None, padded_len, None, dim), lambda b, h: (b, 0, h, 0))
    per_token = pl.BlockSpec((None, padded_len, None), lambda b, h: (b, 0, h))
    token_specs = [sequence(x.shape[-1]) if x.ndim == 4 else per_token for x in token_inputs]
    carry_arrays = chunked.flatten_carry(carry)
    carry_spec = lambda x: pl.BlockSpec((None, None, *x.shape[2:]), lambda b, h: (b, h, 0, 0))
    outputs = pl.pallas_call(
        functools.partial(_kernel, config=config, depth=depth, num_token_inputs=len(token_inputs)),
        grid=(batch, heads),
        in_specs=token_specs + [carry_spec(x) for x in carry_arrays],
        out_specs=[sequence(value_dim)] + [carry_spec(x) for x in carry_arrays],
        out_shape=[jax.ShapeDtypeStruct((batch, padded_len, heads, value_dim), jnp.float32)]
        + [jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in carry_arrays],
        # Chunks depend on each other through the carry: nothing to pipeline.
        compiler_params=pltriton.CompilerParams(num_warps=_NUM_WARPS, num_stages=1),
        interpret=config.interpret,
    )(*token_inputs, *carry_arrays)
    return outputs[0], chunked.unflatten_carry(outputs[1:], depth)


_run = xla.with_xla_gradient(_forward)
