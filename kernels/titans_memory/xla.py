"""The Titans memory in chunks, pure JAX: lax.scan over chunks carrying (A, W, S), the
dual form of `kernels.titans_memory.chunked` inside, vmapped over batch and heads.

A plain scan's autodiff would save the carry of every chunk, (T/C)·|W| floats. Here the
chunks are scanned in about sqrt(T/C) groups of about sqrt(T/C) chunks (`scan_by_groups`):
the forward keeps only the carries at group starts; the backward, group by group from the
last, reruns the group's chunks to get their carries and activations, then pulls the
cotangents back one chunk at a time with the written-out `chunked.chunk_backward`.
O(sqrt(T/C)·|W|) memory; one forward more than a plain scan's autodiff, and about 1.2x
faster than jax.vjp of each chunk, which reruns the chunk's forward a second time. Chunks
added to fill the last group are all padding, exact no-ops.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from kernels._matmul import t_dot_transposing_first
from kernels.titans_memory import chunked


def titans_memory(q, k, v, lr, log_momentum, log_retain, state, *, chunk_size, activation, aligned):
    """q, k [B,T,H,Dk], v [B,T,H,Dv], lr [B,T,H], log_momentum and log_retain [B,T,H]
    float32 or None, state a float32 TitansMemoryState -> (y [B,T,H,Dv] in v's dtype,
    final state). aligned: the state's offset is known to be 0."""
    return run_placed(run_chunks, q, k, v, lr, log_momentum, log_retain, state, chunk_size=chunk_size,
                      activation=activation, aligned=aligned)


def run_placed(run, q, k, v, lr, log_momentum, log_retain, state, *, chunk_size, activation, aligned, interpret=False):
    """Place the tokens on the chunk schedule, run(config, placed inputs, carry) ->
    (y slots, carry), and take the outputs and the final state back. Shared with the
    Pallas kernels."""
    seq_len = q.shape[1]
    placed, front = chunked.place_tokens(
        chunk_size, q, k, v, lr, log_momentum, log_retain, state.offset, aligned=aligned
    )
    config = chunked.ChunkConfig(chunk_size, activation, log_momentum is not None, interpret)
    y, (anchor, weights, momentum) = run(config, placed, (state.anchor, state.weights, state.momentum))
    final_state = type(state)(
        weights, momentum, anchor, chunked.next_offset(state.offset, seq_len, chunk_size)
    )
    return chunked.take_tokens(y, front, seq_len).astype(v.dtype), final_state


def run_chunks(config: chunked.ChunkConfig, placed: chunked.PlacedInputs, carry):
    """placed [B,T',H,...] with T' a multiple of the chunk; carry (A, W, S) tuples of
    [B,H,din,dout] float32 -> (y [B,T',H,Dv] float32, carry after the last chunk)."""
    batch, padded_len, heads, _ = placed.q.shape
    c = config.chunk_size
    num_chunks = padded_len // c
    group = math.isqrt(num_chunks - 1) + 1 if num_chunks > 1 else 1  # ceil(sqrt(N))
    num_groups = -(-num_chunks // group)
    extra_len = (num_groups * group - num_chunks) * c

    def by_group(x):
        """[B,T',H,...] -> [groups, chunks per group, B, C, H, ...], float32."""
        x = jnp.pad(x.astype(jnp.float32), [(0, 0), (0, extra_len)] + [(0, 0)] * (x.ndim - 2))
        x = x.reshape(batch, num_groups, group, c, *x.shape[2:])
        return jnp.moveaxis(x, 0, 2)

    tokens = [placed.q, placed.k, placed.v, placed.theta, placed.log_retain, placed.log_momentum, placed.mask]
    tokens = tuple(None if x is None else by_group(x) for x in tokens)

    column = lambda x: None if x is None else x[:, None]

    def one_head(carry, q, k, v, theta, log_retain, log_momentum, mask):
        return chunked.chunk_pass(
            carry, q, k, v, column(theta), column(log_retain), column(log_momentum), column(mask),
            activation=config.activation, t_dot=t_dot_transposing_first,
        )

    def one_head_backward(carry, q, k, v, theta, log_retain, log_momentum, mask, activations, d_y, d_carry):
        d_carry, *d_tokens = chunked.chunk_backward(
            carry, q, k, v, column(theta), column(log_retain), column(log_momentum), column(mask),
            activations, d_y, d_carry, activation=config.activation, t_dot=t_dot_transposing_first,
        )
        d_q, d_k, d_v, *d_rates = d_tokens
        d_rates = [None if d is None else d[:, 0] for d in d_rates]
        return d_carry, (d_q, d_k, d_v, *d_rates, jnp.zeros_like(mask))

    # Carry [B,H,din,dout]: heads on axis 0 once batch is mapped; tokens [B,C,H,...]: axis 1.
    tokens_axis = (1,) * 7
    per_chunk = jax.vmap(jax.vmap(one_head, in_axes=(0, *tokens_axis), out_axes=(1, 0, 0)))
    per_chunk_backward = jax.vmap(
        jax.vmap(one_head_backward, in_axes=(0, *tokens_axis, 0, 1, 0), out_axes=(0, tokens_axis))
    )

    def chunk_step(carry, chunk):
        y, carry, activations = per_chunk(carry, *chunk)
        return carry, y, activations

    def chunk_step_backward(carry, chunk, activations, d_carry, d_y):
        return per_chunk_backward(carry, *chunk, activations, d_y, d_carry)

    carry, y = scan_by_groups(chunk_step, chunk_step_backward, carry, tokens)
    # [groups, per group, B, C, H, Dv] -> [B, T', H, Dv]
    y = jnp.moveaxis(y, 2, 0).reshape(batch, num_groups * group * c, heads, -1)
    return y[:, :padded_len], carry


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def scan_by_groups(step, step_backward, carry, xs):
    """lax.scan of step(carry, x) -> (carry, y, residuals) over xs [groups, per group, ...]
    -> (final carry, ys [groups, per group, ...]). The backward keeps only the carries at
    group starts; at each group, from the last, it reruns the group's steps to get their
    carries and residuals, then calls step_backward(carry, x, residuals, d_carry_out, d_y)
    -> (d_carry_in, d_x) from the group's last step to its first."""
    return lax.scan(lambda carry, group_xs: lax.scan(_without_residuals(step), carry, group_xs), carry, xs)


def _without_residuals(step):
    def plain_step(carry, x):
        carry, y, _ = step(carry, x)
        return carry, y

    return plain_step


def _scan_by_groups_forward(step, step_backward, carry, xs):
    def group(carry, group_xs):
        final, ys = lax.scan(_without_residuals(step), carry, group_xs)
        return final, (ys, carry)

    final, (ys, group_starts) = lax.scan(group, carry, xs)
    return (final, ys), (group_starts, xs)


def _scan_by_groups_backward(step, step_backward, residuals, cotangents):
    group_starts, xs = residuals
    d_final, d_ys = cotangents

    def group_backward(d_carry, group):
        start, group_xs, group_d_ys = group

        def advance(carry, x):
            next_carry, _, step_residuals = step(carry, x)
            return next_carry, (carry, step_residuals)

        # Each step's carry and residuals: memory per group, not per sequence.
        _, (step_starts, step_residuals) = lax.scan(advance, start, group_xs)

        def backward_step(d_carry, inputs):
            step_start, x, residual, d_y = inputs
            return step_backward(step_start, x, residual, d_carry, d_y)

        return lax.scan(backward_step, d_carry, (step_starts, group_xs, step_residuals, group_d_ys), reverse=True)

    d_start, d_xs = lax.scan(group_backward, d_final, (group_starts, xs, d_ys), reverse=True)
    return d_start, d_xs


scan_by_groups.defvjp(_scan_by_groups_forward, _scan_by_groups_backward)


def with_xla_gradient(kernel_run):
    """kernel_run(config, placed, carry) -> (y, carry), differentiable: its backward is
    the VJP of `run_chunks` (the forward recomputed in XLA, checkpointed by groups)."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def run(config, placed, carry):
        return kernel_run(config, placed, carry)

    def run_forward(config, placed, carry):
        return kernel_run(config, placed, carry), (placed, carry)

    def run_backward(config, residuals, cotangents):
        _, pullback = jax.vjp(functools.partial(run_chunks, config), *residuals)
        return pullback(cotangents)

    run.defvjp(run_forward, run_backward)
    return run


def check_pallas_arguments(chunk_size, state, backend_name):
    """The Pallas kernels cover memory depths 1 and 2 and power-of-two chunks."""
    depth = len(state.weights)
    if depth not in (1, 2):
        raise ValueError(
            f"titans_memory: the Pallas {backend_name} kernels cover memory depth 1 and 2, got depth "
            f"{depth}; use implementation='xla'"
        )
    if chunk_size & (chunk_size - 1):
        raise ValueError(
            f"titans_memory: the Pallas {backend_name} kernels need a power-of-two chunk_size, got "
            f"{chunk_size}; use implementation='xla'"
        )
