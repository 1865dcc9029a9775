"""Public causal linear attention: the chunked parallel form, its state and the decode step.

Per head, with phi the feature map and g <= 0 the log-decay:

    S_t = exp(g_t) S_{t-1} + phi(k_t)^T v_t          S: [F, Dv] float32
    z_t = exp(g_t) z_{t-1} + phi(k_t)                z: [F] float32 (normalize only)
    y_t = phi(q_t) S_t  [ / (phi(q_t) . z_t + eps)  when normalize ]

exp(g_t) scales the state's rows: one factor per head (g [B,T,H]) or one per key channel
(g [B,T,H,Dk], GLA-style). The parallel form and the step share the state layout, so a
prefill's final state continues exactly in `linear_attention_step` or in a next call.
"""

from __future__ import annotations

import functools
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kernels import _backend
from kernels._sharding import per_shard
from kernels._checks import as_int, check_bthd
from kernels.linear_attention import kernel_math, reference, xla
from kernels.linear_attention.feature_maps import FEATURE_MAPS, apply_feature_map, feature_dim

DEFAULT_CHUNK_SIZE = 64
DEFAULT_EPS = 1e-6


class LinearAttentionState(NamedTuple):
    """The recurrent state after some tokens.

    S: [B, H, F, Dv] float32, the decayed sum of phi(k)^T v.
    z: [B, H, F] float32, the decayed sum of phi(k) (the normalizer), or None when the
    attention is not normalized. F = Dk, or 1 + Dk + Dk^2 for feature_map="taylor2"
    (features ordered as `taylor2_feature_map` returns them).
    """

    S: jax.Array
    z: jax.Array | None


def init_linear_attention_state(
    batch: int,
    heads: int,
    key_dim: int,
    value_dim: int,
    *,
    feature_map: str | None = None,
    normalize: bool = False,
) -> LinearAttentionState:
    """The state before any token: zeros, with z only when normalize."""
    for name, value in (("batch", batch), ("heads", heads), ("key_dim", key_dim), ("value_dim", value_dim)):
        if as_int(value) is None or value < 1:
            raise ValueError(f"init_linear_attention_state: {name} must be a positive int, got {value!r}")
    _check_feature_map("init_linear_attention_state", feature_map)
    features = feature_dim(feature_map, key_dim)
    return LinearAttentionState(
        S=jnp.zeros((batch, heads, features, value_dim), jnp.float32),
        z=jnp.zeros((batch, heads, features), jnp.float32) if normalize else None,
    )


def linear_attention(
    q,
    k,
    v,
    *,
    log_decay=None,
    normalize: bool = False,
    feature_map: str | None = None,
    initial_state: LinearAttentionState | None = None,
    return_final_state: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    implementation: str | None = None,
    eps: float = DEFAULT_EPS,
):
    """Causal linear attention: q, k [B,T,H,Dk], v [B,T,H,Dv] -> y [B,T,H,Dv] in v's dtype.

    log_decay: None (no decay), [B,T,H] (per head and token) or [B,T,H,Dk] (per key
      channel; not with feature_map="taylor2"). Values must be <= 0 (decays in (0, 1]);
      they are accumulated in float32.
    normalize: divide by phi(q_t) . z_t + eps.
    feature_map: None (identity) or "taylor2" (BASED; see `taylor2_feature_map`).
    initial_state: a `LinearAttentionState` to continue from (z required iff normalize).
    return_final_state: also return the state after the last token: (y, state).
    chunk_size: tokens per chunk of the chunked implementations (the result does not
      depend on it); lengths that are not a multiple are padded internally. The Pallas
      kernels need a multiple of 16 (TPU) or a power of two >= 16 (GPU).
    implementation: None (backend default), "reference", "xla" or "pallas".
    eps: added to the normalizer (normalize only); must be > 0.

    Returns y, or (y, LinearAttentionState) with return_final_state. Differentiable in
    q, k, v, log_decay and initial_state: the Pallas kernels have their own backward
    passes (they recompute chunk states instead of storing them), the XLA form keeps one
    state per scan step.
    """
    batch, seq_len, heads, key_dim, value_dim = _check_qkv(q, k, v)
    _check_feature_map("linear_attention", feature_map)
    log_decay = _checked_log_decay("linear_attention", log_decay, (batch, seq_len, heads), key_dim, feature_map)
    initial_state = _checked_state(
        "linear_attention", "initial_state", initial_state, batch, heads, key_dim, value_dim,
        feature_map, normalize, required=False,
    )
    if as_int(chunk_size) is None or chunk_size < 1:
        raise ValueError(f"linear_attention: chunk_size must be a positive int, got {chunk_size!r}")
    _check_eps("linear_attention", eps, normalize)

    implementation_fn = _backend.dispatch("linear_attention", implementation)
    y, final_state = implementation_fn(
        q,
        k,
        v,
        log_decay=log_decay,
        normalize=bool(normalize),
        feature_map=feature_map,
        initial_state=initial_state,
        return_final_state=bool(return_final_state),
        chunk_size=as_int(chunk_size),
        eps=float(eps),
    )
    if return_final_state:
        return y, LinearAttentionState(*final_state)
    return y


def linear_attention_step(
    q_t,
    k_t,
    v_t,
    state: LinearAttentionState,
    *,
    log_decay=None,
    normalize: bool = False,
    feature_map: str | None = None,
    eps: float = DEFAULT_EPS,
):
    """Decode one token: q_t, k_t [B,H,Dk], v_t [B,H,Dv] -> (y_t [B,H,Dv] in v's dtype, state).

    An O(F * Dv) update of the carried state (no chunking): the recurrence of
    `linear_attention` for a single token. log_decay: None, [B,H] or [B,H,Dk]. Pass the
    same normalize / feature_map / eps as the prefill that produced the state.
    """
    for name, array in (("q_t", q_t), ("k_t", k_t), ("v_t", v_t)):
        if getattr(array, "ndim", None) != 3:
            raise ValueError(
                f"linear_attention_step: {name} must be [batch, heads, dim] (one token, 3 dims), "
                f"got shape {getattr(array, 'shape', type(array).__name__)}"
            )
    if q_t.shape != k_t.shape or q_t.shape[:2] != v_t.shape[:2]:
        raise ValueError(
            "linear_attention_step: q_t and k_t must have the same shape [B,H,Dk] and v_t the same "
            f"[B,H], got q_t {q_t.shape}, k_t {k_t.shape}, v_t {v_t.shape}"
        )
    batch, heads, key_dim = q_t.shape
    value_dim = v_t.shape[-1]
    _check_feature_map("linear_attention_step", feature_map)
    log_decay = _checked_log_decay("linear_attention_step", log_decay, (batch, heads), key_dim, feature_map)
    state = _checked_state(
        "linear_attention_step", "state", state, batch, heads, key_dim, value_dim,
        feature_map, normalize, required=True,
    )
    _check_eps("linear_attention_step", eps, normalize)
    if log_decay is None:
        decay = None
    else:
        decay = jnp.exp(log_decay)
        decay = decay[..., None] if decay.ndim == 2 else decay
    y, S, z = reference.token_step(
        state.S,
        state.z,
        apply_feature_map(feature_map, q_t),
        apply_feature_map(feature_map, k_t),
        v_t.astype(jnp.float32),
        decay,
        eps=float(eps),
    )
    return y.astype(v_t.dtype), LinearAttentionState(S, z)


def _check_qkv(q, k, v):
    check_bthd("linear_attention", q=q, k=k, v=v)
    if q.shape != k.shape:
        raise ValueError(f"linear_attention: q and k must have the same shape, got q {q.shape} and k {k.shape}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(
            "linear_attention: v must share [batch, seq, heads] with q and k, "
            f"got v {v.shape} and q {q.shape}"
        )
    if q.shape[1] < 1:
        raise ValueError("linear_attention: q, k and v hold no tokens (sequence length 0); pass at least one")
    return (*q.shape, v.shape[-1])


def _check_feature_map(op, feature_map):
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"{op}: feature_map must be one of {list(FEATURE_MAPS)}, got {feature_map!r}")


def _checked_log_decay(op, log_decay, per_head_shape, key_dim, feature_map):
    """None, or the log-decay as float32 of shape per_head_shape or per_head_shape + (Dk,)."""
    if log_decay is None:
        return None
    log_decay = jnp.asarray(log_decay)
    per_channel_shape = (*per_head_shape, key_dim)
    if log_decay.shape not in (per_head_shape, per_channel_shape) or not jnp.issubdtype(
        log_decay.dtype, jnp.floating
    ):
        raise ValueError(
            f"{op}: log_decay must be a float array of shape {per_head_shape} (per head) or "
            f"{per_channel_shape} (per key channel), got {log_decay.dtype} {log_decay.shape}"
        )
    if feature_map == "taylor2" and log_decay.shape == per_channel_shape:
        raise ValueError(
            f"{op}: a per-channel log_decay {per_channel_shape} has no meaning for "
            "feature_map='taylor2' (its state rows are products of channels); "
            f"pass a per-head log_decay of shape {per_head_shape} or None"
        )
    return log_decay.astype(jnp.float32)


def _checked_state(op, name, state, batch, heads, key_dim, value_dim, feature_map, normalize, *, required):
    """Validate a LinearAttentionState (or an (S, z) pair); return it in float32."""
    if state is None:
        if required:
            raise ValueError(f"{op}: {name} is required; start from init_linear_attention_state(...)")
        return None
    if not isinstance(state, tuple) or len(state) != 2:
        raise ValueError(f"{op}: {name} must be a LinearAttentionState(S, z), got {type(state).__name__}")
    S, z = state
    features = feature_dim(feature_map, key_dim)
    expected_S = (batch, heads, features, value_dim)
    if getattr(S, "shape", None) != expected_S:
        raise ValueError(
            f"{op}: {name}.S must be [batch, heads, features, value_dim] = {expected_S} "
            f"(features = {features} for feature_map={feature_map!r}), got {getattr(S, 'shape', S)}"
        )
    if normalize and z is None:
        raise ValueError(
            f"{op}: normalize=True needs {name}.z, the normalizer; the state came from a "
            "call without normalize (or pass normalize=False)"
        )
    if not normalize and z is not None:
        raise ValueError(
            f"{op}: {name}.z is set but normalize=False; pass normalize=True to continue a "
            "normalized state, or a state with z=None"
        )
    if z is not None and getattr(z, "shape", None) != expected_S[:3]:
        raise ValueError(
            f"{op}: {name}.z must be [batch, heads, features] = {expected_S[:3]}, got {getattr(z, 'shape', z)}"
        )
    return LinearAttentionState(jnp.asarray(S, jnp.float32), None if z is None else jnp.asarray(z, jnp.float32))


def _check_eps(op, eps, normalize):
    if normalize and not (isinstance(eps, numbers.Real) and not isinstance(eps, bool) and eps > 0):
        raise ValueError(f"{op}: eps must be a number > 0 (it keeps the normalizer nonzero), got {eps!r}")


# --- the Pallas implementation: layout, padding and custom_vjp over a kernel module ---


def pallas_linear_attention(
    kernel_module, q, k, v, *, log_decay, normalize, feature_map, initial_state, return_final_state, chunk_size, eps
):
    """The Pallas implementation on the kernels of `kernel_module` (pallas_tpu or
    pallas_gpu): q, k [B,T,H,Dk], v [B,T,H,Dv] -> (y, (S, z) or None).

    The kernels see [B, H, T_pad, D] arrays and the chunk-cumulative log-decay; the state
    travels as one (S_p, z_p) pair per feature piece. Gradients come from the kernels'
    two backward passes (custom_vjp), none from autodiff.
    """
    batch, seq_len, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    if log_decay is None:
        decay = None
    else:
        decay = "head" if log_decay.ndim == 3 else "channel"
    cfg = kernel_math.Config(
        chunk=kernel_module.chunk_for(seq_len, chunk_size),
        seq_len=seq_len,
        key_dim=key_dim,
        feature_map=feature_map,
        decay=decay,
        normalize=normalize,
        eps=eps,
        compute_dtype="bfloat16" if jnp.result_type(q, k, v) == jnp.bfloat16 else "float32",
    )
    if initial_state is None:
        initial_state = init_linear_attention_state(
            batch, heads, key_dim, value_dim, feature_map=feature_map, normalize=normalize
        )
    y, final_pieces = _pallas_with_gradients(kernel_module, cfg, q, k, v, log_decay, _split_state(initial_state, cfg))
    return y, (_merge_state(final_pieces) if return_final_state else None)


def _pallas_on_this_backend(q, k, v, **options):
    return pallas_linear_attention(_backend.pallas_kernel_module("linear_attention"), q, k, v, **options)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _pallas_with_gradients(kernel_module, cfg, q, k, v, log_decay, state_pieces):
    outputs, _ = _pallas_forward(kernel_module, cfg, q, k, v, log_decay, state_pieces)
    return outputs


def _pallas_forward(kernel_module, cfg, q, k, v, log_decay, state_pieces):
    y, final_pieces = kernel_module.forward(
        *(_to_kernel_layout(x, cfg) for x in (q, k, v)),
        _chunk_cumulative(log_decay, cfg),
        state_pieces,
        cfg=cfg,
    )
    residuals = (q, k, v, log_decay, state_pieces, final_pieces)
    return (_from_kernel_layout(y, cfg), final_pieces), residuals


def _pallas_backward(kernel_module, cfg, residuals, cotangents):
    q, k, v, log_decay, state_pieces, final_pieces = residuals
    dy, d_final_pieces = cotangents
    q_kernel, k_kernel, v_kernel = (_to_kernel_layout(x, cfg) for x in (q, k, v))
    b = _chunk_cumulative(log_decay, cfg)
    do = _to_kernel_layout(dy, cfg)
    dq, d_cumulative_q, inv_normalizer, d_normalizer = kernel_module.backward_queries(
        q_kernel, k_kernel, v_kernel, b, state_pieces, do, cfg=cfg
    )
    dk, dv, d_cumulative_k, d_initial_pieces = kernel_module.backward_keys_values(
        q_kernel, k_kernel, v_kernel, b, do, inv_normalizer, d_normalizer, d_final_pieces, cfg=cfg
    )
    d_log_decay = None
    if log_decay is not None:
        # The loss depends on g only through the cumulative B_t = sum_{l <= t} g_l, and on
        # B_t as exp(+B_t) on the query side and exp(-B_t) on the key side of every term.
        if cfg.decay == "head":
            d_cumulative = d_cumulative_q - d_cumulative_k
        else:
            d_cumulative = q_kernel.astype(jnp.float32) * dq - k_kernel.astype(jnp.float32) * dk
        d_cumulative = d_cumulative[:, :, : cfg.seq_len]
        d_log_decay = jnp.flip(jnp.cumsum(jnp.flip(d_cumulative, axis=2), axis=2), axis=2)
        # The final state carries exp(B_T) for every term: a query-side term at the end.
        d_log_decay = d_log_decay + _final_state_decay_gradient(final_pieces, d_final_pieces, cfg)[:, :, None]
        d_log_decay = jnp.swapaxes(d_log_decay, 1, 2)
    return (
        _from_kernel_layout(dq, cfg).astype(q.dtype),
        _from_kernel_layout(dk, cfg).astype(k.dtype),
        _from_kernel_layout(dv, cfg).astype(v.dtype),
        d_log_decay,
        d_initial_pieces,
    )


_pallas_with_gradients.defvjp(_pallas_forward, _pallas_backward)


def _final_state_decay_gradient(final_pieces, d_final_pieces, cfg):
    """sum over the final state of d_state * state: [B, H] per head, [B, H, Dk] per channel."""
    total = 0.0
    for (S_p, z_p), (dS_p, dz_p) in zip(final_pieces, d_final_pieces):
        per_row = jnp.sum(S_p * dS_p, axis=-1) + (0.0 if z_p is None else z_p * dz_p)
        total = total + (per_row if cfg.decay == "channel" else jnp.sum(per_row, axis=-1))
    return total


def _to_kernel_layout(x, cfg):
    """[B, T, H, D] -> [B, H, T_pad, D], zero-padded to whole chunks."""
    padded_len = -(-cfg.seq_len // cfg.chunk) * cfg.chunk
    x = jnp.pad(x, [(0, 0), (0, padded_len - cfg.seq_len), (0, 0), (0, 0)])
    return jnp.swapaxes(x, 1, 2)


def _from_kernel_layout(x, cfg):
    """[B, H, T_pad, D] -> [B, T, H, D]."""
    return jnp.swapaxes(x[:, :, : cfg.seq_len], 1, 2)


def _chunk_cumulative(log_decay, cfg):
    """g [B,T,H(,Dk)] -> b [B,H,T_pad(,Dk)], its cumulative sum restarted at each chunk
    (float32; padding adds zero decay)."""
    if log_decay is None:
        return None
    per_head = log_decay.ndim == 3
    g = _to_kernel_layout(log_decay[..., None] if per_head else log_decay, cfg)
    batch, heads, padded_len, width = g.shape
    b = jnp.cumsum(g.reshape(batch, heads, padded_len // cfg.chunk, cfg.chunk, width), axis=3)
    b = b.reshape(batch, heads, padded_len, width)
    return b[..., 0] if per_head else b


def _split_state(state, cfg):
    """(S [B,H,F,Dv], z [B,H,F] or None) -> ((S_p, z_p) per feature piece)."""
    S, z = state
    pieces, start = [], 0
    for piece in cfg.pieces:
        stop = start + piece.size
        pieces.append((S[:, :, start:stop], None if z is None else z[:, :, start:stop]))
        start = stop
    return tuple(pieces)


def _merge_state(pieces):
    S = jnp.concatenate([S_p for S_p, _ in pieces], axis=2)
    z = None if pieces[0][1] is None else jnp.concatenate([z_p for _, z_p in pieces], axis=2)
    return S, z


_backend.register_op(
    "linear_attention",
    {
        "reference": reference.linear_attention,
        "xla": xla.linear_attention,
        "pallas": per_shard(
            _pallas_on_this_backend,
            arg_layouts=("BTH", "BTH", "BTH"),
            kwarg_layouts={"log_decay": "BTH", "initial_state": "BH"},
            out_layouts=("BTH", "BH"),
        ),
    },
)
