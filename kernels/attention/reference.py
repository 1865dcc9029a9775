"""Causal softmax attention, the obvious way: a full [T, T] masked softmax in float32.

The oracle for every attention test. Memory is quadratic in the sequence length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention(q, k, v, *, window, prefix, segment_ids, scale):
    """q [B,T,H,D], k/v [B,T,K,D] -> o [B,T,H,D]; see `kernels.attention` for the mask rule."""
    seq_len = q.shape[1]
    positions = jnp.arange(seq_len)
    visible_TS = _visible(positions[:, None], positions[None, :], window, prefix)[None]
    if segment_ids is not None:
        visible_TS = visible_TS & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return _masked_softmax_attention(q, k, v, visible_TS, scale)


def attention_decode(q, k, v, cache, *, window, prefix, scale):
    """New tokens q [B,T,H,D], k/v [B,T,K,D] attend to the cache and to the chunk itself -> o."""
    chunk_len = q.shape[1]
    query_positions = cache.length + jnp.arange(chunk_len)
    key_positions = jnp.concatenate([cache.slot_pos, query_positions])
    keys = jnp.concatenate([cache.k, k.astype(cache.k.dtype)], axis=1)
    values = jnp.concatenate([cache.v, v.astype(cache.v.dtype)], axis=1)
    visible_TS = _visible(query_positions[:, None], key_positions[None, :], window, prefix)
    # Empty cache slots hold position -1.
    visible_TS = visible_TS & (key_positions[None, :] >= 0)
    return _masked_softmax_attention(q, keys, values, visible_TS[None], scale)


def _visible(query_pos, key_pos, window, prefix):
    visible = key_pos <= query_pos
    if window is not None:
        visible = visible & ((query_pos - key_pos < window) | (key_pos < prefix))
    return visible


def _masked_softmax_attention(q, k, v, visible_BTS, scale):
    """Dense attention with an explicit boolean mask [B or 1, Tq, Tk], all in float32."""
    heads_per_kv_head = q.shape[2] // k.shape[2]
    k_BSHD = jnp.repeat(k.astype(jnp.float32), heads_per_kv_head, axis=2)
    v_BSHD = jnp.repeat(v.astype(jnp.float32), heads_per_kv_head, axis=2)
    exact = jax.lax.Precision.HIGHEST  # the oracle must not use bf16 matmul passes on TPU
    scores_BHTS = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k_BSHD, precision=exact)
    scores_BHTS = scores_BHTS * scale
    scores_BHTS = jnp.where(visible_BTS[:, None], scores_BHTS, -jnp.inf)
    weights_BHTS = jax.nn.softmax(scores_BHTS, axis=-1)
    o_BTHD = jnp.einsum("bhts,bshd->bthd", weights_BHTS, v_BSHD, precision=exact)
    return o_BTHD.astype(q.dtype)
