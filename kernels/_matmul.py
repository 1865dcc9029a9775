"""2D matmul and reduction helpers for the chunk math that runs inside Pallas kernels.

They stick to what both Mosaic (TPU) and Triton (GPU) lower: dot_general in the three
forms A B, A B^T and A^T B with float32 accumulation at HIGHEST precision (no bf16
passes on TPU), and sums that keep their reduced axis.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

EXACT = lax.Precision.HIGHEST


def dot(a, b):
    """a @ b."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=EXACT, preferred_element_type=jnp.float32)


def dot_t(a, b):
    """a @ b^T."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=EXACT, preferred_element_type=jnp.float32)


def t_dot(a, b):
    """a^T @ b."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=EXACT, preferred_element_type=jnp.float32)


def sum_rows(x):
    """[M, N] -> [M, 1]."""
    return jnp.sum(x, axis=1, keepdims=True)


def sum_columns(x):
    """[M, N] -> [1, N]."""
    return jnp.sum(x, axis=0, keepdims=True)
