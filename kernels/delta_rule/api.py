"""Public gated delta rule: parallel (chunked) form and one-token decode step.

    S_t = exp(g_t) (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t,    y_t = q_t S_t

k_t, q_t are row vectors [Dk], v_t is [Dv], and the state S [Dk, Dv] maps keys to
values. No scale is applied to q: pass q * Dk**-0.5 for the convention of
flash-linear-attention's chunk_gated_delta_rule.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from kernels import _backend
from kernels._sharding import per_shard
from kernels._checks import as_int, check_per_token, check_qkv
from kernels.delta_rule import reference, xla

# normalize_qk: x / sqrt(sum(x^2) + eps), so an all-zero vector stays zero (padding).
_NORMALIZE_EPS = 1e-6


def delta_rule(
    q,
    k,
    v,
    beta,
    *,
    log_decay=None,
    segment_ids=None,
    normalize_qk: bool = False,
    initial_state=None,
    return_final_state: bool = False,
    chunk_size: int = 64,
    implementation: str | None = None,
):
    """The gated delta rule over a sequence.

    q, k [B,T,H,Dk], v [B,T,H,Dv]: any float dtype; y comes back in v's dtype.
    beta [B,T,H]: write strength (1 replaces the value stored under k_t when |k_t| = 1).
    log_decay [B,T,H]: g_t, the per-token, per-head log of the state's decay (<= 0 to
        forget); accumulated in float32. None means no decay.
    segment_ids int [B,T]: a token whose id differs from the previous token's starts
        from state 0 (packed documents, routed memories). initial_state only reaches
        the first segment. Padding with beta = 0 and log_decay = 0 is an exact no-op.
    normalize_qk: L2-normalise q and k over Dk inside the op, x / sqrt(|x|^2 + 1e-6),
        before any implementation runs (gradients flow through it).
    initial_state [B,H,Dk,Dv]: the state before token 0 (float32; default zeros).
    return_final_state: also return the state after the last token, float32
        [B,H,Dk,Dv]; feed it to `delta_rule_step` or to the next call's initial_state.
    chunk_size: tokens per chunk in the chunked forms, a power of two; the answer does
        not depend on it. Lengths that are not a multiple are padded internally.
    implementation: None (backend default), "reference", "xla" or "pallas". The Pallas
        kernels need chunk_size >= 16, and on GPU power-of-two head dims >= 16.

    Returns y [B,T,H,Dv], or (y, final_state) with return_final_state.
    """
    batch, seq_len, heads, key_dim = check_qkv("delta_rule", q, k, v, time_axis=True)
    beta = check_per_token("delta_rule", "beta", beta, (batch, seq_len, heads))
    if log_decay is None:
        log_decay = jnp.zeros((batch, seq_len, heads), jnp.float32)
    log_decay = check_per_token("delta_rule", "log_decay", log_decay, (batch, seq_len, heads))
    log_decay = log_decay.astype(jnp.float32)
    state_shape = (batch, heads, key_dim, v.shape[-1])
    initial_state = _checked_state("delta_rule", "initial_state", initial_state, state_shape)
    chunk_size = _checked_chunk_size(chunk_size)
    if normalize_qk:
        q, k = l2_normalize(q), l2_normalize(k)
    implementation_fn = _backend.dispatch("delta_rule", implementation)
    y, final_state = implementation_fn(
        q,
        k,
        v,
        beta,
        log_decay=log_decay,
        segment_starts=_segment_starts(segment_ids, (batch, seq_len)),
        initial_state=initial_state,
        chunk_size=chunk_size,
    )
    return (y, final_state) if return_final_state else y


def delta_rule_step(q_t, k_t, v_t, beta_t, state, *, log_decay=None, normalize_qk: bool = False):
    """Decode one token: q_t, k_t [B,H,Dk], v_t [B,H,Dv], beta_t and log_decay [B,H],
    state [B,H,Dk,Dv] float32 -> (y_t [B,H,Dv] in v's dtype, new state float32).

    Same arguments and convention as `delta_rule`; T calls from its initial_state give
    its y and final state.
    """
    batch, heads, key_dim = check_qkv("delta_rule_step", q_t, k_t, v_t, time_axis=False)
    beta_t = check_per_token("delta_rule_step", "beta_t", beta_t, (batch, heads))
    if log_decay is None:
        log_decay = jnp.zeros((batch, heads), jnp.float32)
    log_decay = check_per_token("delta_rule_step", "log_decay", log_decay, (batch, heads))
    state_shape = (batch, heads, key_dim, v_t.shape[-1])
    if state is None:
        raise ValueError(
            f"delta_rule_step: state is required, float32 {state_shape}; start from "
            "jnp.zeros or from delta_rule(..., return_final_state=True)"
        )
    state = _checked_state("delta_rule_step", "state", state, state_shape)
    if normalize_qk:
        q_t, k_t = l2_normalize(q_t), l2_normalize(k_t)
    f32 = lambda x: x.astype(jnp.float32)
    y_t, state = reference.token_step(state, f32(q_t), f32(k_t), f32(v_t), f32(beta_t), f32(log_decay))
    return y_t.astype(v_t.dtype), state


def l2_normalize(x, eps: float = _NORMALIZE_EPS):
    """x / sqrt(sum(x^2) + eps) over the last dim, computed in float32, in x's dtype."""
    x32 = x.astype(jnp.float32)
    inverse_norm = lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * inverse_norm).astype(x.dtype)


def _segment_starts(segment_ids, expected_shape):
    """bool [B,T]: True where a token's segment id differs from the previous token's."""
    if segment_ids is None:
        return None
    segment_ids = jnp.asarray(segment_ids)
    if segment_ids.shape != expected_shape or not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise ValueError(
            f"delta_rule: segment_ids must be an int array of shape [batch, seq] = "
            f"{expected_shape}, got {segment_ids.dtype} {segment_ids.shape}"
        )
    changed = segment_ids[:, 1:] != segment_ids[:, :-1]
    return jnp.concatenate([jnp.zeros_like(changed[:, :1]), changed], axis=1)


def _checked_state(op, name, state, expected_shape):
    if state is None:
        return jnp.zeros(expected_shape, jnp.float32)
    state = jnp.asarray(state)
    if state.shape != expected_shape:
        raise ValueError(
            f"{op}: {name} must be [batch, heads, key_dim, value_dim] = {expected_shape}, "
            f"got {state.shape}"
        )
    return state.astype(jnp.float32)


def _checked_chunk_size(chunk_size):
    size = as_int(chunk_size)
    if size is None or size < 1 or size & (size - 1):
        raise ValueError(f"delta_rule: chunk_size must be a power of two, got {chunk_size!r}")
    return size


def _pallas(q, k, v, beta, **options):
    """The Pallas kernels for the default backend (interpreted on CPU)."""
    kernel_module = _backend.pallas_kernel_module("delta_rule")
    return kernel_module.delta_rule(q, k, v, beta, interpret=_backend.interpret_mode(), **options)


_backend.register_op(
    "delta_rule",
    {
        "reference": reference.delta_rule,
        "xla": xla.delta_rule,
        "pallas": per_shard(
            _pallas,
            arg_layouts=("BTH", "BTH", "BTH", "BTH"),
            kwarg_layouts={"log_decay": "BTH", "segment_starts": "BT", "initial_state": "BH"},
            out_layouts=("BTH", "BH"),
        ),
    },
)
