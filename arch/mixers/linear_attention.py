"""Causal linear attention mixers on the shared `kernels.linear_attention` op.

`linear_attention` is the zoology baseline: q and k are projected to a feature
dim per head and passed through a feature map (elu+1 by default, or the
identity), optionally normalised. Its decode state is the op's recurrent state:
S [H, F, Dv] and, when normalised, z [H, F], whatever the context length.

`based` is the same mixer with BASED's defaults (Arora et al., 2024): the taylor2
feature map over 16 projected dims, normalised, no rotary. Sequences up to
`parallel_max_len` tokens take BASED's quadratic form, longer ones the chunked kernel.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

import kernels
from arch.config import ModelConfig
from arch.layers import compute_dtype, dense, output_std
from arch.registry import MixerOptions, register_mixer

# Pointwise maps applied in the mixer; "taylor2" is expanded inside the kernel instead.
POINTWISE_FEATURE_MAPS = {
    "identity": lambda x: x,
    "elu1": lambda x: jax.nn.elu(x) + 1.0,
}
FEATURE_MAPS = tuple(POINTWISE_FEATURE_MAPS) + ("taylor2",)


@dataclasses.dataclass(frozen=True)
class LinearAttentionOptions(MixerOptions):
    _path: ClassVar[str] = "model.mixer_options.linear_attention"

    feature_map: str = "elu1"
    feature_dim: int = 0  # q/k dim per head; 0 means the model's head dim
    normalize: bool = True
    eps: float = 1e-6
    chunk_size: int = 64
    implementation: str = ""  # kernel implementation; "" picks the best for the backend
    # Sequences up to this length use the quadratic form (taylor2 only); 0 means always the kernel.
    parallel_max_len: int = 0

    def validate(self) -> None:
        self.check(self.feature_map in FEATURE_MAPS, "feature_map", f"must be one of {FEATURE_MAPS}")
        self.check(self.parallel_max_len >= 0, "parallel_max_len", "must be >= 0 (0 never uses the quadratic form)")
        self.check(
            self.parallel_max_len == 0 or self.feature_map == "taylor2",
            "parallel_max_len",
            f"the quadratic form is taylor2's; set feature_map='taylor2' or parallel_max_len=0 "
            f"(feature_map is {self.feature_map!r})",
        )
        self.check(self.feature_dim >= 0, "feature_dim", "must be >= 0 (0 means the head dim)")
        self.check(self.eps > 0, "eps", "must be positive")
        self.check(self.chunk_size >= 1, "chunk_size", "must be a positive integer")
        self.check(
            self.implementation in ("",) + kernels.IMPLEMENTATIONS,
            "implementation",
            f"must be '' (automatic) or one of {kernels.IMPLEMENTATIONS}",
        )


@dataclasses.dataclass(frozen=True)
class BasedOptions(LinearAttentionOptions):
    """BASED's linear attention: eps as in the HazyResearch reference (its normaliser is >= 1/2 per key)."""

    _path: ClassVar[str] = "model.mixer_options.based"

    feature_map: str = "taylor2"
    feature_dim: int = 16
    normalize: bool = True
    eps: float = 1e-12


class LinearAttention(nnx.Module):
    """Feature-map linear attention with a constant-size recurrent state."""

    def __init__(self, cfg: ModelConfig, options: LinearAttentionOptions, *, rngs: nnx.Rngs):
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.resolved_head_dim
        self.feature_dim = options.feature_dim or self.head_dim
        self.normalize = options.normalize
        self.eps = options.eps
        self.chunk_size = options.chunk_size
        self.implementation = options.implementation or None
        self.parallel_max_len = options.parallel_max_len
        self.pointwise = options.feature_map if options.feature_map in POINTWISE_FEATURE_MAPS else None
        self.kernel_feature_map = "taylor2" if options.feature_map == "taylor2" else None
        self.dtype = compute_dtype(cfg)
        d = cfg.d_model
        self.q_proj = dense(d, self.n_heads * self.feature_dim, ("embed", "heads"), cfg, rngs=rngs)
        self.k_proj = dense(d, self.n_heads * self.feature_dim, ("embed", "heads"), cfg, rngs=rngs)
        self.v_proj = dense(d, self.n_heads * self.head_dim, ("embed", "heads"), cfg, rngs=rngs)
        self.o_proj = dense(self.n_heads * self.head_dim, d, ("heads", "embed"), cfg, rngs=rngs, std=output_std(cfg))

    def _project(self, x):
        """q, k [..., H, F] after the pointwise feature map; v [..., H, Dv]."""
        lead = x.shape[:-1]
        q = self.q_proj(x).reshape(*lead, self.n_heads, self.feature_dim)
        k = self.k_proj(x).reshape(*lead, self.n_heads, self.feature_dim)
        v = self.v_proj(x).reshape(*lead, self.n_heads, self.head_dim)
        if self.pointwise is not None:
            q, k = POINTWISE_FEATURE_MAPS[self.pointwise](q), POINTWISE_FEATURE_MAPS[self.pointwise](k)
        return q, k, v

    def _output(self, y):
        return self.o_proj(y.reshape(*y.shape[:-2], self.n_heads * self.head_dim))

    def _run(self, x_BTD, initial_state, return_final_state: bool):
        q, k, v = self._project(x_BTD)
        return kernels.linear_attention(
            q,
            k,
            v,
            normalize=self.normalize,
            feature_map=self.kernel_feature_map,
            initial_state=initial_state,
            return_final_state=return_final_state,
            chunk_size=self.chunk_size,
            implementation=self.implementation,
            eps=self.eps,
        )

    def __call__(self, x_BTD, *, segment_ids=None, positions=None):
        if segment_ids is not None:
            raise ValueError(
                "linear_attention does not take segment_ids: its state cannot be reset per packed segment; "
                "train it on unpacked sequences"
            )
        if x_BTD.shape[1] <= self.parallel_max_len:
            q, k, v = self._project(x_BTD)
            return self._output(kernels.taylor2_quadratic_attention(q, k, v, normalize=self.normalize, eps=self.eps))
        return self._output(self._run(x_BTD, None, False))

    def init_state(self, batch: int, max_len: int) -> kernels.LinearAttentionState:
        return kernels.init_linear_attention_state(
            batch,
            self.n_heads,
            self.feature_dim,
            self.head_dim,
            feature_map=self.kernel_feature_map,
            normalize=self.normalize,
        )

    def prefill(self, x_BTD, state):
        y, state = self._run(x_BTD, state, True)
        return self._output(y), state

    def step(self, x_BD, state):
        q, k, v = self._project(x_BD)
        y, state = kernels.linear_attention_step(
            q, k, v, state, normalize=self.normalize, feature_map=self.kernel_feature_map, eps=self.eps
        )
        return self._output(y), state

    def state_bytes(self, batch: int, length: int) -> int:
        """Bytes of S (and z) in float32: constant in the context length."""
        features = 1 + self.feature_dim + self.feature_dim**2 if self.kernel_feature_map else self.feature_dim
        per_head = features * self.head_dim + (features if self.normalize else 0)
        return batch * self.n_heads * per_head * jnp.dtype(jnp.float32).itemsize


register_mixer(
    "linear_attention",
    options=LinearAttentionOptions,
    description="causal linear attention (elu+1, identity or taylor2 feature map), constant-size state",
)(LinearAttention)
register_mixer(
    "based",
    options=BasedOptions,
    description="BASED linear attention: taylor2 feature map over 16 dims, normalised; quadratic form up to parallel_max_len",
)(LinearAttention)
