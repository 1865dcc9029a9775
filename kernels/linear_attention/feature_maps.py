"""Feature maps phi of linear attention, applied to q and k before the recurrence.

None is the identity. "taylor2" is BASED's second-order Taylor map of exp:
phi(x) = [1, x / d^(1/4), vec(x outer x) / (sqrt(2) sqrt(d))] with 1 + d + d^2 features
(vec is row-major: feature 1 + d + a*d + b holds x_a x_b), so that
phi(q) . phi(k) = 1 + s + s^2 / 2 with s = q . k / sqrt(d).
"""

from __future__ import annotations

import math

import jax.numpy as jnp

FEATURE_MAPS = (None, "taylor2")


def feature_dim(feature_map: str | None, head_dim: int) -> int:
    """F, the number of features phi maps a head_dim vector to (the state has F rows)."""
    return head_dim if feature_map is None else 1 + head_dim + head_dim * head_dim


def taylor2_scales(head_dim: int) -> tuple[float, float]:
    """(scale of the linear features, scale of the quadratic features) of "taylor2"."""
    return head_dim**-0.25, 1.0 / (math.sqrt(2.0) * math.sqrt(head_dim))


def taylor2_feature_map(x):
    """BASED's taylor2 feature map: x [..., d] -> float32 [..., 1 + d + d^2].

    phi(q) . phi(k) = 1 + s + s^2 / 2 with s = q . k / sqrt(d). The kernels never build
    these features in HBM; this explicit form serves decode, tests and the reference.
    """
    x = jnp.asarray(x, jnp.float32)
    head_dim = x.shape[-1]
    linear_scale, quadratic_scale = taylor2_scales(head_dim)
    quadratic = (x[..., :, None] * x[..., None, :]).reshape(*x.shape[:-1], head_dim * head_dim)
    return jnp.concatenate(
        [jnp.ones((*x.shape[:-1], 1), jnp.float32), x * linear_scale, quadratic * quadratic_scale],
        axis=-1,
    )


def apply_feature_map(feature_map: str | None, x):
    """phi(x) in float32: [..., d] -> [..., feature_dim(feature_map, d)]."""
    if feature_map is None:
        return jnp.asarray(x, jnp.float32)
    return taylor2_feature_map(x)
