"""Public causal softmax attention: parallel form, KV cache and decode form.

Arrays are [batch, seq, heads, head_dim]. Key j is visible to query i iff
j <= i, and (window is None or i - j < window or j < prefix), and (no segment
ids or both tokens are in the same segment). Query head h reads kv head
h // (heads // kv_heads). Softmax statistics are float32 whatever the input dtype.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kernels import _backend
from kernels._sharding import per_shard
from kernels._checks import as_int, check_bthd
from kernels.attention import reference, xla


class KVCache(NamedTuple):
    """Keys and values of past tokens, shared by the whole batch's position.

    k, v: [B, C, K, D]; slot_pos: int32 [C], the absolute position held by each
    slot (-1 when empty); length: int32 scalar, the number of tokens seen so far.
    Position p lives in slot p when p < prefix, otherwise in the ring
    prefix + (p - prefix) % (C - prefix); prefix slots are never overwritten.
    """

    k: jax.Array
    v: jax.Array
    slot_pos: jax.Array
    length: jax.Array


def init_kv_cache(
    batch: int,
    max_len: int,
    kv_heads: int,
    head_dim: int,
    *,
    window: int | None = None,
    prefix: int = 0,
    dtype=jnp.float32,
) -> KVCache:
    """An empty cache of capacity max_len, or min(max_len, prefix + window) with a window."""
    for name, value in (("batch", batch), ("max_len", max_len), ("kv_heads", kv_heads), ("head_dim", head_dim)):
        if as_int(value) is None or value < 1:
            raise ValueError(f"init_kv_cache: {name} must be a positive int, got {value!r}")
    window, prefix = _checked_window_and_prefix("init_kv_cache", window, prefix)
    capacity = max_len if window is None else min(max_len, prefix + window)
    return KVCache(
        k=jnp.zeros((batch, capacity, kv_heads, head_dim), dtype),
        v=jnp.zeros((batch, capacity, kv_heads, head_dim), dtype),
        slot_pos=jnp.full((capacity,), -1, jnp.int32),
        length=jnp.zeros((), jnp.int32),
    )


def attention(
    q,
    k,
    v,
    *,
    window: int | None = None,
    prefix: int = 0,
    segment_ids=None,
    scale: float | None = None,
    implementation: str | None = None,
):
    """Causal attention: q [B,T,H,D], k/v [B,T,K,D] with H % K == 0 -> o [B,T,H,D] in q's dtype.

    window: each query sees at most its last `window` tokens, itself included.
    prefix: the first `prefix` tokens stay visible to every later query.
    segment_ids: int [B, T]; tokens only see tokens of the same segment.
    scale: multiplies q.k; defaults to 1/sqrt(D).
    implementation: None (backend default), "reference", "xla" or "pallas".
    """
    _check_qkv("attention", q, k, v)
    window, prefix = _checked_window_and_prefix("attention", window, prefix)
    if segment_ids is not None:
        segment_ids = jnp.asarray(segment_ids)
        expected = q.shape[:2]
        if segment_ids.shape != expected or not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(
                f"attention: segment_ids must be an int array of shape [batch, seq] = {expected}, "
                f"got {segment_ids.dtype} {segment_ids.shape}"
            )
    implementation_fn = _backend.dispatch("attention", implementation)
    return implementation_fn(
        q,
        k,
        v,
        window=window,
        prefix=prefix,
        segment_ids=segment_ids,
        scale=_default_scale(scale, q),
    )


def attention_decode(
    q,
    k,
    v,
    cache: KVCache,
    *,
    window: int | None = None,
    prefix: int = 0,
    scale: float | None = None,
    implementation: str | None = None,
):
    """T new tokens at positions cache.length ... attend to the cache and causally to themselves.

    q [B,T,H,D], k/v [B,T,K,D] -> (o [B,T,H,D], cache with the chunk written in).
    T = 1 decodes one token; larger T is chunked prefill. Use the same window and
    prefix as `init_kv_cache` and `attention`.

    A cache without a usable ring (no window, or capacity < prefix + window)
    cannot hold more than its capacity: this raises ValueError when the chunk
    alone is too long, or when cache.length is concrete and length + T would
    overflow. Under jit, where length is traced, an overflowing call returns NaN
    outputs instead.
    """
    _check_qkv("attention_decode", q, k, v)
    window, prefix = _checked_window_and_prefix("attention_decode", window, prefix)
    batch, chunk_len, _, head_dim = q.shape
    kv_heads = k.shape[2]
    capacity = cache.k.shape[1]
    expected_cache_shape = (batch, capacity, kv_heads, head_dim)
    if cache.k.shape != expected_cache_shape or cache.v.shape != expected_cache_shape:
        raise ValueError(
            f"attention_decode: cache k/v must be [batch, capacity, kv_heads, head_dim] = "
            f"{expected_cache_shape} to match k, got {cache.k.shape} and {cache.v.shape}"
        )
    if cache.slot_pos.shape != (capacity,):
        raise ValueError(
            f"attention_decode: cache.slot_pos must have shape ({capacity},), got {cache.slot_pos.shape}"
        )
    ring_is_usable = _check_capacity(capacity, cache.length, chunk_len, window, prefix)

    implementation_fn = _backend.dispatch("attention_decode", implementation)
    o = implementation_fn(q, k, v, cache, window=window, prefix=prefix, scale=_default_scale(scale, q))
    if not ring_is_usable:
        overflowed = cache.length + chunk_len > capacity
        o = jnp.where(overflowed, jnp.asarray(jnp.nan, o.dtype), o)
    return o, _write_chunk(cache, k, v, prefix)


def _write_chunk(cache: KVCache, k, v, prefix: int) -> KVCache:
    """Store the chunk's keys and values at their slots; advance length."""
    capacity = cache.k.shape[1]
    chunk_len = k.shape[1]
    ring_size = capacity - prefix
    positions = cache.length + jnp.arange(chunk_len, dtype=jnp.int32)
    ring_slots = prefix + (positions - prefix) % max(ring_size, 1)
    slots = jnp.where(positions < prefix, positions, ring_slots)
    if chunk_len > ring_size:
        # A chunk longer than the ring keeps its prefix positions and its last ring_size
        # tokens; the rest would be overwritten within this same write, so drop them
        # (an out-of-range slot with mode="drop") to keep scatter indices unique.
        token_index = jnp.arange(chunk_len)
        kept = (positions < prefix) | (token_index >= chunk_len - ring_size)
        slots = jnp.where(kept, slots, capacity)
    return KVCache(
        k=cache.k.at[:, slots].set(k.astype(cache.k.dtype), mode="drop"),
        v=cache.v.at[:, slots].set(v.astype(cache.v.dtype), mode="drop"),
        slot_pos=cache.slot_pos.at[slots].set(positions, mode="drop"),
        length=cache.length + chunk_len,
    )


def _check_capacity(capacity, length, chunk_len, window, prefix) -> bool:
    """Raise if the chunk cannot fit; return whether the ring may wrap (old tokens evicted)."""
    if prefix > capacity:
        raise ValueError(
            f"attention_decode: prefix={prefix} does not fit in a cache of capacity {capacity}; "
            "create the cache with init_kv_cache(..., prefix=prefix)"
        )
    if window is not None and capacity - prefix >= window:
        return True
    how_to_fix = (
        "create the cache with a larger max_len"
        + ("" if window is None else f" (at least prefix + window = {prefix + window} to use it as a ring)")
    )
    if chunk_len > capacity:
        raise ValueError(
            f"attention_decode: a chunk of {chunk_len} tokens does not fit in a cache of "
            f"capacity {capacity}; {how_to_fix}"
        )
    if not isinstance(length, jax.core.Tracer) and int(length) + chunk_len > capacity:
        raise ValueError(
            f"attention_decode: cache overflow: length {int(length)} + {chunk_len} new tokens > "
            f"capacity {capacity}; {how_to_fix}"
        )
    return False


def _check_qkv(op: str, q, k, v) -> None:
    check_bthd(op, q=q, k=k, v=v)
    if k.shape != v.shape:
        raise ValueError(f"{op}: k and v must have the same shape, got k {k.shape} and v {v.shape}")
    batch, seq_len, heads, head_dim = q.shape
    kv_batch, kv_seq_len, kv_heads, kv_head_dim = k.shape
    for what, q_size, kv_size in (
        ("batch", batch, kv_batch),
        ("sequence length", seq_len, kv_seq_len),
        ("head_dim", head_dim, kv_head_dim),
    ):
        if q_size != kv_size:
            raise ValueError(
                f"{op}: q has {what} {q_size} but k/v have {kv_size}; they must match "
                f"(q {q.shape}, k {k.shape})"
            )
    if seq_len < 1:
        raise ValueError(f"{op}: q, k and v hold no tokens (sequence length 0); pass at least one")
    if heads % kv_heads:
        raise ValueError(
            f"{op}: k has {kv_heads} kv heads but q has {heads} heads; "
            "heads must be a multiple of kv heads"
        )


def _checked_window_and_prefix(op: str, window, prefix) -> tuple[int | None, int]:
    """Validate window and prefix; return them as Python ints (they are compile-time constants)."""
    if window is not None:
        if as_int(window) is None or window < 1:
            raise ValueError(
                f"{op}: window must be None or an int >= 1 (1 = only the token itself), got {window!r}"
            )
        window = as_int(window)
    if as_int(prefix) is None or prefix < 0:
        raise ValueError(f"{op}: prefix must be an int >= 0, got {prefix!r}")
    return window, as_int(prefix)


def _default_scale(scale, q) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale


def _pallas_attention(q, k, v, **options):
    kernels_module = _backend.pallas_kernel_module("attention")
    return kernels_module.attention(q, k, v, interpret=_backend.interpret_mode(), **options)


def _pallas_attention_decode(q, k, v, cache, **options):
    kernels_module = _backend.pallas_kernel_module("attention")
    return kernels_module.attention_decode(q, k, v, cache, interpret=_backend.interpret_mode(), **options)


_backend.register_op(
    "attention",
    {
        "reference": reference.attention,
        "xla": xla.attention,
        "pallas": per_shard(
            _pallas_attention,
            arg_layouts=("BTH", "BTH", "BTH"),
            kwarg_layouts={"segment_ids": "BT"},
            out_layouts="BTH",
        ),
    },
)
_backend.register_op(
    "attention_decode",
    {
        "reference": reference.attention_decode,
        "xla": xla.attention_decode,
        "pallas": per_shard(
            _pallas_attention_decode,
            arg_layouts=("BTH", "BTH", "BTH", KVCache(k="BTH", v="BTH", slot_pos="", length="")),
            kwarg_layouts={},
            out_layouts="BTH",
        ),
    },
)
