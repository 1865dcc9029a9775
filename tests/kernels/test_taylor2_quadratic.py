"""BASED's quadratic form of taylor2 linear attention against the token-by-token reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels.linear_attention import reference
from kernels.testing import assert_close


def _inputs(length=11, key_dim=4, value_dim=5):
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (2, length, 3, key_dim))
    k = jax.random.normal(keys[1], (2, length, 3, key_dim))
    v = jax.random.normal(keys[2], (2, length, 3, value_dim))
    return q, k, v


@pytest.mark.parametrize("normalize", [True, False])
def test_quadratic_form_matches_the_recurrence_in_values_and_gradients(normalize):
    q, k, v = _inputs()
    cotangent = jax.random.normal(jax.random.key(1), v.shape)

    def quadratic(q, k, v):
        return kernels.taylor2_quadratic_attention(q, k, v, normalize=normalize, eps=1e-6)

    def recurrent(q, k, v):
        y, _ = reference.linear_attention(
            q, k, v, log_decay=None, normalize=normalize, feature_map="taylor2",
            initial_state=None, return_final_state=False, chunk_size=1, eps=1e-6,
        )
        return y

    assert_close(quadratic(q, k, v), recurrent(q, k, v), tol=1e-5, name="y")
    grads = [jax.grad(lambda *a: jnp.sum(f(*a) * cotangent), argnums=(0, 1, 2))(q, k, v) for f in (quadratic, recurrent)]
    for name, got, want in zip("qkv", *grads):
        assert_close(got, want, tol=1e-5, name=f"d{name}")


def test_quadratic_form_keeps_the_value_dtype_and_is_causal():
    q, k, v = _inputs(length=7)
    y = kernels.taylor2_quadratic_attention(q, k, v.astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16 and y.shape == v.shape
    changed = kernels.taylor2_quadratic_attention(q, k.at[:, 4].add(1.0), v.at[:, 4].add(1.0))
    np.testing.assert_array_equal(changed[:, :4], kernels.taylor2_quadratic_attention(q, k, v)[:, :4])
