"""The Titans neural long-term memory: reference, chunked XLA, Pallas."""

from kernels.titans_memory.api import (
    TitansMemoryState,
    init_titans_memory_state,
    memory_layer_shapes,
    titans_memory,
    titans_memory_read,
    titans_memory_step,
)

__all__ = [
    "TitansMemoryState",
    "init_titans_memory_state",
    "memory_layer_shapes",
    "titans_memory",
    "titans_memory_read",
    "titans_memory_step",
]
