"""Causal linear attention: the reference against explicit sums, every implementation
(chunked XLA; Pallas TPU and GPU kernels in interpret mode) against the reference
(outputs, final state, gradients of every input), chunk-size independence, state
chaining, the decode step, lowering of the Pallas kernels for TPU and CUDA, and input
errors."""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels import _backend
from kernels.linear_attention import api, kernel_math, pallas_gpu, pallas_tpu
from kernels.linear_attention import xla as linear_attention_xla
from kernels.testing import assert_close, export_lowering, random_normal

SLOW = pytest.mark.slow
# The test shapes are tiny: compiling without LLVM optimizations halves the (dominant)
# compile time of the interpreted Pallas kernels.
QUICK_COMPILE = {"xla_backend_optimization_level": 0}
BATCH, HEADS, KEY_DIM, VALUE_DIM = 2, 2, 8, 16


@dataclasses.dataclass(frozen=True)
class Case:
    seq: int
    feature_map: str | None = None
    decay: str | None = None  # None, "head" or "channel"
    normalize: bool = False
    dtype: str = "float32"
    chunk: int = 16

    @property
    def id(self):
        parts = [f"T{self.seq}", self.feature_map or "identity", f"decay-{self.decay}"]
        parts += ["normalized"] if self.normalize else []
        parts += [self.dtype[:4], f"C{self.chunk}"]
        return "-".join(parts)


def _features(case):
    return KEY_DIM if case.feature_map is None else 1 + KEY_DIM + KEY_DIM**2


def _inputs(case):
    """q, k, v, log_decay and an initial state for a case, drawn with NumPy."""
    seq = case.seq
    rng = np.random.default_rng(0)
    dtype = jnp.dtype(case.dtype)
    q = rng.standard_normal((BATCH, seq, HEADS, KEY_DIM))
    k = rng.standard_normal((BATCH, seq, HEADS, KEY_DIM))
    if case.normalize and case.feature_map is None:
        # Positive features keep the identity map's normalizer away from zero.
        q, k = np.abs(q) + 0.1, np.abs(k) + 0.1
    v = rng.standard_normal((BATCH, seq, HEADS, VALUE_DIM))
    decay_shape = {None: None, "head": (BATCH, seq, HEADS), "channel": (BATCH, seq, HEADS, KEY_DIM)}[case.decay]
    log_decay = None if decay_shape is None else jnp.asarray(-rng.uniform(0.0, 1.0, decay_shape), jnp.float32)
    features = _features(case)
    S = 0.3 * rng.standard_normal((BATCH, HEADS, features, VALUE_DIM))
    z = rng.uniform(0.5, 1.5, (BATCH, HEADS, features)) if case.normalize else None
    state = kernels.LinearAttentionState(
        jnp.asarray(S, jnp.float32), None if z is None else jnp.asarray(z, jnp.float32)
    )
    q, k, v = (jnp.asarray(x, dtype) for x in (q, k, v))
    return q, k, v, log_decay, state


def _options(case):
    return dict(normalize=case.normalize, feature_map=case.feature_map, chunk_size=case.chunk)


def _run(implementation, q, k, v, log_decay, state, *, return_final_state=True, **options):
    """One call of an implementation: "reference", "xla", "pallas" (the public API, which
    interprets the TPU kernels on CPU) or "pallas_gpu" (the GPU kernels, interpreted)."""
    if implementation == "pallas_gpu":
        y, final = api.pallas_linear_attention(
            pallas_gpu, q, k, v, log_decay=log_decay, initial_state=state,
            return_final_state=return_final_state, eps=api.DEFAULT_EPS, **options,
        )
        return (y, kernels.LinearAttentionState(*final)) if return_final_state else y
    return kernels.linear_attention(
        q, k, v, log_decay=log_decay, initial_state=state, return_final_state=return_final_state,
        implementation=implementation, **options,
    )


def _jitted(implementation, case, **options):
    """_run for one implementation and case, compiled as a whole (eager calls would compile
    each small op on its own)."""
    return jax.jit(
        functools.partial(_run, implementation, **dict(_options(case), **options)), compiler_options=QUICK_COMPILE
    )


def _tokens(positions, *arrays):
    """The arrays (None stays None) at the given token positions (a slice of axis 1)."""
    return tuple(None if x is None else x[:, positions] for x in arrays)


def _outputs_and_gradients(implementation, case, inputs):
    """(y, final state, gradients of every input) under random cotangents; one compile."""
    q, k, v, log_decay, state = inputs
    cotangent_y = random_normal(11, (*q.shape[:3], VALUE_DIM))
    cotangent_S = random_normal(12, state.S.shape)
    cotangent_z = None if state.z is None else random_normal(13, state.z.shape)

    def run(q, k, v, log_decay, state):
        outputs, pullback = jax.vjp(
            functools.partial(_run, implementation, **_options(case)), q, k, v, log_decay, state
        )
        cotangents = (
            cotangent_y.astype(outputs[0].dtype), kernels.LinearAttentionState(cotangent_S, cotangent_z)
        )
        return outputs, pullback(cotangents)

    return jax.jit(run, compiler_options=QUICK_COMPILE)(q, k, v, log_decay, state)


_reference_results = {}


def _reference_outputs_and_gradients(case, inputs):
    if case not in _reference_results:
        _reference_results[case] = _outputs_and_gradients("reference", case, inputs)
    return _reference_results[case]


def _assert_matches_reference(implementation, case, tol):
    inputs = _inputs(case)
    (y, final), gradients = _outputs_and_gradients(implementation, case, inputs)
    (expected_y, expected_final), expected_gradients = _reference_outputs_and_gradients(case, inputs)
    assert y.dtype == jnp.dtype(case.dtype) and final.S.dtype == jnp.float32
    assert_close(y, expected_y, tol=tol, name="y")
    assert_close(final.S, expected_final.S, tol=tol, name="final S")
    if case.normalize:
        assert_close(final.z, expected_final.z, tol=tol, name="final z")
    names = ("dq", "dk", "dv", "d log_decay", "d initial_state")
    for name, gradient, expected in zip(names, gradients, expected_gradients):
        if expected is None:
            assert gradient is None, name
            continue
        for leaf, expected_leaf in zip(jax.tree.leaves(gradient), jax.tree.leaves(expected)):
            assert leaf.dtype == expected_leaf.dtype, name
            # With T = 1, dq and dk of the intra-chunk part are tiny; the floor keeps it fair.
            assert_close(leaf, expected_leaf, tol=tol, name=name, floor=0.1)


# --- the oracle and the feature map ---------------------------------------------------


def test_taylor2_feature_map_gives_the_second_order_taylor_kernel():
    q, k = random_normal(0, (5, 6)), random_normal(1, (5, 6))
    phi_q, phi_k = kernels.taylor2_feature_map(q), kernels.taylor2_feature_map(k)
    assert phi_q.shape == (5, 1 + 6 + 36) and phi_q.dtype == jnp.float32
    s = np.sum(np.asarray(q, np.float64) * np.asarray(k, np.float64), axis=-1) / np.sqrt(6)
    np.testing.assert_allclose(np.sum(phi_q * phi_k, axis=-1), 1 + s + s**2 / 2, rtol=1e-5)
    # Feature 1 + d + a*d + b holds x_a x_b (row-major), the layout of the state's rows.
    np.testing.assert_allclose(phi_q[:, 1 + 6 + 2 * 6 + 5], q[:, 2] * q[:, 5] / (np.sqrt(2) * np.sqrt(6)), rtol=1e-5)


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_kernel_feature_pieces_match_the_public_feature_map(compute_dtype):
    # The kernels build phi from pieces and 0/1 selection matrices; it must be the same map.
    x = random_normal(2, (16, KEY_DIM)).astype(compute_dtype).astype(jnp.float32)
    cfg = kernel_math.Config(16, 16, KEY_DIM, "taylor2", None, False, 1e-6, compute_dtype)
    expansion = kernel_math.selection_matrices(KEY_DIM)
    pieces = [kernel_math.features(piece, x, expansion, cfg) for piece in cfg.pieces]
    assert [piece.shape[1] for piece in pieces] == [1, KEY_DIM, KEY_DIM**2]
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), kernels.taylor2_feature_map(x), rtol=1e-6)


def _explicit_sums(q, k, v, log_decay, state, *, feature_map, normalize, eps):
    """y_t = phi(q_t) (D_t S_0 + sum_{j <= t} D_{t,j} phi(k_j)^T v_j) written as sums, float64,
    with D_{t,j} = exp(sum_{j < l <= t} g_l) per head or per channel."""
    phi = (lambda x: np.asarray(x, np.float64)) if feature_map is None else (
        lambda x: np.asarray(kernels.taylor2_feature_map(x), np.float64)
    )
    phi_q, phi_k, v = phi(q), phi(k), np.asarray(v, np.float64)
    batch, seq, heads, features = phi_q.shape
    g = np.zeros((batch, seq, heads, 1)) if log_decay is None else np.asarray(log_decay, np.float64)
    g = g[..., None] if g.ndim == 3 else g
    cumulative = np.cumsum(g, axis=1)  # B_t
    y = np.zeros(v.shape)
    for t in range(seq):
        decay_from_start = np.exp(cumulative[:, t])  # [B, H, F or 1]
        numerator = np.einsum("bhf,bhfd->bhd", phi_q[:, t] * decay_from_start, np.asarray(state.S, np.float64))
        denominator = np.sum(phi_q[:, t] * decay_from_start * np.asarray(state.z, np.float64), -1) if normalize else 0
        for j in range(t + 1):
            weight = np.sum(phi_q[:, t] * phi_k[:, j] * np.exp(cumulative[:, t] - cumulative[:, j]), axis=-1)
            numerator = numerator + weight[..., None] * v[:, j]
            denominator = denominator + weight
        y[:, t] = numerator / (denominator + eps)[..., None] if normalize else numerator
    return y


@pytest.mark.parametrize(
    "case",
    [Case(9, None, "channel"), Case(9, None, "head", normalize=True), Case(7, "taylor2", "head", normalize=True)],
    ids=lambda case: case.id,
)
def test_reference_matches_explicit_sums(case):
    q, k, v, log_decay, state = _inputs(case)
    y = _jitted("reference", case, return_final_state=False)(q, k, v, log_decay, state)
    expected = _explicit_sums(
        q, k, v, log_decay, state, feature_map=case.feature_map, normalize=case.normalize, eps=api.DEFAULT_EPS
    )
    np.testing.assert_allclose(y, expected, rtol=2e-5, atol=2e-5)


# --- every implementation against the reference ---------------------------------------

# Each implementation's default cases cover, between them: lengths 1, 63 and 130 (none a
# multiple of the chunk), chunks 16, 32 and 64, both feature maps, no / per-head /
# per-channel decay, normalize on and off, float32 and bfloat16. The slow cases fill in
# more of the grid. Shared cases share their (cached) reference results.
PALLAS_CASES = [
    Case(63, None, "channel"),
    Case(1, "taylor2", "head", normalize=True, chunk=64),
    Case(130, None, None, dtype="bfloat16", chunk=32),
]
XLA_CASES = [
    Case(63, None, "channel"),
    Case(130, "taylor2", "head", normalize=True, dtype="bfloat16", chunk=32),
    Case(1, None, None, normalize=True, chunk=64),
]
SLOW_CASES = [
    Case(130, None, "channel", normalize=True, dtype="bfloat16", chunk=32),
    Case(130, None, "head", normalize=True),
    Case(33, None, "channel", normalize=True, chunk=32),
    Case(1, "taylor2", "head", normalize=True, chunk=64),
    Case(130, "taylor2", "head", normalize=True, dtype="bfloat16", chunk=32),
    Case(130, "taylor2", None, chunk=64),
    Case(63, "taylor2", "head", dtype="bfloat16"),
    Case(63, None, "head", normalize=True, dtype="bfloat16"),
]


def _tolerance(case):
    return 1e-4 if case.dtype == "float32" else 2e-2


@pytest.mark.parametrize(
    "case",
    XLA_CASES + [pytest.param(case, marks=SLOW) for case in SLOW_CASES if case not in XLA_CASES],
    ids=lambda case: case.id,
)
def test_xla_matches_reference(case):
    _assert_matches_reference("xla", case, _tolerance(case))


@pytest.mark.parametrize(
    "implementation, case",
    [(implementation, case) for implementation in ("pallas", "pallas_gpu") for case in PALLAS_CASES]
    + [pytest.param(implementation, case, marks=SLOW) for implementation in ("pallas", "pallas_gpu")
       for case in SLOW_CASES if case not in PALLAS_CASES],
    ids=lambda value: value.id if isinstance(value, Case) else {"pallas": "tpu", "pallas_gpu": "gpu"}[value],
)
def test_pallas_matches_reference(implementation, case):
    _assert_matches_reference(implementation, case, _tolerance(case))


@pytest.mark.parametrize(
    "implementation, case",
    [
        ("xla", Case(130, "taylor2", "head", normalize=True)),
        pytest.param("xla", Case(130, None, "channel", normalize=True), marks=SLOW),
        pytest.param("pallas", Case(70, None, "channel", normalize=True), marks=SLOW),
        pytest.param("pallas_gpu", Case(70, "taylor2", "head", normalize=True), marks=SLOW),
        pytest.param("pallas_gpu", Case(70, None, "head"), marks=SLOW),
    ],
    ids=lambda value: value.id if isinstance(value, Case) else value,
)
def test_chunk_size_does_not_change_the_result(implementation, case):
    q, k, v, log_decay, state = _inputs(case)
    results = []
    for chunk in (16, 32, 64):
        results.append(_jitted(implementation, case, chunk_size=chunk)(q, k, v, log_decay, state))
    for chunk, (y, final) in zip((32, 64), results[1:]):
        assert_close(y, results[0][0], tol=1e-5, name=f"y with chunk {chunk}")
        assert_close(final.S, results[0][1].S, tol=1e-5, name=f"S with chunk {chunk}")


@pytest.mark.parametrize(
    "implementation, case",
    [
        ("xla", Case(42, "taylor2", "head", normalize=True)),
        ("pallas", Case(42, None, "channel", normalize=True)),
        pytest.param("xla", Case(42, None, "channel", normalize=True), marks=SLOW),
        pytest.param("pallas", Case(42, "taylor2", "head", normalize=True), marks=SLOW),
        pytest.param("pallas_gpu", Case(42, None, "channel", normalize=True), marks=SLOW),
        pytest.param("pallas_gpu", Case(42, "taylor2", "head", normalize=True), marks=SLOW),
    ],
    ids=lambda value: value.id if isinstance(value, Case) else value,
)
def test_two_calls_with_a_carried_state_equal_one_call(implementation, case):
    q, k, v, log_decay, state = _inputs(case)
    # Two halves of 21 tokens: not chunk boundaries, and one compile for both calls.
    split = case.seq // 2
    run = _jitted(implementation, case)
    y_first, carried = run(*_tokens(slice(None, split), q, k, v, log_decay), state)
    y_rest, chained_final = run(*_tokens(slice(split, None), q, k, v, log_decay), carried)
    y, final = _jitted("reference", case)(q, k, v, log_decay, state)
    assert_close(jnp.concatenate([y_first, y_rest], axis=1), y, tol=1e-5, name="y")
    assert_close(chained_final.S, final.S, tol=1e-5, name="final S")
    if case.normalize:
        assert_close(chained_final.z, final.z, tol=1e-5, name="final z")


@pytest.mark.parametrize(
    "case",
    [Case(23, "taylor2", "head", normalize=True), Case(23, None, "channel")],
    ids=lambda case: case.id,
)
def test_prefill_then_decode_steps_equal_the_parallel_form(case):
    q, k, v, log_decay, state = _inputs(case)
    prefill = 9
    expected, expected_final = _jitted("reference", case)(q, k, v, log_decay, state)
    y_prefill, carried = _jitted("xla", case)(*_tokens(slice(None, prefill), q, k, v, log_decay), state)
    step = jax.jit(
        functools.partial(kernels.linear_attention_step, normalize=case.normalize, feature_map=case.feature_map),
        compiler_options=QUICK_COMPILE,
    )
    outputs = [y_prefill]
    for t in range(prefill, case.seq):
        (log_decay_t,) = _tokens(t, log_decay)
        y_t, carried = step(q[:, t], k[:, t], v[:, t], carried, log_decay=log_decay_t)
        assert y_t.shape == (BATCH, HEADS, VALUE_DIM)
        outputs.append(y_t[:, None])
    assert_close(jnp.concatenate(outputs, axis=1), expected, tol=1e-5, name="decoded y")
    assert_close(carried.S, expected_final.S, tol=1e-5, name="S after decoding")


def test_decoding_from_an_empty_state_equals_the_parallel_form():
    case = Case(12, "taylor2", "head", normalize=True)
    q, k, v, log_decay, _ = _inputs(case)
    expected = _jitted("reference", case, return_final_state=False)(q, k, v, log_decay, None)
    state = kernels.init_linear_attention_state(BATCH, HEADS, KEY_DIM, VALUE_DIM, feature_map="taylor2", normalize=True)
    assert state.S.shape == (BATCH, HEADS, _features(case), VALUE_DIM) and state.z.shape == state.S.shape[:3]
    step = jax.jit(
        functools.partial(kernels.linear_attention_step, normalize=True, feature_map="taylor2"),
        compiler_options=QUICK_COMPILE,
    )
    outputs = []
    for t in range(case.seq):
        y_t, state = step(q[:, t], k[:, t], v[:, t], state, log_decay=log_decay[:, t])
        outputs.append(y_t)
    assert_close(jnp.stack(outputs, axis=1), expected, tol=1e-5, name="decoded y")


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_strong_decay_stays_finite_and_exact(implementation):
    # exp of a cumulative sum would overflow within one chunk; differences of cumulative sums do not.
    case = Case(70, None, "channel", chunk=64)
    q, k, v, _, state = _inputs(case)
    log_decay = jnp.full((BATCH, case.seq, HEADS, KEY_DIM), -30.0).at[..., :2].set(-1e-3)
    expected = _jitted("reference", case)(q, k, v, log_decay, state)
    y, final = _jitted(implementation, case)(q, k, v, log_decay, state)
    assert_close(y, expected[0], tol=1e-5, name="y")
    assert_close(final.S, expected[1].S, tol=1e-5, name="final S")


def test_xla_forward_memory_does_not_grow_with_length():
    def temp_bytes(seq):
        shape = jax.ShapeDtypeStruct((1, seq, 2, 32), jnp.float32)
        decay = jax.ShapeDtypeStruct((1, seq, 2), jnp.float32)
        forward = functools.partial(
            linear_attention_xla.linear_attention, normalize=True, feature_map=None, initial_state=None,
            return_final_state=False, chunk_size=64, eps=1e-6,
        )
        lowered = jax.jit(lambda q, k, v, g: forward(q, k, v, log_decay=g)[0]).lower(shape, shape, shape, decay)
        compiled = lowered.compile()
        return compiled.memory_analysis().temp_size_in_bytes

    short, long = temp_bytes(1024), temp_bytes(8192)
    assert long <= short + 64 * 1024, (short, long)


def test_public_api_defaults_and_dispatch():
    case = Case(20, None, "head", normalize=True)
    q, k, v, log_decay, _ = _inputs(case)
    assert kernels.default_implementation("linear_attention") == "xla"
    assert kernels.available_ops()["linear_attention"] == ["reference", "xla", "pallas"]
    y = jax.jit(functools.partial(kernels.linear_attention, normalize=True), compiler_options=QUICK_COMPILE)(
        q, k, v, log_decay=log_decay
    )
    assert y.shape == (BATCH, case.seq, HEADS, VALUE_DIM) and y.dtype == q.dtype
    expected = _jitted("reference", case, return_final_state=False)(q, k, v, log_decay, None)
    assert_close(y, expected, tol=1e-5, name="y")


def test_public_pallas_gradients_without_the_final_state():
    # Without return_final_state the kernels' backward gets a zero state cotangent.
    case = Case(20, None, "head", normalize=True)
    q, k, v, log_decay, _ = _inputs(case)

    def loss(implementation):
        def of_inputs(q, k, v, log_decay):
            y = kernels.linear_attention(q, k, v, log_decay=log_decay, normalize=True, implementation=implementation)
            return jnp.sum(jnp.sin(y))

        return jax.jit(jax.grad(of_inputs, argnums=(0, 1, 2, 3)), compiler_options=QUICK_COMPILE)

    gradients, expected = loss("pallas")(q, k, v, log_decay), loss("reference")(q, k, v, log_decay)
    for name, gradient, expected_gradient in zip(("dq", "dk", "dv", "d log_decay"), gradients, expected):
        assert_close(gradient, expected_gradient, tol=1e-5, name=name)


# --- lowering for TPU and CUDA without hardware -------------------------------------------

LOWERING_SEQ, LOWERING_HEADS = 1000, 4
# (feature map, decay, normalize, key dim): the kernel variants that differ in code.
LOWERING_VARIANTS = {
    "identity": (None, None, False, 64),
    "per-head-normalized": (None, "head", True, 64),
    "per-channel": (None, "channel", False, 64),
    "taylor2-per-head-normalized": ("taylor2", "head", True, 16),
}
PLATFORMS = {"tpu": (pallas_tpu, "tpu_custom_call"), "cuda": (pallas_gpu, "__gpu$xla.gpu.triton")}


@pytest.mark.parametrize("variant", list(LOWERING_VARIANTS))
@pytest.mark.parametrize("platform", list(PLATFORMS))
def test_forward_and_backward_lower(platform, variant, monkeypatch):
    feature_map, decay, normalize, key_dim = LOWERING_VARIANTS[variant]
    module, custom_call = PLATFORMS[platform]
    monkeypatch.setattr(_backend, "interpret_mode", lambda: False)
    dtype = jnp.bfloat16
    shape = (2, LOWERING_SEQ, LOWERING_HEADS)
    q = jax.ShapeDtypeStruct((*shape, key_dim), dtype)
    v = jax.ShapeDtypeStruct((*shape, 64), dtype)
    decay_shape = shape if decay == "head" else (*shape, key_dim)
    log_decay = None if decay is None else jax.ShapeDtypeStruct(decay_shape, jnp.float32)
    features = key_dim if feature_map is None else 1 + key_dim + key_dim**2
    state = kernels.LinearAttentionState(
        jax.ShapeDtypeStruct((2, LOWERING_HEADS, features, 64), jnp.float32),
        jax.ShapeDtypeStruct((2, LOWERING_HEADS, features), jnp.float32) if normalize else None,
    )

    def forward(q, k, v, log_decay, state):
        return api.pallas_linear_attention(
            module, q, k, v, log_decay=log_decay, normalize=normalize, feature_map=feature_map,
            initial_state=state, return_final_state=True, chunk_size=64, eps=1e-6,
        )

    def gradients(q, k, v, log_decay, state):
        def loss(*inputs):
            y, (S, _) = forward(*inputs)
            return jnp.sum(y.astype(jnp.float32)) + jnp.sum(S)

        return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(q, k, v, log_decay, state)

    def kernel_calls(exported):
        return len(re.findall(re.escape(custom_call), exported.mlir_module()))

    assert kernel_calls(export_lowering(forward, q, q, v, log_decay, state, platform=platform)) == 1
    # dq pass and dk/dv pass; the forward too when the decay gradient needs the final state.
    expected_backward_calls = 2 if decay is None else 3
    exported = export_lowering(gradients, q, q, v, log_decay, state, platform=platform)
    assert kernel_calls(exported) == expected_backward_calls


# --- input errors ----------------------------------------------------------------------------


def test_linear_attention_rejects_bad_inputs():
    case = Case(10, None, None, normalize=True)
    q, k, v, _, state = _inputs(case)
    with pytest.raises(ValueError, match=r"q must be \[batch, seq, heads, head_dim\] \(4 dims\)"):
        kernels.linear_attention(q[0], k, v)
    with pytest.raises(ValueError, match="q and k must have the same shape"):
        kernels.linear_attention(q, k[..., :4], v)
    with pytest.raises(ValueError, match=r"v must share \[batch, seq, heads\] with q and k"):
        kernels.linear_attention(q, k, v[:, :9])
    with pytest.raises(ValueError, match="hold no tokens"):
        kernels.linear_attention(q[:, :0], k[:, :0], v[:, :0])
    with pytest.raises(ValueError, match=r"feature_map must be one of \[None, 'taylor2'\], got 'elu'"):
        kernels.linear_attention(q, k, v, feature_map="elu")
    with pytest.raises(ValueError, match=r"log_decay must be a float array of shape \(2, 10, 2\) \(per head\) or"):
        kernels.linear_attention(q, k, v, log_decay=jnp.zeros((2, 10)))
    with pytest.raises(ValueError, match="per-channel log_decay .* has no meaning for feature_map='taylor2'"):
        kernels.linear_attention(q, k, v, feature_map="taylor2", log_decay=jnp.zeros((2, 10, 2, 8)))
    with pytest.raises(ValueError, match="normalize=True needs initial_state.z"):
        kernels.linear_attention(q, k, v, normalize=True, initial_state=state._replace(z=None))
    with pytest.raises(ValueError, match="initial_state.z is set but normalize=False"):
        kernels.linear_attention(q, k, v, initial_state=state)
    with pytest.raises(ValueError, match=r"initial_state.S must be \[batch, heads, features, value_dim\] = \(2, 2, 73, 16\)"):
        kernels.linear_attention(q, k, v, normalize=True, feature_map="taylor2", initial_state=state)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        kernels.linear_attention(q, k, v, chunk_size=0)
    with pytest.raises(ValueError, match="eps must be a number > 0"):
        kernels.linear_attention(q, k, v, normalize=True, eps=0.0)
    with pytest.raises(ValueError, match=r"\(Pallas TPU\): chunk_size must be a multiple of 16"):
        kernels.linear_attention(q, k, v, chunk_size=24, implementation="pallas")
    with pytest.raises(ValueError, match=r"\(Pallas GPU\): chunk_size must be a power of two >= 16"):
        pallas_gpu.chunk_for(100, 48)


def test_linear_attention_step_rejects_bad_inputs():
    state = kernels.init_linear_attention_state(2, 3, 4, 5)
    q = jnp.zeros((2, 3, 4))
    v = jnp.zeros((2, 3, 5))
    with pytest.raises(ValueError, match=r"q_t must be \[batch, heads, dim\] \(one token, 3 dims\)"):
        kernels.linear_attention_step(q[None], q, v, state)
    with pytest.raises(ValueError, match="state is required; start from init_linear_attention_state"):
        kernels.linear_attention_step(q, q, v, None)
    with pytest.raises(ValueError, match="normalize=True needs state.z"):
        kernels.linear_attention_step(q, q, v, state, normalize=True)
    with pytest.raises(ValueError, match=r"log_decay must be a float array of shape \(2, 3\) \(per head\)"):
        kernels.linear_attention_step(q, q, v, state, log_decay=jnp.zeros((2,)))
    with pytest.raises(ValueError, match="init_linear_attention_state: value_dim must be a positive int"):
        kernels.init_linear_attention_state(2, 3, 4, 0)
