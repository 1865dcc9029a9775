"""Flash attention for TPU in Pallas (Mosaic): forward, backward and KV-cache decode.

Layout inside the kernels is heads-major, q [B, H, T, D] and k/v [B, K, T, D], so
every block is a legal (block, D) tile; `attention` transposes and pads at the
boundary. Query head h reads kv head h // (H // K).

Forward and dq: grid (B, H, query block, visit). Visits run over the key blocks
that can hold a visible key (the prefix blocks, then the blocks overlapping the
window; up to the diagonal), from per-query-block tables passed by scalar
prefetch, so a window of w costs O(T * w). A query block with fewer visits than
the grid's extent repeats its last key block index for the remaining steps
(Pallas skips the copy of an unchanged block) and `pl.when` skips their work.
Blocks that are entirely visible skip building the mask.

dk/dv: grid (B, K, key block, group head x query visit): each key block sums
over the query heads that share its kv head and the query blocks that see it,
in key-major [block_k, block_q] tiles. Both backward kernels recompute
probabilities from the forward's log-sum-exp, saved as rows [B, H, 8, T].

Softmax statistics live in VMEM scratch as [rows, 128] with equal lanes, so they
broadcast against score tiles without relayouts.

Decode reads the cache in its public [B, C, K, D] layout, all kv heads of a block
of slots at once, and picks each head's rows with a sublane-strided load.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.attention import reference, xla

DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_K = 512
DEFAULT_DECODE_BLOCK_K = 512
DEFAULT_DECODE_BLOCK_ROWS = 256
_LANES = 128
_SUBLANES = 8
# Finite, so a row whose first visited block is fully masked gets exp(0) garbage that
# its first visible key rescales by exp(_MASKED - real max) = 0, instead of NaN from inf - inf.
_MASKED = -0.7 * float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class _Config:
    """Compile-time settings of one attention call (also read by xla's block-plan helpers)."""

    window: int | None
    prefix: int
    scale: float
    block_q: int
    block_k: int
    heads_per_kv_head: int
    has_segments: bool
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
    interpret: bool = False,
):
    """q [B,T,H,D], k/v [B,T,K,D] -> o [B,T,H,D]; see `kernels.attention` for the mask rule.

    block_q, block_k: multiples of 128, one dividing the other; the forward and both
    backward kernels use them. interpret: run the kernels in the Pallas interpreter.
    """
    seq_len, heads, kv_heads = q.shape[1], q.shape[2], k.shape[2]
    block_q, block_k, padded_len = _block_sizes(seq_len, block_q, block_k)
    config = _Config(
        window=window,
        prefix=prefix,
        scale=float(scale),
        block_q=block_q,
        block_k=block_k,
        heads_per_kv_head=heads // kv_heads,
        has_segments=segment_ids is not None,
        interpret=interpret,
    )
    if segment_ids is None:
        segment_columns = segment_rows = None
    else:
        # Padding tokens get segment 0; they are only ever seen by padding queries.
        padded = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, padded_len - seq_len)))
        segment_columns = jnp.broadcast_to(padded[:, :, None], (*padded.shape, _LANES))
        segment_rows = jnp.broadcast_to(padded[:, None, :], (padded.shape[0], _SUBLANES, padded_len))
    o = _flash_attention(
        config,
        _to_heads_major(q, padded_len),
        _to_heads_major(k, padded_len),
        _to_heads_major(v, padded_len),
        segment_columns,
        segment_rows,
    )
    return o[:, :, :seq_len].transpose(0, 2, 1, 3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash_attention(config, q, k, v, segment_columns, segment_rows):
    o, _ = _forward(config, q, k, v, segment_columns, segment_rows)
    return o


def _flash_attention_forward(config, q, k, v, segment_columns, segment_rows):
    o, lse_rows = _forward(config, q, k, v, segment_columns, segment_rows)
    return o, (q, k, v, segment_columns, segment_rows, o, lse_rows)


def _flash_attention_backward(config, residuals, do):
    q, k, v, segment_columns, segment_rows, o, lse_rows = residuals
    # delta_i = sum_j p_ij dp_ij = do_i . o_i, the softmax backward's row correction.
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)
    delta_rows = jnp.broadcast_to(delta[:, :, None, :], lse_rows.shape)
    dq = _backward_dq(config, q, k, v, do, lse_rows, delta_rows, segment_columns, segment_rows)
    dk, dv = _backward_dkv(config, q, k, v, do, lse_rows, delta_rows, segment_columns, segment_rows)
    return dq, dk, dv, None, None


_flash_attention.defvjp(_flash_attention_forward, _flash_attention_backward)


# --- block plans -----------------------------------------------------------------


def _key_block_plan(config, num_q_blocks):
    """Per query block (int32 [num_q_blocks] each): prefix blocks, first window block,
    number of visits; and the most visits of any query block (the grid's extent).
    Computed in NumPy: the plan is static, and constants built with jnp under a
    shard_map trace would take the manual sharding of the mesh."""
    plan = xla._key_blocks_to_visit(config, np.arange(num_q_blocks), xp=np)
    tables = tuple(np.broadcast_to(np.asarray(x, np.int32), (num_q_blocks,)) for x in plan)
    return tuple(jnp.asarray(table) for table in tables), int(np.max(tables[2]))


def _query_block_plan(config, num_q_blocks, num_k_blocks):
    """Per key block (int32 [num_k_blocks] each): first query block that sees it and the
    number of query blocks that do; and the most of any key block (the grid's extent)."""
    first, stop = xla._query_blocks_that_see(config, np.arange(num_k_blocks), num_q_blocks, xp=np)
    first = np.broadcast_to(np.asarray(first, np.int32), (num_k_blocks,))
    count = np.broadcast_to(np.asarray(stop, np.int32), (num_k_blocks,)) - first
    return (jnp.asarray(first), jnp.asarray(count)), int(np.max(count))


def _visited_key_block(num_prefix_ref, window_start_ref, num_visits_ref, q_block, visit):
    """The key block of a visit: prefix blocks first, then the window's blocks.

    Steps past a query block's last visit repeat that visit's block.
    """
    visit = jnp.minimum(visit, num_visits_ref[q_block] - 1)
    num_prefix = num_prefix_ref[q_block]
    return jnp.where(visit < num_prefix, visit, window_start_ref[q_block] + visit - num_prefix)


def _visited_query_block(first_ref, count_ref, key_block, visit):
    return first_ref[key_block] + jnp.minimum(visit, count_ref[key_block] - 1)


def _block_fully_visible(config, first_query, first_key):
    """Scalar: every (query, key) pair of the two blocks is visible, so no mask is needed."""
    last_query = first_query + config.block_q - 1
    last_key = first_key + config.block_k - 1
    fully_visible = last_key <= first_query
    if config.window is not None:
        fully_visible &= (last_query - first_key < config.window) | (last_key < config.prefix)
    return fully_visible


def _when_visited(config, in_range, first_query, first_key, body):
    """Run body(masked) for a visited block pair, without the mask when none is needed."""
    if config.has_segments:
        pl.when(in_range)(lambda: body(True))
        return
    fully_visible = _block_fully_visible(config, first_query, first_key)
    pl.when(in_range & fully_visible)(lambda: body(False))
    pl.when(in_range & jnp.logical_not(fully_visible))(lambda: body(True))


def _query_major_segment_specs(bq, bk, key_index):
    """Block specs of the segment ids for kernels gridded (batch, head, query block, visit):
    the query block's ids as lane-broadcast columns, the visited key block's ids as rows."""
    return [
        pl.BlockSpec((None, bq, _LANES), lambda b, h, i, t, *_: (b, i, 0)),
        pl.BlockSpec((None, _SUBLANES, bk), lambda b, h, i, t, *refs: (b, 0, key_index(b, h, i, t, *refs)[2])),
    ]


# --- forward ---------------------------------------------------------------------


def _forward(config, q, k, v, segment_columns, segment_rows):
    """-> (o [B,H,T,D] in q's dtype, log-sum-exp as rows [B,H,8,T] float32)."""
    batch, heads, padded_len, head_dim = q.shape
    num_q_blocks = padded_len // config.block_q
    tables, max_visits = _key_block_plan(config, num_q_blocks)
    group = config.heads_per_kv_head
    bq, bk = config.block_q, config.block_k

    def key_index(b, h, i, t, num_prefix_ref, window_start_ref, num_visits_ref):
        return (b, lax.div(h, group), _visited_key_block(num_prefix_ref, window_start_ref, num_visits_ref, i, t), 0)

    in_specs = [
        pl.BlockSpec((None, None, bq, head_dim), lambda b, h, i, t, *_: (b, h, i, 0)),
        pl.BlockSpec((None, None, bk, head_dim), key_index),
        pl.BlockSpec((None, None, bk, head_dim), key_index),
    ]
    inputs = [q, k, v]
    if config.has_segments:
        in_specs += _query_major_segment_specs(bq, bk, key_index)
        inputs += [segment_columns, segment_rows]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(batch, heads, num_q_blocks, max_visits),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, None, bq, head_dim), lambda b, h, i, t, *_: (b, h, i, 0)),
            pl.BlockSpec((None, None, _SUBLANES, bq), lambda b, h, i, t, *_: (b, h, 0, i)),
        ],
        scratch_shapes=[
            pltpu.VMEM((bq, _LANES), jnp.float32),
            pltpu.VMEM((bq, _LANES), jnp.float32),
            pltpu.VMEM((bq, head_dim), jnp.float32),
        ],
    )
    return pl.pallas_call(
        functools.partial(_forward_kernel, config=config),
        grid_spec=grid_spec,
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((batch, heads, _SUBLANES, padded_len), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
        ),
        interpret=config.interpret,
        name="flash_attention_forward",
    )(*tables, *inputs)


def _forward_kernel(num_prefix_ref, window_start_ref, num_visits_ref, q_ref, k_ref, v_ref, *refs, config):
    if config.has_segments:
        q_segment_ref, k_segment_ref, o_ref, lse_ref, max_ref, sum_ref, acc_ref = refs
    else:
        q_segment_ref = k_segment_ref = None
        o_ref, lse_ref, max_ref, sum_ref, acc_ref = refs
    q_block, visit = pl.program_id(2), pl.program_id(3)
    num_visits = num_visits_ref[q_block]
    key_block = _visited_key_block(num_prefix_ref, window_start_ref, num_visits_ref, q_block, visit)
    first_query, first_key = q_block * config.block_q, key_block * config.block_k

    @pl.when(visit == 0)
    def _start():
        max_ref[...] = jnp.full(max_ref.shape, _MASKED, jnp.float32)
        sum_ref[...] = jnp.zeros(sum_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def attend(masked):
        v_block = v_ref[...]
        scores = _dot_nt(q_ref[...], k_ref[...]) * config.scale
        if masked:
            visible = _query_major_visibility(config, first_query, first_key, q_segment_ref, k_segment_ref)
            scores = jnp.where(visible, scores, _MASKED)
        max_prev = max_ref[...]
        max_next = jnp.maximum(max_prev, scores.max(axis=1, keepdims=True))
        correction = jnp.exp(max_prev - max_next)
        probabilities = jnp.exp(scores - _lanes_as(max_next, scores.shape[1]))
        sum_ref[...] = correction * sum_ref[...] + probabilities.sum(axis=1, keepdims=True)
        max_ref[...] = max_next
        acc_ref[...] = correction[:, :1] * acc_ref[...] + _dot(probabilities.astype(v_block.dtype), v_block)

    _when_visited(config, visit < num_visits, first_query, first_key, attend)

    @pl.when(visit == num_visits - 1)
    def _finish():
        # Every query sees itself, and its own key block is always visited: total >= 1.
        total = sum_ref[...]
        o_ref[...] = (acc_ref[...] / total[:, :1]).astype(o_ref.dtype)
        lse_ref[...] = (max_ref[...] + jnp.log(total)).T[:_SUBLANES]


def _query_major_visibility(config, first_query, first_key, q_segment_ref, k_segment_ref):
    """Boolean [block_q, block_k]: which keys each query of the block pair sees."""
    shape = (config.block_q, config.block_k)
    query_pos = first_query + lax.broadcasted_iota(jnp.int32, shape, 0)
    key_pos = first_key + lax.broadcasted_iota(jnp.int32, shape, 1)
    visible = reference._visible(query_pos, key_pos, config.window, config.prefix)
    if q_segment_ref is not None:
        visible &= _lanes_as(q_segment_ref[...], config.block_k) == k_segment_ref[:1, :]
    return visible


# --- backward --------------------------------------------------------------------


def _backward_dq(config, q, k, v, do, lse_rows, delta_rows, segment_columns, segment_rows):
    batch, heads, padded_len, head_dim = q.shape
    num_q_blocks = padded_len // config.block_q
    tables, max_visits = _key_block_plan(config, num_q_blocks)
    group = config.heads_per_kv_head
    bq, bk = config.block_q, config.block_k

    def key_index(b, h, i, t, num_prefix_ref, window_start_ref, num_visits_ref):
        return (b, lax.div(h, group), _visited_key_block(num_prefix_ref, window_start_ref, num_visits_ref, i, t), 0)

    query_spec = pl.BlockSpec((None, None, bq, head_dim), lambda b, h, i, t, *_: (b, h, i, 0))
    row_spec = pl.BlockSpec((None, None, _SUBLANES, bq), lambda b, h, i, t, *_: (b, h, 0, i))
    key_spec = pl.BlockSpec((None, None, bk, head_dim), key_index)
    in_specs = [query_spec, key_spec, key_spec, query_spec, row_spec, row_spec]
    inputs = [q, k, v, do, lse_rows, delta_rows]
    if config.has_segments:
        in_specs += _query_major_segment_specs(bq, bk, key_index)
        inputs += [segment_columns, segment_rows]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(batch, heads, num_q_blocks, max_visits),
        in_specs=in_specs,
        out_specs=query_spec,
        scratch_shapes=[pltpu.VMEM((bq, head_dim), jnp.float32)],
    )
    return pl.pallas_call(
        functools.partial(_dq_kernel, config=config),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
        ),
        interpret=config.interpret,
        name="flash_attention_backward_dq",
    )(*tables, *inputs)


def _dq_kernel(
    num_prefix_ref, window_start_ref, num_visits_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, config
):
    if config.has_segments:
        q_segment_ref, k_segment_ref, dq_ref, dq_acc_ref = refs
    else:
        q_segment_ref = k_segment_ref = None
        dq_ref, dq_acc_ref = refs
    q_block, visit = pl.program_id(2), pl.program_id(3)
    num_visits = num_visits_ref[q_block]
    key_block = _visited_key_block(num_prefix_ref, window_start_ref, num_visits_ref, q_block, visit)
    first_query, first_key = q_block * config.block_q, key_block * config.block_k

    @pl.when(visit == 0)
    def _start():
        dq_acc_ref[...] = jnp.zeros(dq_acc_ref.shape, jnp.float32)

    def accumulate(masked):
        k_block = k_ref[...]
        scores = _dot_nt(q_ref[...], k_block) * config.scale
        if masked:
            visible = _query_major_visibility(config, first_query, first_key, q_segment_ref, k_segment_ref)
            scores = jnp.where(visible, scores, _MASKED)
        probabilities = jnp.exp(scores - lse_ref[0][:, None])
        dprobabilities = _dot_nt(do_ref[...], v_ref[...])
        dscores = probabilities * (dprobabilities - delta_ref[0][:, None])
        dq_acc_ref[...] += _dot(dscores.astype(k_block.dtype), k_block)

    _when_visited(config, visit < num_visits, first_query, first_key, accumulate)

    @pl.when(visit == num_visits - 1)
    def _finish():
        dq_ref[...] = (dq_acc_ref[...] * config.scale).astype(dq_ref.dtype)


def _backward_dkv(config, q, k, v, do, lse_rows, delta_rows, segment_columns, segment_rows):
    batch, heads, padded_len, head_dim = q.shape
    kv_heads = k.shape[1]
    num_q_blocks, num_k_blocks = padded_len // config.block_q, padded_len // config.block_k
    tables, max_visits = _query_block_plan(config, num_q_blocks, num_k_blocks)
    group = config.heads_per_kv_head
    bq, bk = config.block_q, config.block_k

    def query_head_and_block(b, kv_head, j, step, first_ref, count_ref):
        head = kv_head * group + lax.div(step, max_visits)
        return head, _visited_query_block(first_ref, count_ref, j, lax.rem(step, max_visits))

    def query_index(b, kv_head, j, step, *refs):
        head, q_block = query_head_and_block(b, kv_head, j, step, *refs)
        return (b, head, q_block, 0)

    def row_index(b, kv_head, j, step, *refs):
        head, q_block = query_head_and_block(b, kv_head, j, step, *refs)
        return (b, head, 0, q_block)

    query_spec = pl.BlockSpec((None, None, bq, head_dim), query_index)
    row_spec = pl.BlockSpec((None, None, _SUBLANES, bq), row_index)
    key_spec = pl.BlockSpec((None, None, bk, head_dim), lambda b, kv_head, j, step, *_: (b, kv_head, j, 0))
    in_specs = [query_spec, key_spec, key_spec, query_spec, row_spec, row_spec]
    inputs = [q, k, v, do, lse_rows, delta_rows]
    if config.has_segments:
        in_specs += [
            pl.BlockSpec((None, bk, _LANES), lambda b, kv_head, j, step, *_: (b, j, 0)),
            pl.BlockSpec(
                (None, _SUBLANES, bq),
                lambda b, kv_head, j, step, *refs: (b, 0, query_head_and_block(b, kv_head, j, step, *refs)[1]),
            ),
        ]
        inputs += [segment_columns, segment_rows]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(batch, kv_heads, num_k_blocks, group * max_visits),
        in_specs=in_specs,
        out_specs=[key_spec, key_spec],
        scratch_shapes=[pltpu.VMEM((bk, head_dim), jnp.float32), pltpu.VMEM((bk, head_dim), jnp.float32)],
    )
    return pl.pallas_call(
        functools.partial(_dkv_kernel, config=config, max_visits=max_visits),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
        ),
        interpret=config.interpret,
        name="flash_attention_backward_dkv",
    )(*tables, *inputs)


def _dkv_kernel(
    first_ref, count_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, config, max_visits
):
    if config.has_segments:
        k_segment_ref, q_segment_ref, dk_ref, dv_ref, dk_acc_ref, dv_acc_ref = refs
    else:
        k_segment_ref = q_segment_ref = None
        dk_ref, dv_ref, dk_acc_ref, dv_acc_ref = refs
    key_block, step = pl.program_id(2), pl.program_id(3)
    visit = lax.rem(step, max_visits)
    q_block = _visited_query_block(first_ref, count_ref, key_block, visit)
    first_query, first_key = q_block * config.block_q, key_block * config.block_k

    @pl.when(step == 0)
    def _start():
        dk_acc_ref[...] = jnp.zeros(dk_acc_ref.shape, jnp.float32)
        dv_acc_ref[...] = jnp.zeros(dv_acc_ref.shape, jnp.float32)

    def accumulate(masked):
        # Key-major: [block_k, block_q] tiles, so the row statistics broadcast along sublanes.
        q_block_values, do_block = q_ref[...], do_ref[...]
        scores = _dot_nt(k_ref[...], q_block_values) * config.scale
        if masked:
            shape = (config.block_k, config.block_q)
            key_pos = first_key + lax.broadcasted_iota(jnp.int32, shape, 0)
            query_pos = first_query + lax.broadcasted_iota(jnp.int32, shape, 1)
            visible = reference._visible(query_pos, key_pos, config.window, config.prefix)
            if k_segment_ref is not None:
                visible &= _lanes_as(k_segment_ref[...], config.block_q) == q_segment_ref[:1, :]
            scores = jnp.where(visible, scores, _MASKED)
        probabilities = jnp.exp(scores - lse_ref[:1, :])
        dv_acc_ref[...] += _dot(probabilities.astype(do_block.dtype), do_block)
        dprobabilities = _dot_nt(v_ref[...], do_block)
        dscores = probabilities * (dprobabilities - delta_ref[:1, :])
        dk_acc_ref[...] += _dot(dscores.astype(q_block_values.dtype), q_block_values)

    _when_visited(config, visit < count_ref[key_block], first_query, first_key, accumulate)

    @pl.when(step == pl.num_programs(3) - 1)
    def _finish():
        dk_ref[...] = (dk_acc_ref[...] * config.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc_ref[...].astype(dv_ref.dtype)


# --- decode ----------------------------------------------------------------------


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
    interpret: bool = False,
):
    """New tokens q [B,T,H,D], k/v [B,T,K,D] attend to the cache and causally to themselves -> o.

    Grid (B, row block, cache block + 1): each step reads `block_k` cache slots of every
    kv head once (the cache stays [B, C, K, D]; a kv head's rows are a strided load);
    the last step attends to the chunk itself and writes the output. The query rows of
    one kv head are its G query heads x T tokens, so grouped heads share each key load.
    Only the blocks holding filled slots are read: a cache that has not wrapped holds
    positions 0 .. length - 1 in slots 0 .. length - 1.
    """
    batch, chunk_len, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    capacity = cache.k.shape[1]
    block_k = min(block_k, capacity)
    num_cache_blocks = pl.cdiv(capacity, block_k)
    num_rows = group * chunk_len
    # Rows are q's second-minor dim: whole (8, 128) tiles, (16, 128) for 16-bit types.
    row_tile = _SUBLANES * (4 // q.dtype.itemsize)
    block_rows = min(_round_up(block_rows, row_tile), _round_up(num_rows, row_tile))
    padded_rows = _round_up(num_rows, block_rows)
    padded_chunk = _round_up(chunk_len, _SUBLANES)

    # Row r of kv head k is query head k * G + r // T at chunk token r % T.
    q_rows = q.reshape(batch, chunk_len, kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)
    q_rows = q_rows.reshape(batch, kv_heads, num_rows, head_dim)
    q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, padded_rows - num_rows), (0, 0)))
    row_positions = cache.length + jnp.arange(padded_rows, dtype=jnp.int32) % chunk_len
    row_positions = jnp.broadcast_to(row_positions[:, None], (padded_rows, _LANES))
    # Slots past the capacity (a partial last block) hold position -1: never visible.
    slot_positions = jnp.pad(cache.slot_pos, (0, num_cache_blocks * block_k - capacity), constant_values=-1)
    slot_positions = slot_positions.reshape(num_cache_blocks, 1, block_k)
    loadable = functools.partial(_strided_loadable, kv_heads=kv_heads)
    chunk_k, chunk_v = (
        jnp.pad(loadable(x.astype(cache.k.dtype)), ((0, 0), (0, padded_chunk - chunk_len), (0, 0), (0, 0)))
        for x in (k, v)
    )
    filled_slots = jnp.minimum(cache.length, capacity)
    scalars = jnp.stack([cache.length, jnp.maximum(pl.cdiv(filled_slots, block_k), 1)]).astype(jnp.int32)

    config = _DecodeConfig(
        window=window,
        prefix=prefix,
        scale=float(scale),
        block_k=block_k,
        capacity=capacity,
    )

    def cache_index(b, r, step, scalars_ref):
        return (b, jnp.minimum(step, scalars_ref[1] - 1), 0, 0)

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(batch, padded_rows // block_rows, num_cache_blocks + 1),
        in_specs=[
            pl.BlockSpec((None, kv_heads, block_rows, head_dim), lambda b, r, step, _: (b, 0, r, 0)),
            pl.BlockSpec((block_rows, _LANES), lambda b, r, step, _: (r, 0)),
            pl.BlockSpec((None, 1, block_k), lambda b, r, step, s: cache_index(b, r, step, s)[1:]),
            pl.BlockSpec((None, block_k, kv_heads, head_dim), cache_index),
            pl.BlockSpec((None, block_k, kv_heads, head_dim), cache_index),
            pl.BlockSpec((None, padded_chunk, kv_heads, head_dim), lambda b, r, step, _: (b, 0, 0, 0)),
            pl.BlockSpec((None, padded_chunk, kv_heads, head_dim), lambda b, r, step, _: (b, 0, 0, 0)),
        ],
        out_specs=pl.BlockSpec((None, kv_heads, block_rows, head_dim), lambda b, r, step, _: (b, 0, r, 0)),
        scratch_shapes=[
            pltpu.VMEM((kv_heads, block_rows, _LANES), jnp.float32),
            pltpu.VMEM((kv_heads, block_rows, _LANES), jnp.float32),
            pltpu.VMEM((kv_heads, block_rows, head_dim), jnp.float32),
        ],
    )
    o_rows = pl.pallas_call(
        functools.partial(_decode_kernel, config=config),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct(q_rows.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="flash_attention_decode",
    )(scalars, q_rows, row_positions, slot_positions, loadable(cache.k), loadable(cache.v), chunk_k, chunk_v)
    o = o_rows[:, :, :num_rows].reshape(batch, kv_heads, group, chunk_len, head_dim)
    return o.transpose(0, 3, 1, 2, 4).reshape(batch, chunk_len, heads, head_dim)


@dataclasses.dataclass(frozen=True)
class _DecodeConfig:
    window: int | None
    prefix: int
    scale: float
    block_k: int
    capacity: int


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
    max_ref,
    sum_ref,
    acc_ref,
    *,
    config,
):
    step = pl.program_id(2)
    num_cache_blocks = pl.num_programs(2) - 1
    length, used_cache_blocks = scalars_ref[0], scalars_ref[1]
    kv_heads = q_ref.shape[0]
    query_pos = row_positions_ref[:, :1]

    @pl.when(step == 0)
    def _start():
        max_ref[...] = jnp.full(max_ref.shape, _MASKED, jnp.float32)
        sum_ref[...] = jnp.zeros(sum_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def attend(kv_head, keys, values, key_pos):
        q_rows = q_ref[kv_head]
        scores = _dot_nt(q_rows, keys.astype(q_rows.dtype)) * config.scale
        visible = reference._visible(query_pos, key_pos, config.window, config.prefix) & (key_pos >= 0)
        scores = jnp.where(visible, scores, _MASKED)
        max_prev = max_ref[kv_head]
        max_next = jnp.maximum(max_prev, scores.max(axis=1, keepdims=True))
        correction = jnp.exp(max_prev - max_next)
        probabilities = jnp.exp(scores - _lanes_as(max_next, scores.shape[1]))
        sum_ref[kv_head] = correction * sum_ref[kv_head] + probabilities.sum(axis=1, keepdims=True)
        max_ref[kv_head] = max_next
        acc_ref[kv_head] = correction[:, :1] * acc_ref[kv_head] + _dot(probabilities.astype(values.dtype), values)

    @pl.when(step < used_cache_blocks)
    def _cache_block():
        key_pos = slot_positions_ref[...]
        for kv_head in range(kv_heads):
            keys = _load_kv_head(cache_k_ref, kv_head)
            values = _load_kv_head(cache_v_ref, kv_head)
            if config.capacity % config.block_k:
                # The last block reads past the cache; unspecified values must not reach
                # p @ v (0 * NaN), so zero them.
                slot = step * config.block_k + lax.broadcasted_iota(jnp.int32, values.shape, 0)
                values = jnp.where(slot < config.capacity, values, jnp.zeros_like(values))
            attend(kv_head, keys, values, key_pos)

    @pl.when(step == num_cache_blocks)
    def _chunk_and_finish():
        padded_chunk = chunk_k_ref.shape[0]
        # Chunk token t sits at position length + t; padding tokens come after every query.
        key_pos = length + lax.broadcasted_iota(jnp.int32, (1, padded_chunk), 1)
        for kv_head in range(kv_heads):
            attend(kv_head, _load_kv_head(chunk_k_ref, kv_head), _load_kv_head(chunk_v_ref, kv_head), key_pos)
            # Each query sees itself in the chunk, so the total is at least 1.
            o_ref[kv_head] = (acc_ref[kv_head] / sum_ref[kv_head][:, :1]).astype(o_ref.dtype)


def _strided_loadable(x, *, kv_heads):
    """x in a dtype `_load_kv_head` can read one kv head of: 32-bit, or bfloat16 with one
    or an even number of kv heads; anything else is widened to float32 (a copy)."""
    if x.dtype.itemsize == 4 or kv_heads == 1 or (x.dtype == jnp.bfloat16 and kv_heads % 2 == 0):
        return x
    return x.astype(jnp.float32)


def _load_kv_head(ref, kv_head):
    """Rows of one kv head from a [slots, K, D] block: a sublane-strided load."""
    slots, kv_heads, head_dim = ref.shape
    flat = ref.reshape(slots * kv_heads, head_dim)
    if kv_heads == 1:
        return flat[...]
    if ref.dtype.itemsize == 4:
        return flat[pl.ds(kv_head, slots, stride=kv_heads), :]
    # bfloat16 packs rows 2i and 2i + 1 into one 32-bit word (low and high half): load
    # the words of this head's rows, keep its half, and widen it to a float32 bit pattern.
    words = flat.bitcast(jnp.uint32)[pl.ds(kv_head // 2, slots, stride=kv_heads // 2), :]
    high_half = words & jnp.uint32(0xFFFF0000) if kv_head % 2 else words << 16
    return pltpu.bitcast(high_half, jnp.float32).astype(ref.dtype)


# --- helpers ---------------------------------------------------------------------


def _dot(a, b):
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_nt(a, b):
    """a @ b.T without materialising the transpose."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _lanes_as(columns, width):
    """A [rows, 128] array whose lanes are equal, made broadcastable against [rows, width]."""
    if width % _LANES == 0:
        return jnp.tile(columns, (1, width // _LANES))
    return columns[:, :1]


def _round_up(value, multiple):
    return -(-value // multiple) * multiple


def _block_sizes(seq_len, block_q, block_k):
    """-> (block_q, block_k, padded length) with both blocks dividing the padded length."""
    if (
        min(block_q, block_k) < _LANES
        or block_q % _LANES
        or block_k % _LANES
        or max(block_q, block_k) % min(block_q, block_k)
    ):
        raise ValueError(
            f"attention (pallas, TPU): block_q={block_q} and block_k={block_k} must be multiples "
            f"of {_LANES} and one must divide the other"
        )
    if seq_len <= min(block_q, block_k):
        short_block = _round_up(seq_len, _LANES)
        return short_block, short_block, short_block
    return block_q, block_k, _round_up(seq_len, max(block_q, block_k))


def _to_heads_major(x, padded_len):
    """[B, T, H, D] -> [B, H, T_pad, D], zero-padded along T."""
    x = jnp.pad(x, ((0, 0), (0, padded_len - x.shape[1]), (0, 0), (0, 0)))
    return x.transpose(0, 2, 1, 3)
