"""The device mesh and the one rule table that maps logical parameter axes onto it.

Mesh axes: `data` (pure data parallelism), `fsdp` (data parallelism whose
parameters and optimizer state are sharded too) and `tensor` (Megatron-style
model parallelism over heads and MLP width). The batch is split over data×fsdp.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import kernels
from arch.config import ConfigError
from train.config import MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis name (as written by arch/ with nnx.with_partitioning) -> mesh axes.
LOGICAL_AXIS_RULES: dict[str, tuple[str, ...]] = {
    "batch": BATCH_AXES,
    "embed": ("fsdp",),
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "mlp": ("tensor",),
    "layers": (),
}


def mesh_shape(cfg: MeshConfig, device_count: int) -> tuple[int, int, int]:
    """Resolve a -1 axis and check that the mesh uses every device exactly."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    fixed = math.prod(size for size in sizes if size != -1)
    if -1 in sizes:
        if device_count % fixed:
            raise ConfigError(
                f"mesh: {device_count} devices cannot be split into data={cfg.data}, fsdp={cfg.fsdp}, "
                f"tensor={cfg.tensor}; the fixed axes' product {fixed} must divide the device count"
            )
        sizes[sizes.index(-1)] = device_count // fixed
    elif fixed != device_count:
        raise ConfigError(
            f"mesh: data×fsdp×tensor = {cfg.data}×{cfg.fsdp}×{cfg.tensor} = {fixed}, but there are "
            f"{device_count} devices; make the product equal the device count or set one axis to -1"
        )
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> jax.sharding.Mesh:
    devices = devices if devices is not None else jax.devices()
    shape = mesh_shape(cfg, len(devices))
    return jax.make_mesh(
        shape,
        MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
        devices=devices,
    )


@contextlib.contextmanager
def use_mesh(mesh: jax.sharding.Mesh) -> Iterator[None]:
    """Make `mesh` the current mesh, with the Pallas kernels split over it as the rule
    table splits activations: batch over data×fsdp, heads over tensor."""
    with jax.set_mesh(mesh), kernels.kernel_partition(batch=BATCH_AXES, heads=LOGICAL_AXIS_RULES["heads"]):
        yield


def logical_to_mesh_spec(logical_axes: tuple, shape: tuple[int, ...], mesh: jax.sharding.Mesh) -> PartitionSpec:
    """Map logical axis names to a PartitionSpec, replicating a dim its mesh axes do not divide."""
    used: set[str] = set()
    spec = []
    for name, size in zip(logical_axes, shape):
        mesh_axes = tuple(
            axis for axis in LOGICAL_AXIS_RULES.get(name, ()) if axis not in used and mesh.shape[axis] > 1
        ) if name is not None else ()
        if mesh_axes and size % math.prod(mesh.shape[axis] for axis in mesh_axes) == 0:
            used.update(mesh_axes)
            spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
        else:
            spec.append(None)
    return PartitionSpec(*spec)


def param_shardings(abstract_params: nnx.State, mesh: jax.sharding.Mesh) -> dict[str, Any]:
    """NamedShardings for a pure-dict view of `abstract_params`, from each Param's logical axes."""

    def sharding_of(variable):
        axes = variable.get_metadata().get("out_sharding") or (None,) * variable.value.ndim
        return NamedSharding(mesh, logical_to_mesh_spec(tuple(axes), variable.value.shape, mesh))

    shardings = jax.tree.map(sharding_of, abstract_params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(shardings) if isinstance(shardings, nnx.State) else shardings


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def global_batch(local_batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """Per-host numpy batches -> global arrays sharded over data×fsdp."""
    sharding = batch_sharding(mesh)
    return {
        name: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for name, value in local_batch.items()
    }


def data_parallel_size(mesh: jax.sharding.Mesh) -> int:
    return math.prod(mesh.shape[axis] for axis in BATCH_AXES)
