"""The gated delta rule: the reference against the literal matrix recurrence; every
implementation (chunked XLA, the Pallas TPU and GPU kernels in interpret mode) against
the reference, values and all gradients; state chaining, decode, segments, padding,
normalisation, the delta rule's recall property; lowering for TPU and CUDA; errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels.delta_rule import pallas_gpu, pallas_tpu, reference
from kernels.delta_rule import xla as delta_rule_xla
from kernels.testing import assert_close, export_lowering, random_normal

IMPLEMENTATIONS = {
    "reference": reference.delta_rule,
    "xla": delta_rule_xla.delta_rule,
    "pallas_tpu": functools.partial(pallas_tpu.delta_rule, interpret=True),
    "pallas_gpu": functools.partial(pallas_gpu.delta_rule, interpret=True),
}
OUTPUT_NAMES = ("y", "final_state", "dq", "dk", "dv", "dbeta", "dlog_decay", "dinitial_state")


def _inputs(seed, batch, seq, heads, key_dim, value_dim, dtype=jnp.float32):
    """(q, k, v, beta, log_decay, initial_state): unit-norm keys (the delta rule's stable
    regime), beta in (0.05, 1), log decays in (-0.5, 0); drawn with NumPy."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, seq, heads, key_dim)).astype(np.float32)
    k = rng.standard_normal((batch, seq, heads, key_dim)).astype(np.float32)
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.standard_normal((batch, seq, heads, value_dim)).astype(np.float32)
    beta = rng.uniform(0.05, 1.0, (batch, seq, heads)).astype(np.float32)
    log_decay = rng.uniform(-0.5, 0.0, (batch, seq, heads)).astype(np.float32)
    state = rng.standard_normal((batch, heads, key_dim, value_dim)).astype(np.float32)
    as_dtype = lambda x: jnp.asarray(x, dtype)
    return as_dtype(q), as_dtype(k), as_dtype(v), jnp.asarray(beta), jnp.asarray(log_decay), jnp.asarray(state)


def _segment_ids(seed, batch, seq):
    """Runs of random lengths; ids alternate 0/1, so an id recurs (still a new segment)."""
    starts = np.random.default_rng(seed).uniform(size=(batch, seq)) < 0.08
    return jnp.asarray(np.cumsum(starts, axis=1) % 2, jnp.int32)


def _segment_starts(segment_ids):
    if segment_ids is None:
        return None
    changed = segment_ids[:, 1:] != segment_ids[:, :-1]
    return jnp.concatenate([jnp.zeros_like(changed[:, :1]), changed], axis=1)


def _bind(implementation, segment_starts, chunk_size):
    def run(q, k, v, beta, log_decay, state):
        return IMPLEMENTATIONS[implementation](
            q, k, v, beta, log_decay=log_decay, segment_starts=segment_starts,
            initial_state=state, chunk_size=chunk_size,
        )

    return run


@functools.partial(jax.jit, static_argnames=("implementation", "chunk_size"))
def _forward(inputs, segment_starts, *, implementation, chunk_size=16):
    return _bind(implementation, segment_starts, chunk_size)(*inputs)


@functools.partial(jax.jit, static_argnames=("implementation", "chunk_size"))
def _outputs_and_grads(inputs, segment_starts, cotangents, *, implementation, chunk_size=16):
    """(y, final state) and the gradients of <y, dy> + <S, dS> with respect to q, k, v,
    beta, log_decay and the initial state. Module-level jit: equal shapes share compiles."""
    outputs, pullback = jax.vjp(_bind(implementation, segment_starts, chunk_size), *inputs)
    dy, d_state = cotangents
    return (*outputs, *pullback((dy.astype(outputs[0].dtype), d_state)))


def _cotangents(inputs):
    return random_normal(99, inputs[2].shape), random_normal(98, inputs[5].shape)


# --- the oracle ----------------------------------------------------------------------


def test_reference_matches_the_literal_matrix_recurrence():
    # S_t = exp(g_t) (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t, y_t = q_t S_t in
    # float64, with a segment start resetting S to 0.
    q, k, v, beta, log_decay, state = _inputs(0, 1, 12, 2, 4, 3)
    segment_ids = jnp.asarray([[0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0]], jnp.int32)
    y, final_state = kernels.delta_rule(
        q, k, v, beta, log_decay=log_decay, segment_ids=segment_ids, initial_state=state,
        return_final_state=True, implementation="reference",
    )
    q, k, v, beta, log_decay, S = (np.asarray(x, np.float64) for x in (q, k, v, beta, log_decay, state))
    S, expected = S[0], np.zeros(y.shape[1:])
    for t in range(12):
        if t and segment_ids[0, t] != segment_ids[0, t - 1]:
            S = np.zeros_like(S)
        for h in range(2):
            k_t = k[0, t, h][None, :]
            transition = np.exp(log_decay[0, t, h]) * (np.eye(4) - beta[0, t, h] * k_t.T @ k_t)
            S[h] = transition @ S[h] + beta[0, t, h] * k_t.T @ v[0, t, h][None, :]
            expected[t, h] = q[0, t, h] @ S[h]
    np.testing.assert_allclose(y[0], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(final_state[0], S, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", ["reference", "xla", "pallas"])
def test_unit_beta_on_orthonormal_keys_stores_and_overwrites_exactly(implementation):
    # The delta rule's memory property: beta = 1 writes v under k, replacing what k held.
    key_dim = 8
    keys = np.linalg.qr(np.random.default_rng(1).standard_normal((key_dim, key_dim)))[0]
    values = np.random.default_rng(2).standard_normal((key_dim + 1, 4))
    k = np.concatenate([keys, keys[:1]])  # the last token rewrites key 0
    as_input = lambda x: jnp.asarray(x[None, :, None, :], jnp.float32)
    y, state = kernels.delta_rule(
        as_input(k), as_input(k), as_input(values), jnp.ones((1, key_dim + 1, 1)),
        return_final_state=True, chunk_size=16, implementation=implementation,
    )
    recalled = keys @ np.asarray(state[0, 0])
    np.testing.assert_allclose(recalled, np.concatenate([values[-1:], values[1:key_dim]]), atol=1e-5)
    # Reading with the key just written returns its value.
    np.testing.assert_allclose(y[0, :, 0], values, atol=1e-5)


# --- every implementation against the reference --------------------------------------


def _case(implementation, seq, chunk_size, segments, dtype, *, slow=False):
    dtype_name = jnp.dtype(dtype).name
    case_id = f"{implementation}-T{seq}-C{chunk_size}{'-segments' if segments else ''}-{dtype_name}"
    marks = [pytest.mark.slow] if slow else []
    return pytest.param(implementation, seq, chunk_size, segments, dtype, id=case_id, marks=marks)


MATCHES_REFERENCE_CASES = [
    _case("xla", 1, 16, False, jnp.float32),
    _case("xla", 63, 32, True, jnp.float32),
    _case("xla", 130, 64, True, jnp.bfloat16),
    _case("xla", 130, 16, False, jnp.float32, slow=True),
    _case("pallas_tpu", 37, 16, True, jnp.float32),
    _case("pallas_gpu", 37, 16, True, jnp.float32),
    _case("pallas_tpu", 1, 16, False, jnp.float32, slow=True),
    _case("pallas_gpu", 1, 16, False, jnp.float32, slow=True),
    _case("pallas_tpu", 20, 16, False, jnp.bfloat16, slow=True),
    _case("pallas_gpu", 20, 16, False, jnp.bfloat16, slow=True),
]


@pytest.mark.parametrize("implementation, seq, chunk_size, segments, dtype", MATCHES_REFERENCE_CASES)
def test_matches_reference_values_and_gradients(implementation, seq, chunk_size, segments, dtype):
    # The GPU kernel wants power-of-two head dims >= 16; unequal Dk and Dv catch transposes.
    # Interpret-mode Pallas pays per grid step: one batch row is enough there.
    pallas = implementation.startswith("pallas")
    key_dim, value_dim, batch = (16, 32, 1) if pallas else (8, 12, 2)
    inputs = _inputs(seq, batch, seq, 2, key_dim, value_dim, dtype)
    starts = _segment_starts(_segment_ids(seq, batch, seq)) if segments else None
    cotangents = _cotangents(inputs)
    actual = _outputs_and_grads(inputs, starts, cotangents, implementation=implementation, chunk_size=chunk_size)
    expected = _outputs_and_grads(inputs, starts, cotangents, implementation="reference")
    assert actual[0].dtype == dtype and actual[1].dtype == jnp.float32
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for name, a, e in zip(OUTPUT_NAMES, actual, expected):
        assert a.dtype == e.dtype, name
        assert_close(a, e, tol=tol, name=name, floor=0.1)


def test_chunk_sizes_give_the_same_answer():
    inputs = _inputs(3, 1, 100, 2, 8, 8)
    starts = _segment_starts(_segment_ids(3, 1, 100))
    y16, state16 = _forward(inputs, starts, implementation="xla", chunk_size=16)
    for chunk_size in (32, 64):
        y, state = _forward(inputs, starts, implementation="xla", chunk_size=chunk_size)
        assert_close(y, y16, tol=1e-5, name=f"y (chunk {chunk_size})")
        assert_close(state, state16, tol=1e-5, name=f"final state (chunk {chunk_size})")


def _temp_bytes(fn, seq):
    args = [jax.ShapeDtypeStruct((1, seq, 2, 16), jnp.float32) for _ in range(3)]
    args += [jax.ShapeDtypeStruct((1, seq, 2), jnp.float32) for _ in range(2)]
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def _xla_forward(q, k, v, beta, log_decay):
    return kernels.delta_rule(q, k, v, beta, log_decay=log_decay, implementation="xla")


def test_xla_forward_memory_is_flat_in_length():
    # At 8192 tokens q alone is 1 MiB: the forward's scratch must hold no T-sized buffer.
    assert _temp_bytes(_xla_forward, 8192) < 2**19


@pytest.mark.slow
def test_xla_backward_memory_is_linear_in_length():
    def forward_and_backward(*inputs):
        return jax.grad(lambda *x: jnp.sum(_xla_forward(*x)), argnums=tuple(range(5)))(*inputs)

    short, long = _temp_bytes(forward_and_backward, 1024), _temp_bytes(forward_and_backward, 4096)
    assert long < 5 * short, (short, long)


# --- Pallas lowering for TPU and CUDA ------------------------------------------------


def _lowering_args(dtype):
    batch, seq, heads, dim = 1, 130, 2, 64
    return (
        *(jax.ShapeDtypeStruct((batch, seq, heads, dim), dtype) for _ in range(3)),
        jax.ShapeDtypeStruct((batch, seq, heads), jnp.float32),
        jax.ShapeDtypeStruct((batch, seq, heads), jnp.float32),
        jax.ShapeDtypeStruct((batch, seq), jnp.int32),
        jax.ShapeDtypeStruct((batch, heads, dim, dim), jnp.float32),
    )


@pytest.mark.parametrize(
    "platform, kernel, custom_call",
    [("tpu", pallas_tpu.delta_rule, "tpu_custom_call"), ("cuda", pallas_gpu.delta_rule, "triton")],
)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_pallas_kernels_lower_forward_and_backward(platform, kernel, custom_call, dtype):
    def forward(q, k, v, beta, log_decay, segment_ids, state):
        return kernel(
            q, k, v, beta, log_decay=log_decay, segment_starts=_segment_starts(segment_ids),
            initial_state=state, chunk_size=64,
        )

    def gradients(q, k, v, beta, log_decay, segment_ids, state):
        def loss(q, k, v, beta, log_decay, state):
            y, final_state = forward(q, k, v, beta, log_decay, segment_ids, state)
            return jnp.sum(y.astype(jnp.float32)) + jnp.sum(final_state)

        return jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5))(q, k, v, beta, log_decay, state)

    args = _lowering_args(dtype)
    assert export_lowering(forward, *args, platform=platform).mlir_module().count(custom_call) >= 1
    # The forward that keeps the chunk states, and the backward kernel.
    assert export_lowering(gradients, *args, platform=platform).mlir_module().count(custom_call) >= 2


# --- behaviour of the public op ----------------------------------------------------------


@pytest.mark.parametrize("implementation", ["reference", "xla"])
def test_two_calls_with_a_carried_state_equal_one_call(implementation):
    q, k, v, beta, log_decay, state = _inputs(6, 2, 64, 2, 8, 8)
    segment_ids = _segment_ids(6, 2, 64)
    call = jax.jit(
        functools.partial(kernels.delta_rule, return_final_state=True, chunk_size=16, implementation=implementation)
    )
    y, final_state = call(q, k, v, beta, log_decay=log_decay, segment_ids=segment_ids, initial_state=state)
    first, second = slice(0, 32), slice(32, 64)
    y1, state1 = call(
        q[:, first], k[:, first], v[:, first], beta[:, first],
        log_decay=log_decay[:, first], segment_ids=segment_ids[:, first], initial_state=state,
    )
    # A call cannot see the previous call's last id: if the second part starts a new
    # segment, the caller hands over a zero state.
    starts_segment = (segment_ids[:, 32] != segment_ids[:, 31])[:, None, None, None]
    y2, state2 = call(
        q[:, second], k[:, second], v[:, second], beta[:, second],
        log_decay=log_decay[:, second], segment_ids=segment_ids[:, second],
        initial_state=jnp.where(starts_segment, 0.0, state1),
    )
    assert_close(jnp.concatenate([y1, y2], axis=1), y, tol=1e-5, name="y")
    assert_close(state2, final_state, tol=1e-5, name="final state")


@pytest.mark.parametrize("implementation", ["reference", "xla"])
def test_decode_steps_equal_the_parallel_form(implementation):
    q, k, v, beta, log_decay, state = _inputs(7, 2, 21, 2, 8, 4)
    q, k = q * 3.0, k * 0.5  # normalize_qk must undo these scales
    y, final_state = kernels.delta_rule(
        q, k, v, beta, log_decay=log_decay, initial_state=state, normalize_qk=True,
        return_final_state=True, chunk_size=8, implementation=implementation,
    )
    step = jax.jit(functools.partial(kernels.delta_rule_step, normalize_qk=True))

    def decode(state, tokens):
        decoded = []
        for t in tokens:
            y_t, state = step(q[:, t], k[:, t], v[:, t], beta[:, t], state, log_decay=log_decay[:, t])
            decoded.append(y_t)
        return jnp.stack(decoded, axis=1), state

    decoded, decoded_state = decode(state, range(21))
    assert_close(decoded, y, tol=1e-5, name="y decoded from the start")
    assert_close(decoded_state, final_state, tol=1e-5, name="final state decoded from the start")
    # Prefill hands over to decode.
    _, prefill_state = kernels.delta_rule(
        q[:, :13], k[:, :13], v[:, :13], beta[:, :13], log_decay=log_decay[:, :13], initial_state=state,
        normalize_qk=True, return_final_state=True, chunk_size=8, implementation=implementation,
    )
    decoded, decoded_state = decode(prefill_state, range(13, 21))
    assert_close(decoded, y[:, 13:], tol=1e-5, name="y decoded after prefill")
    assert_close(decoded_state, final_state, tol=1e-5, name="final state decoded after prefill")


@pytest.mark.parametrize("implementation", ["reference", "xla"])
def test_segments_equal_separate_runs(implementation):
    # Ids 0, 1, 0: the third run is a new segment although its id was seen before.
    segment_ids = jnp.asarray([[0] * 12 + [1] * 12 + [0] * 12], jnp.int32)
    q, k, v, beta, log_decay, state = _inputs(8, 1, 36, 2, 16, 16)
    call = jax.jit(
        functools.partial(kernels.delta_rule, return_final_state=True, chunk_size=16, implementation=implementation)
    )
    y, final_state = call(q, k, v, beta, log_decay=log_decay, segment_ids=segment_ids, initial_state=state)
    outputs, segment_state = [], state
    for start in (0, 12, 24):
        part = slice(start, start + 12)
        y_part, last_state = call(
            q[:, part], k[:, part], v[:, part], beta[:, part],
            log_decay=log_decay[:, part], initial_state=segment_state,
        )
        outputs.append(y_part)
        segment_state = jnp.zeros_like(state)  # initial_state reaches the first segment only
    assert_close(y, jnp.concatenate(outputs, axis=1), tol=1e-5, name="y")
    assert_close(final_state, last_state, tol=1e-5, name="final state")


@pytest.mark.parametrize("implementation", ["reference", "xla"])
def test_padding_with_zero_beta_and_zero_log_decay_is_a_no_op(implementation):
    q, k, v, beta, log_decay, state = _inputs(9, 1, 30, 2, 8, 8)
    pad_q, pad_k, pad_v, *_ = _inputs(10, 1, 9, 2, 8, 8)
    zeros = jnp.zeros((1, 9, 2))
    insert = lambda x, pad: jnp.concatenate([x[:, :12], pad, x[:, 12:], pad], axis=1)
    real_tokens = np.r_[0:12, 21:39]
    call = functools.partial(
        kernels.delta_rule, initial_state=state, return_final_state=True, chunk_size=16,
        implementation=implementation,
    )
    y, final_state = call(q, k, v, beta, log_decay=log_decay)
    y_padded, padded_state = call(
        insert(q, pad_q), insert(k, pad_k), insert(v, pad_v), insert(beta, zeros),
        log_decay=insert(log_decay, zeros),
    )
    assert_close(y_padded[:, real_tokens], y, tol=1e-6, name="y at real tokens")
    assert_close(padded_state, final_state, tol=1e-6, name="final state")
    if implementation == "reference":
        np.testing.assert_array_equal(padded_state, final_state)  # token by token: exact


def test_normalize_qk_values_and_gradients():
    # The op normalises before dispatching to an implementation; compare it against
    # normalising by hand (the reference is the cheapest to compile).
    q, k, v, beta, log_decay, _ = _inputs(11, 1, 19, 2, 8, 8)
    k = k * jnp.linspace(0.5, 3.0, 19)[None, :, None, None]
    dy = random_normal(12, v.shape)

    def loss(implementation, normalize_inside, q, k, v, beta, log_decay):
        if not normalize_inside:
            unit = lambda x: x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-6)
            q, k = unit(q), unit(k)
        y = kernels.delta_rule(
            q, k, v, beta, log_decay=log_decay, normalize_qk=normalize_inside, chunk_size=16,
            implementation=implementation,
        )
        return jnp.sum(y * dy)

    value_and_grads = jax.jit(jax.value_and_grad(loss, argnums=(2, 3, 4, 5, 6)), static_argnums=(0, 1))
    value, grads = value_and_grads("reference", True, q, k, v, beta, log_decay)
    expected_value, expected_grads = value_and_grads("reference", False, q, k, v, beta, log_decay)
    assert_close(value, expected_value, tol=1e-5, name="loss")
    for name, a, e in zip(("dq", "dk", "dv", "dbeta", "dlog_decay"), grads, expected_grads):
        assert_close(a, e, tol=1e-5, name=name, floor=0.1)


def test_defaults_and_dispatch():
    q, k, v, beta, log_decay, _ = _inputs(13, 1, 10, 2, 8, 8)
    # Defaults: no decay, zero initial state, no segments.
    y = kernels.delta_rule(q, k, v, beta, implementation="reference")
    expected_y, _ = reference.delta_rule(
        q, k, v, beta, log_decay=jnp.zeros_like(log_decay), segment_starts=None,
        initial_state=jnp.zeros((1, 2, 8, 8)), chunk_size=16,
    )
    assert y.shape == v.shape and y.dtype == v.dtype
    np.testing.assert_array_equal(y, expected_y)
    assert kernels.default_implementation("delta_rule") == "xla"
    assert kernels.available_ops()["delta_rule"] == ["reference", "xla", "pallas"]


# --- input errors ---------------------------------------------------------------------


def test_delta_rule_rejects_bad_inputs():
    q, k, v, beta, log_decay, state = _inputs(14, 2, 10, 2, 8, 4)
    with pytest.raises(ValueError, match=r"q and k must have the same shape"):
        kernels.delta_rule(q, k[..., :4], v, beta)
    with pytest.raises(ValueError, match=r"v must match q in every dim but the last"):
        kernels.delta_rule(q, k, v[:, :9], beta)
    with pytest.raises(ValueError, match=r"q must be \[batch, seq, heads, dim\] \(4 dims\)"):
        kernels.delta_rule(q[0], k, v, beta)
    with pytest.raises(ValueError, match="hold no tokens"):
        kernels.delta_rule(q[:, :0], k[:, :0], v[:, :0], beta[:, :0])
    with pytest.raises(ValueError, match=r"beta must be a float array of shape \[2, 10, 2\]"):
        kernels.delta_rule(q, k, v, beta[..., None])
    with pytest.raises(ValueError, match=r"log_decay must be a float array of shape \[2, 10, 2\]"):
        kernels.delta_rule(q, k, v, beta, log_decay=log_decay[:, :5])
    with pytest.raises(ValueError, match=r"initial_state must be \[batch, heads, key_dim, value_dim\] = \(2, 2, 8, 4\)"):
        kernels.delta_rule(q, k, v, beta, initial_state=state[..., :2])
    with pytest.raises(ValueError, match=r"segment_ids must be an int array of shape \[batch, seq\] = \(2, 10\)"):
        kernels.delta_rule(q, k, v, beta, segment_ids=jnp.zeros((2, 10)))
    for chunk_size in (0, 24, 2.0, True):
        with pytest.raises(ValueError, match="chunk_size must be a power of two"):
            kernels.delta_rule(q, k, v, beta, chunk_size=chunk_size)
    with pytest.raises(ValueError, match="Pallas TPU kernels need chunk_size >= 16"):
        kernels.delta_rule(q, k, v, beta, chunk_size=8, implementation="pallas")
    with pytest.raises(ValueError, match="Pallas GPU kernels need a key head dim that is a power of two >= 16"):
        pallas_gpu.delta_rule(
            q, k, v, beta, log_decay=log_decay, segment_starts=None, initial_state=state, chunk_size=16
        )
    with pytest.raises(ValueError, match="got unknown implementation 'cuda'"):
        kernels.delta_rule(q, k, v, beta, implementation="cuda")


def test_delta_rule_step_rejects_bad_inputs():
    q, k, v, beta, _, state = _inputs(15, 2, 1, 2, 8, 4)
    step_inputs = (q[:, 0], k[:, 0], v[:, 0], beta[:, 0])
    with pytest.raises(ValueError, match=r"q must be \[batch, heads, dim\] \(3 dims\)"):
        kernels.delta_rule_step(q, k[:, 0], v[:, 0], beta[:, 0], state)
    with pytest.raises(ValueError, match="state is required"):
        kernels.delta_rule_step(*step_inputs, None)
    with pytest.raises(ValueError, match=r"state must be \[batch, heads, key_dim, value_dim\] = \(2, 2, 8, 4\)"):
        kernels.delta_rule_step(*step_inputs, state[:1])
    with pytest.raises(ValueError, match=r"beta_t must be a float array of shape \[2, 2\]"):
        kernels.delta_rule_step(q[:, 0], k[:, 0], v[:, 0], beta, state)
