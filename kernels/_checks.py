"""Argument checks shared by the ops' public functions, with messages that name the op."""

from __future__ import annotations

import operator


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
