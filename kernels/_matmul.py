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


def t_dot_transposing_first(a, b):
    """a^T @ b with a^T written out first, for XLA outside Pallas kernels: XLA folds a
    plain transpose into the dot's dimensions, and XLA:CPU's contraction over the
    leading axis of both operands runs at about 60% of a plain matmul's rate. The
    barrier keeps the transposed copy (cheap: one operand, once)."""
    return dot(lax.optimization_barrier(jnp.swapaxes(a, 0, 1)), b)


def sum_rows(x):
    """[M, N] -> [M, 1]."""
    return jnp.sum(x, axis=1, keepdims=True)


def sum_columns(x):
    """[M, N] -> [1, N]."""
    return jnp.sum(x, axis=0, keepdims=True)
