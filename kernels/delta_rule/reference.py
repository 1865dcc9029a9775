"""The gated delta rule, the obvious way: the recurrence run token by token with
lax.scan, in float32. The oracle for every delta-rule test.

    S_t = exp(g_t) (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t,    y_t = q_t S_t

computed in the equivalent rank-one form (one line of algebra, no [Dk, Dk] matrix):

    D = exp(g_t) S_{t-1};    S_t = D + beta_t k_t^T (v_t - k_t D)

A token that starts a new segment sees S_{t-1} = 0.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

_EXACT = lax.Precision.HIGHEST  # the oracle must not use bf16 matmul passes on TPU


def token_step(state, q_t, k_t, v_t, beta_t, log_decay_t):
    """One token, all float32: state [B,H,Dk,Dv]; q_t, k_t [B,H,Dk]; v_t [B,H,Dv];
    beta_t, log_decay_t [B,H]. Returns (y_t [B,H,Dv], new state)."""
    decayed = jnp.exp(log_decay_t)[..., None, None] * state
    prediction = jnp.einsum("bhk,bhkv->bhv", k_t, decayed, precision=_EXACT)
    correction = beta_t[..., None] * (v_t - prediction)
    state = decayed + k_t[..., :, None] * correction[..., None, :]
    y_t = jnp.einsum("bhk,bhkv->bhv", q_t, state, precision=_EXACT)
    return y_t, state


def delta_rule(q, k, v, beta, *, log_decay, segment_starts, initial_state, chunk_size):
    """q, k [B,T,H,Dk], v [B,T,H,Dv], beta and log_decay [B,T,H], segment_starts bool
    [B,T] or None, initial_state [B,H,Dk,Dv] float32 -> (y [B,T,H,Dv] in v's dtype,
    final state [B,H,Dk,Dv] float32). See `kernels.delta_rule` for the arguments."""
    del chunk_size  # the oracle has no chunks
    f32 = lambda x: x.astype(jnp.float32)
    time_major = lambda x: jnp.moveaxis(x, 1, 0)
    inputs = [time_major(f32(x)) for x in (q, k, v, beta, log_decay)]
    starts = None if segment_starts is None else time_major(segment_starts)

    def step(state, token):
        (q_t, k_t, v_t, beta_t, log_decay_t), starts_segment = token
        if starts_segment is not None:
            state = jnp.where(starts_segment[:, None, None, None], 0.0, state)
        y_t, state = token_step(state, q_t, k_t, v_t, beta_t, log_decay_t)
        return state, y_t

    final_state, y = lax.scan(step, f32(initial_state), (inputs, starts))
    return jnp.moveaxis(y, 0, 1).astype(v.dtype), final_state
