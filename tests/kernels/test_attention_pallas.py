"""Pallas flash attention (TPU and GPU kernels) against the reference, in interpret mode:
values and dq/dk/dv, windows, prefix, segments, grouped heads, odd lengths, bfloat16;
decode against the parallel form; the block plans that skip masked-out key blocks;
and lowering of forward, backward and decode for TPU and CUDA without hardware."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels import _backend
from kernels.attention import api, pallas_gpu, pallas_tpu, reference
from kernels.bench import chip_peak
from kernels.testing import assert_close, export_lowering, random_normal, random_qkv, random_segment_ids

HEAD_DIM = 8
SCALE = HEAD_DIM**-0.5
KERNEL_MODULES = {"tpu": pallas_tpu, "gpu": pallas_gpu}


def _output_and_grads(attention_fn, q, k, v, cotangent):
    """One compile for o and (dq, dk, dv) under the given output cotangent."""

    def run(q, k, v):
        o, pullback = jax.vjp(attention_fn, q, k, v)
        return o, pullback(cotangent.astype(o.dtype))

    return jax.jit(run)(q, k, v)


def _small_blocks(backend, block_q, block_k):
    """Interpret-mode blocks: TPU blocks are multiples of 128; GPU ones may be 16."""
    if backend == "tpu":
        return dict(block_q=block_q, block_k=block_k)
    return dict(block_q=block_q, block_k=block_k, backward_block_major=block_q, backward_block_minor=block_k)


# (seq, heads, kv_heads, window, prefix, segments, dtype, TPU blocks, GPU blocks)
F32, BF16 = jnp.float32, jnp.bfloat16
SLOW = pytest.mark.slow
KERNEL_CASES = [
    pytest.param(1, 2, 2, None, 0, False, F32, (128, 128), (16, 16), id="T1"),
    pytest.param(63, 4, 2, None, 0, False, F32, (128, 128), (32, 16), id="T63-gqa"),
    # At T = 400 the TPU kernel (blocks of 128) skips key blocks between the prefix and the window.
    pytest.param(400, 2, 2, 9, 20, True, F32, (128, 128), (16, 16), id="window9-prefix20-segments"),
    pytest.param(130, 6, 2, 40, 3, True, BF16, (128, 256), (16, 32), id="window40-prefix3-segments-gqa-bf16"),
    pytest.param(130, 4, 1, None, 0, False, F32, (256, 128), (16, 32), id="T130-mqa", marks=SLOW),
    pytest.param(300, 2, 2, 5, 0, False, F32, (128, 128), (32, 16), id="window5", marks=SLOW),
    pytest.param(200, 2, 2, None, 7, True, F32, (128, 128), (32, 32), id="prefix-no-window-segments", marks=SLOW),
    pytest.param(130, 4, 2, None, 0, False, BF16, (128, 128), (32, 16), id="T130-gqa-bf16", marks=SLOW),
]


def _per_backend(cases, slow_on_gpu=()):
    """Each case once per kernel backend; ids in slow_on_gpu run on GPU only under -m slow."""
    return [
        pytest.param(
            backend,
            *case.values,
            id=f"{backend}-{case.id}",
            marks=[*case.marks, *([SLOW] if backend == "gpu" and case.id in slow_on_gpu else [])],
        )
        for case in cases
        for backend in ("tpu", "gpu")
    ]


@pytest.mark.parametrize(
    "backend, seq, heads, kv_heads, window, prefix, segments, dtype, tpu_blocks, gpu_blocks",
    # T = 1 on GPU takes the same short-sequence path as T = 63.
    _per_backend(KERNEL_CASES, slow_on_gpu={"T1"}),
)
def test_pallas_matches_reference(
    backend, seq, heads, kv_heads, window, prefix, segments, dtype, tpu_blocks, gpu_blocks
):
    q, k, v = random_qkv(seq, 1, seq, heads, kv_heads, HEAD_DIM, dtype)
    segment_ids = random_segment_ids(7, 1, seq, 3) if segments else None
    cotangent = random_normal(8, q.shape)
    options = dict(window=window, prefix=prefix, segment_ids=segment_ids, scale=SCALE)
    blocks = _small_blocks(backend, *(tpu_blocks if backend == "tpu" else gpu_blocks))
    kernel = functools.partial(KERNEL_MODULES[backend].attention, interpret=True, **blocks, **options)

    o, grads = _output_and_grads(kernel, q, k, v, cotangent)
    dense = functools.partial(reference.attention, **options)
    expected_o, expected_grads = _output_and_grads(dense, q, k, v, cotangent)
    tol = 1e-5 if dtype == F32 else 1e-2
    assert o.dtype == dtype
    assert_close(o, expected_o, tol=tol, name="o")
    for name, grad, expected in zip(("dq", "dk", "dv"), grads, expected_grads):
        assert grad.dtype == dtype
        # With T = 1 the dq and dk are exactly zero; the floor compares them absolutely.
        assert_close(grad, expected, tol=tol, name=name, floor=0.1)


def test_public_api_dispatches_pallas_to_the_interpreted_tpu_kernels():
    q, k, v = random_qkv(1, 2, 40, 4, 2, HEAD_DIM)
    cotangent = random_normal(2, q.shape)
    options = dict(window=6, prefix=2)
    pallas = functools.partial(kernels.attention, implementation="pallas", **options)
    dense = functools.partial(reference.attention, segment_ids=None, scale=SCALE, **options)
    o, grads = _output_and_grads(pallas, q, k, v, cotangent)
    expected_o, expected_grads = _output_and_grads(dense, q, k, v, cotangent)
    for name, actual, expected in zip(("o", "dq", "dk", "dv"), (o, *grads), (expected_o, *expected_grads)):
        assert_close(actual, expected, tol=1e-5, name=name)
    assert _backend.pallas_kernel_module("attention") is pallas_tpu


# --- block plans: which key blocks are visited, and which need a mask -------------


def _block_visibility(seq, window, prefix, block_q, block_k):
    """(some pair visible, every pair visible) per [query block, key block]."""
    positions = np.arange(seq)
    mask = np.asarray(reference._visible(positions[:, None], positions[None, :], window, prefix))
    blocks = mask.reshape(seq // block_q, block_q, seq // block_k, block_k)
    return blocks.any(axis=(1, 3)), blocks.all(axis=(1, 3))


PLAN_CASES = [(None, 0), (1, 0), (5, 0), (40, 0), (5, 8), (40, 3), (100, 20), (None, 9)]


@pytest.mark.parametrize("window, prefix", PLAN_CASES)
@pytest.mark.parametrize("block_q, block_k", [(16, 16), (16, 32), (32, 16)])
def test_gpu_loops_visit_exactly_the_visible_blocks(window, prefix, block_q, block_k):
    seq = 192
    num_q_blocks, num_k_blocks = seq // block_q, seq // block_k
    some_visible, all_visible = _block_visibility(seq, window, prefix, block_q, block_k)
    config = pallas_gpu._Config(window, prefix, 1.0, block_q, block_k, 1, False, 4, 2, True)

    key_ranges = pallas_gpu._key_block_ranges(config, jnp.arange(num_q_blocks))
    key_ranges = [np.broadcast_to(x, (num_q_blocks,)) for x in key_ranges]
    for i, (prefix_stop, window_start, full_start, full_stop, stop) in enumerate(zip(*key_ranges)):
        unmasked = list(range(full_start, full_stop))
        visited = [*range(prefix_stop), *range(window_start, full_start), *unmasked, *range(full_stop, stop)]
        assert sorted(visited) == list(np.flatnonzero(some_visible[i])), i
        # Past the prefix blocks, exactly the fully visible blocks skip the mask.
        assert unmasked == [j for j in range(prefix_stop, num_k_blocks) if all_visible[i, j]], i

    query_ranges = pallas_gpu._query_block_ranges(config, jnp.arange(num_k_blocks), num_q_blocks)
    query_ranges = [np.broadcast_to(x, (num_k_blocks,)) for x in query_ranges]
    for j, (start, full_start, full_stop, stop) in enumerate(zip(*query_ranges)):
        assert list(range(start, stop)) == list(np.flatnonzero(some_visible[:, j])), j
        unmasked = list(range(full_start, full_stop))
        assert all(all_visible[unmasked, j]), j
        if prefix == 0:
            assert unmasked == list(np.flatnonzero(all_visible[:, j])), j


@pytest.mark.parametrize("window, prefix", PLAN_CASES)
def test_tpu_visits_cover_the_visible_blocks_and_skip_masks_only_when_safe(window, prefix):
    seq, block_q, block_k = 1024, 128, 256
    some_visible, all_visible = _block_visibility(seq, window, prefix, block_q, block_k)
    config = pallas_tpu._Config(window, prefix, 1.0, block_q, block_k, 1, False, True)
    tables, max_visits = pallas_tpu._key_block_plan(config, seq // block_q)
    num_prefix, window_start, num_visits = (np.asarray(table) for table in tables)
    assert max_visits == np.max(num_visits)
    for i in range(seq // block_q):
        visited = [
            int(pallas_tpu._visited_key_block(num_prefix, window_start, num_visits, i, t))
            for t in range(max_visits)
        ]
        # Steps past the last visit repeat it, so the pipeline fetches nothing new.
        assert visited[num_visits[i] :] == [visited[num_visits[i] - 1]] * (max_visits - num_visits[i])
        assert sorted(visited[: num_visits[i]]) == list(np.flatnonzero(some_visible[i])), i
    query_block, key_block = np.meshgrid(np.arange(seq // block_q), np.arange(seq // block_k), indexing="ij")
    fully_visible = np.asarray(pallas_tpu._block_fully_visible(config, query_block * block_q, key_block * block_k))
    assert not np.any(fully_visible & ~all_visible)
    if prefix == 0:
        np.testing.assert_array_equal(fully_visible, all_visible)


def test_windowed_work_does_not_grow_with_length():
    """A window of w visits O(w / block) key blocks per query block, whatever T is."""
    tpu_visits, gpu_visits = [], []
    for seq in (4096, 16384):
        config = pallas_tpu._Config(256, 4, 1.0, 128, 128, 1, False, True)
        tpu_visits.append(pallas_tpu._key_block_plan(config, seq // 128)[1])
        gpu_config = pallas_gpu._Config(256, 4, 1.0, 128, 64, 1, False, 4, 2, True)
        ranges = pallas_gpu._key_block_ranges(gpu_config, jnp.arange(seq // 128))
        prefix_stop, window_start, _, _, stop = (np.asarray(x) for x in ranges)
        gpu_visits.append(int(np.max(prefix_stop + stop - window_start)))
    assert tpu_visits == [4, 4] and gpu_visits == [7, 7]


# --- decode --------------------------------------------------------------------


def _decode_in_chunks(decode_fn, q, k, v, chunk_sizes, *, max_len, window, prefix, dtype):
    cache = kernels.init_kv_cache(q.shape[0], max_len, k.shape[2], HEAD_DIM, window=window, prefix=prefix, dtype=dtype)

    @jax.jit
    def step(q, k, v, cache):
        o = decode_fn(q, k, v, cache, window=window, prefix=prefix, scale=SCALE)
        return o, api._write_chunk(cache, k, v, prefix)

    outputs, start = [], 0
    for size in chunk_sizes:
        o, cache = step(q[:, start : start + size], k[:, start : start + size], v[:, start : start + size], cache)
        outputs.append(o)
        start += size
    return jnp.concatenate(outputs, axis=1)


# (seq, max_len, window, prefix, heads, kv_heads, chunks, dtype, decode block_k)
DECODE_CASES = [
    # A ring of 6 slots (one partial block of 16 on GPU), wrapped by chunks of 5.
    pytest.param(15, 64, 4, 2, 4, 2, [5] * 3, F32, 16, id="window4-prefix2-wraps-chunks"),
    # 20 slots: a full block of 16 and a partial one, two splits on GPU.
    pytest.param(20, 20, None, 0, 4, 2, [2] * 10, BF16, 16, id="partial-last-cache-block-bf16"),
    pytest.param(12, 12, None, 0, 4, 2, [1] * 12, F32, 16, id="full-exact-fit-tokens", marks=SLOW),
    pytest.param(19, 40, 5, 1, 8, 4, [3] * 6 + [1], BF16, 16, id="window5-prefix1-bf16", marks=SLOW),
    pytest.param(13, 64, 3, 0, 6, 3, [1] * 13, BF16, 16, id="window3-odd-kv-heads-bf16", marks=SLOW),
]


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize("seq, max_len, window, prefix, heads, kv_heads, chunks, dtype, block_k", DECODE_CASES)
def test_decode_matches_parallel(backend, seq, max_len, window, prefix, heads, kv_heads, chunks, dtype, block_k):
    q, k, v = random_qkv(5, 2, seq, heads, kv_heads, HEAD_DIM, dtype)
    expected = reference.attention(q, k, v, window=window, prefix=prefix, segment_ids=None, scale=SCALE)
    decode = functools.partial(KERNEL_MODULES[backend].attention_decode, block_k=block_k, interpret=True)
    o = _decode_in_chunks(decode, q, k, v, chunks, max_len=max_len, window=window, prefix=prefix, dtype=dtype)
    assert o.dtype == dtype
    assert_close(o, expected, tol=1e-5 if dtype == F32 else 1e-2, name="decoded o")


def test_public_decode_with_pallas_matches_parallel():
    # A prefill longer than its ring of prefix + window slots, through the public API.
    q, k, v = random_qkv(6, 2, 9, 4, 2, HEAD_DIM)
    expected = reference.attention(q, k, v, window=4, prefix=1, segment_ids=None, scale=SCALE)
    cache = kernels.init_kv_cache(2, 16, 2, HEAD_DIM, window=4, prefix=1)
    o, cache = kernels.attention_decode(q, k, v, cache, window=4, prefix=1, implementation="pallas")
    assert_close(o, expected, tol=1e-5, name="o")
    assert cache.slot_pos.tolist() == [0, 5, 6, 7, 8]


# --- lowering for TPU and CUDA without hardware -------------------------------------

LOWERING_BATCH, LOWERING_SEQ, LOWERING_HEADS, LOWERING_KV_HEADS, LOWERING_DIM = 2, 1000, 8, 2, 128
# Where the mask variants differ: full causal, and window + prefix + segments.
LOWERING_VARIANTS = {
    "full": dict(window=None, prefix=0, segments=False),
    "windowed": dict(window=256, prefix=16, segments=True),
}
CUSTOM_CALL = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}
PLATFORM_MODULES = {"tpu": pallas_tpu, "cuda": pallas_gpu}


def _lowering_arguments(dtype, segments):
    shape = (LOWERING_BATCH, LOWERING_SEQ)
    q = jax.ShapeDtypeStruct((*shape, LOWERING_HEADS, LOWERING_DIM), dtype)
    kv = jax.ShapeDtypeStruct((*shape, LOWERING_KV_HEADS, LOWERING_DIM), dtype)
    segment_ids = jax.ShapeDtypeStruct(shape, jnp.int32) if segments else None
    return q, kv, kv, segment_ids


def _kernel_calls(exported, platform):
    return len(re.findall(re.escape(CUSTOM_CALL[platform]), exported.mlir_module()))


@pytest.mark.parametrize("variant", list(LOWERING_VARIANTS))
@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_forward_and_backward_lower(platform, variant):
    window, prefix, segments = LOWERING_VARIANTS[variant].values()
    module = PLATFORM_MODULES[platform]
    q, k, v, segment_ids = _lowering_arguments(jnp.bfloat16, segments)

    def forward(q, k, v, segment_ids):
        return module.attention(q, k, v, window=window, prefix=prefix, segment_ids=segment_ids, scale=0.1)

    def gradients(q, k, v, segment_ids):
        def loss(q, k, v):
            return jnp.sum(forward(q, k, v, segment_ids).astype(jnp.float32))

        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    assert _kernel_calls(export_lowering(forward, q, k, v, segment_ids, platform=platform), platform) == 1
    # The forward (for its residuals), dq and dk/dv: the whole gradient is Pallas.
    assert _kernel_calls(export_lowering(gradients, q, k, v, segment_ids, platform=platform), platform) == 3


@pytest.mark.parametrize(
    "variant, dtype, chunk_len",
    # A long plain cache with a float32 chunk (chunked prefill); a bfloat16 ring, one token.
    [("full", jnp.float32, 16), ("windowed", jnp.bfloat16, 1)],
)
@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_decode_lowers(platform, variant, dtype, chunk_len):
    window, prefix, _ = LOWERING_VARIANTS[variant].values()
    max_len = 4096 if window is None else prefix + window
    cache = jax.eval_shape(
        functools.partial(
            kernels.init_kv_cache, LOWERING_BATCH, max_len, LOWERING_KV_HEADS, LOWERING_DIM,
            window=window, prefix=prefix, dtype=dtype,
        )
    )
    module = PLATFORM_MODULES[platform]
    q = jax.ShapeDtypeStruct((LOWERING_BATCH, chunk_len, LOWERING_HEADS, LOWERING_DIM), dtype)
    kv = jax.ShapeDtypeStruct((LOWERING_BATCH, chunk_len, LOWERING_KV_HEADS, LOWERING_DIM), dtype)

    def decode(q, k, v, cache):
        return module.attention_decode(q, k, v, cache, window=window, prefix=prefix, scale=0.1)

    assert _kernel_calls(export_lowering(decode, q, kv, kv, cache, platform=platform), platform) == 1


# --- errors -----------------------------------------------------------------------


def test_block_sizes_are_checked_with_clear_errors():
    q, k, v = random_qkv(9, 1, 20, 2, 2, HEAD_DIM)
    options = dict(window=None, prefix=0, segment_ids=None, scale=SCALE, interpret=True)
    with pytest.raises(ValueError, match=r"block_q=64 and block_k=512 must be multiples of 128"):
        pallas_tpu.attention(q, k, v, block_q=64, **options)
    with pytest.raises(ValueError, match=r"block_k=48 must be a power of two >= 16"):
        pallas_gpu.attention(q, k, v, block_k=48, **options)


def test_bench_knows_the_peaks_of_the_target_chips():
    assert chip_peak("NVIDIA H100 80GB HBM3").tflops == 989.0
    assert chip_peak("NVIDIA H100 PCIe").hbm_gb_per_s == 2000.0
    assert chip_peak("NVIDIA H200").hbm_gb_per_s == 4800.0
    assert chip_peak("NVIDIA A100-SXM4-80GB").tflops == 312.0
    assert chip_peak("TPU v4").tflops == 275.0
    assert chip_peak("TPU v5 lite").tflops == chip_peak("TPU v5e").tflops == 197.0
    assert chip_peak("TPU v5p").tflops == 459.0
    assert chip_peak("TPU v6 lite").tflops == chip_peak("TPU v6e").tflops == 918.0
    assert chip_peak("cpu") is None
