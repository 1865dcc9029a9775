"""Op registry, default-implementation choice and Pallas interpret mode.

Every op registers its implementations here under a name ("attention",
"attention_decode", ...); the public functions in `kernels/<op>/api.py` call
`dispatch` to get the callable for the requested or default implementation.
This module is the only place that imports Pallas backends: an op's Pallas
entry is registered from here, so nothing else pulls in Mosaic or Triton.
"""

from __future__ import annotations

import importlib
from typing import Callable

import jax

IMPLEMENTATIONS = ("reference", "xla", "pallas")

# Preference order when `implementation=None`: Pallas where it compiles natively,
# the blocked XLA form everywhere else; the reference only if an op has nothing better.
_PREFERENCE_ON_ACCELERATOR = ("pallas", "xla", "reference")
_PREFERENCE_ON_CPU = ("xla", "reference")

_registry: dict[str, dict[str, Callable]] = {}


def register_op(name: str, implementations: dict[str, Callable]) -> None:
    """Register (or replace) the implementations of op `name`, keyed by implementation name."""
    unknown = sorted(set(implementations) - set(IMPLEMENTATIONS))
    if unknown:
        raise ValueError(
            f"register_op({name!r}): unknown implementation name(s) {unknown}; "
            f"expected some of {list(IMPLEMENTATIONS)}"
        )
    if not implementations:
        raise ValueError(f"register_op({name!r}): give at least one implementation")
    _registry[name] = dict(implementations)


def available_ops() -> dict[str, list[str]]:
    """Each registered op and its implementation names (ordered reference, xla, pallas)."""
    return {
        name: [impl for impl in IMPLEMENTATIONS if impl in impls]
        for name, impls in sorted(_registry.items())
    }


def interpret_mode() -> bool:
    """True when Pallas kernels must run in interpret mode (no TPU or GPU to compile for)."""
    return jax.default_backend() == "cpu"


def pallas_kernel_module(op_package: str):
    """The Pallas kernels of kernels/<op_package>/ for the default backend, imported on
    first use: pallas_gpu on GPU, pallas_tpu on TPU and on CPU (where it runs interpreted)."""
    variant = "pallas_gpu" if jax.default_backend() == "gpu" else "pallas_tpu"
    return importlib.import_module(f"kernels.{op_package}.{variant}")


def default_implementation(name: str) -> str:
    """The implementation `dispatch(name, None)` picks on the current default backend."""
    implementations = _implementations_of(name)
    preference = _PREFERENCE_ON_CPU if interpret_mode() else _PREFERENCE_ON_ACCELERATOR
    for candidate in preference:
        if candidate in implementations:
            return candidate
    raise ValueError(
        f"{name}: no implementation usable on backend {jax.default_backend()!r}; "
        f"registered: {sorted(implementations)}"
    )


def dispatch(name: str, implementation: str | None = None) -> Callable:
    """The callable for op `name`; `implementation=None` picks the backend's default."""
    implementations = _implementations_of(name)
    if implementation is None:
        implementation = default_implementation(name)
    if implementation not in implementations:
        available = [impl for impl in IMPLEMENTATIONS if impl in implementations]
        if implementation in IMPLEMENTATIONS:
            problem = f"has no {implementation!r} implementation"
        else:
            problem = f"got unknown implementation {implementation!r}"
        raise ValueError(
            f"{name}: {problem}; available: {available} (or None for the backend default)"
        )
    return implementations[implementation]


def _implementations_of(name: str) -> dict[str, Callable]:
    if name not in _registry:
        raise ValueError(f"unknown op {name!r}; registered ops: {sorted(_registry)}")
    return _registry[name]
