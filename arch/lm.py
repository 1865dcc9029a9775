"""The decoder LM shared by every architecture.

embedding -> N blocks (pre-norm; mixer; pre-norm; SwiGLU MLP) -> final norm -> head.
The mixer of each block comes from `ModelConfig.layers`, so hybrids are configs.
The LM owns the same recurrent contract as its mixers: `init_state`, `prefill`
and `step`, which `generate` uses.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from arch import registry
from arch.config import ModelConfig
from arch.layers import RMSNorm, SwiGLU, compute_dtype, positions_from_segments

# jax.checkpoint policies by config name; "none" means no rematerialisation.
REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Block(nnx.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then x + mlp(norm(x)) unless the config drops the MLP."""

    def __init__(self, cfg: ModelConfig, mixer_name: str, *, rngs: nnx.Rngs):
        self.mixer_name = mixer_name
        self.mixer_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = registry.build_mixer(cfg, mixer_name, rngs=rngs)
        if cfg.mlp:
            self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.mlp = SwiGLU(cfg, rngs=rngs)
        else:
            self.mlp_norm = self.mlp = None

    def _mlp(self, x):
        return x if self.mlp is None else x + self.mlp(self.mlp_norm(x))

    def __call__(self, x, segment_ids=None, positions=None):
        return self._mlp(x + self.mixer(self.mixer_norm(x), segment_ids=segment_ids, positions=positions))

    def prefill(self, x, state):
        y, state = self.mixer.prefill(self.mixer_norm(x), state)
        return self._mlp(x + y), state

    def step(self, x, state):
        y, state = self.mixer.step(self.mixer_norm(x), state)
        return self._mlp(x + y), state


class LM(nnx.Module):
    """Decoder-only language model over `cfg.layers` mixers."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.max_seq_len = cfg.max_seq_len
        self.dtype = compute_dtype(cfg)
        # Parameters are created unsharded; train.sharding places them on the mesh
        # from their logical axis names, so a model also builds in a notebook with no mesh.
        with nnx.use_eager_sharding(False):
            self.embed = nnx.Embed(
                cfg.vocab_size,
                cfg.d_model,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                embedding_init=nnx.with_partitioning(nnx.initializers.normal(cfg.init_std), ("vocab", "embed")),
                rngs=rngs,
            )
            self.blocks = nnx.List([Block(cfg, name, rngs=rngs) for name in cfg.layer_mixers])
            self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
            if cfg.tie_embeddings:
                self.head = None
            else:
                self.head = nnx.Param(
                    nnx.initializers.normal(cfg.init_std)(rngs.params(), (cfg.d_model, cfg.vocab_size), jnp.float32),
                    out_sharding=("embed", "vocab"),
                )

    # -- parallel form ---------------------------------------------------------------

    def hidden(self, tokens_BT, *, segment_ids=None, remat: str = "none"):
        """Final-norm hidden states [B, T, D] (the head is applied separately, see `logits`)."""
        positions = None if segment_ids is None else positions_from_segments(segment_ids)
        x = self.embed(tokens_BT)
        for block in self.blocks:
            if remat == "none":
                x = block(x, segment_ids, positions)
            else:
                run = nnx.remat(lambda blk, h, s, p: blk(h, s, p), policy=REMAT_POLICIES[remat])
                x = run(block, x, segment_ids, positions)
        return self.final_norm(x)

    def logits(self, hidden_BTD):
        """Vocabulary logits in float32 (the matmul accumulates in float32)."""
        weight = self.embed.embedding[...].T if self.head is None else self.head[...]
        return jnp.einsum(
            "...d,dv->...v", hidden_BTD, weight.astype(self.dtype), preferred_element_type=jnp.float32
        )

    def __call__(self, tokens_BT, *, segment_ids=None, remat: str = "none"):
        return self.logits(self.hidden(tokens_BT, segment_ids=segment_ids, remat=remat))

    # -- recurrent form --------------------------------------------------------------

    def init_state(self, batch: int, max_len: int) -> list[Any]:
        """Per-block decode state for sequences of up to `max_len` tokens."""
        return [block.mixer.init_state(batch, max_len) for block in self.blocks]

    def prefill(self, tokens_BT, state):
        """Run a chunk of tokens against the carried state: (logits [B, T, V], state)."""
        x = self.embed(tokens_BT)
        new_state = []
        for block, block_state in zip(self.blocks, state):
            x, block_state = block.prefill(x, block_state)
            new_state.append(block_state)
        return self.logits(self.final_norm(x)), new_state

    def step(self, token_B, state):
        """Decode one token per row: (logits [B, V], state)."""
        x = self.embed(token_B)
        new_state = []
        for block, block_state in zip(self.blocks, state):
            x, block_state = block.step(x, block_state)
            new_state.append(block_state)
        return self.logits(self.final_norm(x)), new_state

    def state_bytes(self, batch: int, length: int) -> int:
        """Decode-state bytes after `length` tokens, summed over blocks."""
        return sum(block.mixer.state_bytes(batch, length) for block in self.blocks)

    def generate(
        self,
        prompt_BT,
        max_new_tokens: int,
        *,
        rng: jax.Array | None = None,
        temperature: float = 0.0,
        top_k: int = 0,
    ):
        """Continue `prompt_BT` by `max_new_tokens` tokens: greedy when temperature is 0, else sampled.

        Returns the new tokens [B, max_new_tokens]. The prompt goes through `prefill`
        in one call; each new token then goes through `step`.
        """
        if max_new_tokens < 1:
            raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
        prompt_BT = jnp.asarray(prompt_BT, jnp.int32)
        if prompt_BT.ndim != 2 or prompt_BT.shape[1] < 1:
            raise ValueError(f"generate: prompt must be [batch, length>=1] token ids, got shape {prompt_BT.shape}")
        total = prompt_BT.shape[1] + max_new_tokens
        if total > self.max_seq_len:
            raise ValueError(
                f"generate: prompt ({prompt_BT.shape[1]}) + new tokens ({max_new_tokens}) = {total} exceeds "
                f"model.max_seq_len={self.max_seq_len}"
            )
        if rng is None:
            rng = jax.random.key(0)
        return _generate(self, prompt_BT, rng, max_new_tokens, float(temperature), int(top_k))


def sample_token(logits_BV, rng, temperature: float, top_k: int):
    """Greedy (temperature 0) or temperature / top-k sampling from float32 logits."""
    if temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth, -jnp.inf, logits_BV)
    return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


@nnx.jit(static_argnums=(3, 4, 5))
def _generate(model: LM, prompt_BT, rng, max_new_tokens: int, temperature: float, top_k: int):
    batch, prompt_len = prompt_BT.shape
    state = model.init_state(batch, prompt_len + max_new_tokens)
    logits, state = model.prefill(prompt_BT, state)
    rng, first_rng = jax.random.split(rng)
    first = sample_token(logits[:, -1], first_rng, temperature, top_k)

    def body(carry, step_rng):
        token, state = carry
        logits, state = model.step(token, state)
        next_token = sample_token(logits, step_rng, temperature, top_k)
        return (next_token, state), next_token

    if max_new_tokens == 1:
        return first[:, None]
    _, rest = jax.lax.scan(body, (first, state), jax.random.split(rng, max_new_tokens - 1))
    return jnp.concatenate([first[:, None], rest.T], axis=1)
