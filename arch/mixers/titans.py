"""Titans (Behrouz, Zhong, Mirrokni, 2025): the neural long-term memory and its architectures.

`NeuralMemory` is the memory of one block, shared by every Titans mixer: q, k, v
projections with causal short convolutions and SiLU (q, k L2-normalised per head),
per-token rates θ (learning rate), η (momentum) and α (forget), a learned initial
memory W_0, and the `kernels.titans_memory` op, whose chunk schedule (gradients at
the chunk-start weights, chunks at absolute positions) decode keeps exactly.

Mixers:
- `titans_lmm`: the memory as the block's mixer (MAL is the config that alternates it
  with sliding-window attention, both with persistent tokens);
- `titans_mag`: sliding-window attention with an always-visible persistent prefix,
  gated by the memory run over [P ‖ x];
- `titans_mac`: per segment, the memory's read of the segment joins its attention
  context, the attention output updates the memory, and the updated memory gates it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

import kernels
from arch.config import ModelConfig
from arch.layers import PersistentTokens, RMSNorm, ShortConv, compute_dtype, dense, output_std, rotary
from arch.registry import MixerOptions, register_mixer

ACTIVATIONS = ("gelu", "silu")
OUTPUT_GATES = {"silu": jax.nn.silu, "sigmoid": jax.nn.sigmoid}
MAX_DEPTH = 4
# Initial rates, the issue's: momentum η near 0.9 and forgetting α near 0.01.
INITIAL_MOMENTUM = 0.9
INITIAL_FORGET = 0.01


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


@dataclasses.dataclass(frozen=True)
class MemoryOptions(MixerOptions):
    """Options of the neural memory, shared by every Titans mixer."""

    depth: int = 2  # memory MLP layers, 1 (a matrix memory) to 4
    hidden_dim: int = 0  # width of the hidden layers; 0 means 4 * head_dim
    activation: str = "gelu"  # between the memory's layers
    chunk_size: int = 64  # tokens per gradient step of the parallel form (decode keeps the schedule)
    momentum: bool = True  # False: η = 0, a plain gradient step per chunk
    weight_decay: bool = True  # False: α = 0, the memory never forgets
    conv_size: int = 4  # taps of the short convolutions after the q, k, v projections; 0 = none
    # θ = theta_max·σ(·). A chunk takes all its gradients at one point, so C alike keys move the
    # memory C times one token's step; heavy-ball momentum stays stable while C·θ·λ < 2(1 + η), with
    # λ ≈ 4 for unit keys at init (the loss's factor 2, about 2 from a depth-2 memory's two layers).
    # At C = 64 and η = 0.9 that is θ < 0.015: 0.01 keeps the default chunk stable (0.1 diverges
    # within a few chunks on correlated inputs), and smaller chunks have margin to spare.
    theta_max: float = 0.01
    persistent_tokens: int = 0  # learned tokens the memory (and attention) see before the sequence
    implementation: str = ""  # kernel implementation; "" picks the best for the backend

    def validate(self) -> None:
        self.check(1 <= self.depth <= MAX_DEPTH, "depth", f"must be 1 (a matrix memory) to {MAX_DEPTH}")
        self.check(self.hidden_dim >= 0, "hidden_dim", "must be >= 0 (0 means 4 * head_dim)")
        self.check(self.activation in ACTIVATIONS, "activation", f"must be one of {ACTIVATIONS}")
        self.check(self.chunk_size >= 1, "chunk_size", "must be a positive integer")
        self.check(self.conv_size >= 0, "conv_size", "must be >= 0 (0 turns the short convolutions off)")
        self.check(self.theta_max > 0, "theta_max", "must be positive")
        self.check(self.persistent_tokens >= 0, "persistent_tokens", "must be >= 0 (0 means none)")
        self.check(
            self.implementation in ("",) + kernels.IMPLEMENTATIONS,
            "implementation",
            f"must be '' (automatic) or one of {kernels.IMPLEMENTATIONS}",
        )


@dataclasses.dataclass(frozen=True)
class TitansLMMOptions(MemoryOptions):
    _path: ClassVar[str] = "model.mixer_options.titans_lmm"

    output_gate: str = "silu"  # the output gate's nonlinearity: "silu" or "sigmoid"

    def validate(self) -> None:
        super().validate()
        self.check(self.output_gate in OUTPUT_GATES, "output_gate", f"must be one of {tuple(OUTPUT_GATES)}")


@dataclasses.dataclass(frozen=True)
class _AttentionMemoryOptions(MemoryOptions):
    persistent_tokens: int = 4
    rope: bool = True

    def check_model(self, model: ModelConfig) -> None:
        self.check(
            not self.rope or model.resolved_head_dim % 2 == 0,
            "rope",
            f"rotary embeddings need an even head dim, got {model.resolved_head_dim}",
        )


@dataclasses.dataclass(frozen=True)
class TitansMAGOptions(_AttentionMemoryOptions):
    _path: ClassVar[str] = "model.mixer_options.titans_mag"

    window: int = 512  # tokens each query's attention sees, itself included (the prefix besides)

    def validate(self) -> None:
        super().validate()
        self.check(self.window >= 1, "window", "the window must hold at least one token")


@dataclasses.dataclass(frozen=True)
class TitansMACOptions(_AttentionMemoryOptions):
    _path: ClassVar[str] = "model.mixer_options.titans_mac"

    segment_len: int = 512  # tokens per segment; attention never crosses a segment boundary

    def validate(self) -> None:
        super().validate()
        self.check(self.segment_len >= 1, "segment_len", "must be a positive integer")
        self.check(
            self.segment_len % self.chunk_size == 0,
            "segment_len",
            f"must be a multiple of chunk_size={self.chunk_size}, so a segment's retrieval reads "
            "the weights of a chunk boundary",
        )


class ConvProjection(nnx.Module):
    """x W, a causal depthwise short convolution (unless conv_size is 0) and SiLU, split into heads.

    The decode state is the convolution's tail [B, conv_size - 1, H·D] (empty without one).
    """

    def __init__(self, in_dim: int, cfg: ModelConfig, conv_size: int, *, rngs: nnx.Rngs):
        self.n_heads, self.head_dim = cfg.n_heads, cfg.resolved_head_dim
        self.dtype = compute_dtype(cfg)
        channels = self.n_heads * self.head_dim
        self.proj = dense(in_dim, channels, ("embed", "heads"), cfg, rngs=rngs)
        self.conv = ShortConv(channels, conv_size, cfg, axis_name="heads", rngs=rngs) if conv_size else None

    def init_state(self, batch: int) -> jax.Array:
        if self.conv is None:
            return jnp.zeros((batch, 0, self.n_heads * self.head_dim), self.dtype)
        return self.conv.init_state(batch)

    def __call__(self, x_BTD: jax.Array, state: jax.Array) -> tuple[jax.Array, jax.Array]:
        u = self.proj(x_BTD)
        if self.conv is not None:
            u, state = self.conv(u, state)
        u = jax.nn.silu(u).astype(self.dtype)
        return u.reshape(*u.shape[:2], self.n_heads, self.head_dim), state


class MemoryState(NamedTuple):
    """The decode state of a NeuralMemory: the op's state and the q, k, v convolution tails."""

    memory: kernels.TitansMemoryState
    conv: tuple[jax.Array, jax.Array, jax.Array]


class NeuralMemory(nnx.Module):
    """The Titans long-term memory of one block: [B, T, in_dim] -> memory reads y [B, T, H, D]."""

    def __init__(self, cfg: ModelConfig, options: MemoryOptions, *, in_dim: int | None = None, rngs: nnx.Rngs):
        self.n_heads, self.head_dim = cfg.n_heads, cfg.resolved_head_dim
        self.chunk_size = options.chunk_size
        self.activation = options.activation
        self.theta_max = options.theta_max
        self.implementation = options.implementation or None
        in_dim = in_dim or cfg.d_model
        self.q = ConvProjection(in_dim, cfg, options.conv_size, rngs=rngs)
        self.k = ConvProjection(in_dim, cfg, options.conv_size, rngs=rngs)
        self.v = ConvProjection(in_dim, cfg, options.conv_size, rngs=rngs)
        self.lr_proj = self._rate_projection(in_dim, cfg, 0.0, rngs)
        self.momentum_proj = self._rate_projection(in_dim, cfg, _logit(INITIAL_MOMENTUM), rngs) if options.momentum else None
        self.forget_proj = self._rate_projection(in_dim, cfg, _logit(INITIAL_FORGET), rngs) if options.weight_decay else None
        shapes = kernels.memory_layer_shapes(self.head_dim, self.head_dim, options.depth, options.hidden_dim or None)
        self.initial_weights = nnx.List(
            [
                nnx.Param(
                    nnx.initializers.normal(din**-0.5)(rngs.params(), (self.n_heads, din, dout), jnp.float32),
                    out_sharding=("heads", None, None),
                )
                for din, dout in shapes
            ]
        )

    @staticmethod
    def _rate_projection(in_dim: int, cfg: ModelConfig, bias: float, rngs: nnx.Rngs) -> nnx.Linear:
        """One pre-sigmoid value per token and head; the bias sets the rate before training."""
        proj = dense(in_dim, cfg.n_heads, ("embed", "heads"), cfg, rngs=rngs, use_bias=True)
        proj.bias[...] = jnp.full((cfg.n_heads,), bias, jnp.float32)
        return proj

    def _inputs(self, x_BTD: jax.Array, conv: tuple):
        """The op's per-token inputs and the new convolution tails."""
        (q, q_tail), (k, k_tail), (v, v_tail) = (p(x_BTD, s) for p, s in zip((self.q, self.k, self.v), conv))
        rates = {"lr": self.theta_max * jax.nn.sigmoid(self.lr_proj(x_BTD).astype(jnp.float32))}
        rates["log_momentum"] = (
            None if self.momentum_proj is None else jax.nn.log_sigmoid(self.momentum_proj(x_BTD).astype(jnp.float32))
        )
        rates["log_retain"] = (
            None if self.forget_proj is None else jax.nn.log_sigmoid(-self.forget_proj(x_BTD).astype(jnp.float32))
        )
        return (kernels.l2_normalize(q), kernels.l2_normalize(k), v), rates, (q_tail, k_tail, v_tail)

    def _weights0(self) -> tuple[jax.Array, ...]:
        return tuple(w[...] for w in self.initial_weights)

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        """Reads of a sequence that starts from the learned W_0."""
        (q, k, v), rates, _ = self._inputs(x_BTD, self.init_state(x_BTD.shape[0]).conv)
        return kernels.titans_memory(
            q,
            k,
            v,
            rates["lr"],
            log_momentum=rates["log_momentum"],
            log_retain=rates["log_retain"],
            initial_weights=self._weights0(),
            chunk_size=self.chunk_size,
            activation=self.activation,
            implementation=self.implementation,
        )

    def init_state(self, batch: int) -> MemoryState:
        return MemoryState(
            kernels.init_titans_memory_state(self._weights0(), batch),
            (self.q.init_state(batch), self.k.init_state(batch), self.v.init_state(batch)),
        )

    def prefill(self, x_BTD: jax.Array, state: MemoryState) -> tuple[jax.Array, MemoryState]:
        (q, k, v), rates, conv = self._inputs(x_BTD, state.conv)
        y, memory = kernels.titans_memory(
            q,
            k,
            v,
            rates["lr"],
            log_momentum=rates["log_momentum"],
            log_retain=rates["log_retain"],
            initial_state=state.memory,
            return_final_state=True,
            chunk_size=self.chunk_size,
            activation=self.activation,
            implementation=self.implementation,
        )
        return y, MemoryState(memory, conv)

    def step(self, x_BD: jax.Array, state: MemoryState) -> tuple[jax.Array, MemoryState]:
        """One token [B, in_dim] -> (y [B, H, D], state), the op's exact decode step."""
        (q, k, v), rates, conv = self._inputs(x_BD[:, None], state.conv)
        first = lambda a: None if a is None else a[:, 0]  # noqa: E731
        y, memory = kernels.titans_memory_step(
            q[:, 0],
            k[:, 0],
            v[:, 0],
            rates["lr"][:, 0],
            state.memory,
            log_momentum=first(rates["log_momentum"]),
            log_retain=first(rates["log_retain"]),
            chunk_size=self.chunk_size,
            activation=self.activation,
        )
        return y, MemoryState(memory, conv)

    def read(self, q_BTHD: jax.Array, weights: tuple[jax.Array, ...]) -> jax.Array:
        """M(q; W) without an update, for weights [B, H, din, dout] per layer -> [B, T, H, D] float32."""
        return kernels.titans_memory_read(q_BTHD, weights, activation=self.activation)

    def weight_bytes(self, batch: int) -> int:
        """Bytes of one copy of the memory's weights for `batch` rows, float32."""
        return batch * sum(w.size for w in self.initial_weights) * jnp.dtype(jnp.float32).itemsize

    def state_bytes(self, batch: int) -> int:
        """Weights, momentum and gradient point, and the convolution tails; constant in the length."""
        conv = sum(s.size * s.dtype.itemsize for s in self.init_state(batch).conv)
        return 3 * self.weight_bytes(batch) + conv


def _reject_segment_ids(name: str, segment_ids) -> None:
    if segment_ids is not None:
        raise ValueError(
            f"{name} does not take segment_ids: its memory cannot be reset per packed segment; "
            "train it on unpacked sequences"
        )


# -- titans_lmm -----------------------------------------------------------------------


class TitansLMM(nnx.Module):
    """The memory as the token mixer: o_proj(RMSNorm(y) ⊙ gate(x W_g)), heads normalised one by one.

    With persistent tokens the memory first learns from N_p learned tokens (MAL's [P ‖ x]).
    """

    def __init__(self, cfg: ModelConfig, options: TitansLMMOptions, *, rngs: nnx.Rngs):
        self.n_heads, self.head_dim = cfg.n_heads, cfg.resolved_head_dim
        self.prefix = options.persistent_tokens
        self.persistent = PersistentTokens(self.prefix, cfg, rngs=rngs) if self.prefix else None
        self.memory = NeuralMemory(cfg, options, rngs=rngs)
        self.norm = RMSNorm(self.head_dim, cfg.norm_eps, axis_name=None)
        self.gate = OUTPUT_GATES[options.output_gate]
        inner = self.n_heads * self.head_dim
        self.gate_proj = dense(cfg.d_model, inner, ("embed", "heads"), cfg, rngs=rngs)
        self.o_proj = dense(inner, cfg.d_model, ("heads", "embed"), cfg, rngs=rngs, std=output_std(cfg))

    def _output(self, y_BTHD: jax.Array, x_BTD: jax.Array) -> jax.Array:
        y = self.norm(y_BTHD.astype(x_BTD.dtype)).reshape(*x_BTD.shape[:-1], -1)
        return self.o_proj(y * self.gate(self.gate_proj(x_BTD)))

    def __call__(self, x_BTD, *, segment_ids=None, positions=None):
        _reject_segment_ids("titans_lmm", segment_ids)
        if self.persistent is None:
            return self._output(self.memory(x_BTD), x_BTD)
        return self._output(self.memory(self.persistent.prepend(x_BTD))[:, self.prefix :], x_BTD)

    def init_state(self, batch: int, max_len: int) -> MemoryState:
        """The memory at W_0, or after the persistent tokens (the same for every sequence)."""
        state = self.memory.init_state(batch)
        if self.persistent is not None:
            _, state = self.memory.prefill(self.persistent.batch(batch), state)
        return state

    def prefill(self, x_BTD, state: MemoryState):
        y, state = self.memory.prefill(x_BTD, state)
        return self._output(y, x_BTD), state

    def step(self, x_BD, state: MemoryState):
        y, state = self.memory.step(x_BD, state)
        return self._output(y[:, None], x_BD[:, None])[:, 0], state

    def state_bytes(self, batch: int, length: int) -> int:
        return self.memory.state_bytes(batch)


# -- attention beside the memory (MAG, MAC) ---------------------------------------------


class AttentionHeads(nnx.Module):
    """q, k, v projections with rotary embeddings for the Titans mixers' attention (outputs stay per head)."""

    def __init__(self, cfg: ModelConfig, rope: bool, *, rngs: nnx.Rngs):
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.num_kv_heads, cfg.resolved_head_dim
        self.rope, self.rope_theta = rope, cfg.rope_theta
        d = cfg.d_model
        self.q_proj = dense(d, self.n_heads * self.head_dim, ("embed", "heads"), cfg, rngs=rngs)
        self.k_proj = dense(d, self.n_kv_heads * self.head_dim, ("embed", "heads"), cfg, rngs=rngs)
        self.v_proj = dense(d, self.n_kv_heads * self.head_dim, ("embed", "heads"), cfg, rngs=rngs)

    def __call__(self, x_BTD: jax.Array, positions_T: jax.Array):
        batch, length, _ = x_BTD.shape
        q = self.q_proj(x_BTD).reshape(batch, length, self.n_heads, self.head_dim)
        k = self.k_proj(x_BTD).reshape(batch, length, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x_BTD).reshape(batch, length, self.n_kv_heads, self.head_dim)
        if self.rope:
            positions = jnp.broadcast_to(positions_T, (batch, length))
            q, k = rotary(q, positions, self.rope_theta), rotary(k, positions, self.rope_theta)
        return q, k, v


# -- titans_mag -----------------------------------------------------------------------


class MAGState(NamedTuple):
    cache: kernels.KVCache  # the window's keys and values, the persistent prefix kept
    memory: MemoryState  # after the persistent tokens and the sequence so far


class TitansMAG(nnx.Module):
    """Memory as a gate: o_proj(RMSNorm(attention) ⊙ σ(RMSNorm(memory))) over [P ‖ x], at x's positions.

    The attention is windowed with the persistent tokens always visible; the memory runs over
    [P ‖ x] from W_0. Decode keeps a ring KV cache with the prefix and the memory's state.
    """

    def __init__(self, cfg: ModelConfig, options: TitansMAGOptions, *, rngs: nnx.Rngs):
        self.n_heads, self.head_dim = cfg.n_heads, cfg.resolved_head_dim
        self.window = options.window
        self.prefix = options.persistent_tokens
        self.implementation = options.implementation or None
        self.dtype = compute_dtype(cfg)
        self.persistent = PersistentTokens(self.prefix, cfg, rngs=rngs) if self.prefix else None
        self.attention = AttentionHeads(cfg, options.rope, rngs=rngs)
        self.memory = NeuralMemory(cfg, options, rngs=rngs)
        self.attention_norm = RMSNorm(self.head_dim, cfg.norm_eps, axis_name=None)
        self.memory_norm = RMSNorm(self.head_dim, cfg.norm_eps, axis_name=None)
        inner = self.n_heads * self.head_dim
        self.o_proj = dense(inner, cfg.d_model, ("heads", "embed"), cfg, rngs=rngs, std=output_std(cfg))

    def _output(self, o_BTHD: jax.Array, y_BTHD: jax.Array) -> jax.Array:
        gated = self.attention_norm(o_BTHD) * jax.nn.sigmoid(self.memory_norm(y_BTHD.astype(o_BTHD.dtype)))
        return self.o_proj(gated.reshape(*gated.shape[:2], -1))

    def _with_prefix(self, x_BTD):
        return x_BTD if self.persistent is None else self.persistent.prepend(x_BTD)

    def __call__(self, x_BTD, *, segment_ids=None, positions=None):
        _reject_segment_ids("titans_mag", segment_ids)
        full = self._with_prefix(x_BTD)
        q, k, v = self.attention(full, jnp.arange(full.shape[1]))
        o = kernels.attention(q, k, v, window=self.window, prefix=self.prefix, implementation=self.implementation)
        y = self.memory(full)
        return self._output(o[:, self.prefix :], y[:, self.prefix :])

    def _attend_cached(self, x_BTD, cache: kernels.KVCache):
        q, k, v = self.attention(x_BTD, cache.length + jnp.arange(x_BTD.shape[1]))
        return kernels.attention_decode(
            q, k, v, cache, window=self.window, prefix=self.prefix, implementation=self.implementation
        )

    def init_state(self, batch: int, max_len: int) -> MAGState:
        cache = kernels.init_kv_cache(
            batch,
            self.prefix + max_len,
            self.attention.n_kv_heads,
            self.head_dim,
            window=self.window,
            prefix=self.prefix,
            dtype=self.dtype,
        )
        memory = self.memory.init_state(batch)
        if self.persistent is not None:
            tokens = self.persistent.batch(batch)
            _, cache = self._attend_cached(tokens, cache)
            _, memory = self.memory.prefill(tokens, memory)
        return MAGState(cache, memory)

    def prefill(self, x_BTD, state: MAGState):
        o, cache = self._attend_cached(x_BTD, state.cache)
        y, memory = self.memory.prefill(x_BTD, state.memory)
        return self._output(o, y), MAGState(cache, memory)

    def step(self, x_BD, state: MAGState):
        o, cache = self._attend_cached(x_BD[:, None], state.cache)
        y, memory = self.memory.step(x_BD, state.memory)
        return self._output(o, y[:, None])[:, 0], MAGState(cache, memory)

    def state_bytes(self, batch: int, length: int) -> int:
        held = self.prefix + min(length, self.window)
        kv = 2 * batch * held * self.attention.n_kv_heads * self.head_dim * jnp.dtype(self.dtype).itemsize
        return kv + self.memory.state_bytes(batch)


# -- titans_mac -----------------------------------------------------------------------


class MACState(NamedTuple):
    cache: kernels.KVCache  # P, then the current segment's interleaved (retrieval, token) keys and values
    memory: MemoryState  # the memory updated by every attention output so far
    segment_weights: tuple  # W at the current segment's start: what its retrievals read
    retrieval_conv: jax.Array  # the retrieval query's convolution tail


class TitansMAC(nnx.Module):
    """Memory as a context, segment by segment (segments of `segment_len` tokens):

    1. h = M(q_x; W_seg): the memory as it stood before the segment, read, not updated;
    2. attention over [P ‖ h_1, x_1, h_2, x_2, ...], causal over the interleaved sequence with
       P always visible: token i sees P, h_1..h_i and x_1..x_i, never a retrieval computed from
       a later token (the paper's [P ‖ h ‖ x] with h fully visible would leak the future);
       segments never attend to each other;
    3. the attention sublayer's output y = x + W_a·o, with its residual connection (the paper
       uses residual connections in all blocks), updates the memory (the op over the segment,
       chunks aligned with the segment). Without the residual the memory learns from attention
       mixtures only: at init these are near-uniform averages of the segment, every key looks
       alike, and on MQAR the memory never learns to store pairs (0.00 recall when all queries
       lie beyond the first segment, against 0.99 with it);
    4. output = o_proj(o ⊙ σ(RMSNorm(M(q_y; W_t)))), the updated memory's read of y gating the
       attention heads.

    Decode buffers the segment's keys and values after P, updates the memory token by token
    with the same chunk schedule, and at the segment's end sets W_seg to the current weights
    and empties the buffer.
    """

    def __init__(self, cfg: ModelConfig, options: TitansMACOptions, *, rngs: nnx.Rngs):
        self.n_heads, self.head_dim = cfg.n_heads, cfg.resolved_head_dim
        self.segment_len = options.segment_len
        self.prefix = options.persistent_tokens
        self.implementation = options.implementation or None
        self.dtype = compute_dtype(cfg)
        inner = self.n_heads * self.head_dim
        self.persistent = PersistentTokens(self.prefix, cfg, rngs=rngs) if self.prefix else None
        self.retrieval_query = ConvProjection(cfg.d_model, cfg, options.conv_size, rngs=rngs)
        self.retrieved_norm = RMSNorm(self.head_dim, cfg.norm_eps, axis_name=None)
        self.retrieved_proj = dense(inner, cfg.d_model, ("heads", "embed"), cfg, rngs=rngs)
        self.attention = AttentionHeads(cfg, options.rope, rngs=rngs)
        # The attention sublayer's output projection: y = x + W_a·Attn(S̃) is what the memory learns from.
        self.attention_proj = dense(inner, cfg.d_model, ("heads", "embed"), cfg, rngs=rngs, std=output_std(cfg))
        self.memory = NeuralMemory(cfg, options, rngs=rngs)
        self.gate_norm = RMSNorm(self.head_dim, cfg.norm_eps, axis_name=None)
        self.o_proj = dense(inner, cfg.d_model, ("heads", "embed"), cfg, rngs=rngs, std=output_std(cfg))

    def _retrievals(self, x_BTD: jax.Array, conv_state: jax.Array, weights: tuple):
        """Model-space tokens [B, T, D] of M(q_x; weights), and the new convolution tail."""
        q, conv_state = self.retrieval_query(x_BTD, conv_state)
        h = self.memory.read(kernels.l2_normalize(q), weights).astype(self.dtype)
        return self.retrieved_proj(self.retrieved_norm(h).reshape(*x_BTD.shape[:2], -1)), conv_state

    def _attention_output(self, x_BTD: jax.Array, o_BTHD: jax.Array) -> jax.Array:
        """y = x + W_a·o: the attention sublayer's output with its residual connection."""
        return x_BTD + self.attention_proj(o_BTHD.reshape(*o_BTHD.shape[:2], -1))

    def _output(self, o_BTHD: jax.Array, m_BTHD: jax.Array) -> jax.Array:
        gated = o_BTHD * jax.nn.sigmoid(self.gate_norm(m_BTHD.astype(o_BTHD.dtype)))
        return self.o_proj(gated.reshape(*gated.shape[:2], -1))

    def _segments(self, x_BTD, memory: MemoryState, retrieval_conv: jax.Array):
        """Whole segments in parallel, starting at a segment boundary: x [B, n·S, D] ->
        (outputs, memory after them, retrieval conv tail). The retrievals of each segment
        read the memory as it stood at its start."""
        batch, length, d_model = x_BTD.shape
        segments = x_BTD.reshape(batch, length // self.segment_len, self.segment_len, d_model).swapaxes(0, 1)
        context_positions = jnp.arange(self.prefix + 2 * self.segment_len)
        persistent = None if self.persistent is None else self.persistent.batch(batch)

        def segment(carry, x_BSD):
            memory, retrieval_conv = carry
            h, retrieval_conv = self._retrievals(x_BSD, retrieval_conv, memory.memory.weights)
            interleaved = jnp.stack([h, x_BSD], axis=2).reshape(batch, 2 * self.segment_len, d_model)
            context = interleaved if persistent is None else jnp.concatenate([persistent, interleaved], axis=1)
            q, k, v = self.attention(context, context_positions)
            o = kernels.attention(q, k, v, prefix=self.prefix, implementation=self.implementation)
            o = o[:, self.prefix + 1 :: 2]  # the tokens' outputs; the retrievals' are not used
            m, memory = self.memory.prefill(self._attention_output(x_BSD, o), memory)
            return (memory, retrieval_conv), self._output(o, m)

        (memory, retrieval_conv), out = jax.lax.scan(segment, (memory, retrieval_conv), segments)
        return out.swapaxes(0, 1).reshape(batch, length, d_model), memory, retrieval_conv

    def __call__(self, x_BTD, *, segment_ids=None, positions=None):
        _reject_segment_ids("titans_mac", segment_ids)
        batch, length, _ = x_BTD.shape
        n_segments = -(-length // self.segment_len)
        # Trailing padding only follows the real tokens, so it never reaches their outputs.
        padded = jnp.pad(x_BTD, ((0, 0), (0, n_segments * self.segment_len - length), (0, 0)))
        out, _, _ = self._segments(padded, self.memory.init_state(batch), self.retrieval_query.init_state(batch))
        return out[:, :length]

    def _empty_cache(self, batch: int) -> kernels.KVCache:
        cache = kernels.init_kv_cache(
            batch,
            self.prefix + 2 * self.segment_len,
            self.attention.n_kv_heads,
            self.head_dim,
            prefix=self.prefix,
            dtype=self.dtype,
        )
        if self.persistent is not None:
            tokens = self.persistent.batch(batch)
            q, k, v = self.attention(tokens, jnp.arange(self.prefix))
            _, cache = kernels.attention_decode(q, k, v, cache, prefix=self.prefix, implementation=self.implementation)
        return cache

    def init_state(self, batch: int, max_len: int) -> MACState:
        memory = self.memory.init_state(batch)
        return MACState(
            self._empty_cache(batch), memory, memory.memory.weights, self.retrieval_query.init_state(batch)
        )

    def step(self, x_BD, state: MACState):
        x = x_BD[:, None]
        h, retrieval_conv = self._retrievals(x, state.retrieval_conv, state.segment_weights)
        pair = jnp.concatenate([h, x], axis=1)  # the token's retrieval, then the token
        q, k, v = self.attention(pair, state.cache.length + jnp.arange(2))
        o, cache = kernels.attention_decode(q, k, v, state.cache, prefix=self.prefix, implementation=self.implementation)
        o = o[:, 1:]
        m, memory = self.memory.step(self._attention_output(x, o)[:, 0], state.memory)
        segment_done = cache.length == self.prefix + 2 * self.segment_len
        # At a segment's end the buffer keeps only P, and the next retrievals read the weights now.
        emptied = cache._replace(
            slot_pos=jnp.where(jnp.arange(cache.slot_pos.shape[0]) < self.prefix, cache.slot_pos, -1),
            length=jnp.asarray(self.prefix, cache.length.dtype),
        )
        cache = jax.tree.map(lambda empty, full: jnp.where(segment_done, empty, full), emptied, cache)
        segment_weights = tuple(
            jnp.where(segment_done, w, w_seg) for w, w_seg in zip(memory.memory.weights, state.segment_weights)
        )
        return self._output(o, m[:, None])[:, 0], MACState(cache, memory, segment_weights, retrieval_conv)

    def _step_through(self, x_BTD, state: MACState):
        def one(state, x_BD):
            y, state = self.step(x_BD, state)
            return state, y

        state, y = jax.lax.scan(one, state, x_BTD.swapaxes(0, 1))
        return y.swapaxes(0, 1), state

    def prefill(self, x_BTD, state: MACState):
        """Whole segments in parallel when the state sits at a segment boundary (a fresh
        state, or one that ended a segment), token by token through `step` otherwise; the
        tokens after the last whole segment always go through `step`."""
        whole = x_BTD.shape[1] // self.segment_len * self.segment_len
        y = []
        if whole:
            head = x_BTD[:, :whole]

            def by_segments(state):
                out, memory, retrieval_conv = self._segments(head, state.memory, state.retrieval_conv)
                return out, MACState(state.cache, memory, memory.memory.weights, retrieval_conv)

            at_boundary = state.cache.length == self.prefix
            out, state = jax.lax.cond(at_boundary, by_segments, lambda state: self._step_through(head, state), state)
            y.append(out)
        if whole < x_BTD.shape[1]:
            out, state = self._step_through(x_BTD[:, whole:], state)
            y.append(out)
        return jnp.concatenate(y, axis=1), state

    def state_bytes(self, batch: int, length: int) -> int:
        """The segment buffer (allocated whole), the memory's state, W_seg and the retrieval conv tail."""
        slots = self.prefix + 2 * self.segment_len
        kv = 2 * batch * slots * self.attention.n_kv_heads * self.head_dim * jnp.dtype(self.dtype).itemsize
        conv = self.retrieval_query.init_state(batch)
        return kv + self.memory.state_bytes(batch) + self.memory.weight_bytes(batch) + conv.size * conv.dtype.itemsize


register_mixer(
    "titans_lmm",
    options=TitansLMMOptions,
    description="Titans neural long-term memory (deep MLP memory, momentum, forgetting) as the mixer",
)(TitansLMM)
register_mixer(
    "titans_mag",
    options=TitansMAGOptions,
    description="Titans memory as a gate: sliding-window attention with persistent tokens, gated by the memory",
)(TitansMAG)
register_mixer(
    "titans_mac",
    options=TitansMACOptions,
    description="Titans memory as a context: segment attention over persistent tokens, memory reads and the segment",
)(TitansMAC)
