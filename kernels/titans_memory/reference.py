"""The Titans memory, the obvious way: the decode step run token by token with lax.scan,
in float32, the gradient u_t taken by jax.grad, so it is right for any depth. The oracle
for every Titans memory test.

    u = grad_W ||M(k_t; anchor) - v_t||^2;  S = eta S - theta u;  W = (1 - alpha) W + S
    y_t = M(q_t; W);  offset += 1;  at offset == C: anchor = W, offset = 0
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

EXACT = lax.Precision.HIGHEST  # the oracle must not use bf16 matmul passes on TPU


def activation_fn(name):
    """The activation between memory layers: "gelu" (tanh approximation) or "silu"."""
    return {"gelu": lambda x: jax.nn.gelu(x, approximate=True), "silu": jax.nn.silu}[name]


def memory_apply(weights, x, activation):
    """M(x; W) for batched weights [B,H,din,dout] per layer and x [B,H,Dk] -> [B,H,Dv]."""
    phi = activation_fn(activation)
    for index, w in enumerate(weights):
        x = jnp.einsum("bhi,bhio->bho", x, w, precision=EXACT)
        if index < len(weights) - 1:
            x = phi(x)
    return x


def token_step(state, q_t, k_t, v_t, lr_t, log_momentum_t, log_retain_t, *, chunk_size, activation):
    """One token: q_t, k_t [B,H,Dk], v_t [B,H,Dv], lr_t [B,H], log_momentum_t and
    log_retain_t [B,H] or None; state a TitansMemoryState -> (y_t [B,H,Dv] float32, state)."""
    f32 = lambda x: x.astype(jnp.float32)
    q_t, k_t, v_t, lr_t = f32(q_t), f32(k_t), f32(v_t), f32(lr_t)
    per_head = lambda x: f32(x)[..., None, None]

    def loss(weights):
        # Heads and batch rows are separate memories: the gradient of the sum is each one's.
        return jnp.sum(jnp.square(memory_apply(weights, k_t, activation) - v_t))

    surprise = jax.grad(loss)(state.anchor)
    momentum = tuple(-per_head(lr_t) * u for u in surprise)
    if log_momentum_t is not None:
        eta = per_head(jnp.exp(log_momentum_t))
        momentum = tuple(eta * s + m for s, m in zip(state.momentum, momentum))
    retain = 1.0 if log_retain_t is None else per_head(jnp.exp(log_retain_t))
    weights = tuple(retain * w + s for w, s in zip(state.weights, momentum))
    y_t = memory_apply(weights, q_t, activation)
    offset = state.offset + 1
    chunk_done = offset == chunk_size
    anchor = tuple(jnp.where(chunk_done, w, a) for w, a in zip(weights, state.anchor))
    offset = jnp.where(chunk_done, 0, offset).astype(jnp.int32)
    return y_t, type(state)(weights, momentum, anchor, offset)


def titans_memory(q, k, v, lr, log_momentum, log_retain, state, *, chunk_size, activation, aligned):
    """q, k [B,T,H,Dk], v [B,T,H,Dv], lr [B,T,H], log_momentum and log_retain [B,T,H]
    float32 or None, state a float32 TitansMemoryState -> (y [B,T,H,Dv] in v's dtype,
    final state). See `kernels.titans_memory` for the arguments."""
    del aligned  # token by token, the offset in the state is all the schedule needs
    time_major = lambda x: None if x is None else jnp.moveaxis(x, 1, 0)
    tokens = tuple(time_major(x) for x in (q, k, v, lr, log_momentum, log_retain))

    def step(state, token):
        y_t, state = token_step(state, *token, chunk_size=chunk_size, activation=activation)
        return state, y_t

    final_state, y = lax.scan(step, state, tokens)
    return jnp.moveaxis(y, 0, 1).astype(v.dtype), final_state
