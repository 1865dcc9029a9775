"""Blocked (flash-style) causal softmax attention in pure JAX.

Forward: each query block runs an online softmax over only the key blocks that
can hold a visible key (causal: up to the diagonal; windowed: the prefix blocks
plus the blocks overlapping the window), so memory is O(T * block) and windowed
cost is O(T * window). Backward: a custom_vjp that recomputes block scores from
the saved log-sum-exp, key-block-major; dk and dv accumulate per key block and
dq accumulates into one float32 buffer of the queries' size.

Decode attends over [cache slots ; new chunk] blocked along the keys too, with
masks built from absolute positions. It visits every key block, because ring
buffer slots are not in position order and the positions are only known at run
time; the cache capacity bounds that cost.

Internal layout: queries as blocks [num_blocks, B, K, G, block, D] (G query
heads share kv head K), keys and values as [num_blocks, B, K, block, D].
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

DEFAULT_BLOCK_Q = 256
DEFAULT_BLOCK_K = 256
DEFAULT_DECODE_BLOCK_K = 512
# Short sequences shrink both blocks to the sequence length rounded up to this.
_BLOCK_ALIGNMENT = 8


@dataclasses.dataclass(frozen=True)
class _Static:
    """Compile-time settings of one blocked attention call."""

    window: int | None
    prefix: int
    scale: float
    block_q: int
    block_k: int


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
):
    """q [B,T,H,D], k/v [B,T,K,D] -> o [B,T,H,D]; see `kernels.attention` for the mask rule."""
    seq_len, kv_heads = q.shape[1], k.shape[2]
    block_q, block_k, padded_len = _block_sizes(seq_len, block_q, block_k)
    static = _Static(window, prefix, float(scale), block_q, block_k)
    if segment_ids is None:
        segment_q_blocks = segment_k_blocks = None
    else:
        segment_q_blocks = _segment_blocks(segment_ids, block_q, padded_len)
        segment_k_blocks = _segment_blocks(segment_ids, block_k, padded_len)
    o_blocks = _blocked_attention(
        static,
        _query_blocks(q, kv_heads, block_q, padded_len),
        _key_blocks(k, block_k, padded_len),
        _key_blocks(v, block_k, padded_len),
        segment_q_blocks,
        segment_k_blocks,
    )
    return _from_query_blocks(o_blocks, seq_len)


def attention_decode(
    q,
    k,
    v,
    cache,
    *,
    window,
    prefix,
    scale,
    block_q: int = DEFAULT_BLOCK_Q,
    block_k: int = DEFAULT_DECODE_BLOCK_K,
):
    """New tokens q [B,T,H,D], k/v [B,T,K,D] attend to the cache and to the chunk itself -> o."""
    chunk_len, kv_heads = q.shape[1], k.shape[2]
    keys = jnp.concatenate([cache.k, k.astype(cache.k.dtype)], axis=1)
    values = jnp.concatenate([cache.v, v.astype(cache.v.dtype)], axis=1)
    cache_and_chunk_positions = jnp.concatenate([cache.slot_pos, cache.length + jnp.arange(chunk_len)])
    num_keys = keys.shape[1]

    block_q = min(block_q, chunk_len)
    block_k = min(block_k, num_keys)
    padded_q = _round_up(chunk_len, block_q)
    padded_k = _round_up(num_keys, block_k)
    # Padding queries sit at later positions (they see real keys, so no 0/0); padding keys
    # get position -1, which no query sees.
    query_position_blocks = (cache.length + jnp.arange(padded_q)).reshape(-1, block_q)
    key_position_blocks = jnp.pad(
        cache_and_chunk_positions, (0, padded_k - num_keys), constant_values=-1
    ).reshape(-1, block_k)
    k_blocks = _key_blocks(keys, block_k, padded_k)
    v_blocks = _key_blocks(values, block_k, padded_k)

    def attend_query_block(inputs):
        q_block, query_positions = inputs

        def visit_key_block(state, key_block):
            k_block, v_block, key_positions = key_block
            visible = _visible(window, prefix, query_positions, key_positions, None, None)
            return _online_softmax_step(state, q_block, k_block, v_block, visible, scale), None

        state, _ = lax.scan(
            visit_key_block,
            _initial_softmax_state(q_block),
            (k_blocks, v_blocks, key_position_blocks),
        )
        o_block, _ = _finish_softmax(state, q.dtype)
        return o_block

    o_blocks = lax.map(
        attend_query_block,
        (_query_blocks(q, kv_heads, block_q, padded_q), query_position_blocks),
    )
    return _from_query_blocks(o_blocks, chunk_len)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _blocked_attention(static, q_blocks, k_blocks, v_blocks, segment_q_blocks, segment_k_blocks):
    o_blocks, _ = _forward(static, q_blocks, k_blocks, v_blocks, segment_q_blocks, segment_k_blocks)
    return o_blocks


def _forward(static, q_blocks, k_blocks, v_blocks, segment_q_blocks, segment_k_blocks):
    """-> (o_blocks in q's dtype, log-sum-exp blocks [num_q_blocks, B, K, G, block_q] float32)."""
    num_q_blocks = q_blocks.shape[0]

    def attend_query_block(inputs):
        block_index, q_block, segment_q = inputs
        query_positions = block_index * static.block_q + jnp.arange(static.block_q)
        num_prefix_blocks, window_start, num_visits = _key_blocks_to_visit(static, block_index)

        def visit(visit_index, state):
            # Visits run over the prefix blocks first, then the window's blocks.
            key_block_index = jnp.where(
                visit_index < num_prefix_blocks,
                visit_index,
                window_start + visit_index - num_prefix_blocks,
            )
            key_positions = key_block_index * static.block_k + jnp.arange(static.block_k)
            visible = _visible(
                static.window,
                static.prefix,
                query_positions,
                key_positions,
                segment_q,
                _index_block(segment_k_blocks, key_block_index),
            )
            return _online_softmax_step(
                state,
                q_block,
                _index_block(k_blocks, key_block_index),
                _index_block(v_blocks, key_block_index),
                visible,
                static.scale,
            )

        state = lax.fori_loop(0, num_visits, visit, _initial_softmax_state(q_block))
        return _finish_softmax(state, q_block.dtype)

    return lax.map(
        attend_query_block, (jnp.arange(num_q_blocks), q_blocks, segment_q_blocks)
    )


def _forward_with_residuals(static, q_blocks, k_blocks, v_blocks, segment_q_blocks, segment_k_blocks):
    o_blocks, lse_blocks = _forward(
        static, q_blocks, k_blocks, v_blocks, segment_q_blocks, segment_k_blocks
    )
    residuals = (q_blocks, k_blocks, v_blocks, segment_q_blocks, segment_k_blocks, o_blocks, lse_blocks)
    return o_blocks, residuals


def _backward(static, residuals, do_blocks):
    """Recompute each block's probabilities from the log-sum-exp; loop over key blocks."""
    q_blocks, k_blocks, v_blocks, segment_q_blocks, segment_k_blocks, o_blocks, lse_blocks = residuals
    num_q_blocks = q_blocks.shape[0]
    # delta_i = sum_j p_ij dp_ij = do_i . o_i: the softmax backward's row correction.
    delta_blocks = jnp.sum(do_blocks.astype(jnp.float32) * o_blocks.astype(jnp.float32), axis=-1)

    def key_block_gradients(dq_accumulator, inputs):
        block_index, k_block, v_block, segment_k = inputs
        key_positions = block_index * static.block_k + jnp.arange(static.block_k)
        first_q_block, stop_q_block = _query_blocks_that_see(static, block_index, num_q_blocks)

        def visit(q_block_index, carry):
            dq_accumulator, dk_block, dv_block = carry
            q_block = _index_block(q_blocks, q_block_index)
            do_block = _index_block(do_blocks, q_block_index)
            query_positions = q_block_index * static.block_q + jnp.arange(static.block_q)
            visible = _visible(
                static.window,
                static.prefix,
                query_positions,
                key_positions,
                _index_block(segment_q_blocks, q_block_index),
                segment_k,
            )
            scores = _block_scores(q_block, k_block, static.scale)
            lse = _index_block(lse_blocks, q_block_index)[..., None]
            probabilities = jnp.exp(jnp.where(visible, scores, -jnp.inf) - lse)
            dv_block += jnp.einsum(
                "bkgqc,bkgqd->bkcd",
                probabilities.astype(do_block.dtype),
                do_block,
                preferred_element_type=jnp.float32,
            )
            dprobabilities = jnp.einsum(
                "bkgqd,bkcd->bkgqc", do_block, v_block, preferred_element_type=jnp.float32
            )
            delta = _index_block(delta_blocks, q_block_index)[..., None]
            dscores = probabilities * (dprobabilities - delta)
            dk_block += jnp.einsum(
                "bkgqc,bkgqd->bkcd",
                dscores.astype(q_block.dtype),
                q_block,
                preferred_element_type=jnp.float32,
            )
            dq_block = jnp.einsum(
                "bkgqc,bkcd->bkgqd",
                dscores.astype(k_block.dtype),
                k_block,
                preferred_element_type=jnp.float32,
            )
            dq_accumulator = lax.dynamic_update_index_in_dim(
                dq_accumulator,
                _index_block(dq_accumulator, q_block_index) + dq_block,
                q_block_index,
                axis=0,
            )
            return dq_accumulator, dk_block, dv_block

        zeros_kv = jnp.zeros(k_block.shape, jnp.float32)
        dq_accumulator, dk_block, dv_block = lax.fori_loop(
            first_q_block, stop_q_block, visit, (dq_accumulator, zeros_kv, zeros_kv)
        )
        return dq_accumulator, (dk_block * static.scale, dv_block)

    dq_accumulator, (dk_blocks, dv_blocks) = lax.scan(
        key_block_gradients,
        jnp.zeros(q_blocks.shape, jnp.float32),
        (jnp.arange(k_blocks.shape[0]), k_blocks, v_blocks, segment_k_blocks),
    )
    return (
        (dq_accumulator * static.scale).astype(q_blocks.dtype),
        dk_blocks.astype(k_blocks.dtype),
        dv_blocks.astype(v_blocks.dtype),
        None,
        None,
    )


_blocked_attention.defvjp(_forward_with_residuals, _backward)


def _key_blocks_to_visit(static, q_block_index, xp=jnp):
    """(number of prefix blocks, first window block, total visits) for one query block.

    xp: the array module, numpy for the static block plans of the Pallas kernels."""
    first_query = q_block_index * static.block_q
    last_key_block = (first_query + static.block_q - 1) // static.block_k
    if static.window is None:
        return 0, 0, last_key_block + 1
    num_prefix_blocks = xp.minimum(-(-static.prefix // static.block_k), last_key_block + 1)
    first_window_block = xp.maximum(first_query - static.window + 1, 0) // static.block_k
    # Prefix blocks that overlap the window were already visited as prefix blocks.
    window_start = xp.maximum(first_window_block, num_prefix_blocks)
    num_window_blocks = xp.maximum(last_key_block - window_start + 1, 0)
    return num_prefix_blocks, window_start, num_prefix_blocks + num_window_blocks


def _query_blocks_that_see(static, k_block_index, num_q_blocks, xp=jnp):
    """[first, stop) range of query blocks with at least one query that may see this key block."""
    first_key = k_block_index * static.block_k
    first_q_block = first_key // static.block_q
    if static.window is None:
        return first_q_block, num_q_blocks
    last_key = first_key + static.block_k - 1
    window_stop = xp.minimum((last_key + static.window - 1) // static.block_q + 1, num_q_blocks)
    # A block holding prefix positions is seen by every later query.
    return first_q_block, xp.where(first_key < static.prefix, num_q_blocks, window_stop)


def _visible(window, prefix, query_positions, key_positions, segment_q, segment_k):
    """Boolean mask broadcastable to block scores [B, K, G, block_q, block_k]."""
    query_pos = query_positions[:, None]
    key_pos = key_positions[None, :]
    visible = (key_pos <= query_pos) & (key_pos >= 0)
    if window is not None:
        visible = visible & ((query_pos - key_pos < window) | (key_pos < prefix))
    visible = visible[None, None, None]
    if segment_q is not None:
        same_segment = segment_q[:, :, None] == segment_k[:, None, :]
        visible = visible & same_segment[:, None, None]
    return visible


def _block_scores(q_block, k_block, scale):
    scores = jnp.einsum("bkgqd,bkcd->bkgqc", q_block, k_block, preferred_element_type=jnp.float32)
    return scores * scale


def _initial_softmax_state(q_block):
    """(running max, running denominator, running numerator), all float32."""
    row_shape = q_block.shape[:-1]
    return (
        jnp.full(row_shape, -jnp.inf, jnp.float32),
        jnp.zeros(row_shape, jnp.float32),
        jnp.zeros(q_block.shape, jnp.float32),
    )


def _online_softmax_step(state, q_block, k_block, v_block, visible, scale):
    running_max, denominator, numerator = state
    scores = jnp.where(visible, _block_scores(q_block, k_block, scale), -jnp.inf)
    new_max = jnp.maximum(running_max, scores.max(axis=-1))
    # Rows with nothing visible yet keep max -inf; shift them by 0 so exp gives 0, not NaN.
    shift = jnp.where(new_max == -jnp.inf, 0.0, new_max)
    probabilities = jnp.exp(scores - shift[..., None])
    rescale = jnp.exp(running_max - shift)
    denominator = denominator * rescale + probabilities.sum(axis=-1)
    numerator = numerator * rescale[..., None] + jnp.einsum(
        "bkgqc,bkcd->bkgqd",
        probabilities.astype(v_block.dtype),
        v_block,
        preferred_element_type=jnp.float32,
    )
    return new_max, denominator, numerator


def _finish_softmax(state, dtype):
    """-> (output block in dtype, log-sum-exp of each row)."""
    running_max, denominator, numerator = state
    # Every real query sees itself; the guard only keeps 0/0 out of never-used rows.
    safe_denominator = jnp.where(denominator > 0, denominator, 1.0)
    o_block = (numerator / safe_denominator[..., None]).astype(dtype)
    return o_block, running_max + jnp.log(safe_denominator)


def _block_sizes(seq_len, block_q, block_k):
    """-> (block_q, block_k, padded length): blocks divide the padded length."""
    if min(block_q, block_k) < 1 or max(block_q, block_k) % min(block_q, block_k):
        raise ValueError(
            f"attention: block_q={block_q} and block_k={block_k} must be positive and one "
            "must divide the other"
        )
    if seq_len <= min(block_q, block_k):
        short_block = _round_up(seq_len, _BLOCK_ALIGNMENT)
        return short_block, short_block, short_block
    return block_q, block_k, _round_up(seq_len, max(block_q, block_k))


def _round_up(value, multiple):
    return -(-value // multiple) * multiple


def _index_block(blocks, index):
    """blocks[index] along the leading block axis; None stays None."""
    if blocks is None:
        return None
    return lax.dynamic_index_in_dim(blocks, index, axis=0, keepdims=False)


def _query_blocks(q, kv_heads, block, padded_len):
    """[B, T, H, D] -> [T_pad / block, B, K, G, block, D]."""
    batch, seq_len, heads, head_dim = q.shape
    q = jnp.pad(q, ((0, 0), (0, padded_len - seq_len), (0, 0), (0, 0)))
    q = q.reshape(batch, padded_len // block, block, kv_heads, heads // kv_heads, head_dim)
    return q.transpose(1, 0, 3, 4, 2, 5)


def _key_blocks(k, block, padded_len):
    """[B, T, K, D] -> [T_pad / block, B, K, block, D]."""
    batch, seq_len, kv_heads, head_dim = k.shape
    k = jnp.pad(k, ((0, 0), (0, padded_len - seq_len), (0, 0), (0, 0)))
    return k.reshape(batch, padded_len // block, block, kv_heads, head_dim).transpose(1, 0, 3, 2, 4)


def _segment_blocks(segment_ids, block, padded_len):
    """Segment ids [B, T] -> [T_pad / block, B, block]."""
    batch, seq_len = segment_ids.shape
    padded = jnp.pad(segment_ids, ((0, 0), (0, padded_len - seq_len)))
    return padded.reshape(batch, padded_len // block, block).transpose(1, 0, 2)


def _from_query_blocks(o_blocks, seq_len):
    """[T_pad / block, B, K, G, block, D] -> [B, T, H, D]."""
    num_blocks, batch, kv_heads, group, block, head_dim = o_blocks.shape
    o = o_blocks.transpose(1, 0, 4, 2, 3, 5)
    return o.reshape(batch, num_blocks * block, kv_heads * group, head_dim)[:, :seq_len]
