"""Softmax attention mixers: full causal (multi-head or grouped-query) and sliding-window.

Both use rotary position embeddings and the shared `kernels.attention` op; their
decode state is the op's KV cache, a ring buffer of the window when windowed.
With `persistent_tokens` = N > 0 (Titans' persistent memory, used by the MAL preset),
N learned vectors sit before the sequence at positions 0..N-1; their keys and values
are a prefix every token sees, inside or beyond the window.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

import kernels
from arch.config import ModelConfig
from arch.layers import PersistentTokens, compute_dtype, dense, output_std, rotary
from arch.registry import MixerOptions, register_mixer


@dataclasses.dataclass(frozen=True)
class AttentionOptions(MixerOptions):
    _path: ClassVar[str] = "model.mixer_options.attention"

    rope: bool = True
    implementation: str = ""  # kernel implementation; "" picks the best for the backend
    persistent_tokens: int = 0  # learned always-visible prefix tokens; 0 = none

    @property
    def window(self) -> int | None:
        return None

    def validate(self) -> None:
        self.check(self.persistent_tokens >= 0, "persistent_tokens", "must be >= 0 (0 means none)")

    def check_model(self, model: ModelConfig) -> None:
        self.check(
            not self.rope or model.resolved_head_dim % 2 == 0,
            "rope",
            f"rotary embeddings need an even head dim, got {model.resolved_head_dim}",
        )
        self.check(
            self.implementation in ("",) + kernels.IMPLEMENTATIONS,
            "implementation",
            f"must be '' (automatic) or one of {kernels.IMPLEMENTATIONS}",
        )


@dataclasses.dataclass(frozen=True)
class SlidingWindowOptions(AttentionOptions):
    _path: ClassVar[str] = "model.mixer_options.sliding_window"

    size: int = 256  # tokens each query sees, itself included

    @property
    def window(self) -> int | None:
        return self.size

    def validate(self) -> None:
        super().validate()
        self.check(self.size >= 1, "size", "the window must hold at least one token")


class Attention(nnx.Module):
    """Causal softmax attention with rotary embeddings; windowed when the options give a window."""

    def __init__(self, cfg: ModelConfig, options: AttentionOptions, *, rngs: nnx.Rngs):
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.resolved_head_dim
        self.window = options.window
        self.rope = options.rope
        self.rope_theta = cfg.rope_theta
        self.implementation = options.implementation or None
        self.dtype = compute_dtype(cfg)
        d, h, kv = cfg.d_model, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.q_proj = dense(d, h, ("embed", "heads"), cfg, rngs=rngs)
        self.k_proj = dense(d, kv, ("embed", "heads"), cfg, rngs=rngs)
        self.v_proj = dense(d, kv, ("embed", "heads"), cfg, rngs=rngs)
        self.o_proj = dense(h, d, ("heads", "embed"), cfg, rngs=rngs, std=output_std(cfg))
        self.prefix = options.persistent_tokens
        self.persistent = PersistentTokens(self.prefix, cfg, rngs=rngs) if self.prefix else None

    def _project(self, x_BTD: jax.Array, positions_BT: jax.Array):
        batch, length, _ = x_BTD.shape
        q = self.q_proj(x_BTD).reshape(batch, length, self.n_heads, self.head_dim)
        k = self.k_proj(x_BTD).reshape(batch, length, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x_BTD).reshape(batch, length, self.n_kv_heads, self.head_dim)
        if self.rope:
            q = rotary(q, positions_BT, self.rope_theta)
            k = rotary(k, positions_BT, self.rope_theta)
        return q, k, v

    def _output(self, o_BTHD: jax.Array) -> jax.Array:
        batch, length = o_BTHD.shape[:2]
        return self.o_proj(o_BTHD.reshape(batch, length, self.n_heads * self.head_dim))

    def __call__(self, x_BTD, *, segment_ids=None, positions=None):
        batch, length, _ = x_BTD.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
        if self.persistent is not None:
            if segment_ids is not None:
                raise ValueError(
                    "attention with persistent_tokens does not take segment_ids: the persistent prefix would "
                    "belong to one packed segment only; train it on unpacked sequences"
                )
            x_BTD = self.persistent.prepend(x_BTD)
            prefix_positions = jnp.broadcast_to(jnp.arange(self.prefix), (batch, self.prefix))
            positions = jnp.concatenate([prefix_positions, positions + self.prefix], axis=1)
        q, k, v = self._project(x_BTD, positions)
        o = kernels.attention(
            q,
            k,
            v,
            window=self.window,
            prefix=self.prefix,
            segment_ids=segment_ids,
            implementation=self.implementation,
        )
        return self._output(o[:, self.prefix :])

    def init_state(self, batch: int, max_len: int) -> kernels.KVCache:
        """An empty cache, or one holding the persistent tokens' keys and values."""
        cache = kernels.init_kv_cache(
            batch,
            self.prefix + max_len,
            self.n_kv_heads,
            self.head_dim,
            window=self.window,
            prefix=self.prefix,
            dtype=self.dtype,
        )
        if self.persistent is not None:
            _, cache = self._attend_cached(self.persistent.batch(batch), cache)
        return cache

    def _attend_cached(self, x_BTD, cache: kernels.KVCache):
        batch, length, _ = x_BTD.shape
        positions = jnp.broadcast_to(cache.length + jnp.arange(length), (batch, length))
        q, k, v = self._project(x_BTD, positions)
        return kernels.attention_decode(
            q, k, v, cache, window=self.window, prefix=self.prefix, implementation=self.implementation
        )

    def prefill(self, x_BTD, state: kernels.KVCache):
        o, state = self._attend_cached(x_BTD, state)
        return self._output(o), state

    def step(self, x_BD, state: kernels.KVCache):
        y, state = self.prefill(x_BD[:, None], state)
        return y[:, 0], state

    def state_bytes(self, batch: int, length: int) -> int:
        """Bytes of the KV cache after `length` tokens (what decoding must keep), persistent tokens included."""
        held = self.prefix + (length if self.window is None else min(length, self.window))
        return 2 * batch * held * self.n_kv_heads * self.head_dim * jnp.dtype(self.dtype).itemsize


register_mixer(
    "attention",
    options=AttentionOptions,
    description="causal softmax attention (multi-head or grouped-query), rotary",
)(Attention)
register_mixer(
    "sliding_window",
    options=SlidingWindowOptions,
    description="causal softmax attention over the last `size` tokens, rotary, ring-buffer KV cache",
)(Attention)
