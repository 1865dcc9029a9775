"""Causal linear attention, the obvious way: the recurrence run token by token with
lax.scan, in float32. The oracle for every linear-attention test.

    S_t = exp(g_t) S_{t-1} + phi(k_t)^T v_t,    y_t = phi(q_t) S_t
    z_t = exp(g_t) z_{t-1} + phi(k_t),          y_t /= phi(q_t) . z_t + eps   (normalize)

exp(g_t) scales the state's rows: one factor per head, or one per feature channel.

`taylor2_quadratic_attention` is BASED's quadratic (attention-matrix) form of the
undecayed taylor2 case, which never builds the 1 + d + d^2 features.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from kernels.linear_attention.feature_maps import apply_feature_map


def taylor2_quadratic_attention(q, k, v, *, normalize: bool = True, eps: float = 1e-6):
    """BASED's quadratic form: q, k [B,T,H,d], v [B,T,H,Dv] -> y [B,T,H,Dv] in v's dtype.

        y_i = sum_{j<=i} A_ij v_j  [ / (sum_{j<=i} A_ij + eps)  when normalize ]
        A_ij = 1 + s + s^2 / 2,  s = q_i . k_j / sqrt(d)

    Equals `linear_attention(..., feature_map="taylor2")` without decay, since A_ij =
    phi(q_i) . phi(k_j); O(T^2) work and memory in float32, cheaper for short sequences.
    """
    q, k = jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32)
    length = q.shape[1]
    s = jnp.einsum("bihd,bjhd->bhij", q, k, precision=lax.Precision.HIGHEST) / jnp.sqrt(float(q.shape[-1]))
    causal = jnp.tril(jnp.ones((length, length), bool))
    A = jnp.where(causal, 1.0 + s + 0.5 * s * s, 0.0)
    y = jnp.einsum("bhij,bjhd->bihd", A, v.astype(jnp.float32), precision=lax.Precision.HIGHEST)
    if normalize:
        y = y / (jnp.swapaxes(jnp.sum(A, axis=-1), 1, 2)[..., None] + eps)
    return y.astype(v.dtype)


def token_step(S, z, phi_q, phi_k, v, decay, *, eps):
    """One token of the recurrence, all float32.

    S [B,H,F,Dv]; z [B,H,F], or None without normalization; phi_q, phi_k [B,H,F];
    v [B,H,Dv]; decay = exp(g) as [B,H,1] (per head) or [B,H,F] (per channel), or None.
    Returns (y [B,H,Dv], S, z).
    """
    if decay is not None:
        S = decay[..., None] * S
        z = None if z is None else decay * z
    S = S + phi_k[..., :, None] * v[..., None, :]
    y = jnp.einsum("bhf,bhfd->bhd", phi_q, S, precision=lax.Precision.HIGHEST)
    if z is not None:
        z = z + phi_k
        y = y / (jnp.sum(phi_q * z, axis=-1) + eps)[..., None]
    return y, S, z


def linear_attention(
    q, k, v, *, log_decay, normalize, feature_map, initial_state, return_final_state, chunk_size, eps
):
    """q, k [B,T,H,Dk], v [B,T,H,Dv] -> (y [B,T,H,Dv] in v's dtype, (S, z) or None).

    See `kernels.linear_attention` for the arguments; chunk_size is unused here.
    """
    del chunk_size  # the oracle has no chunks
    phi_q = apply_feature_map(feature_map, q)
    phi_k = apply_feature_map(feature_map, k)
    batch, _, heads, features = phi_q.shape
    if initial_state is None:
        S = jnp.zeros((batch, heads, features, v.shape[-1]), jnp.float32)
        z = jnp.zeros((batch, heads, features), jnp.float32) if normalize else None
    else:
        S, z = initial_state
    if log_decay is None:
        decay = None
    else:
        decay = jnp.exp(log_decay.astype(jnp.float32))
        decay = decay[..., None] if decay.ndim == 3 else decay

    def step(carry, inputs):
        S, z = carry
        y, S, z = token_step(S, z, *inputs, eps=eps)
        return (S, z), y

    def time_major(x):
        return None if x is None else jnp.moveaxis(x, 1, 0)

    (S, z), y = lax.scan(
        step,
        (S, z),
        (time_major(phi_q), time_major(phi_k), time_major(v.astype(jnp.float32)), time_major(decay)),
    )
    y = jnp.moveaxis(y, 0, 1).astype(v.dtype)
    return y, ((S, z) if return_final_state else None)
