"""The Titans memory: the reference against the literal update; every implementation
(chunked XLA, the Pallas TPU and GPU kernels in interpret mode) against the reference,
values, final states and all gradients; the chunk schedule across calls and in decode;
the gated delta rule as its depth-1, momentum-free, C = 1 case; gradient memory of the
XLA form; lowering for TPU and CUDA; errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels.titans_memory import chunked, pallas_gpu, pallas_tpu, reference
from kernels.titans_memory import xla as titans_xla
from kernels.testing import assert_close, export_lowering, random_normal

IMPLEMENTATIONS = {
    "reference": reference.titans_memory,
    "xla": titans_xla.titans_memory,
    "pallas_tpu": functools.partial(pallas_tpu.titans_memory, interpret=True),
    "pallas_gpu": functools.partial(pallas_gpu.titans_memory, interpret=True),
}
OUTPUT_NAMES = (
    "y", "final weights", "final momentum", "final anchor", "final offset",
    "dq", "dk", "dv", "dlr", "dlog_momentum", "dlog_retain", "dweights", "dmomentum", "danchor",
)


def _inputs(seed, batch, seq, heads, dim, depth, dtype=jnp.float32):
    """(q, k, v, lr, log_momentum, log_retain, W_0): unit-norm q and k (as the mixer
    gives them), theta in (0.01, 0.1), eta in (0.5, 1), 1 - alpha in (0.8, 1)."""
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((batch, seq, heads, dim)).astype(np.float32) for _ in range(3))
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    per_token = lambda low, high: jnp.asarray(rng.uniform(low, high, (batch, seq, heads)), jnp.float32)
    lr = per_token(0.01, 0.1)
    log_momentum, log_retain = jnp.log(per_token(0.5, 1.0)), jnp.log(per_token(0.8, 1.0))
    shapes = kernels.memory_layer_shapes(dim, dim, depth)
    weights = tuple(
        jnp.asarray(rng.standard_normal((heads, din, dout)) / np.sqrt(din), jnp.float32) for din, dout in shapes
    )
    as_dtype = lambda x: jnp.asarray(x, dtype)
    return as_dtype(q), as_dtype(k), as_dtype(v), lr, log_momentum, log_retain, weights


def _carried_state(seed, weights, batch, offset):
    """A state in the middle of a chunk: weights, momentum and anchor all different."""
    rng = np.random.default_rng(seed)
    noisy = lambda scale: tuple(
        jnp.asarray(np.broadcast_to(w, (batch, *w.shape)) + scale * rng.standard_normal((batch, *w.shape)), jnp.float32)
        for w in weights
    )
    momentum = tuple(0.1 * m for m in noisy(0.0))
    return noisy(0.05), momentum, noisy(0.05), offset


def _run(implementation, chunk_size, activation, offset, q, k, v, lr, log_momentum, log_retain, weights, momentum, anchor):
    """The implementation from init_titans_memory_state(weights) (offset None) or from a
    carried state (weights, momentum, anchor, offset) -> (y, final state)."""
    if offset is None:
        state, aligned = kernels.init_titans_memory_state(weights, q.shape[0]), True
    else:
        state = kernels.TitansMemoryState(weights, momentum, anchor, jnp.asarray(offset, jnp.int32))
        aligned = False
    return IMPLEMENTATIONS[implementation](
        q, k, v, lr, log_momentum, log_retain, state, chunk_size=chunk_size, activation=activation, aligned=aligned
    )


@functools.partial(jax.jit, static_argnames=("implementation", "chunk_size", "activation", "offset"))
def _outputs_and_grads(inputs, cotangents, *, implementation, chunk_size, activation="gelu", offset=None):
    """(y, final state) and the gradients of <y, dy> + <final W, S, A; d> with respect to
    q, k, v, lr, log_momentum, log_retain and the initial weights (momentum, anchor)."""
    run = functools.partial(_run, implementation, chunk_size, activation, offset)
    (y, state), pullback = jax.vjp(run, *inputs)
    dy, d_weights, d_momentum, d_anchor = cotangents
    d_state = type(state)(d_weights, d_momentum, d_anchor, np.zeros((), jax.dtypes.float0))
    return (y, *state[:3], state.offset, *pullback((dy.astype(y.dtype), d_state)))


def _case_inputs(seed, seq, depth, dtype, offset, momentum, retain, batch=2, heads=2, dim=4):
    q, k, v, lr, log_momentum, log_retain, weights = _inputs(seed, batch, seq, heads, dim, depth, dtype)
    log_momentum = log_momentum if momentum else None
    log_retain = log_retain if retain else None
    if offset is None:
        state = (weights, None, None)
    else:
        state = _carried_state(seed + 1, weights, batch, offset)[:3]
    inputs = (q, k, v, lr, log_momentum, log_retain, *state)
    batched = tuple(jnp.broadcast_to(w, (batch, *w.shape)) if offset is None else w for w in state[0])
    cotangents = (
        random_normal(99, v.shape),
        *(tuple(random_normal(90 + i + 10 * j, w.shape) for i, w in enumerate(batched)) for j in range(3)),
    )
    return inputs, cotangents


def _assert_outputs_close(actual, expected, tol):
    for name, a, e in zip(OUTPUT_NAMES, jax.tree.leaves(actual, is_leaf=lambda x: x is None),
                          jax.tree.leaves(expected, is_leaf=lambda x: x is None)):
        if e is None:
            assert a is None, name
            continue
        assert a.dtype == e.dtype, name
        assert_close(a, e, tol=tol, name=name, floor=0.1)


# --- the oracle ------------------------------------------------------------------------


def test_reference_matches_the_literal_update_of_a_matrix_memory():
    # Depth 1 in float64: u = 2 k^T (k A - v) at the chunk-start weights A (chunks of 3).
    q, k, v, lr, log_momentum, log_retain, weights = _inputs(0, 1, 8, 2, 4, 1)
    y, state = kernels.titans_memory(
        q, k, v, lr, log_momentum=log_momentum, log_retain=log_retain, initial_weights=weights,
        return_final_state=True, chunk_size=3, implementation="reference",
    )
    q, k, v, lr, eta, retain = (np.asarray(x, np.float64) for x in (q, k, v, lr, jnp.exp(log_momentum), jnp.exp(log_retain)))
    W = np.asarray(weights[0], np.float64)
    S, A, expected = np.zeros_like(W), W.copy(), np.zeros(y.shape[1:])
    for t in range(8):
        for h in range(2):
            u = 2.0 * np.outer(k[0, t, h], k[0, t, h] @ A[h] - v[0, t, h])
            S[h] = eta[0, t, h] * S[h] - lr[0, t, h] * u
            W[h] = retain[0, t, h] * W[h] + S[h]
            expected[t, h] = q[0, t, h] @ W[h]
        if t % 3 == 2:
            A = W.copy()
    np.testing.assert_allclose(y[0], expected, rtol=1e-5, atol=1e-5)
    for actual, literal in ((state.weights[0][0], W), (state.momentum[0][0], S), (state.anchor[0][0], A)):
        np.testing.assert_allclose(actual, literal, rtol=1e-5, atol=1e-5)
    assert int(state.offset) == 8 % 3


def test_gated_delta_rule_is_the_matrix_memory_without_momentum_at_chunk_1():
    # Depth 1, eta = 0, C = 1: W_t = (1 - a_t) W_{t-1} - theta_t 2 k_t^T (k_t W_{t-1} - v_t).
    # The delta rule decays first: S_t = D + beta_t k_t^T (v_t - k_t D), D = exp(g_t) S_{t-1},
    # i.e. S_t = exp(g_t) (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t. Both are the same
    # recurrence with g_t = log(1 - a_t), beta_t = 2 theta_t / (1 - a_t) and the value
    # written as (1 - a_t) v_t: then exp(g) beta = 2 theta and beta (1 - a) v = 2 theta v.
    q, k, v, lr, _, log_retain, weights = _inputs(1, 2, 17, 2, 4, 1)
    y, state = kernels.titans_memory(
        q, k, v, lr, log_retain=log_retain, initial_weights=weights, return_final_state=True,
        chunk_size=1, implementation="xla",
    )
    retain = jnp.exp(log_retain)
    y_delta, state_delta = kernels.delta_rule(
        q, k, retain[..., None] * v, 2.0 * lr / retain, log_decay=log_retain,
        initial_state=jnp.broadcast_to(weights[0], (2, *weights[0].shape)), return_final_state=True,
        chunk_size=16, implementation="xla",
    )
    assert_close(y, y_delta, tol=1e-5, name="y")
    assert_close(state.weights[0], state_delta, tol=1e-5, name="final weights")


# --- every implementation against the reference --------------------------------------


def _case(implementation, depth, chunk_size, seq, *, offset=None, momentum=True, retain=True,
          activation="gelu", dtype=jnp.float32, slow=False):
    parts = [implementation, f"L{depth}", f"C{chunk_size}", f"T{seq}"]
    parts += [] if offset is None else [f"offset{offset}"]
    parts += [] if momentum else ["no_momentum"]
    parts += [] if retain else ["no_retain"]
    parts += [] if activation == "gelu" else [activation]
    parts += [] if dtype == jnp.float32 else [jnp.dtype(dtype).name]
    marks = [pytest.mark.slow] if slow else []
    return pytest.param(
        implementation, depth, chunk_size, seq, offset, momentum, retain, activation, dtype,
        id="-".join(parts), marks=marks,
    )


MATCHES_REFERENCE_CASES = [
    _case("xla", 1, 1, 9),
    _case("xla", 2, 1, 9, momentum=False, retain=False, slow=True),
    _case("xla", 1, 4, 21, offset=3),
    _case("xla", 2, 4, 21, offset=1, activation="silu"),
    _case("xla", 3, 4, 14, offset=2),
    _case("xla", 4, 2, 9, momentum=False, activation="silu", slow=True),
    _case("xla", 2, 8, 19, momentum=False, slow=True),
    _case("xla", 2, 16, 37, retain=False, slow=True),
    _case("xla", 1, 16, 40, offset=9, momentum=False, retain=False, slow=True),
    _case("xla", 2, 8, 33, offset=5, slow=True),
    _case("pallas_tpu", 1, 4, 11, offset=2),
    _case("pallas_tpu", 2, 8, 13),
    _case("pallas_gpu", 2, 4, 11, offset=3, momentum=False),
    _case("pallas_gpu", 1, 16, 19, retain=False, slow=True),
    _case("pallas_tpu", 2, 1, 9, activation="silu", slow=True),
    _case("pallas_tpu", 2, 16, 37, momentum=False, retain=False, slow=True),
    _case("pallas_gpu", 2, 8, 21, offset=7, dtype=jnp.bfloat16, slow=True),
]


@pytest.mark.parametrize(
    "implementation, depth, chunk_size, seq, offset, momentum, retain, activation, dtype", MATCHES_REFERENCE_CASES
)
def test_matches_reference_values_and_gradients(
    implementation, depth, chunk_size, seq, offset, momentum, retain, activation, dtype
):
    # Interpret-mode Pallas pays per grid step: one batch row is enough there.
    batch = 1 if implementation.startswith("pallas") else 2
    inputs, cotangents = _case_inputs(seq, seq, depth, dtype, offset, momentum, retain, batch=batch)
    options = dict(chunk_size=chunk_size, activation=activation, offset=offset)
    actual = _outputs_and_grads(inputs, cotangents, implementation=implementation, **options)
    expected = _outputs_and_grads(inputs, cotangents, implementation="reference", **options)
    assert actual[0].dtype == dtype and actual[1][0].dtype == jnp.float32
    _assert_outputs_close(actual, expected, tol=1e-5 if dtype == jnp.float32 else 2e-2)


@pytest.mark.parametrize("depth, momentum, activation, valid_tokens", [
    (1, True, "gelu", 8), (2, True, "gelu", 5), (2, False, "silu", 8), (3, True, "silu", 3),
])
def test_written_out_chunk_backward_equals_autodiff_of_the_chunk(depth, momentum, activation, valid_tokens):
    # One chunk, 2D, with cotangents on y and on every carry (the anchor's too), and a
    # chunk that may end in padding (then the anchor passes through).
    size, dim = 8, 4
    keys = iter(range(100 * depth, 100 * depth + 50))
    shapes = kernels.memory_layer_shapes(dim, dim, depth)
    carry = tuple(tuple(0.3 * random_normal(next(keys), s) for s in shapes) for _ in range(3))
    q, k, v = (random_normal(next(keys), (size, dim)) for _ in range(3))
    column = lambda low, high: jnp.asarray(np.random.default_rng(next(keys)).uniform(low, high, (size, 1)), jnp.float32)
    theta, log_retain = column(0.01, 0.1), jnp.log(column(0.8, 1.0))
    log_momentum = jnp.log(column(0.5, 1.0)) if momentum else None
    mask = (jnp.arange(size)[:, None] < valid_tokens).astype(jnp.float32)
    d_y = random_normal(next(keys), (size, dim))
    d_carry = tuple(tuple(random_normal(next(keys), s) for s in shapes) for _ in range(3))

    def forward(carry, q, k, v, theta, log_retain, log_momentum):
        return chunked.chunk_forward(carry, q, k, v, theta, log_retain, log_momentum, mask, activation=activation)

    inputs = (carry, q, k, v, theta, log_retain, log_momentum)

    @jax.jit
    def autodiff(inputs):
        return jax.vjp(forward, *inputs)[1]((d_y, d_carry))

    @jax.jit
    def written_out(inputs):
        _, _, activations = chunked.chunk_pass(*inputs, mask, activation=activation)
        return chunked.chunk_backward(*inputs, mask, activations, d_y, d_carry, activation=activation)

    expected, actual = autodiff(inputs), written_out(inputs)
    names = ("d_carry", "dq", "dk", "dv", "dtheta", "dlog_retain", "dlog_momentum")
    for name, a, e in zip(names, actual, expected):
        for a_leaf, e_leaf in zip(jax.tree.leaves(a), jax.tree.leaves(e)):
            assert_close(a_leaf, e_leaf, tol=1e-5, name=name)


def test_bfloat16_inputs_match_the_reference():
    # bfloat16 q, k, v; the state and the arithmetic stay float32, y comes back in bfloat16.
    q, k, v, lr, log_momentum, log_retain, weights = _inputs(3, 2, 13, 2, 4, 2, jnp.bfloat16)
    call = functools.partial(
        kernels.titans_memory, q, k, v, lr, log_momentum=log_momentum, log_retain=log_retain,
        initial_weights=weights, return_final_state=True, chunk_size=4,
    )
    y, state = call(implementation="xla")
    y_ref, state_ref = call(implementation="reference")
    assert y.dtype == jnp.bfloat16 and state.weights[0].dtype == jnp.float32
    assert_close(y, y_ref, tol=1e-2, name="y")
    for layer, (a, e) in enumerate(zip(state.weights, state_ref.weights)):
        assert_close(a, e, tol=1e-5, name=f"final weights[{layer}]")


# --- the chunk schedule across calls and in decode --------------------------------------


@pytest.mark.parametrize("implementation", [pytest.param("reference", marks=pytest.mark.slow), "xla"])
def test_calls_split_inside_chunks_equal_one_call(implementation):
    # Chunks of 4; calls of 6, 1 and 10 tokens: both splits fall inside a chunk.
    q, k, v, lr, log_momentum, log_retain, weights = _inputs(4, 2, 17, 2, 4, 2)
    call = jax.jit(
        functools.partial(kernels.titans_memory, return_final_state=True, chunk_size=4, implementation=implementation)
    )
    y, final_state = call(
        q, k, v, lr, log_momentum=log_momentum, log_retain=log_retain, initial_weights=weights
    )
    outputs, state = [], None
    for part in (slice(0, 6), slice(6, 7), slice(7, 17)):
        start = dict(initial_weights=weights) if state is None else dict(initial_state=state)
        y_part, state = call(
            q[:, part], k[:, part], v[:, part], lr[:, part],
            log_momentum=log_momentum[:, part], log_retain=log_retain[:, part], **start,
        )
        outputs.append(y_part)
    assert_close(jnp.concatenate(outputs, axis=1), y, tol=1e-5, name="y")
    for field in ("weights", "momentum", "anchor"):
        for layer, (a, e) in enumerate(zip(getattr(state, field), getattr(final_state, field))):
            assert_close(a, e, tol=1e-5, name=f"{field}[{layer}]")
    assert int(state.offset) == int(final_state.offset) == 17 % 4


@pytest.mark.parametrize(
    "momentum, retain", [(True, True), pytest.param(False, False, marks=pytest.mark.slow)], ids=["gated", "plain"]
)
def test_decode_steps_equal_the_parallel_form(momentum, retain):
    q, k, v, lr, log_momentum, log_retain, weights = _inputs(5, 2, 11, 2, 4, 2)
    log_momentum = log_momentum if momentum else None
    log_retain = log_retain if retain else None
    per_token = dict(log_momentum=log_momentum, log_retain=log_retain)
    call = functools.partial(kernels.titans_memory, return_final_state=True, chunk_size=4, implementation="xla")
    y, final_state = call(q, k, v, lr, initial_weights=weights, **per_token)
    step = jax.jit(functools.partial(kernels.titans_memory_step, chunk_size=4))
    at = lambda x, t: None if x is None else x[:, t]

    def decode(state, tokens):
        decoded = []
        for t in tokens:
            y_t, state = step(
                q[:, t], k[:, t], v[:, t], lr[:, t], state,
                log_momentum=at(log_momentum, t), log_retain=at(log_retain, t),
            )
            decoded.append(y_t)
        return jnp.stack(decoded, axis=1), state

    def assert_state_close(state, label):
        for field in ("weights", "momentum", "anchor"):
            for layer, (a, e) in enumerate(zip(getattr(state, field), getattr(final_state, field))):
                assert_close(a, e, tol=1e-5, name=f"{field}[{layer}] {label}")
        assert int(state.offset) == int(final_state.offset)

    decoded, state = decode(kernels.init_titans_memory_state(weights, 2), range(11))
    assert_close(decoded, y, tol=1e-5, name="y decoded from the start")
    assert_state_close(state, "decoded from the start")
    # A prefill of odd length hands over to decode in the middle of a chunk.
    first = slice(0, 5)
    _, prefill_state = call(
        q[:, first], k[:, first], v[:, first], lr[:, first], initial_weights=weights,
        **{name: at(x, first) for name, x in per_token.items()},
    )
    decoded, state = decode(prefill_state, range(5, 11))
    assert_close(decoded, y[:, 5:], tol=1e-5, name="y decoded after prefill")
    assert_state_close(state, "decoded after prefill")


def test_padding_tokens_are_no_ops_in_the_dual_form():
    # A chunk that is all padding leaves (A, W, S) exactly as they were.
    rng = np.random.default_rng(6)
    carry = tuple(tuple(jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((4, 16), (16, 4))) for _ in range(3))
    tokens = [jnp.asarray(rng.standard_normal((8, 4)), jnp.float32) for _ in range(3)]
    padding = jnp.zeros((8, 1))
    for log_momentum in (padding, None):
        _, new_carry = jax.jit(functools.partial(chunked.chunk_forward, activation="gelu"))(
            carry, *tokens, padding, padding, log_momentum, padding
        )
        for before, after in zip(jax.tree.leaves(carry), jax.tree.leaves(new_carry)):
            np.testing.assert_array_equal(after, before)


# --- gradient memory of the XLA form ------------------------------------------------------


def _gradient_temp_bytes(num_chunks, chunk_size=4, dim=64):
    shapes = kernels.memory_layer_shapes(dim, dim, 1)
    args = [jax.ShapeDtypeStruct((1, num_chunks * chunk_size, 1, dim), jnp.float32) for _ in range(3)]
    args += [jax.ShapeDtypeStruct((1, num_chunks * chunk_size, 1), jnp.float32) for _ in range(3)]
    args += [tuple(jax.ShapeDtypeStruct((1, din, dout), jnp.float32) for din, dout in shapes)]

    def loss(q, k, v, lr, log_momentum, log_retain, weights):
        y = kernels.titans_memory(
            q, k, v, lr, log_momentum=log_momentum, log_retain=log_retain, initial_weights=weights,
            chunk_size=chunk_size, implementation="xla",
        )
        return jnp.sum(y)

    gradients = jax.grad(loss, argnums=tuple(range(7)))
    return jax.jit(gradients).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_xla_gradient_memory_does_not_grow_like_the_number_of_chunks():
    # |W| = 64 * 64 floats = 16 KiB per copy, three copies (A, W, S) per carry: saving
    # every chunk's carry would cost 48 KiB per chunk, 12 MiB for 256 chunks; sqrt(N)
    # grouping keeps ~2 sqrt(N) of them (2.7 MiB of temp memory in all when written).
    assert _gradient_temp_bytes(256) < 256 * 48 * 2**10 / 3


# --- Pallas lowering for TPU and CUDA ------------------------------------------------------


@pytest.mark.parametrize(
    "platform, kernel, custom_call",
    [("tpu", pallas_tpu.titans_memory, "tpu_custom_call"), ("cuda", pallas_gpu.titans_memory, "triton")],
)
@pytest.mark.parametrize("depth", [1, 2])
def test_pallas_kernels_lower_forward_and_backward(platform, kernel, custom_call, depth):
    batch, seq, heads, dim, chunk_size = 1, 130, 2, 32, 32
    shapes = kernels.memory_layer_shapes(dim, dim, depth)
    args = (
        *(jax.ShapeDtypeStruct((batch, seq, heads, dim), jnp.bfloat16) for _ in range(3)),
        *(jax.ShapeDtypeStruct((batch, seq, heads), jnp.float32) for _ in range(3)),
        tuple(jax.ShapeDtypeStruct((heads, din, dout), jnp.float32) for din, dout in shapes),
    )

    def forward(q, k, v, lr, log_momentum, log_retain, weights):
        # A carried state: the front padding's dynamic placement lowers too.
        state = kernels.init_titans_memory_state(weights, batch)._replace(offset=jnp.int32(5))
        return kernel(
            q, k, v, lr, log_momentum, log_retain, state, chunk_size=chunk_size, activation="gelu", aligned=False
        )

    def loss_and_gradients(*args):
        # The backward is the XLA form's VJP: only the loss value keeps the kernel alive.
        def loss(*args):
            y, state = forward(*args)
            return jnp.sum(y.astype(jnp.float32)) + sum(jnp.sum(w) for w in state.weights)

        return jax.value_and_grad(loss, argnums=tuple(range(7)))(*args)

    assert export_lowering(forward, *args, platform=platform).mlir_module().count(custom_call) >= 1
    assert export_lowering(loss_and_gradients, *args, platform=platform).mlir_module().count(custom_call) >= 1


# --- the public op ------------------------------------------------------------------------------


def test_memory_layer_shapes_and_initial_state():
    assert kernels.memory_layer_shapes(8, 6, 1) == [(8, 6)]
    assert kernels.memory_layer_shapes(8, 6, 3) == [(8, 32), (32, 32), (32, 6)]
    assert kernels.memory_layer_shapes(8, 6, 2, hidden_dim=5) == [(8, 5), (5, 6)]
    weights = tuple(jnp.ones((2, din, dout), jnp.bfloat16) for din, dout in kernels.memory_layer_shapes(4, 4, 2))
    state = kernels.init_titans_memory_state(weights, 3)
    assert [w.shape for w in state.weights] == [(3, 2, 4, 16), (3, 2, 16, 4)]
    assert all(w.dtype == jnp.float32 for w in jax.tree.leaves(state[:3]))
    assert all(not jnp.any(s) for s in state.momentum) and state.offset.dtype == jnp.int32
    for a, w in zip(state.anchor, state.weights):
        np.testing.assert_array_equal(a, w)


def test_defaults_and_dispatch():
    assert kernels.default_implementation("titans_memory") == "xla"
    assert kernels.available_ops()["titans_memory"] == ["reference", "xla", "pallas"]


def test_titans_memory_rejects_bad_inputs():
    q, k, v, lr, log_momentum, _, weights = _inputs(7, 2, 10, 2, 4, 2)
    call = functools.partial(kernels.titans_memory, initial_weights=weights)
    with pytest.raises(ValueError, match=r"q and k must have the same shape"):
        call(q, k[..., :2], v, lr)
    with pytest.raises(ValueError, match=r"q must be \[batch, seq, heads, dim\] \(4 dims\)"):
        call(q[0], k, v, lr)
    with pytest.raises(ValueError, match=r"lr must be a float array of shape \[2, 10, 2\]"):
        call(q, k, v, lr[..., None])
    with pytest.raises(ValueError, match=r"log_momentum must be a float array of shape \[2, 10, 2\]"):
        call(q, k, v, lr, log_momentum=log_momentum[:, :3])
    with pytest.raises(ValueError, match="give exactly one of initial_weights .* got neither"):
        kernels.titans_memory(q, k, v, lr)
    state = kernels.init_titans_memory_state(weights, 2)
    with pytest.raises(ValueError, match="got both"):
        call(q, k, v, lr, initial_state=state)
    with pytest.raises(ValueError, match=r"initial_weights\[1\] has shape \(2, 8, 4\), which does not follow"):
        call(q, k, v, lr, initial_weights=(weights[0], weights[1][:, :8]))
    with pytest.raises(ValueError, match=r"do not fit q .* first layer's din = key_dim 2"):
        call(q[..., :2], k[..., :2], v, lr)
    with pytest.raises(ValueError, match=r"initial_weights must be a non-empty tuple"):
        call(q, k, v, lr, initial_weights=weights[0])
    with pytest.raises(ValueError, match=r"initial_state must be a TitansMemoryState"):
        kernels.titans_memory(q, k, v, lr, initial_state=tuple(state))
    with pytest.raises(ValueError, match=r"do not fit .* batch 1"):
        kernels.titans_memory(q[:1], k[:1], v[:1], lr[:1], initial_state=state)
    for chunk_size in (0, 2.0, True):
        with pytest.raises(ValueError, match="chunk_size must be a positive int"):
            call(q, k, v, lr, chunk_size=chunk_size)
    with pytest.raises(ValueError, match=r"activation must be one of \['gelu', 'silu'\], got 'relu'"):
        call(q, k, v, lr, activation="relu")
    with pytest.raises(ValueError, match="got unknown implementation 'cuda'"):
        call(q, k, v, lr, implementation="cuda")
    with pytest.raises(ValueError, match="Pallas TPU kernels need a power-of-two chunk_size, got 12"):
        call(q, k, v, lr, chunk_size=12, implementation="pallas")
    deep = tuple(jnp.zeros((2, din, dout)) for din, dout in kernels.memory_layer_shapes(4, 4, 3))
    with pytest.raises(ValueError, match="Pallas TPU kernels cover memory depth 1 and 2, got depth 3"):
        call(q, k, v, lr, initial_weights=deep, implementation="pallas")
    state = kernels.init_titans_memory_state(weights, 2)
    with pytest.raises(ValueError, match=r"GPU kernel needs powers of two >= 16 .* got chunk_size = 8"):
        pallas_gpu.titans_memory(q, k, v, lr, None, None, state, chunk_size=8, activation="gelu", aligned=True)


def test_titans_memory_step_rejects_bad_inputs():
    q, k, v, lr, _, _, weights = _inputs(8, 2, 1, 2, 4, 1)
    state = kernels.init_titans_memory_state(weights, 2)
    step_inputs = (q[:, 0], k[:, 0], v[:, 0], lr[:, 0])
    with pytest.raises(ValueError, match=r"q must be \[batch, heads, dim\] \(3 dims\)"):
        kernels.titans_memory_step(q, k[:, 0], v[:, 0], lr[:, 0], state)
    with pytest.raises(ValueError, match="state is required"):
        kernels.titans_memory_step(*step_inputs, None)
    with pytest.raises(ValueError, match=r"state.momentum\[0\] must have the shape of weights\[0\]"):
        kernels.titans_memory_step(*step_inputs, state._replace(momentum=(state.momentum[0][:1],)))
    with pytest.raises(ValueError, match=r"lr_t must be a float array of shape \[2, 2\]"):
        kernels.titans_memory_step(q[:, 0], k[:, 0], v[:, 0], lr, state)


def test_read_applies_the_frozen_memory_to_every_token():
    rng = np.random.default_rng(7)
    weights = (
        jnp.asarray(rng.standard_normal((2, 3, 4, 16)), jnp.float32),
        jnp.asarray(rng.standard_normal((2, 3, 16, 5)), jnp.float32),
    )
    q = jnp.asarray(rng.standard_normal((2, 6, 3, 4)), jnp.float32)
    got = kernels.titans_memory_read(q, weights, activation="silu")
    hidden = np.einsum("bthi,bhio->btho", np.asarray(q), np.asarray(weights[0]))
    hidden = hidden / (1 + np.exp(-hidden))
    expected = np.einsum("bthi,bhio->btho", hidden, np.asarray(weights[1]))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="does not follow layer 0"):
        kernels.titans_memory_read(q, (weights[0], weights[0]))
