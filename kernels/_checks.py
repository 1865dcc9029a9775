"""Argument checks shared by the ops' public functions, with messages that name the op."""

from __future__ import annotations

import operator

import jax.numpy as jnp


def as_int(value) -> int | None:
    """The value as a Python int if it is an integer (bools are not), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_bthd(op: str, **arrays) -> None:
    """Every array must be [batch, seq, heads, head_dim]."""
    for name, array in arrays.items():
        if getattr(array, "ndim", None) != 4:
            raise ValueError(
                f"{op}: {name} must be [batch, seq, heads, head_dim] (4 dims), "
                f"got shape {getattr(array, 'shape', type(array).__name__)}"
            )


def check_qkv(op: str, q, k, v, *, time_axis: bool) -> tuple:
    """q and k of one shape, v matching them in every dim but the last, all float:
    [batch, seq, heads, dim] with time_axis (and at least one token), else [batch, heads, dim].
    Returns q's shape."""
    layout = "[batch, seq, heads, dim]" if time_axis else "[batch, heads, dim]"
    ndim = 4 if time_axis else 3
    for name, array in (("q", q), ("k", k), ("v", v)):
        if getattr(array, "ndim", None) != ndim:
            raise ValueError(
                f"{op}: {name} must be {layout} ({ndim} dims), "
                f"got shape {getattr(array, 'shape', type(array).__name__)}"
            )
        if not jnp.issubdtype(array.dtype, jnp.floating):
            raise ValueError(f"{op}: {name} must be a float array, got {array.dtype}")
    if q.shape != k.shape:
        raise ValueError(f"{op}: q and k must have the same shape, got q {q.shape} and k {k.shape}")
    if v.shape[:-1] != q.shape[:-1]:
        raise ValueError(f"{op}: v must match q in every dim but the last, got q {q.shape} and v {v.shape}")
    if time_axis and q.shape[1] < 1:
        raise ValueError(f"{op}: q, k and v hold no tokens (sequence length 0); pass at least one")
    return q.shape


def check_per_token(op: str, name: str, array, expected_shape: tuple):
    """A float array of expected_shape, one value per token and head; returned as a jax array."""
    array = jnp.asarray(array)
    if array.shape != expected_shape or not jnp.issubdtype(array.dtype, jnp.floating):
        raise ValueError(
            f"{op}: {name} must be a float array of shape {list(expected_shape)} "
            f"(one value per token and head), got {array.dtype} {array.shape}"
        )
    return array
