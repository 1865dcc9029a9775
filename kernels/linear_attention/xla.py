"""Chunked causal linear attention in pure JAX: lax.scan over groups of chunks.

Per chunk of C tokens, with b the within-chunk cumulative sum of the log-decay g:
  intra-chunk   y_i += sum_{j <= i} (phi(q_i) . phi(k_j)) exp(b_i - b_j) v_j   (masked [C, C] scores)
  inter-chunk   y_i += (phi(q_i) exp(b_i)) S                                   (state before the chunk)
  state         S <- exp(b_last) S + U,   U = sum_j (phi(k_j) exp(b_last - b_j))^T v_j
Every exponent is a difference of cumulative sums that is <= 0 for g <= 0, so nothing
overflows however long the chunk. The intra-chunk scores of "taylor2" come from
1 + s + s^2 / 2 (s = q . k / sqrt(d)) without expanding the features; the inter-chunk part
expands them for one group of chunks at a time.

One scan step handles a group of G chunks (_CHUNKS_PER_STEP) at once: their scores and
state increments U are batched matmuls, and the states before each chunk of the group
follow from the carried state by G cheap elementwise steps S <- exp(b_last) S + U, so
the CPU works on batched matmuls instead of many tiny steps. The scan carries only the
state and slices the inputs in place, so the forward's temporaries do not grow with T.
Gradients are autodiff through the scan with jax.checkpoint on the step: the backward
keeps one state per step (O(T / (G C) * F * Dv)) and recomputes the rest.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from kernels.linear_attention.feature_maps import apply_feature_map, feature_dim

# Short sequences shrink the chunk to the sequence length rounded up to this.
_CHUNK_ALIGNMENT = 8
# Chunks per scan step: enough to amortize the step's overhead over batched matmuls, few
# enough that passing the state through the group stays cheap. Per-channel decays
# build [C, C, Dk] weights per chunk, so they take one chunk per step.
_CHUNKS_PER_STEP = 8


def linear_attention(
    q, k, v, *, log_decay, normalize, feature_map, initial_state, return_final_state, chunk_size, eps
):
    """q, k [B,T,H,Dk], v [B,T,H,Dv] -> (y [B,T,H,Dv] in v's dtype, (S, z) or None).

    See `kernels.linear_attention` for the arguments.
    """
    batch, seq_len, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    chunk = min(chunk_size, -(-seq_len // _CHUNK_ALIGNMENT) * _CHUNK_ALIGNMENT)
    num_chunks = -(-seq_len // chunk)
    per_channel = log_decay is not None and log_decay.ndim == 4
    group = 1 if per_channel else min(_CHUNKS_PER_STEP, num_chunks)
    step_len = group * chunk
    num_steps = -(-seq_len // step_len)

    def padded(x):
        """Zero-padded to whole steps: padding tokens are exact no-ops."""
        padding = num_steps * step_len - seq_len
        if x is None or not padding:
            return x
        return jnp.pad(x, [(0, 0), (0, padding)] + [(0, 0)] * (x.ndim - 2))

    q, k, v = padded(q), padded(k), padded(v)
    log_decay = None if log_decay is None else padded(log_decay.astype(jnp.float32))

    if initial_state is None:
        features = feature_dim(feature_map, key_dim)
        S = jnp.zeros((batch, heads, features, value_dim), jnp.float32)
        z = jnp.zeros((batch, heads, features), jnp.float32) if normalize else None
    else:
        S, z = initial_state

    def step(carry, step_index):
        # Slicing the closed-over inputs (rather than scanning over step-major copies)
        # lets XLA read them in place: the forward's temporaries stay flat in T.
        def chunks(x):
            """[B, step_len, H, ...] of this step -> [B, H, G, C, ...], float32."""
            x = lax.dynamic_slice_in_dim(x, step_index * step_len, step_len, axis=1)
            x = x.reshape(batch, group, chunk, heads, *x.shape[3:]).astype(jnp.float32)
            return jnp.moveaxis(x, 3, 1)

        positions = step_index * step_len + jnp.arange(step_len).reshape(group, chunk)
        carry, y = _group_step(
            carry,
            chunks(q),
            chunks(k),
            chunks(v),
            None if log_decay is None else chunks(log_decay),
            positions < seq_len,
            feature_map=feature_map,
            eps=eps,
        )
        # Back to token-major within the step, so that stacking the steps is the output.
        return carry, jnp.moveaxis(y, 1, 3).reshape(batch, step_len, heads, value_dim)

    (S, z), y = lax.scan(jax.checkpoint(step), (S, z), jnp.arange(num_steps))
    y = jnp.moveaxis(y, 0, 1).reshape(batch, num_steps * step_len, heads, value_dim)
    return y[:, :seq_len].astype(v.dtype), ((S, z) if return_final_state else None)


def _group_step(carry, q, k, v, g, is_token, *, feature_map, eps):
    """One group of G chunks: q, k [B,H,G,C,Dk], v [B,H,G,C,Dv], g [B,H,G,C(,Dk)] or None,
    is_token [G, C] -> (state after the group, y [B,H,G,C,Dv] float32)."""
    S, z = carry
    chunk = q.shape[3]
    causal = jnp.tril(jnp.ones((chunk, chunk), bool))

    scores = jnp.einsum("bngid,bngjd->bngij", q, k, preferred_element_type=jnp.float32)
    if feature_map == "taylor2":
        s = scores / math.sqrt(q.shape[-1])
        scores = 1.0 + s + 0.5 * s * s
    phi_q = apply_feature_map(feature_map, q)
    phi_k = apply_feature_map(feature_map, k)
    if feature_map is not None:
        # phi(0) keeps its constant feature; padding keys must not add it to z.
        phi_k = phi_k * is_token[..., None]

    if g is None:
        weights = jnp.where(causal, scores, 0.0)
        chunk_log_decay = None
    else:
        b = jnp.cumsum(g, axis=3)
        b_last = b[:, :, :, -1:]
        if g.ndim == 4:  # one decay per head: rows of the state share it
            weights = scores * _causal_exp(b[..., :, None] - b[..., None, :], causal)
            phi_q = phi_q * jnp.exp(b)[..., None]
            phi_k = phi_k * jnp.exp(b_last - b)[..., None]
            chunk_log_decay = b_last  # [B, H, G, 1]
        else:  # one decay per key channel: the decay sits inside the q . k sum
            pair_decay = _causal_exp(b[:, :, :, :, None] - b[:, :, :, None, :], causal[..., None])
            weights = jnp.einsum(
                "bngif,bngjf,bngijf->bngij", q, k, pair_decay, preferred_element_type=jnp.float32
            )
            phi_q = phi_q * jnp.exp(b)
            phi_k = phi_k * jnp.exp(b_last - b)
            chunk_log_decay = b_last[:, :, :, 0]  # [B, H, G, Dk]

    y = jnp.einsum("bngij,bngjd->bngid", weights, v, preferred_element_type=jnp.float32)
    increments = jnp.einsum("bngjf,bngjd->bngfd", phi_k, v, preferred_element_type=jnp.float32)
    S_before, S = _states_of_the_group(S, increments, chunk_log_decay)
    y = y + jnp.einsum("bngif,bngfd->bngid", phi_q, S_before, preferred_element_type=jnp.float32)
    if z is not None:
        z_before, z = _states_of_the_group(z[..., None], jnp.sum(phi_k, axis=3)[..., None], chunk_log_decay)
        z_before, z = z_before[..., 0], z[..., 0]
        denominator = jnp.sum(weights, axis=-1)
        denominator = denominator + jnp.einsum("bngif,bngf->bngi", phi_q, z_before, preferred_element_type=jnp.float32)
        y = y / (denominator + eps)[..., None]
    return (S, z), y


def _states_of_the_group(S, increments, chunk_log_decay):
    """The state before each chunk of a group, and after the group.

    S [B,H,F,D] before the group; increments U [B,H,G,F,D] (each chunk's own
    contribution, decayed to its end); chunk_log_decay [B,H,G,R] (R = 1 per head, F per
    channel) or None. S_g = exp(c_g) S_{g-1} + U_g, run over the G chunks: a few cheap
    elementwise steps next to the matmuls.
    """
    if chunk_log_decay is None:
        before = jnp.cumsum(increments, axis=2) - increments
        return S[:, :, None] + before, S + jnp.sum(increments, axis=2)
    decays = jnp.exp(chunk_log_decay)[..., None]  # [B,H,G,R,1]
    states_before = []
    for g in range(increments.shape[2]):
        states_before.append(S)
        S = decays[:, :, g] * S + increments[:, :, g]
    return jnp.stack(states_before, axis=2), S


def _causal_exp(exponent, causal):
    """exp(exponent) where causal (there exponent <= 0), exactly 0 elsewhere."""
    return jnp.exp(jnp.where(causal, exponent, -jnp.inf))
