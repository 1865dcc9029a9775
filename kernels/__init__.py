"""memzoo's shared op layer: every op takes [batch, seq, heads, head_dim] arrays and an
`implementation=` choice ("reference", "xla", "pallas"; None picks the backend default)."""

from kernels._backend import IMPLEMENTATIONS, available_ops, default_implementation
from kernels.attention import KVCache, attention, attention_decode, init_kv_cache

__all__ = [
    "IMPLEMENTATIONS",
    "KVCache",
    "attention",
    "attention_decode",
    "available_ops",
    "default_implementation",
    "init_kv_cache",
]
