"""Causal softmax attention: reference, blocked XLA, KV cache and decode."""

from kernels.attention.api import KVCache, attention, attention_decode, init_kv_cache

__all__ = ["KVCache", "attention", "attention_decode", "init_kv_cache"]
