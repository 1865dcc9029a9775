"""The pretraining loop shared by every architecture.

One call, `train(cfg, workdir)`, builds the mesh, the model and the data,
resumes from the workdir's latest checkpoint when asked, and runs to
`cfg.steps`: logging metrics as JSON lines and TensorBoard events, evaluating on
held-out data, checkpointing asynchronously, saving on SIGTERM (preemption), and
stopping at a non-finite loss without checkpointing it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import signal
import sys
import time
from typing import Any

import jax
import numpy as np

from arch.config import ConfigError
from train import data as data_lib
from train import sharding as shd
from train.checkpoint import Checkpointer, checkpoint_dir
from train.config import TrainConfig
from train.step import make_trainer

# Fields that may change between a run and its resumption; anything else must match.
RESUMABLE_CHANGES = ("steps", "logging", "checkpoint", "name")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped and kept its last good checkpoint."""


@dataclasses.dataclass
class TrainResult:
    steps_done: int
    losses: dict[int, float]  # step (1-based, after the update) -> training loss
    eval_losses: dict[int, float]
    tokens_per_second: float
    preempted: bool = False


class _PreemptionFlag:
    """Set by SIGTERM; the loop checkpoints and exits at the next step boundary."""

    def __init__(self):
        self.raised = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. a notebook worker): no handler
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.raised = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class MetricsWriter:
    """JSON lines in workdir/metrics.jsonl and TensorBoard events in workdir/tensorboard (process 0 only)."""

    def __init__(self, workdir: pathlib.Path, tensorboard: bool):
        self.enabled = jax.process_index() == 0
        self.jsonl = open(workdir / "metrics.jsonl", "a") if self.enabled else None
        self.tb = None
        if self.enabled and tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for name, value in values.items():
                self.tb.add_scalar(name, value, step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def _check_resumable(saved: TrainConfig, current: TrainConfig) -> None:
    saved_dict, current_dict = saved.to_dict(), current.to_dict()
    for key in saved_dict:
        if key not in RESUMABLE_CHANGES and saved_dict[key] != current_dict[key]:
            raise ConfigError(
                f"{key}: differs from the checkpointed run's config, so --resume cannot continue it exactly; "
                f"only {', '.join(RESUMABLE_CHANGES)} may change on resume"
            )


def evaluate(trainer, params, cfg: TrainConfig, mesh) -> float:
    """Mean held-out loss over `data.eval_batches` batches."""
    loss_sum, tokens = 0.0, 0.0
    for batch in data_lib.eval_batches(cfg.data, process_index=jax.process_index(), process_count=jax.process_count()):
        out = trainer.eval_step(params, shd.global_batch(batch, mesh))
        loss_sum += float(out["loss_sum"])
        tokens += float(out["tokens"])
    return loss_sum / max(tokens, 1.0)


def train(
    cfg: TrainConfig, workdir: str | pathlib.Path, *, resume: bool = False, devices: list | None = None
) -> TrainResult:
    """Train to `cfg.steps` in `workdir`; `devices` (default: all) are the mesh's devices."""
    workdir = pathlib.Path(workdir)
    if cfg.mesh.multi_host:
        jax.distributed.initialize()
    mesh = shd.make_mesh(cfg.mesh, devices)
    parallel = shd.data_parallel_size(mesh)
    if cfg.data.batch_size % parallel:
        raise ConfigError(
            f"data.batch_size: {cfg.data.batch_size} is not divisible by the data-parallel size "
            f"data×fsdp = {parallel}"
        )

    existing = checkpoint_dir(workdir)
    has_checkpoints = existing.is_dir() and any(existing.iterdir())
    if has_checkpoints and not resume:
        raise ConfigError(
            f"--workdir: {workdir} already holds checkpoints; pass --resume to continue that run, "
            "or choose an empty workdir"
        )
    if resume and not has_checkpoints:
        raise ConfigError(f"--resume: {workdir} holds no checkpoint to resume from")
    workdir.mkdir(parents=True, exist_ok=True)

    checkpointer = Checkpointer(workdir, cfg.checkpoint)
    if resume:
        _check_resumable(checkpointer.restore_config(), cfg)

    with shd.use_mesh(mesh):
        trainer = make_trainer(cfg, mesh)
        iterator = data_lib.train_iterator(
            cfg.data, process_index=jax.process_index(), process_count=jax.process_count()
        )
        if resume:
            abstract = jax.tree.map(
                lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                jax.eval_shape(trainer.init_state),
                trainer.state_shardings,
            )
            state, data_state = checkpointer.restore(abstract)
            data_lib.restore_iterator_state(iterator, data_state)
        else:
            state = trainer.init_state()
        with open(workdir / "config.json", "w") as f:
            json.dump(cfg.to_dict(), f, indent=2)
        return _run(cfg, workdir, trainer, state, iterator, checkpointer, mesh)


def _run(cfg, workdir, trainer, state, iterator, checkpointer, mesh) -> TrainResult:
    start_step = int(state["step"])
    writer = MetricsWriter(workdir, cfg.logging.tensorboard)
    tokens_per_batch = cfg.data.batch_size * cfg.data.seq_len
    losses: dict[int, float] = {}
    eval_losses: dict[int, float] = {}
    pending: list[tuple[int, dict]] = []  # device metrics not yet fetched, so steps do not sync the host
    last_good_step = start_step
    progress = _progress_bar(cfg, start_step)
    window_start, window_steps, throughput = time.perf_counter(), 0, 0.0
    preempted = False

    def flush() -> None:
        """Fetch pending metrics; stop at the first non-finite loss, naming its step."""
        nonlocal last_good_step, window_start, window_steps, throughput
        if not pending:
            return
        fetched = jax.device_get([metrics for _, metrics in pending])
        for (step, _), metrics in zip(pending, fetched):
            loss = float(metrics["loss"])
            if not math.isfinite(loss):
                saved = checkpointer.latest_step()
                raise NonFiniteLossError(
                    f"loss became {loss} at step {step}; stopped. The last good checkpoint is "
                    f"{'step ' + str(saved) if saved is not None else 'none'} in {checkpointer.directory}"
                )
            losses[step] = loss
            last_good_step = step
        elapsed = time.perf_counter() - window_start
        throughput = window_steps * tokens_per_batch / max(elapsed, 1e-9)
        step, metrics = pending[-1][0], fetched[-1]
        values = {
            "loss": float(metrics["loss"]),
            "grad_norm": float(metrics["grad_norm"]),
            "lr": float(metrics["lr"]),
            "tokens_per_s": throughput,
        }
        writer.write(step, values)
        if progress is not None:
            progress.set_postfix(loss=f"{values['loss']:.4f}", tok_s=f"{throughput:,.0f}")
        pending.clear()
        window_start, window_steps = time.perf_counter(), 0

    def save(step: int, *, force: bool = False) -> None:
        flush()  # never checkpoint a state whose loss was not seen to be finite
        checkpointer.save(step, state, data_lib.iterator_state(iterator), cfg, force=force)

    try:
        with _PreemptionFlag() as preemption:
            for step in range(start_step + 1, cfg.steps + 1):
                batch = shd.global_batch(next(iterator), trainer.mesh)
                state, metrics = trainer.train_step(state, batch)
                pending.append((step, metrics))
                window_steps += 1
                if progress is not None:
                    progress.update(1)
                if step % cfg.logging.log_every == 0:
                    flush()
                if cfg.logging.eval_every and step % cfg.logging.eval_every == 0:
                    flush()
                    eval_loss = evaluate(trainer, state["params"], cfg, mesh)
                    eval_losses[step] = eval_loss
                    writer.write(step, {"eval_loss": eval_loss, "eval_perplexity": math.exp(min(eval_loss, 50.0))})
                if step % cfg.checkpoint.every_steps == 0 or step == cfg.steps:
                    save(step, force=step == cfg.steps)
                if preemption.raised or checkpointer.reached_preemption(step):
                    if step % cfg.checkpoint.every_steps and step != cfg.steps:
                        save(step, force=True)
                    preempted = True
                    print(f"memzoo: preemption signal received; saved step {step} and stopped", file=sys.stderr)
                    break
            flush()
    finally:
        checkpointer.close()
        writer.close()
        if progress is not None:
            progress.close()
    return TrainResult(
        steps_done=last_good_step,
        losses=losses,
        eval_losses=eval_losses,
        tokens_per_second=throughput,
        preempted=preempted,
    )


def _progress_bar(cfg: TrainConfig, start_step: int):
    if not cfg.logging.progress_bar or jax.process_index() != 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.steps, initial=start_step, desc=cfg.name, unit="step", dynamic_ncols=True)


def unigram_entropy(batches) -> float:
    """Entropy (nats/token) of the targets' unigram distribution: the loss a context-free model reaches."""
    counts: dict[int, int] = {}
    for batch in batches:
        values, numbers = np.unique(batch["targets"][batch["mask"] > 0], return_counts=True)
        for value, number in zip(values.tolist(), numbers.tolist()):
            counts[value] = counts.get(value, 0) + number
    total = sum(counts.values())
    probabilities = np.array(list(counts.values()), dtype=np.float64) / max(total, 1)
    return float(-(probabilities * np.log(probabilities)).sum())
