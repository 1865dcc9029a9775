"""BaseConv, the gated short convolution of BASED (Arora et al., 2024).

    y = (SiLU(causal_depthwise_conv(x W_conv)) * (x W_gate)) W_out

BASED writes the two input projections as one d -> 2 * d_inner projection split in
halves; two projections are the same function and shard cleanly over `mlp`. The
convolution looks back `kernel_size` tokens, so the decode state is the last
`kernel_size - 1` convolution inputs, whatever the length.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from arch.config import ModelConfig
from arch.layers import causal_depthwise_conv, compute_dtype, dense, output_std, short_conv_weight
from arch.registry import MixerOptions, register_mixer


@dataclasses.dataclass(frozen=True)
class BaseConvOptions(MixerOptions):
    _path: ClassVar[str] = "model.mixer_options.base_conv"

    kernel_size: int = 3  # tokens the convolution sees, the current one included
    expand: int = 2  # the input projections give expand * d_model features, half convolved, half gating

    def validate(self) -> None:
        self.check(self.kernel_size >= 1, "kernel_size", "must be >= 1")
        self.check(self.expand >= 1, "expand", "must be >= 1")

    def check_model(self, model: ModelConfig) -> None:
        self.check(
            self.expand * model.d_model % 2 == 0,
            "expand",
            f"expand * d_model = {self.expand} * {model.d_model} must be even (it is split in two halves)",
        )


class BaseConv(nnx.Module):
    """Gated causal depthwise convolution; with segment_ids it never reads across packed sequences."""

    def __init__(self, cfg: ModelConfig, options: BaseConvOptions, *, rngs: nnx.Rngs):
        self.kernel_size = options.kernel_size
        self.inner = options.expand * cfg.d_model // 2
        self.dtype = compute_dtype(cfg)
        self.conv_proj = dense(cfg.d_model, self.inner, ("embed", "mlp"), cfg, rngs=rngs, use_bias=True)
        self.gate_proj = dense(cfg.d_model, self.inner, ("embed", "mlp"), cfg, rngs=rngs, use_bias=True)
        self.out_proj = dense(self.inner, cfg.d_model, ("mlp", "embed"), cfg, rngs=rngs, use_bias=True, std=output_std(cfg))
        self.conv_weight = short_conv_weight(self.kernel_size, self.inner, "mlp", rngs=rngs)

    def _convolve(self, window_BSI: jax.Array, segment_ids_BS: jax.Array | None = None) -> jax.Array:
        """SiLU of the causal convolution for the last S - (k - 1) positions of `window`."""
        weight = self.conv_weight[...].astype(self.dtype)
        return jax.nn.silu(causal_depthwise_conv(window_BSI, weight, segment_ids_BS)).astype(self.dtype)

    def _output(self, conv_BTI: jax.Array, x_BTD: jax.Array) -> jax.Array:
        return self.out_proj(conv_BTI * self.gate_proj(x_BTD))

    def __call__(self, x_BTD, *, segment_ids=None, positions=None):
        u = self.conv_proj(x_BTD)
        window = jnp.pad(u, ((0, 0), (self.kernel_size - 1, 0), (0, 0)))
        if segment_ids is not None:
            # Padding gets an id no real segment has, so it behaves like the zeros before the sequence.
            segment_ids = jnp.pad(segment_ids, ((0, 0), (self.kernel_size - 1, 0)), constant_values=-1)
        return self._output(self._convolve(window, segment_ids), x_BTD)

    def init_state(self, batch: int, max_len: int) -> jax.Array:
        """The last kernel_size - 1 convolution inputs [B, k - 1, inner], zeros before the first token."""
        return jnp.zeros((batch, self.kernel_size - 1, self.inner), self.dtype)

    def prefill(self, x_BTD, state):
        window = jnp.concatenate([state, self.conv_proj(x_BTD)], axis=1)
        new_state = window[:, window.shape[1] - (self.kernel_size - 1) :]
        return self._output(self._convolve(window), x_BTD), new_state

    def step(self, x_BD, state):
        y, state = self.prefill(x_BD[:, None], state)
        return y[:, 0], state

    def state_bytes(self, batch: int, length: int) -> int:
        """Bytes of the decode state: kernel_size - 1 inputs per row, the same at every length."""
        return batch * (self.kernel_size - 1) * self.inner * jnp.dtype(self.dtype).itemsize


register_mixer(
    "base_conv",
    options=BaseConvOptions,
    description="BASED's gated short causal depthwise convolution (kernel_size taps, SiLU gate)",
)(BaseConv)
