"""Flash attention for GPU in Pallas (Triton lowering), FlashAttention-2 style.

Forward and dq: one program per (query block, batch, head) loops over only the key
blocks that can hold a visible key, in four ranges: the prefix blocks and the
window's edge blocks (masked), the blocks every query of the block fully sees (no
mask), and the diagonal blocks (masked). A window of w costs O(T * w). Query
blocks run last-first (the grid's index maps and the kernels agree on that), so the
longest causal rows start first.

dk/dv: one program per (key block, batch, kv head) loops over the query heads
sharing that kv head and over the query blocks that see the key block, in the
same masked / unmasked ranges, and recomputes probabilities from the forward's
log-sum-exp. Scores are kept in base 2 (scaled by log2 e) so exp is exp2.

Decode: split-K (flash decoding). Programs (split, batch x kv head, row block)
each reduce one range of cache blocks to a partial output and log-sum-exp; one
more split attends to the new chunk; the splits are merged outside the kernel.

Arrays stay [B, T, H, D]: sequences are zero-padded to a block multiple and head
dims to a power of two >= 16, as tl.dot needs.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.attention import reference

DEFAULT_BLOCK_Q = 128
DEFAULT_BLOCK_K = 64
DEFAULT_NUM_STAGES = 3
# Backward programs own `major` rows (queries for dq, keys for dk/dv) and step
# through the other side `minor` rows at a time.
DEFAULT_BACKWARD_BLOCK_MAJOR = 128
DEFAULT_BACKWARD_BLOCK_MINOR = 32
DEFAULT_BACKWARD_NUM_STAGES = 2
DEFAULT_DECODE_BLOCK_K = 128
DEFAULT_DECODE_BLOCK_ROWS = 64
_DECODE_PROGRAMS = 256
_MIN_DOT_SIZE = 16
_LOG2_E = math.log2(math.e)
# Finite, so a row whose first visited block is fully masked gets exp2(0) garbage that
# its first visible key rescales by exp2(_MASKED - real max) = 0, instead of NaN from inf - inf.
_MASKED = -0.7 * float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class _Config:
    """Compile-time settings of one kernel; block_q / block_k are that kernel's blocks."""

    window: int | None
    prefix: int
    scale: float
    block_q: int
    block_k: int
    heads_per_kv_head: int
    has_segments: bool
    num_warps: int
    num_stages: int
    interpret: bool


def attention(
    q,
    k,
    v,
    *,
    window,
    prefix,
    segment_ids,
    scale,
    block_q: int = DEFAULT_BLOCK_Q,
    block_k: int = DEFAULT_BLOCK_K,
    num_warps: int | None = None,
    num_stages: int = DEFAULT_NUM_STAGES,
    backward_block_major: int = DEFAULT_BACKWARD_BLOCK_MAJOR,
    backward_block_minor: int = DEFAULT_BACKWARD_BLOCK_MINOR,
    backward_num_warps: int | None = None,
    backward_num_stages: int = DEFAULT_BACKWARD_NUM_STAGES,
    interpret: bool = False,
):
    """q [B,T,H,D], k/v [B,T,K,D] -> o [B,T,H,D]; see `kernels.attention` for the mask rule.

    Blocks are powers of two >= 16. num_warps defaults to 4 for head_dim <= 64, else 8.
    interpret: run the kernels in the Pallas interpreter.
    """
    _, seq_len, heads, head_dim = q.shape
    blocks = (block_q, block_k, backward_block_major, backward_block_minor)
    for name, block in zip(("block_q", "block_k", "backward_block_major", "backward_block_minor"), blocks):
        _check_power_of_two(name, block)
    # Short sequences shrink every block to the sequence's power of two.
    short = _next_power_of_two(max(seq_len, _MIN_DOT_SIZE))
    block_q, block_k, backward_block_major, backward_block_minor = (min(b, short) for b in blocks)
    padded_len = _round_up(seq_len, max(block_q, block_k, backward_block_major, backward_block_minor))
    padded_dim = _next_power_of_two(max(head_dim, _MIN_DOT_SIZE))
    default_warps = 4 if padded_dim <= 64 else 8
    forward_config = _Config(
        window=window,
        prefix=prefix,
        scale=float(scale),
        block_q=block_q,
        block_k=block_k,
        heads_per_kv_head=heads // k.shape[2],
        has_segments=segment_ids is not None,
        num_warps=num_warps or default_warps,
        num_stages=num_stages,
        interpret=interpret,
    )
    dq_config = dataclasses.replace(
        forward_config,
        block_q=backward_block_major,
        block_k=backward_block_minor,
        num_warps=backward_num_warps or default_warps,
        num_stages=backward_num_stages,
    )
    dkv_config = dataclasses.replace(dq_config, block_q=backward_block_minor, block_k=backward_block_major)
    if segment_ids is not None:
        # Padding tokens get segment 0; they are only ever seen by padding queries.
        segment_ids = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, padded_len - seq_len)))

    def pad(x):
        return jnp.pad(x, ((0, 0), (0, padded_len - seq_len), (0, 0), (0, padded_dim - head_dim)))

    o = _flash_attention((forward_config, dq_config, dkv_config), pad(q), pad(k), pad(v), segment_ids)
    return o[:, :seq_len, :, :head_dim]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash_attention(configs, q, k, v, segment_ids):
    o, _ = _forward(configs[0], q, k, v, segment_ids)
    return o


def _flash_attention_forward(configs, q, k, v, segment_ids):
    o, lse2 = _forward(configs[0], q, k, v, segment_ids)
    return o, (q, k, v, segment_ids, o, lse2)


def _flash_attention_backward(configs, residuals, do):
    _, dq_config, dkv_config = configs
    q, k, v, segment_ids, o, lse2 = residuals
    # delta_i = sum_j p_ij dp_ij = do_i . o_i, the softmax backward's row correction.
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1).transpose(0, 2, 1)
    dq = _backward_dq(dq_config, q, k, v, do, lse2, delta, segment_ids)
    dk, dv = _backward_dkv(dkv_config, q, k, v, do, lse2, delta, segment_ids)
    return dq, dk, dv, None


_flash_attention.defvjp(_flash_attention_forward, _flash_attention_backward)


# --- block ranges ----------------------------------------------------------------


def _key_block_ranges(config, q_block):
    """Key blocks for one query block, as (prefix_stop, window_start, full_start, full_stop, stop).

    Masked: [0, prefix_stop) and [window_start, full_start) and [full_stop, stop);
    unmasked (every pair visible): [full_start, full_stop). Together they are exactly
    the key blocks holding a key some query of the block sees.
    """
    bq, bk = config.block_q, config.block_k
    first_query = q_block * bq
    last_query = first_query + bq - 1
    stop = lax.div(last_query, bk) + 1
    # Causal: a block is fully visible when its last key is at or before the first query.
    full_stop = jnp.minimum(lax.div(first_query + 1, bk), stop)
    if config.window is None:
        prefix_stop = window_start = full_start = 0
    else:
        prefix_stop = jnp.minimum(pl.cdiv(config.prefix, bk), stop)
        window_start = jnp.maximum(lax.div(jnp.maximum(first_query - config.window + 1, 0), bk), prefix_stop)
        # Window: fully visible when the last query is less than `window` after the first key.
        full_start = pl.cdiv(jnp.maximum(last_query - config.window + 1, 0), bk)
        full_start = jnp.maximum(full_start, window_start)
        full_stop = jnp.maximum(full_stop, full_start)
    return prefix_stop, window_start, full_start, full_stop, stop


def _query_block_ranges(config, key_block, num_q_blocks):
    """Query blocks that see one key block, as (start, full_start, full_stop, stop).

    Masked: [start, full_start) and [full_stop, stop); unmasked: [full_start, full_stop).
    """
    bq, bk = config.block_q, config.block_k
    first_key = key_block * bk
    last_key = first_key + bk - 1
    start = lax.div(first_key, bq)
    # Causal: fully visible once the first query of the block is at or after the last key.
    full_start = jnp.minimum(pl.cdiv(last_key, bq), num_q_blocks)
    if config.window is None:
        return start, full_start, num_q_blocks, num_q_blocks
    # Keys of the prefix stay visible to every later query.
    in_prefix = first_key < config.prefix
    window_stop = jnp.minimum(lax.div(last_key + config.window - 1, bq) + 1, num_q_blocks)
    stop = jnp.where(in_prefix, num_q_blocks, window_stop)
    full_stop = pl.cdiv(jnp.maximum(config.window + first_key - bq + 1, 0), bq)
    full_stop = jnp.where(last_key < config.prefix, num_q_blocks, jnp.minimum(full_stop, stop))
    full_stop = jnp.maximum(full_stop, full_start)
    return start, full_start, full_stop, stop


def _visibility(config, query_pos, key_pos, segment_q=None, segment_k=None):
    """Boolean mask from positions (and segment ids) already shaped to broadcast together."""
    visible = reference._visible(query_pos, key_pos, config.window, config.prefix)
    if segment_q is not None:
        visible &= segment_q == segment_k
    return visible


def _masked_scores(config, scores, masked, query_pos, key_pos, segment_q, segment_k):
    """Scores with invisible pairs set to _MASKED; a tile known fully visible skips the mask.

    Positions and segment ids (None without segments) come shaped to broadcast to `scores`.
    """
    if not (masked or config.has_segments):
        return scores
    return jnp.where(_visibility(config, query_pos, key_pos, segment_q, segment_k), scores, _MASKED)


# --- forward ---------------------------------------------------------------------


def _forward(config, q, k, v, segment_ids):
    """-> (o [B,T,H,D] in q's dtype, base-2 log-sum-exp [B,H,T] float32)."""
    batch, padded_len, heads, head_dim = q.shape
    num_q_blocks = padded_len // config.block_q
    group = config.heads_per_kv_head
    # Query blocks run last-first, so the longest causal rows start first.
    query_spec = pl.BlockSpec((None, config.block_q, None, head_dim), lambda i, b, h: (b, num_q_blocks - 1 - i, h, 0))
    key_spec = pl.BlockSpec((None, padded_len, None, head_dim), lambda i, b, h: (b, 0, lax.div(h, group), 0))
    in_specs = [query_spec, key_spec, key_spec]
    inputs = [q, k, v]
    if config.has_segments:
        in_specs.append(pl.BlockSpec((None, padded_len), lambda i, b, h: (b, 0)))
        inputs.append(segment_ids)
    return pl.pallas_call(
        functools.partial(_forward_kernel, config=config),
        grid=(num_q_blocks, batch, heads),
        in_specs=in_specs,
        out_specs=[
            query_spec,
            pl.BlockSpec((None, None, config.block_q), lambda i, b, h: (b, h, num_q_blocks - 1 - i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((batch, heads, padded_len), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=config.interpret,
        name="flash_attention_forward",
    )(*inputs)


def _forward_kernel(q_ref, k_ref, v_ref, *refs, config):
    if config.has_segments:
        segment_ref, o_ref, lse_ref = refs
    else:
        segment_ref = None
        o_ref, lse_ref = refs
    bq, bk = config.block_q, config.block_k
    q_block = pl.num_programs(0) - 1 - pl.program_id(0)
    first_query = q_block * bq
    q = q_ref[...]
    query_pos = first_query + jnp.arange(bq)
    segment_q = None if segment_ref is None else segment_ref[pl.ds(first_query, bq)]

    def visit(masked):
        def body(key_block, carry):
            acc, row_max, row_sum = carry
            first_key = pl.multiple_of(key_block * bk, bk)
            keys = k_ref[pl.ds(first_key, bk), :]
            values = v_ref[pl.ds(first_key, bk), :]
            scores = plgpu.dot(q, keys, trans_b=True) * (config.scale * _LOG2_E)
            key_pos = first_key + jnp.arange(bk)
            segments = (None, None)
            if segment_ref is not None:
                segments = (segment_q[:, None], segment_ref[pl.ds(first_key, bk)][None, :])
            scores = _masked_scores(config, scores, masked, query_pos[:, None], key_pos[None, :], *segments)
            new_max = jnp.maximum(row_max, scores.max(axis=1))
            correction = jnp.exp2(row_max - new_max)
            probabilities = jnp.exp2(scores - new_max[:, None])
            row_sum = row_sum * correction + probabilities.sum(axis=1)
            acc = acc * correction[:, None] + plgpu.dot(probabilities.astype(values.dtype), values)
            return acc, new_max, row_sum

        return body

    prefix_stop, window_start, full_start, full_stop, stop = _key_block_ranges(config, q_block)
    carry = (
        jnp.zeros((bq, q.shape[1]), jnp.float32),
        jnp.full((bq,), _MASKED, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
    )
    carry = lax.fori_loop(0, prefix_stop, visit(masked=True), carry)
    carry = lax.fori_loop(window_start, full_start, visit(masked=True), carry)
    carry = lax.fori_loop(full_start, full_stop, visit(masked=False), carry)
    acc, row_max, row_sum = lax.fori_loop(full_stop, stop, visit(masked=True), carry)
    # Every query sees itself, and its own key block is always visited: row_sum >= 1.
    o_ref[...] = (acc / row_sum[:, None]).astype(o_ref.dtype)
    lse_ref[...] = row_max + jnp.log2(row_sum)


# --- backward --------------------------------------------------------------------


def _backward_dq(config, q, k, v, do, lse2, delta, segment_ids):
    batch, padded_len, heads, head_dim = q.shape
    num_q_blocks = padded_len // config.block_q
    group = config.heads_per_kv_head
    # Query blocks run last-first, so the longest causal rows start first.
    query_spec = pl.BlockSpec((None, config.block_q, None, head_dim), lambda i, b, h: (b, num_q_blocks - 1 - i, h, 0))
    key_spec = pl.BlockSpec((None, padded_len, None, head_dim), lambda i, b, h: (b, 0, lax.div(h, group), 0))
    row_spec = pl.BlockSpec((None, None, config.block_q), lambda i, b, h: (b, h, num_q_blocks - 1 - i))
    in_specs = [query_spec, key_spec, key_spec, query_spec, row_spec, row_spec]
    inputs = [q, k, v, do, lse2, delta]
    if config.has_segments:
        in_specs.append(pl.BlockSpec((None, padded_len), lambda i, b, h: (b, 0)))
        inputs.append(segment_ids)
    return pl.pallas_call(
        functools.partial(_dq_kernel, config=config),
        grid=(num_q_blocks, batch, heads),
        in_specs=in_specs,
        out_specs=query_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=config.interpret,
        name="flash_attention_backward_dq",
    )(*inputs)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, config):
    if config.has_segments:
        segment_ref, dq_ref = refs
    else:
        segment_ref = None
        (dq_ref,) = refs
    bq, bk = config.block_q, config.block_k
    q_block = pl.num_programs(0) - 1 - pl.program_id(0)
    first_query = q_block * bq
    q, do = q_ref[...], do_ref[...]
    lse2, delta = lse_ref[...], delta_ref[...]
    query_pos = first_query + jnp.arange(bq)
    segment_q = None if segment_ref is None else segment_ref[pl.ds(first_query, bq)]

    def visit(masked):
        def body(key_block, dq):
            first_key = pl.multiple_of(key_block * bk, bk)
            keys = k_ref[pl.ds(first_key, bk), :]
            values = v_ref[pl.ds(first_key, bk), :]
            scores = plgpu.dot(q, keys, trans_b=True) * (config.scale * _LOG2_E)
            key_pos = first_key + jnp.arange(bk)
            segments = (None, None)
            if segment_ref is not None:
                segments = (segment_q[:, None], segment_ref[pl.ds(first_key, bk)][None, :])
            scores = _masked_scores(config, scores, masked, query_pos[:, None], key_pos[None, :], *segments)
            probabilities = jnp.exp2(scores - lse2[:, None])
            dprobabilities = plgpu.dot(do, values, trans_b=True)
            dscores = probabilities * (dprobabilities - delta[:, None])
            return dq + plgpu.dot(dscores.astype(keys.dtype), keys)

        return body

    prefix_stop, window_start, full_start, full_stop, stop = _key_block_ranges(config, q_block)
    dq = jnp.zeros(q.shape, jnp.float32)
    dq = lax.fori_loop(0, prefix_stop, visit(masked=True), dq)
    dq = lax.fori_loop(window_start, full_start, visit(masked=True), dq)
    dq = lax.fori_loop(full_start, full_stop, visit(masked=False), dq)
    dq = lax.fori_loop(full_stop, stop, visit(masked=True), dq)
    dq_ref[...] = (dq * config.scale).astype(dq_ref.dtype)


def _backward_dkv(config, q, k, v, do, lse2, delta, segment_ids):
    batch, padded_len, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    group = config.heads_per_kv_head
    # Every query head of the kv head's group, whole sequences.
    group_spec = pl.BlockSpec((None, padded_len, group, head_dim), lambda j, b, kv_head: (b, 0, kv_head, 0))
    group_row_spec = pl.BlockSpec((None, group, padded_len), lambda j, b, kv_head: (b, kv_head, 0))
    key_spec = pl.BlockSpec((None, config.block_k, None, head_dim), lambda j, b, kv_head: (b, j, kv_head, 0))
    in_specs = [group_spec, key_spec, key_spec, group_spec, group_row_spec, group_row_spec]
    inputs = [q, k, v, do, lse2, delta]
    if config.has_segments:
        in_specs.append(pl.BlockSpec((None, padded_len), lambda j, b, kv_head: (b, 0)))
        inputs.append(segment_ids)
    return pl.pallas_call(
        functools.partial(_dkv_kernel, config=config, num_q_blocks=padded_len // config.block_q),
        grid=(padded_len // config.block_k, batch, kv_heads),
        in_specs=in_specs,
        out_specs=[key_spec, key_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=config.interpret,
        name="flash_attention_backward_dkv",
    )(*inputs)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, config, num_q_blocks):
    if config.has_segments:
        segment_ref, dk_ref, dv_ref = refs
    else:
        segment_ref = None
        dk_ref, dv_ref = refs
    bq, bk = config.block_q, config.block_k
    key_block = pl.program_id(0)
    first_key = key_block * bk
    keys, values = k_ref[...], v_ref[...]
    key_pos = first_key + jnp.arange(bk)
    segment_k = None if segment_ref is None else segment_ref[pl.ds(first_key, bk)]

    def visit(group_head, masked):
        # Key-major tiles [block_k, block_q], as in FlashAttention-2's dk/dv loop.
        def body(q_block, carry):
            dk, dv = carry
            first_query = pl.multiple_of(q_block * bq, bq)
            q = q_ref[pl.ds(first_query, bq), group_head, :]
            do = do_ref[pl.ds(first_query, bq), group_head, :]
            lse2 = lse_ref[group_head, pl.ds(first_query, bq)]
            delta = delta_ref[group_head, pl.ds(first_query, bq)]
            scores = plgpu.dot(keys, q, trans_b=True) * (config.scale * _LOG2_E)
            query_pos = first_query + jnp.arange(bq)
            segments = (None, None)
            if segment_ref is not None:
                segments = (segment_ref[pl.ds(first_query, bq)][None, :], segment_k[:, None])
            scores = _masked_scores(config, scores, masked, query_pos[None, :], key_pos[:, None], *segments)
            probabilities = jnp.exp2(scores - lse2[None, :])
            dv = dv + plgpu.dot(probabilities.astype(do.dtype), do)
            dprobabilities = plgpu.dot(values, do, trans_b=True)
            dscores = probabilities * (dprobabilities - delta[None, :])
            dk = dk + plgpu.dot(dscores.astype(q.dtype), q)
            return dk, dv

        return body

    start, full_start, full_stop, stop = _query_block_ranges(config, key_block, num_q_blocks)

    def accumulate_group_head(group_head, carry):
        carry = lax.fori_loop(start, full_start, visit(group_head, masked=True), carry)
        carry = lax.fori_loop(full_start, full_stop, visit(group_head, masked=False), carry)
        return lax.fori_loop(full_stop, stop, visit(group_head, masked=True), carry)

    zeros = jnp.zeros(keys.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, config.heads_per_kv_head, accumulate_group_head, (zeros, zeros))
    dk_ref[...] = (dk * config.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# --- decode ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _DecodeConfig:
    window: int | None
    prefix: int
    scale: float
    block_k: int
    blocks_per_split: int
    num_splits: int
    capacity: int


def attention_decode(
    q,
    k,
    v,
    cache,
    *,
    window,
    prefix,
    scale,
    block_k: int = DEFAULT_DECODE_BLOCK_K,
    block_rows: int = DEFAULT_DECODE_BLOCK_ROWS,
    num_splits: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
):
    """New tokens q [B,T,H,D], k/v [B,T,K,D] attend to the cache and causally to themselves -> o.

    The query rows of one kv head are its G query heads x T tokens, so grouped heads
    share each key load. num_splits: cache ranges reduced in parallel (default: enough
    programs to fill a GPU, at most one per cache block). Only blocks holding filled
    slots are read: a cache that has not wrapped fills slots 0 .. length - 1.
    """
    batch, chunk_len, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    capacity = cache.k.shape[1]
    _check_power_of_two("block_k", block_k)
    _check_power_of_two("block_rows", block_rows)
    block_k = min(block_k, _next_power_of_two(max(capacity, _MIN_DOT_SIZE)))
    num_cache_blocks = pl.cdiv(capacity, block_k)
    if num_splits is None:
        # About 256 programs: two per streaming multiprocessor of an H100 (132).
        num_splits = max(1, min(num_cache_blocks, _DECODE_PROGRAMS // (batch * kv_heads)))
    blocks_per_split = pl.cdiv(num_cache_blocks, num_splits)
    num_splits = pl.cdiv(num_cache_blocks, blocks_per_split)
    num_rows = group * chunk_len
    block_rows = min(block_rows, _next_power_of_two(max(num_rows, _MIN_DOT_SIZE)))
    padded_rows = _round_up(num_rows, block_rows)
    padded_chunk = _next_power_of_two(max(chunk_len, _MIN_DOT_SIZE))
    padded_dim = _next_power_of_two(max(head_dim, _MIN_DOT_SIZE))

    def pad_dim(x):
        return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, padded_dim - head_dim)])

    # Row r of kv head k is query head k * G + r // T at chunk token r % T.
    q_rows = q.reshape(batch, chunk_len, kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)
    q_rows = q_rows.reshape(batch, kv_heads, num_rows, head_dim)
    q_rows = pad_dim(jnp.pad(q_rows, ((0, 0), (0, 0), (0, padded_rows - num_rows), (0, 0))))
    row_positions = cache.length + jnp.arange(padded_rows, dtype=jnp.int32) % chunk_len
    # Slots past the capacity hold position -1: never visible.
    slot_positions = jnp.pad(cache.slot_pos, (0, num_cache_blocks * block_k - capacity), constant_values=-1)
    chunk_k, chunk_v = (
        pad_dim(jnp.pad(x.astype(cache.k.dtype), ((0, 0), (0, padded_chunk - chunk_len), (0, 0), (0, 0))))
        for x in (k, v)
    )
    cache_k, cache_v = pad_dim(cache.k), pad_dim(cache.v)
    filled_slots = jnp.minimum(cache.length, capacity)
    scalars = jnp.stack([cache.length, pl.cdiv(filled_slots, block_k)]).astype(jnp.int32)
    config = _DecodeConfig(
        window=window,
        prefix=prefix,
        scale=float(scale),
        block_k=block_k,
        blocks_per_split=blocks_per_split,
        num_splits=num_splits,
        capacity=capacity,
    )

    def batch_and_head(bh):
        return lax.div(bh, kv_heads), lax.rem(bh, kv_heads)

    def rows_index(s, bh, r):
        return (*batch_and_head(bh), r, 0)

    def kv_index(s, bh, r):
        b, kv_head = batch_and_head(bh)
        return (b, 0, kv_head, 0)

    kv_spec = pl.BlockSpec((None, capacity, None, padded_dim), kv_index)
    chunk_spec = pl.BlockSpec((None, padded_chunk, None, padded_dim), kv_index)
    partial_o, partial_lse2 = pl.pallas_call(
        functools.partial(_decode_kernel, config=config),
        grid=(num_splits + 1, batch * kv_heads, padded_rows // block_rows),
        in_specs=[
            pl.BlockSpec((2,), lambda s, bh, r: (0,)),
            pl.BlockSpec((None, None, block_rows, padded_dim), rows_index),
            pl.BlockSpec((block_rows,), lambda s, bh, r: (r,)),
            pl.BlockSpec((num_cache_blocks * block_k,), lambda s, bh, r: (0,)),
            kv_spec,
            kv_spec,
            chunk_spec,
            chunk_spec,
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, block_rows, padded_dim), lambda s, bh, r: (s, *rows_index(s, bh, r))),
            pl.BlockSpec((None, None, None, block_rows), lambda s, bh, r: (s, *rows_index(s, bh, r)[:3])),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((num_splits + 1, batch, kv_heads, padded_rows, padded_dim), jnp.float32),
            jax.ShapeDtypeStruct((num_splits + 1, batch, kv_heads, padded_rows), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="flash_attention_decode",
    )(scalars, q_rows, row_positions, slot_positions, cache_k, cache_v, chunk_k, chunk_v)

    # Merge the splits: weight each by its share of the total softmax mass.
    weights = jnp.exp2(partial_lse2 - partial_lse2.max(axis=0))
    o_rows = jnp.sum(weights[..., None] * partial_o, axis=0) / jnp.sum(weights, axis=0)[..., None]
    o = o_rows[:, :, :num_rows, :head_dim].reshape(batch, kv_heads, group, chunk_len, head_dim)
    return o.transpose(0, 3, 1, 2, 4).reshape(batch, chunk_len, heads, head_dim).astype(q.dtype)


def _decode_kernel(
    scalars_ref,
    q_ref,
    row_positions_ref,
    slot_positions_ref,
    cache_k_ref,
    cache_v_ref,
    chunk_k_ref,
    chunk_v_ref,
    o_ref,
    lse_ref,
    *,
    config,
):
    split = pl.program_id(0)
    length, used_cache_blocks = scalars_ref[0], scalars_ref[1]
    q = q_ref[...]
    query_pos = row_positions_ref[...]
    bk = config.block_k

    def attend(carry, keys, values, key_pos):
        acc, row_max, row_sum = carry
        scores = plgpu.dot(q, keys.astype(q.dtype), trans_b=True) * (config.scale * _LOG2_E)
        visible = _visibility(config, query_pos[:, None], key_pos[None, :]) & (key_pos >= 0)[None, :]
        scores = jnp.where(visible, scores, _MASKED)
        new_max = jnp.maximum(row_max, scores.max(axis=1))
        correction = jnp.exp2(row_max - new_max)
        probabilities = jnp.exp2(scores - new_max[:, None])
        row_sum = row_sum * correction + probabilities.sum(axis=1)
        acc = acc * correction[:, None] + plgpu.dot(probabilities.astype(values.dtype), values)
        return acc, new_max, row_sum

    def cache_block(block, carry):
        first_slot = pl.multiple_of(block * bk, bk)
        slots = pl.ds(first_slot, bk)
        # The last block may run past the capacity: masked loads read zeros there.
        in_cache = (first_slot + jnp.arange(bk) < config.capacity)[:, None]
        keys = plgpu.load(cache_k_ref.at[slots, :], mask=in_cache, other=0.0)
        values = plgpu.load(cache_v_ref.at[slots, :], mask=in_cache, other=0.0)
        return attend(carry, keys, values, slot_positions_ref[slots])

    def chunk(_, carry):
        # Chunk token t sits at position length + t; padding tokens come after every query.
        key_pos = length + jnp.arange(chunk_k_ref.shape[0])
        return attend(carry, chunk_k_ref[...], chunk_v_ref[...], key_pos)

    carry = (
        jnp.zeros(q.shape, jnp.float32),
        jnp.full((q.shape[0],), _MASKED, jnp.float32),
        jnp.zeros((q.shape[0],), jnp.float32),
    )
    # Splits 0 .. num_splits - 1 reduce their cache blocks; split num_splits the chunk.
    first_block = split * config.blocks_per_split
    stop_block = jnp.minimum(first_block + config.blocks_per_split, used_cache_blocks)
    carry = lax.fori_loop(first_block, stop_block, cache_block, carry)
    carry = lax.fori_loop(0, (split == config.num_splits).astype(jnp.int32), chunk, carry)
    acc, row_max, row_sum = carry
    # An empty split (no filled slot in its range) has row_sum 0: output 0 with weight 0.
    nonempty = row_sum > 0
    o_ref[...] = acc / jnp.where(nonempty, row_sum, 1.0)[:, None]
    lse_ref[...] = jnp.where(nonempty, row_max + jnp.log2(jnp.where(nonempty, row_sum, 1.0)), -jnp.inf)


# --- helpers ---------------------------------------------------------------------


def _check_power_of_two(name, value):
    if value < _MIN_DOT_SIZE or value & (value - 1):
        raise ValueError(
            f"attention (pallas, GPU): {name}={value} must be a power of two >= {_MIN_DOT_SIZE} "
            "(Triton's tl.dot tiles)"
        )


def _next_power_of_two(value):
    return 1 << (value - 1).bit_length()


def _round_up(value, multiple):
    return -(-value // multiple) * multiple
