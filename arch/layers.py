"""Building blocks shared by every model: projections, RMSNorm, SwiGLU MLP, rotary embeddings,
causal short convolutions and persistent tokens.

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


def short_conv_weight(kernel_size: int, channels: int, axis_name: str | None, *, rngs: nnx.Rngs) -> nnx.Param:
    """A depthwise convolution kernel [kernel_size, channels] with PyTorch's Conv1d default init
    (uniform within 1/sqrt(fan_in), fan_in = kernel_size), as BASED and Titans train with."""
    init = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=0, out_axis=1)
    return nnx.Param(init(rngs.params(), (kernel_size, channels), jnp.float32), out_sharding=(None, axis_name))


def causal_depthwise_conv(
    window_BSC: jax.Array, weight_KC: jax.Array, segment_ids_BS: jax.Array | None = None
) -> jax.Array:
    """Float32 outputs for the last S - (K - 1) positions of `window`, each from itself and its K - 1 predecessors.

    Tap j of the kernel weighs the input K - 1 - j positions back (tap K - 1 is the current token).
    With segment ids (aligned with the window), a tap never reads another segment's token.
    """
    k = weight_KC.shape[0]
    length = window_BSC.shape[1] - (k - 1)
    out = jnp.zeros((window_BSC.shape[0], length, window_BSC.shape[2]), jnp.float32)
    for tap in range(k):
        term = window_BSC[:, tap : tap + length] * weight_KC[tap]
        if segment_ids_BS is not None:
            same = segment_ids_BS[:, tap : tap + length] == segment_ids_BS[:, k - 1 :]
            term = jnp.where(same[..., None], term, 0)
        out = out + term.astype(jnp.float32)
    return out


class ShortConv(nnx.Module):
    """Causal depthwise convolution over the last `kernel_size` tokens, channels last.

    The decode state is the last kernel_size - 1 inputs [B, kernel_size - 1, C], zeros
    before the first token, so a call with a carried state continues the previous one.
    """

    def __init__(self, channels: int, kernel_size: int, cfg: ModelConfig, *, axis_name: str | None, rngs: nnx.Rngs):
        self.channels = channels
        self.kernel_size = kernel_size
        self.dtype = compute_dtype(cfg)
        self.weight = short_conv_weight(kernel_size, channels, axis_name, rngs=rngs)

    def init_state(self, batch: int) -> jax.Array:
        return jnp.zeros((batch, self.kernel_size - 1, self.channels), self.dtype)

    def __call__(self, x_BTC: jax.Array, state: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(float32 outputs [B, T, C], the new state)."""
        window = jnp.concatenate([state, x_BTC.astype(self.dtype)], axis=1)
        out = causal_depthwise_conv(window, self.weight[...].astype(self.dtype))
        return out, window[:, window.shape[1] - (self.kernel_size - 1) :]


class PersistentTokens(nnx.Module):
    """N learned d_model vectors a mixer puts before its input (Titans' persistent memory).

    They stand in for block inputs, which the pre-norm brings to unit RMS, so they start at unit scale.
    """

    def __init__(self, count: int, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.count = count
        self.dtype = compute_dtype(cfg)
        self.tokens = nnx.Param(
            nnx.initializers.normal(1.0)(rngs.params(), (count, cfg.d_model), jnp.float32), out_sharding=(None, "embed")
        )

    def batch(self, batch: int) -> jax.Array:
        """The tokens for every row [B, N, D], in the compute dtype."""
        tokens = self.tokens[...].astype(self.dtype)
        return jnp.broadcast_to(tokens[None], (batch, *tokens.shape))

    def prepend(self, x_BTD: jax.Array) -> jax.Array:
        return jnp.concatenate([self.batch(x_BTD.shape[0]), x_BTD], axis=1)
