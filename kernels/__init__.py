"""memzoo's shared op layer: every op takes [batch, seq, heads, head_dim] arrays and an
`implementation=` choice ("reference", "xla", "pallas"; None picks the backend default)."""

from kernels._backend import IMPLEMENTATIONS, available_ops, default_implementation
from kernels._sharding import kernel_partition
from kernels.attention import KVCache, attention, attention_decode, init_kv_cache
from kernels.delta_rule import delta_rule, delta_rule_step, l2_normalize
from kernels.linear_attention import (
    LinearAttentionState,
    init_linear_attention_state,
    linear_attention,
    linear_attention_step,
    taylor2_feature_map,
    taylor2_quadratic_attention,
)
from kernels.titans_memory import (
    TitansMemoryState,
    init_titans_memory_state,
    memory_layer_shapes,
    titans_memory,
    titans_memory_read,
    titans_memory_step,
)

__all__ = [
    "IMPLEMENTATIONS",
    "KVCache",
    "LinearAttentionState",
    "TitansMemoryState",
    "attention",
    "attention_decode",
    "available_ops",
    "default_implementation",
    "delta_rule",
    "delta_rule_step",
    "init_kv_cache",
    "init_linear_attention_state",
    "init_titans_memory_state",
    "kernel_partition",
    "l2_normalize",
    "linear_attention",
    "linear_attention_step",
    "memory_layer_shapes",
    "taylor2_feature_map",
    "taylor2_quadratic_attention",
    "titans_memory",
    "titans_memory_read",
    "titans_memory_step",
]
