"""Running Pallas kernels per shard under a device mesh.

A `pallas_call` is opaque to XLA's sharding propagation: under `jax.jit` with inputs
sharded over a mesh, XLA would gather every input onto every device and run the whole
global batch everywhere. `per_shard` wraps a kernel in `jax.shard_map` instead, so each
device runs it on its own slice of the batch (and of the heads, under tensor
parallelism), which is exact because every op here is independent across batch rows
and heads.

Which mesh axes split which dim comes from `kernel_partition` (train/ sets it from its
rule table). Without it, the batch is split over every mesh axis, which is always
correct (shard_map reshards inputs as needed) and ideal for pure data parallelism. An
axis whose size does not divide the dim is left out, so odd shapes still run.

Layouts name the dims of each array argument: "B" is split over the batch axes, "H"
over the head axes, any other letter is kept whole ("BTH" for [B, T, H, D] arrays,
"BH" for [B, H, ...] states, "BT" for per-sequence ids, "" for replicated values). A
layout covers the leading dims it names; the remaining trailing dims are kept whole.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Any, Callable

import jax
from jax.sharding import PartitionSpec


@dataclasses.dataclass(frozen=True)
class KernelPartition:
    batch: tuple[str, ...] | None  # None: every axis of the mesh
    heads: tuple[str, ...]


_partition = KernelPartition(batch=None, heads=())


@contextlib.contextmanager
def kernel_partition(*, batch: tuple[str, ...], heads: tuple[str, ...] = ()):
    """Within this context (while tracing), Pallas kernels split their batch dim over the
    mesh axes `batch` and their head dim over `heads`."""
    global _partition
    overlap = set(batch) & set(heads)
    if overlap:
        raise ValueError(f"kernel_partition: mesh axes {sorted(overlap)} given for both batch and heads")
    previous, _partition = _partition, KernelPartition(tuple(batch), tuple(heads))
    try:
        yield
    finally:
        _partition = previous


def per_shard(kernel: Callable, *, arg_layouts: tuple, kwarg_layouts: dict[str, Any], out_layouts: Any) -> Callable:
    """Wrap `kernel(*args, **kwargs)` to run per shard when a multi-device mesh is active.

    arg_layouts: one layout (or pytree of layouts) per positional argument; kwarg_layouts:
    layouts of the array keyword arguments (others are static and passed through);
    out_layouts: a layout pytree prefix of the kernel's outputs.
    """

    @functools.wraps(kernel)
    def run(*args, **kwargs):
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty or mesh.size == 1:
            return kernel(*args, **kwargs)
        if len(args) != len(arg_layouts):
            raise TypeError(f"{kernel.__name__}: expected {len(arg_layouts)} positional arrays, got {len(args)}")
        array_kwargs = {name: kwargs.pop(name) for name in kwarg_layouts if name in kwargs}
        arrays = (args, array_kwargs)
        layouts = (tuple(arg_layouts), {name: kwarg_layouts[name] for name in array_kwargs})
        batch_axes, head_axes = _usable_axes(mesh, arrays, layouts)
        to_spec = functools.partial(_spec, batch_axes=batch_axes, head_axes=head_axes)

        def local(shard_args, shard_kwargs):
            return kernel(*shard_args, **shard_kwargs, **kwargs)

        in_specs = jax.tree.map(to_spec, layouts, is_leaf=_is_layout)
        out_specs = jax.tree.map(to_spec, out_layouts, is_leaf=_is_layout)
        # check_vma=False: a pallas_call does not declare how its outputs vary over mesh axes.
        return jax.shard_map(local, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*arrays)

    return run


def _is_layout(x) -> bool:
    return isinstance(x, str)


def _spec(layout: str, *, batch_axes, head_axes) -> PartitionSpec:
    entries = []
    for letter in layout:
        axes = batch_axes if letter == "B" else head_axes if letter == "H" else ()
        entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*entries)


def _usable_axes(mesh, arrays, layouts) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The batch and head axes that divide every array's batch and head dims."""
    wanted_batch = _partition.batch if _partition.batch is not None else tuple(
        name for name in mesh.axis_names if name not in _partition.heads
    )
    batch_sizes, head_sizes = set(), set()

    def collect(layout, array):
        for letter, size in zip(layout, getattr(array, "shape", ())):
            (batch_sizes if letter == "B" else head_sizes if letter == "H" else set()).add(size)

    layout_leaves, layout_tree = jax.tree.flatten(layouts, is_leaf=_is_layout)
    for layout, subtree in zip(layout_leaves, layout_tree.flatten_up_to(arrays)):
        for array in jax.tree.leaves(subtree):
            collect(layout, array)
    return _dividing(mesh, wanted_batch, batch_sizes), _dividing(mesh, _partition.heads, head_sizes)


def _dividing(mesh, axes: tuple[str, ...], sizes: set[int]) -> tuple[str, ...]:
    """Those of `axes`, in order, that are in the mesh with size > 1 and keep the product dividing every size."""
    chosen: list[str] = []
    for axis in axes:
        if axis not in mesh.axis_names or mesh.shape[axis] == 1:
            continue
        product = math.prod(mesh.shape[name] for name in chosen) * mesh.shape[axis]
        if all(size % product == 0 for size in sizes):
            chosen.append(axis)
    return tuple(chosen)
