"""Helpers for kernel tests: relative-RMSE comparison, random inputs, lowering for TPU and CUDA."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Custom calls that Pallas kernels lower to. jax.export refuses unknown custom calls
# because their ABI is not guaranteed stable; a lowering test only needs the module built.
PALLAS_CUSTOM_CALL_TARGETS = {
    "tpu": ("tpu_custom_call",),
    "cuda": ("__gpu$xla.gpu.triton", "triton_kernel_call_ffi", "mosaic_gpu_v2"),
}


def relative_rmse(actual, expected, *, floor: float = 1e-6) -> float:
    """rms(actual - expected) / max(rms(expected), floor), computed in float64."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    error = np.sqrt(np.mean(np.square(actual - expected)))
    scale = np.sqrt(np.mean(np.square(expected)))
    return float(error / max(scale, floor))


def assert_close(actual, expected, *, tol: float, name: str, floor: float = 1e-6) -> None:
    """Fail unless the relative RMSE of actual against expected is at most tol.

    `floor` bounds the denominator, so an all-zero expectation is compared absolutely.
    """
    actual_shape, expected_shape = np.shape(actual), np.shape(expected)
    if actual_shape != expected_shape:
        raise AssertionError(f"{name}: shape {actual_shape} != expected {expected_shape}")
    if not np.all(np.isfinite(np.asarray(actual, np.float64))):
        raise AssertionError(f"{name}: result has NaN or inf values")
    error = relative_rmse(actual, expected, floor=floor)
    if not error <= tol:
        worst = np.unravel_index(
            np.argmax(np.abs(np.asarray(actual, np.float64) - np.asarray(expected, np.float64))),
            expected_shape,
        )
        raise AssertionError(
            f"{name}: relative RMSE {error:.3g} > tol {tol:.3g} "
            f"(largest difference at index {tuple(int(i) for i in worst)}: "
            f"{np.asarray(actual)[worst]} vs expected {np.asarray(expected)[worst]})"
        )


def random_qkv(seed: int, batch, seq, heads, kv_heads, head_dim, dtype=jnp.float32):
    """Standard-normal q [B,T,H,D], k and v [B,T,K,D] in dtype.

    Drawn with NumPy: no per-shape XLA compile, which keeps many-shape tests fast.
    """
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, seq, heads, head_dim), np.float32)
    k = rng.standard_normal((batch, seq, kv_heads, head_dim), np.float32)
    v = rng.standard_normal((batch, seq, kv_heads, head_dim), np.float32)
    return jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype)


def random_normal(seed: int, shape, dtype=jnp.float32):
    """A standard-normal array (for example an output cotangent), drawn with NumPy."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32), dtype)


def random_segment_ids(seed: int, batch, seq, max_segments):
    """int32 [B, T] of sorted ids in [0, max_segments): contiguous packed documents."""
    ids = np.sort(np.random.default_rng(seed).integers(0, max_segments, (batch, seq)), axis=1)
    return jnp.asarray(ids, jnp.int32)


def export_lowering(f, *args, platform: str, allowed_custom_calls: Sequence[str] | None = None):
    """Lower jit(f)(*args) for `platform` ("tpu", "cuda", ...) without its hardware.

    args may be arrays or jax.ShapeDtypeStruct. The Pallas custom calls of that
    platform are allowed by default. Returns the jax.export.Exported; raises if
    lowering fails (for example an illegal block shape or an unsupported op).
    """
    if allowed_custom_calls is None:
        allowed_custom_calls = PALLAS_CUSTOM_CALL_TARGETS.get(platform, ())
    disabled_checks = [
        jax.export.DisabledSafetyCheck.custom_call(target) for target in allowed_custom_calls
    ]
    exporter = jax.export.export(jax.jit(f), platforms=[platform], disabled_checks=disabled_checks)
    return exporter(*args)
