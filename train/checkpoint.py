"""Checkpoints: model, optimizer, data-iterator state and config saved together with orbax.

`Checkpointer` wraps an async `CheckpointManager` that keeps the last N steps.
`load_model` is the one way to get a trained model back from a workdir; `eval`
and `memzoo generate` use it too.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from arch.config import ConfigError
from train.config import CheckpointConfig, TrainConfig, config_from_dict

CHECKPOINT_SUBDIR = "checkpoints"


def checkpoint_dir(workdir: str | pathlib.Path) -> pathlib.Path:
    """A workdir's checkpoint folder; a path that is itself a checkpoint folder is taken as is."""
    path = pathlib.Path(workdir).absolute()
    return path if path.name == CHECKPOINT_SUBDIR else path / CHECKPOINT_SUBDIR


class Checkpointer:
    def __init__(self, workdir: str | pathlib.Path, cfg: CheckpointConfig = CheckpointConfig()):
        self.directory = checkpoint_dir(workdir)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=cfg.keep,
                enable_async_checkpointing=cfg.async_save,
                create=True,
            ),
            item_names=("state", "data", "config"),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict, config: TrainConfig, *, force: bool = False) -> bool:
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(config.to_dict()),
            ),
            force=force,
        )

    def restore_config(self, step: int | None = None) -> TrainConfig:
        step = self._resolve_step(step)
        restored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return config_from_dict(restored["config"])

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """(state, data-iterator state) at `step` (default: the latest), placed as `abstract_state` says."""
        step = self._resolve_step(step)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
            ),
        )
        return restored["state"], restored["data"]

    def restore_params(self, abstract_params: Any, step: int | None = None) -> Any:
        """Only the model parameters, for evaluation and generation."""
        step = self._resolve_step(step)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item={"params": abstract_params},
                    restore_args=jax.tree.map(ocp.checkpoint_utils.construct_restore_args, {"params": abstract_params}),
                    partial_restore=True,
                )
            ),
        )
        return restored["state"]["params"]

    def reached_preemption(self, step: int) -> bool:
        """True on every host once a preemption notice reached the coordinator (multi-host runs)."""
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def _resolve_step(self, step: int | None) -> int:
        steps = self.all_steps()
        if not steps:
            raise ConfigError(f"no checkpoint found in {self.directory}")
        if step is None:
            return max(steps)
        if step not in steps:
            raise ConfigError(f"checkpoint step {step} not found in {self.directory}; saved steps: {sorted(steps)}")
        return step


def load_model(workdir: str | pathlib.Path, step: int | None = None):
    """(model, TrainConfig, step) restored from a workdir or its checkpoints folder, on the default device."""
    from train.step import model_spec
    from flax import nnx

    directory = checkpoint_dir(workdir)
    if not directory.is_dir():
        raise ConfigError(f"--checkpoint: {workdir} holds no checkpoints (looked for {directory})")
    checkpointer = Checkpointer(directory, CheckpointConfig(async_save=False))
    try:
        step = checkpointer._resolve_step(step)
        config = checkpointer.restore_config(step)
        spec = model_spec(config.model, config.seed)
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(
            lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device),
            nnx.to_pure_dict(spec.abstract_params),
        )
        params = checkpointer.restore_params(abstract, step)
    finally:
        checkpointer.close()
    return spec.bind(params), config, step
