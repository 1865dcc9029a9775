"""The kernel test helpers: relative-RMSE comparison and lowering for hardware we do not have."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.testing import assert_close, export_lowering, random_qkv, relative_rmse


def test_assert_close_measures_relative_rmse():
    expected = np.array([3.0, 4.0])  # rms = sqrt(12.5)
    assert relative_rmse(expected + [0.5, -0.5], expected) == pytest.approx(0.5 / np.sqrt(12.5))
    assert_close(expected * (1 + 1e-4), expected, tol=1e-3, name="x")
    with pytest.raises(AssertionError, match=r"x: relative RMSE 0\.1 > tol 0\.01 \(largest difference at index \(1,\)"):
        assert_close(expected * 1.1, expected, tol=1e-2, name="x")
    with pytest.raises(AssertionError, match="x: result has NaN or inf values"):
        assert_close(np.array([np.nan, 4.0]), expected, tol=1.0, name="x")
    with pytest.raises(AssertionError, match=r"x: shape \(3,\) != expected \(2,\)"):
        assert_close(np.zeros(3), expected, tol=1.0, name="x")
    # An all-zero expectation is compared against the floor, not divided by zero.
    assert_close(np.full(4, 1e-9), np.zeros(4), tol=1e-2, name="zeros")


def test_random_qkv_shapes_dtypes_and_determinism():
    q, k, v = random_qkv(0, 2, 5, 4, 2, 8, jnp.bfloat16)
    assert q.shape == (2, 5, 4, 8) and k.shape == v.shape == (2, 5, 2, 8)
    assert q.dtype == k.dtype == v.dtype == jnp.bfloat16
    np.testing.assert_array_equal(random_qkv(0, 2, 5, 4, 2, 8)[0], random_qkv(0, 2, 5, 4, 2, 8)[0])


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_export_lowering_builds_a_module_for_absent_hardware(platform):
    def scaled_softmax(x):
        return jax.nn.softmax(x * 2.0, axis=-1)

    exported = export_lowering(scaled_softmax, jax.ShapeDtypeStruct((4, 128), jnp.float32), platform=platform)
    assert exported.platforms == (platform,)
    assert "exponential" in exported.mlir_module()
