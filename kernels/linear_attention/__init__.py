"""Causal linear attention (optional decay, normalizer and BASED's taylor2 feature map):
reference, chunked XLA, Pallas TPU and GPU kernels, and the decode step."""

from kernels.linear_attention.api import (
    LinearAttentionState,
    init_linear_attention_state,
    linear_attention,
    linear_attention_step,
)
from kernels.linear_attention.feature_maps import taylor2_feature_map
from kernels.linear_attention.reference import taylor2_quadratic_attention

__all__ = [
    "LinearAttentionState",
    "init_linear_attention_state",
    "linear_attention",
    "linear_attention_step",
    "taylor2_feature_map",
    "taylor2_quadratic_attention",
]
