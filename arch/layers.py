"""Building blocks shared by every model: projections, RMSNorm, SwiGLU MLP and rotary embeddings.

Parameters are float32 and carry logical axis names (`embed`, `heads`, `mlp`,
`vocab`) through `nnx.with_partitioning`; `train.sharding` maps those names onto
the mesh with one rule table. Activations run in the config's compute dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from arch.config import ModelConfig


def compute_dtype(cfg: ModelConfig) -> jnp.dtype:
    return jnp.dtype(cfg.dtype)


def dense(
    in_features: int,
    out_features: int,
    axes: tuple[str | None, str | None],
    cfg: ModelConfig,
    *,
    rngs: nnx.Rngs,
    std: float | None = None,
    use_bias: bool = False,
) -> nnx.Linear:
    """A bias-free projection whose kernel [in, out] is named by `axes` for sharding."""
    init = nnx.initializers.normal(cfg.init_std if std is None else std)
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=compute_dtype(cfg),
        param_dtype=jnp.float32,
        kernel_init=nnx.with_partitioning(init, axes),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (axes[1],)),
        rngs=rngs,
    )


def output_std(cfg: ModelConfig) -> float:
    """Init scale of projections that write into the residual stream, shrunk with depth (GPT-2 style)."""
    return cfg.init_std / (2 * cfg.n_layers) ** 0.5


class RMSNorm(nnx.Module):
    """RMS normalisation computed in float32, returned in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6, *, axis_name: str | None = "embed"):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), out_sharding=(axis_name,))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * self.scale[...]).astype(x.dtype)


class SwiGLU(nnx.Module):
    """The gated MLP of LLaMA-style blocks: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, hidden: int | None = None, *, rngs: nnx.Rngs):
        hidden = hidden or cfg.resolved_mlp_dim
        self.gate = dense(cfg.d_model, hidden, ("embed", "mlp"), cfg, rngs=rngs)
        self.up = dense(cfg.d_model, hidden, ("embed", "mlp"), cfg, rngs=rngs)
        self.down = dense(hidden, cfg.d_model, ("mlp", "embed"), cfg, rngs=rngs, std=output_std(cfg))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


def rotary(x_BTHD: jax.Array, positions_BT: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding (rotate-half convention), angles computed in float32."""
    head_dim = x_BTHD.shape[-1]
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head dim, got {head_dim}")
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
    angles = positions_BT.astype(jnp.float32)[..., None] * inv_freq  # [B, T, half]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1 = x_BTHD[..., :half].astype(jnp.float32)
    x2 = x_BTHD[..., half:].astype(jnp.float32)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_BTHD.dtype)


def positions_from_segments(segment_ids_BT: jax.Array) -> jax.Array:
    """Position of each token inside its packed segment (restarts at 0 where the id changes)."""
    batch, length = segment_ids_BT.shape
    index = jnp.broadcast_to(jnp.arange(length), (batch, length))
    starts = jnp.concatenate(
        [jnp.ones((batch, 1), bool), segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1
    )
    segment_start = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
    return index - segment_start
