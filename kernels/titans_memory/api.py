"""Public Titans neural memory (Behrouz et al., "Titans: Learning to Memorize at Test
Time"): parallel (chunked) form and one-token decode step.

The memory M(x; W) is an MLP without biases, W = (W_1..W_L), W_l [din_l, dout_l], with
an activation between layers. Per token t, with u_t = grad_W ||M(k_t; A_t) - v_t||^2:

    S_t = eta_t S_{t-1} - theta_t u_t,   W_t = (1 - alpha_t) W_{t-1} + S_t,   y_t = M(q_t; W_t)

A_t, the gradient point, is the weights at the start of t's chunk: chunks of C tokens
at absolute positions 0, C, 2C, ... of the memory's stream (the paper's mini-batch
gradient descent; C = 1 is plain per-token descent). A carried state knows how far
into its chunk it is, so two calls always equal one call.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from kernels import _backend
from kernels._checks import as_int, check_per_token, check_qkv
from kernels._sharding import per_shard
from kernels.titans_memory import reference, xla

ACTIVATIONS = ("gelu", "silu")


class TitansMemoryState(NamedTuple):
    """The memory between calls, all float32; each tuple holds one array per layer,
    [B, H, din_l, dout_l]."""

    weights: tuple  # W_t
    momentum: tuple  # S_t
    anchor: tuple  # the gradient point of the current chunk
    offset: jnp.ndarray  # int32 []: tokens already in the current chunk (0..C-1)


def memory_layer_shapes(key_dim: int, value_dim: int, depth: int, hidden_dim: int | None = None):
    """[(din, dout)] of each layer: Dk -> hidden -> ... -> hidden -> Dv, depth layers,
    hidden = 4 * Dk unless given."""
    for name, value in (("key_dim", key_dim), ("value_dim", value_dim), ("depth", depth)):
        if as_int(value) is None or value < 1:
            raise ValueError(f"memory_layer_shapes: {name} must be a positive int, got {value!r}")
    hidden = 4 * key_dim if hidden_dim is None else hidden_dim
    if as_int(hidden) is None or hidden < 1:
        raise ValueError(f"memory_layer_shapes: hidden_dim must be a positive int or None, got {hidden_dim!r}")
    widths = [key_dim] + [hidden] * (depth - 1) + [value_dim]
    return list(zip(widths[:-1], widths[1:]))


def init_titans_memory_state(initial_weights, batch: int) -> TitansMemoryState:
    """The state before the first token: W = anchor = W_0 ([H, din, dout] per layer)
    broadcast over the batch, zero momentum, offset 0. Gradients flow to W_0."""
    if as_int(batch) is None or batch < 1:
        raise ValueError(f"init_titans_memory_state: batch must be a positive int, got {batch!r}")
    initial_weights = _checked_initial_weights("init_titans_memory_state", initial_weights)
    weights = tuple(
        jnp.broadcast_to(w.astype(jnp.float32)[None], (batch, *w.shape)) for w in initial_weights
    )
    return TitansMemoryState(
        weights=weights,
        momentum=tuple(jnp.zeros_like(w) for w in weights),
        anchor=weights,
        offset=jnp.zeros((), jnp.int32),
    )


def titans_memory(
    q,
    k,
    v,
    lr,
    *,
    log_momentum=None,
    log_retain=None,
    initial_weights=None,
    initial_state: TitansMemoryState | None = None,
    return_final_state: bool = False,
    chunk_size: int = 64,
    activation: str = "gelu",
    implementation: str | None = None,
):
    """The Titans memory over a sequence.

    q, k [B,T,H,Dk], v [B,T,H,Dv]: any float dtype; y comes back in v's dtype.
    lr [B,T,H]: theta_t >= 0, the inner learning rate (bounded by the caller).
    log_momentum [B,T,H]: log eta_t <= 0; None means no momentum (eta = 0).
    log_retain [B,T,H]: log(1 - alpha_t) <= 0; None means no weight decay (alpha = 0).
    initial_weights: the learned W_0, one [H, din, dout] array per layer (see
        `memory_layer_shapes`), shared by the batch; required unless initial_state is given.
    initial_state: a TitansMemoryState to continue from (then no initial_weights).
    return_final_state: also return the TitansMemoryState after the last token.
    chunk_size: C, tokens per chunk of the update schedule, a positive int (it changes
        the answer; the Pallas kernels want a power of two).
    activation: "gelu" (tanh approximation) or "silu", between the memory's layers.
    implementation: None (backend default), "reference", "xla" or "pallas".

    Returns y [B,T,H,Dv], or (y, final TitansMemoryState) with return_final_state.
    """
    op = "titans_memory"
    batch, seq_len, heads, key_dim = check_qkv(op, q, k, v, time_axis=True)
    per_token = (batch, seq_len, heads)
    lr = _checked_per_token(op, "lr", lr, per_token)
    log_momentum = _checked_optional_per_token(op, "log_momentum", log_momentum, per_token)
    log_retain = _checked_optional_per_token(op, "log_retain", log_retain, per_token)
    chunk_size = _checked_chunk_size(op, chunk_size)
    activation = _checked_activation(op, activation)
    if (initial_weights is None) == (initial_state is None):
        raise ValueError(
            f"{op}: give exactly one of initial_weights (the learned W_0, to start a sequence) "
            f"and initial_state (to continue one); got "
            f"{'both' if initial_state is not None else 'neither'}"
        )
    # A fresh state starts at a chunk boundary: the chunked forms need no front padding.
    aligned = initial_state is None
    if aligned:
        state = init_titans_memory_state(initial_weights, batch)
    else:
        state = _checked_state(op, "initial_state", initial_state)
    _check_state_fits(op, "initial_state" if initial_state is not None else "initial_weights", state, q, v)
    implementation_fn = _backend.dispatch("titans_memory", implementation)
    y, final_state = implementation_fn(
        q,
        k,
        v,
        lr,
        log_momentum,
        log_retain,
        state,
        chunk_size=chunk_size,
        activation=activation,
        aligned=aligned,
    )
    return (y, final_state) if return_final_state else y


def titans_memory_step(
    q_t, k_t, v_t, lr_t, state: TitansMemoryState, *, log_momentum=None, log_retain=None,
    chunk_size: int = 64, activation: str = "gelu",
):
    """Decode one token: q_t, k_t [B,H,Dk], v_t [B,H,Dv], lr_t, log_momentum and
    log_retain [B,H] -> (y_t [B,H,Dv] in v's dtype, new state).

    Same arguments and chunk schedule as `titans_memory` (pass the same chunk_size);
    T calls from its initial state give its y and final state. O(|W|) per token.
    """
    op = "titans_memory_step"
    batch, heads, _ = check_qkv(op, q_t, k_t, v_t, time_axis=False)
    per_token = (batch, heads)
    lr_t = _checked_per_token(op, "lr_t", lr_t, per_token)
    log_momentum = _checked_optional_per_token(op, "log_momentum", log_momentum, per_token)
    log_retain = _checked_optional_per_token(op, "log_retain", log_retain, per_token)
    chunk_size = _checked_chunk_size(op, chunk_size)
    activation = _checked_activation(op, activation)
    if state is None:
        raise ValueError(
            f"{op}: state is required; start from init_titans_memory_state(initial_weights, batch) "
            "or from titans_memory(..., return_final_state=True)"
        )
    state = _checked_state(op, "state", state)
    _check_state_fits(op, "state", state, q_t[:, None], v_t[:, None])
    y_t, state = reference.token_step(
        state, q_t, k_t, v_t, lr_t, log_momentum, log_retain, chunk_size=chunk_size, activation=activation
    )
    return y_t.astype(v_t.dtype), state


def titans_memory_read(q, weights, *, activation: str = "gelu"):
    """M(q; W) without an update: q [B,T,H,Dk] and weights, a tuple of [B,H,din,dout]
    per layer (a state's `weights` or `anchor`) -> [B,T,H,Dv] float32.

    Reads a frozen memory for every token at once, e.g. Titans MAC's retrieval from the
    memory as it stood before a segment.
    """
    op = "titans_memory_read"
    if getattr(q, "ndim", None) != 4:
        raise ValueError(f"{op}: q must be [batch, seq, heads, key_dim], got shape {getattr(q, 'shape', q)}")
    activation = _checked_activation(op, activation)
    weights = tuple(jnp.asarray(w) for w in weights)
    batch, _, heads, key_dim = q.shape
    if not weights or any(w.ndim != 4 or w.shape[:2] != (batch, heads) for w in weights):
        raise ValueError(
            f"{op}: weights must be a non-empty tuple of [batch, heads, din, dout] = [{batch}, {heads}, ., .] "
            f"arrays, got shapes {[w.shape for w in weights]}"
        )
    _check_layers_chain(op, "weights", [w.shape for w in weights])
    if weights[0].shape[2] != key_dim:
        raise ValueError(f"{op}: the first layer takes din = {weights[0].shape[2]}, but q's key_dim is {key_dim}")
    x = q.astype(jnp.float32)
    phi = reference.activation_fn(activation)
    for index, w in enumerate(weights):
        x = jnp.einsum("bthi,bhio->btho", x, w.astype(jnp.float32), precision=reference.EXACT)
        if index < len(weights) - 1:
            x = phi(x)
    return x


# --- argument checks -------------------------------------------------------------------


def _checked_per_token(op, name, array, expected_shape):
    return check_per_token(op, name, array, expected_shape).astype(jnp.float32)


def _checked_optional_per_token(op, name, array, expected_shape):
    return None if array is None else _checked_per_token(op, name, array, expected_shape)


def _checked_chunk_size(op, chunk_size):
    size = as_int(chunk_size)
    if size is None or size < 1:
        raise ValueError(f"{op}: chunk_size must be a positive int, got {chunk_size!r}")
    return size


def _checked_activation(op, activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
    return activation


def _checked_initial_weights(op, initial_weights):
    """A non-empty tuple of [H, din, dout] float arrays whose widths chain."""
    if not isinstance(initial_weights, (tuple, list)) or not initial_weights:
        raise ValueError(
            f"{op}: initial_weights must be a non-empty tuple with one [heads, din, dout] array per "
            f"memory layer, got {type(initial_weights).__name__}"
        )
    initial_weights = tuple(jnp.asarray(w) for w in initial_weights)
    for index, w in enumerate(initial_weights):
        if w.ndim != 3 or not jnp.issubdtype(w.dtype, jnp.floating):
            raise ValueError(
                f"{op}: initial_weights[{index}] must be a float array [heads, din, dout], "
                f"got {w.dtype} {w.shape}"
            )
    _check_layers_chain(op, "initial_weights", [w.shape for w in initial_weights])
    return initial_weights


def _check_layers_chain(op, name, shapes):
    """Every layer's leading dims agree and each layer's din is the previous one's dout."""
    for index in range(1, len(shapes)):
        previous, current = shapes[index - 1], shapes[index]
        if current[:-2] != previous[:-2] or current[-2] != previous[-1]:
            raise ValueError(
                f"{op}: {name}[{index}] has shape {current}, which does not follow layer "
                f"{index - 1}'s {previous} (expected leading dims {previous[:-2]} and din "
                f"{previous[-1]}); see memory_layer_shapes"
            )


def _checked_state(op, name, state):
    if not isinstance(state, TitansMemoryState):
        raise ValueError(
            f"{op}: {name} must be a TitansMemoryState (from init_titans_memory_state or "
            f"return_final_state=True), got {type(state).__name__}"
        )
    depth = len(state.weights)
    if depth < 1 or len(state.momentum) != depth or len(state.anchor) != depth:
        raise ValueError(
            f"{op}: {name} must hold one array per memory layer in weights, momentum and anchor, "
            f"got {len(state.weights)}, {len(state.momentum)} and {len(state.anchor)}"
        )
    shapes = [jnp.shape(w) for w in state.weights]
    for index, shape in enumerate(shapes):
        if len(shape) != 4:
            raise ValueError(f"{op}: {name}.weights[{index}] must be [batch, heads, din, dout], got {shape}")
    _check_layers_chain(op, f"{name}.weights", shapes)
    for field in ("momentum", "anchor"):
        for index, (array, shape) in enumerate(zip(getattr(state, field), shapes)):
            if jnp.shape(array) != shape:
                raise ValueError(
                    f"{op}: {name}.{field}[{index}] must have the shape of weights[{index}], "
                    f"{shape}, got {jnp.shape(array)}"
                )
    if jnp.shape(state.offset) != ():
        raise ValueError(f"{op}: {name}.offset must be an int32 scalar, got shape {jnp.shape(state.offset)}")
    f32 = lambda arrays: tuple(jnp.asarray(x, jnp.float32) for x in arrays)
    return TitansMemoryState(
        f32(state.weights), f32(state.momentum), f32(state.anchor), jnp.asarray(state.offset, jnp.int32)
    )


def _check_state_fits(op, name, state, q, v):
    """The state's batch, heads, key and value dims agree with q and v [B,T,H,D]."""
    batch, _, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    first, last = state.weights[0].shape, state.weights[-1].shape
    if first[:2] != (batch, heads) or first[2] != key_dim or last[3] != value_dim:
        shown = [tuple(w.shape[1:]) for w in state.weights] if name == "initial_weights" else [
            tuple(w.shape) for w in state.weights
        ]
        raise ValueError(
            f"{op}: {name} layer shapes {shown} do not fit q {q.shape} and v {v.shape}: expected "
            f"heads {heads}, the first layer's din = key_dim {key_dim} and the last layer's "
            f"dout = value_dim {value_dim}" + ("" if name == "initial_weights" else f", batch {batch}")
        )


def _pallas(*args, **options):
    """The Pallas kernel for the default backend (interpreted on CPU)."""
    kernel_module = _backend.pallas_kernel_module("titans_memory")
    return kernel_module.titans_memory(*args, interpret=_backend.interpret_mode(), **options)


_STATE_LAYOUT = TitansMemoryState(weights="BH", momentum="BH", anchor="BH", offset="")

_backend.register_op(
    "titans_memory",
    {
        "reference": reference.titans_memory,
        "xla": xla.titans_memory,
        "pallas": per_shard(
            _pallas,
            arg_layouts=("BTH",) * 6 + (_STATE_LAYOUT,),
            kwarg_layouts={},
            out_layouts=("BTH", _STATE_LAYOUT),
        ),
    },
)
