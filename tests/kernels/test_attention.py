"""Causal softmax attention: the reference against hand-built masks, the blocked XLA
form against the reference (values and gradients), decode and chunked prefill
against the parallel form, and input errors."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels.attention import reference
from kernels.attention import xla as attention_xla
from kernels.testing import assert_close, random_normal, random_qkv, random_segment_ids

HEAD_DIM = 8


def _inputs(seed, seq, heads=2, kv_heads=2, batch=2, dtype=jnp.float32):
    return random_qkv(seed, batch, seq, heads, kv_heads, HEAD_DIM, dtype)


def _mask_by_rule(seq, window, prefix, segment_ids_T=None):
    """The visibility rule written out token pair by token pair."""
    mask = np.zeros((seq, seq), bool)
    for i, j in itertools.product(range(seq), range(seq)):
        in_window = window is None or i - j < window or j < prefix
        same_segment = segment_ids_T is None or segment_ids_T[i] == segment_ids_T[j]
        mask[i, j] = j <= i and in_window and same_segment
    return mask


# --- the oracle itself ---------------------------------------------------------


@pytest.mark.parametrize("window, prefix", [(None, 0), (1, 0), (3, 2), (2, 4)])
def test_reference_with_zero_queries_averages_the_visible_values(window, prefix):
    # q = 0 makes every visible score equal, so each output is the mean of its visible values.
    seq = 9
    segment_ids = np.array([[0, 0, 0, 0, 1, 1, 1, 2, 2]])
    _, k, v = _inputs(0, seq, batch=1)
    q = jnp.zeros_like(k)
    o = reference.attention(
        q, k, v, window=window, prefix=prefix, segment_ids=jnp.asarray(segment_ids), scale=1.0
    )
    mask = _mask_by_rule(seq, window, prefix, segment_ids[0])
    expected = np.stack([np.asarray(v[0])[mask[i]].mean(axis=0) for i in range(seq)])
    np.testing.assert_allclose(o[0], expected, rtol=1e-6, atol=1e-6)


def test_reference_matches_softmax_with_an_explicit_mask():
    seq, heads, kv_heads = 7, 4, 2
    q, k, v = _inputs(1, seq, heads, kv_heads, batch=1)
    mask = _mask_by_rule(seq, window=3, prefix=1)
    o = reference.attention(q, k, v, window=3, prefix=1, segment_ids=None, scale=0.5)
    q, k, v = (np.asarray(x[0], np.float64) for x in (q, k, v))
    for h in range(heads):
        kv_head = h // (heads // kv_heads)
        scores = np.where(mask, 0.5 * q[:, h] @ k[:, kv_head].T, -np.inf)
        weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
        weights /= weights.sum(axis=-1, keepdims=True)
        np.testing.assert_allclose(o[0, :, h], weights @ v[:, kv_head], rtol=1e-5, atol=1e-6)


# --- blocked XLA against the reference ------------------------------------------


def _output_and_grads(attention_fn, q, k, v, cotangent):
    """One compile for o and (dq, dk, dv) under the given output cotangent."""

    def run(q, k, v):
        o, pullback = jax.vjp(attention_fn, q, k, v)
        return o, pullback(cotangent.astype(o.dtype))

    return jax.jit(run)(q, k, v)


# (seq, heads, kv_heads, window, prefix, segments, block_q, block_k)
XLA_CASES = [
    pytest.param(1, 2, 2, None, 0, False, 16, 16, id="T1"),
    pytest.param(63, 2, 2, None, 0, False, 16, 16, id="T63"),
    pytest.param(130, 4, 2, None, 0, False, 16, 32, id="T130-gqa-bq<bk"),
    pytest.param(130, 4, 1, None, 0, False, 32, 8, id="T130-mqa-bq>bk"),
    pytest.param(40, 2, 2, 1, 0, False, 8, 8, id="window1"),
    pytest.param(70, 2, 2, 5, 0, False, 16, 8, id="window5"),
    pytest.param(70, 2, 2, 100, 0, False, 16, 16, id="window>T"),
    pytest.param(70, 2, 2, 9, 20, False, 8, 16, id="window9-prefix20"),
    pytest.param(45, 2, 2, None, 7, False, 8, 8, id="prefix-no-window"),
    pytest.param(63, 4, 2, None, 0, True, 16, 16, id="segments"),
    pytest.param(63, 4, 2, 6, 3, True, 8, 16, id="segments-window-prefix"),
]
# bfloat16 inputs on a subset: each case costs two compiles.
BF16_CASES = {"T130-gqa-bq<bk", "window5", "window9-prefix20", "segments-window-prefix"}
XLA_CASES_BY_DTYPE = [
    pytest.param(*case.values, dtype, tol, id=f"{case.id}-{dtype_name}")
    for dtype, tol, dtype_name in ((jnp.float32, 1e-5, "f32"), (jnp.bfloat16, 1e-2, "bf16"))
    for case in XLA_CASES
    if dtype_name == "f32" or case.id in BF16_CASES
]


@pytest.mark.parametrize(
    "seq, heads, kv_heads, window, prefix, segments, block_q, block_k, dtype, tol", XLA_CASES_BY_DTYPE
)
def test_xla_matches_reference(seq, heads, kv_heads, window, prefix, segments, block_q, block_k, dtype, tol):
    q, k, v = _inputs(seq, seq, heads, kv_heads, dtype=dtype)
    segment_ids = random_segment_ids(7, 2, seq, 3) if segments else None
    cotangent = random_normal(8, q.shape)
    options = dict(window=window, prefix=prefix, segment_ids=segment_ids, scale=HEAD_DIM**-0.5)
    blocked = functools.partial(attention_xla.attention, block_q=block_q, block_k=block_k, **options)
    dense = functools.partial(reference.attention, **options)

    o, grads = _output_and_grads(blocked, q, k, v, cotangent)
    expected_o, expected_grads = _output_and_grads(dense, q, k, v, cotangent)
    assert o.dtype == dtype
    assert_close(o, expected_o, tol=tol, name="o")
    for name, grad, expected in zip(("dq", "dk", "dv"), grads, expected_grads):
        assert grad.dtype == dtype
        # With T = 1 the dq and dk are exactly zero; the floor compares them absolutely.
        assert_close(grad, expected, tol=tol, name=name, floor=0.1)


def test_xla_under_a_batch_and_head_sharded_mesh():
    mesh = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None, "tensor", None))
    q, k, v = _inputs(12, 50, heads=8, kv_heads=4, batch=4)
    cotangent = random_normal(13, q.shape)
    blocked = functools.partial(kernels.attention, window=9, prefix=2, implementation="xla")
    with jax.set_mesh(mesh):
        o, grads = _output_and_grads(blocked, *(jax.device_put(x, sharding) for x in (q, k, v)), cotangent)
    assert o.sharding.spec == grads[0].sharding.spec == sharding.spec
    dense = functools.partial(reference.attention, window=9, prefix=2, segment_ids=None, scale=HEAD_DIM**-0.5)
    expected_o, expected_grads = _output_and_grads(dense, q, k, v, cotangent)
    for name, actual, expected in zip(("o", "dq", "dk", "dv"), (o, *grads), (expected_o, *expected_grads)):
        assert_close(actual, expected, tol=1e-5, name=name)


def test_public_attention_dispatches_and_defaults_scale():
    q, k, v = _inputs(3, 20, 4, 2)
    expected = reference.attention(q, k, v, window=None, prefix=0, segment_ids=None, scale=HEAD_DIM**-0.5)
    for implementation in (None, "reference"):
        o = kernels.attention(q, k, v, implementation=implementation)
        assert o.shape == q.shape and o.dtype == q.dtype
        assert_close(o, expected, tol=1e-5, name=f"o ({implementation})")


@pytest.mark.parametrize("window, prefix", [(None, 0), (5, 8)])
def test_block_visits_cover_exactly_the_blocks_with_visible_keys(window, prefix):
    # Visiting a block with no visible key wastes work; missing one loses keys.
    seq, block_q, block_k = 96, 8, 16
    static = attention_xla._Static(window, prefix, 1.0, block_q, block_k)
    has_visible = _mask_by_rule(seq, window, prefix).reshape(
        seq // block_q, block_q, seq // block_k, block_k
    ).any(axis=(1, 3))
    for q_block in range(seq // block_q):
        num_prefix, window_start, num_visits = (int(x) for x in attention_xla._key_blocks_to_visit(static, q_block))
        visited = [t if t < num_prefix else window_start + t - num_prefix for t in range(num_visits)]
        assert sorted(visited) == list(np.flatnonzero(has_visible[q_block])), q_block
    for k_block in range(seq // block_k):
        first, stop = (int(x) for x in attention_xla._query_blocks_that_see(static, k_block, seq // block_q))
        assert list(range(first, stop)) == list(np.flatnonzero(has_visible[:, k_block])), k_block


def _temp_bytes(fn, seq):
    q, k, v = (jax.ShapeDtypeStruct((1, seq, 2, 16), jnp.float32) for _ in range(3))
    return jax.jit(fn).lower(q, k, v).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("window", [None, 64])
def test_xla_memory_grows_linearly_with_length(window):
    def forward_and_backward(q, k, v):
        def loss(q, k, v):
            o = attention_xla.attention(
                q, k, v, window=window, prefix=0, segment_ids=None, scale=1.0, block_q=64, block_k=64
            )
            return jnp.sum(o)

        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    short, long = _temp_bytes(forward_and_backward, 1024), _temp_bytes(forward_and_backward, 4096)
    assert long < 5 * short, (short, long)  # quadratic would be 16x
    # Less than one [T, T] float32 score matrix.
    assert long < 4096 * 4096 * 4


# --- KV cache, decode and chunked prefill --------------------------------------


def test_init_kv_cache_capacity_and_ring_layout():
    assert kernels.init_kv_cache(1, 50, 2, HEAD_DIM).k.shape == (1, 50, 2, HEAD_DIM)
    assert kernels.init_kv_cache(1, 50, 2, HEAD_DIM, window=4, prefix=2).k.shape == (1, 6, 2, HEAD_DIM)
    assert kernels.init_kv_cache(1, 5, 2, HEAD_DIM, window=4, prefix=2).k.shape == (1, 5, 2, HEAD_DIM)

    cache = kernels.init_kv_cache(1, 50, 1, HEAD_DIM, window=4, prefix=2)
    assert cache.slot_pos.tolist() == [-1] * 6 and int(cache.length) == 0
    q, k, v = _inputs(4, 11, 1, 1, batch=1)
    _, cache = kernels.attention_decode(q[:, :10], k[:, :10], v[:, :10], cache, window=4, prefix=2)
    assert cache.slot_pos.tolist() == [0, 1, 6, 7, 8, 9] and int(cache.length) == 10
    np.testing.assert_array_equal(cache.k[0, 2], k[0, 6])
    _, cache = kernels.attention_decode(q[:, 10:], k[:, 10:], v[:, 10:], cache, window=4, prefix=2)
    assert cache.slot_pos.tolist() == [0, 1, 10, 7, 8, 9]


def _decode_in_chunks(q, k, v, chunk_sizes, *, max_len, window, prefix, implementation, cache_window="same"):
    cache_window = window if cache_window == "same" else cache_window
    cache = kernels.init_kv_cache(q.shape[0], max_len, k.shape[2], HEAD_DIM, window=cache_window, prefix=prefix)
    step = jax.jit(
        functools.partial(kernels.attention_decode, window=window, prefix=prefix, implementation=implementation)
    )
    outputs, start = [], 0
    for size in chunk_sizes:
        o, cache = step(q[:, start : start + size], k[:, start : start + size], v[:, start : start + size], cache)
        outputs.append(o)
        start += size
    assert start == q.shape[1] and int(cache.length) == start
    return jnp.concatenate(outputs, axis=1)


DECODE_CASES = [
    pytest.param(12, 12, None, 0, id="full-exact-fit"),
    pytest.param(17, 64, 4, 2, id="window4-prefix2-wraps"),
    pytest.param(13, 64, 3, 0, id="window3-wraps"),
]


@pytest.mark.parametrize("implementation", ["reference", "xla"])
@pytest.mark.parametrize("seq, max_len, window, prefix", DECODE_CASES)
@pytest.mark.parametrize("chunking", ["token-by-token", "chunks-of-5"])
def test_decode_matches_parallel(seq, max_len, window, prefix, implementation, chunking):
    q, k, v = _inputs(5, seq, 4, 2)
    expected = reference.attention(q, k, v, window=window, prefix=prefix, segment_ids=None, scale=HEAD_DIM**-0.5)
    if chunking == "token-by-token":
        chunk_sizes = [1] * seq
    else:
        chunk_sizes = [5] * (seq // 5) + ([seq % 5] if seq % 5 else [])
    o = _decode_in_chunks(
        q, k, v, chunk_sizes, max_len=max_len, window=window, prefix=prefix, implementation=implementation
    )
    assert_close(o, expected, tol=1e-5, name="decoded o")


def test_prefill_longer_than_the_ring_then_decode():
    seq, window, prefix = 20, 4, 3
    q, k, v = _inputs(6, seq, 2, 1)
    expected = reference.attention(q, k, v, window=window, prefix=prefix, segment_ids=None, scale=HEAD_DIM**-0.5)
    o = _decode_in_chunks(
        q, k, v, [14, 1, 5], max_len=100, window=window, prefix=prefix, implementation="xla"
    )
    assert_close(o, expected, tol=1e-5, name="o")


def test_decode_with_a_ring_larger_than_the_window():
    # A cache made without a window still serves windowed decode once its ring covers the window.
    seq, window, prefix = 19, 5, 1
    q, k, v = _inputs(11, seq, 2, 2)
    expected = reference.attention(q, k, v, window=window, prefix=prefix, segment_ids=None, scale=HEAD_DIM**-0.5)
    o = _decode_in_chunks(
        q, k, v, [1] * seq, max_len=8, window=window, prefix=prefix, implementation="xla", cache_window=None
    )
    assert_close(o, expected, tol=1e-5, name="o")


def test_decode_under_jit_returns_nan_when_a_full_cache_overflows():
    q, k, v = _inputs(7, 6, 2, 2)
    cache = kernels.init_kv_cache(2, 4, 2, HEAD_DIM)
    step = jax.jit(kernels.attention_decode)
    o, cache = step(q[:, :3], k[:, :3], v[:, :3], cache)
    assert np.isfinite(o).all()
    o, _ = step(q[:, 3:], k[:, 3:], v[:, 3:], cache)
    assert np.isnan(o).all()


# --- input errors -------------------------------------------------------------


def test_attention_rejects_bad_inputs():
    q, k, v = _inputs(8, 10, 8, 3)
    with pytest.raises(ValueError, match="k has 3 kv heads but q has 8 heads; heads must be a multiple"):
        kernels.attention(q, k, v)
    q, k, v = _inputs(8, 10, 4, 2)
    with pytest.raises(ValueError, match=r"q has sequence length 10 but k/v have 9"):
        kernels.attention(q, k[:, :9], v[:, :9])
    with pytest.raises(ValueError, match="hold no tokens"):
        kernels.attention(q[:, :0], k[:, :0], v[:, :0])
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        kernels.attention(q, k, v[..., :4])
    with pytest.raises(ValueError, match=r"q must be \[batch, seq, heads, head_dim\] \(4 dims\)"):
        kernels.attention(q[0], k, v)
    for window in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match="window must be None or an int >= 1"):
            kernels.attention(q, k, v, window=window)
    with pytest.raises(ValueError, match="prefix must be an int >= 0"):
        kernels.attention(q, k, v, window=4, prefix=-1)
    with pytest.raises(ValueError, match=r"segment_ids must be an int array of shape \[batch, seq\] = \(2, 10\)"):
        kernels.attention(q, k, v, segment_ids=jnp.zeros((2, 9), jnp.int32))


def test_unknown_implementations_are_named_errors():
    q, k, v = _inputs(9, 4)
    with pytest.raises(ValueError, match=r"attention: got unknown implementation 'triton'; available: \['reference', 'xla', 'pallas'\]"):
        kernels.attention(q, k, v, implementation="triton")
    cache = kernels.init_kv_cache(2, 8, 2, HEAD_DIM)
    with pytest.raises(ValueError, match="attention_decode: got unknown implementation 'cuda'"):
        kernels.attention_decode(q, k, v, cache, implementation="cuda")


def test_decode_rejects_overflow_and_mismatched_caches():
    q, k, v = _inputs(10, 6, 2, 2)
    cache = kernels.init_kv_cache(2, 4, 2, HEAD_DIM)
    with pytest.raises(ValueError, match="a chunk of 6 tokens does not fit in a cache of capacity 4"):
        kernels.attention_decode(q, k, v, cache)
    _, cache = kernels.attention_decode(q[:, :3], k[:, :3], v[:, :3], cache)
    with pytest.raises(ValueError, match=r"cache overflow: length 3 \+ 2 new tokens > capacity 4"):
        kernels.attention_decode(q[:, 3:5], k[:, 3:5], v[:, 3:5], cache)
    small_ring = kernels.init_kv_cache(2, 5, 2, HEAD_DIM, window=4, prefix=2)
    with pytest.raises(ValueError, match=r"at least prefix \+ window = 6 to use it as a ring"):
        kernels.attention_decode(q, k, v, small_ring, window=4, prefix=2)
    with pytest.raises(ValueError, match=r"cache k/v must be \[batch, capacity, kv_heads, head_dim\]"):
        kernels.attention_decode(q, k, v, kernels.init_kv_cache(2, 8, 1, HEAD_DIM))
    with pytest.raises(ValueError, match="init_kv_cache: max_len must be a positive int"):
        kernels.init_kv_cache(2, 0, 2, HEAD_DIM)
