"""`memzoo bench mqar`: the zoology MQAR protocol over mixers, model widths and sequence lengths.

Each (mixer, d_model, seq_len) point is a 2-block model, a BaseConv block then the
mixer's block, with no MLP. It trains on MQAR with AdamW (weight decay 0.1) and a
cosine decay to zero over the run, once per learning rate; after every epoch it is
scored on held-out examples of its own length and stops early at 0.99 accuracy. The
point reports its best accuracy over the learning rates, that run's accuracy on longer
held-out sequences (length generalisation), and the model's decode-state bytes at the
training length. (The --quick grid adds a one-epoch warmup: without it its short
budget leaves attention just short of 0.99.) Training and scoring reuse train.step's trainer and train.data's
pipelines.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import pathlib
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from arch.config import ConfigError, ModelConfig
from eval import report
from train import data as data_lib
from train import sharding as shd
from train.config import DataConfig, MeshConfig, OptimizerConfig, TrainConfig
from train.step import labelled_logits, make_trainer


@dataclasses.dataclass(frozen=True)
class MqarGrid:
    """What `memzoo bench mqar` sweeps and how long each run trains (configs/mqar.py holds presets)."""

    mixers: tuple[str, ...]
    d_models: tuple[int, ...]
    seq_lens: tuple[int, ...]
    kv_pairs: tuple[int, ...]  # one per sequence length, or one for all of them
    lrs: tuple[float, ...]
    vocab_size: int = 8192
    train_examples: int = 20_000
    test_examples: int = 1_000
    batch_size: int = 64
    epochs: int = 32
    warmup_epochs: float = 0.0  # linear warmup before the cosine decay; zoology uses none
    test_length_factors: tuple[int, ...] = (2,)  # held-out lengths, as multiples of the training length
    early_stop_accuracy: float = 0.99
    weight_decay: float = 0.1
    seed: int = 0
    # Per bench name: n_heads and mixer_options for its ModelConfig (absent: one head, default options),
    # and "mixer", the registered mixer, when the name is a variant such as "based-f8".
    mixer_settings: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)

    def mixer_of(self, name: str) -> str:
        """The registered mixer that bench name `name` runs."""
        return self.mixer_settings.get(name, {}).get("mixer", name)

    def __post_init__(self):
        flags = {"mixers": "--mixers", "d_models": "--d-model", "seq_lens": "--seq-len", "kv_pairs": "--kv-pairs", "lrs": "--lrs"}
        for name, flag in flags.items():
            if not getattr(self, name):
                raise ConfigError(f"{flag}: give at least one value")
        if len(self.kv_pairs) not in (1, len(self.seq_lens)):
            raise ConfigError(
                f"--kv-pairs: give one value for all sequence lengths or one per length ({len(self.seq_lens)}), "
                f"got {len(self.kv_pairs)}"
            )
        if self.batch_size > self.test_examples or self.train_examples < self.batch_size:
            raise ConfigError(
                f"--batch-size: {self.batch_size} must not exceed --train-examples ({self.train_examples}) "
                f"or --test-examples ({self.test_examples})"
            )
        if self.epochs < 1 or min(self.test_length_factors, default=1) < 1:
            raise ConfigError("--epochs and --test-length-factors must be >= 1")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ConfigError(f"--warmup-epochs: must lie in [0, --epochs={self.epochs}), got {self.warmup_epochs}")

    def pairs_for(self, seq_len: int) -> int:
        return self.kv_pairs[0] if len(self.kv_pairs) == 1 else self.kv_pairs[self.seq_lens.index(seq_len)]

    @property
    def steps_per_epoch(self) -> int:
        return self.train_examples // self.batch_size


@dataclasses.dataclass(frozen=True)
class MqarPoint:
    mixer: str
    d_model: int
    seq_len: int
    kv_pairs: int


def train_config(grid: MqarGrid, point: MqarPoint, lr: float) -> TrainConfig:
    """The training run of one point at one learning rate."""
    settings = grid.mixer_settings.get(point.mixer, {})
    longest = point.seq_len * max(grid.test_length_factors, default=1)
    return TrainConfig(
        name=f"mqar-{point.mixer}-d{point.d_model}-L{point.seq_len}-lr{lr:g}",
        model=ModelConfig(
            vocab_size=grid.vocab_size,
            d_model=point.d_model,
            n_layers=2,
            n_heads=settings.get("n_heads", 1),
            layers=("base_conv", grid.mixer_of(point.mixer)),
            mlp=False,
            mixer_options=dict(settings.get("mixer_options", {})),
            max_seq_len=longest,
        ),
        data=DataConfig(
            source="mqar",
            seq_len=point.seq_len,
            batch_size=grid.batch_size,
            eval_batches=grid.test_examples // grid.batch_size,
            seed=grid.seed,
            task={
                "vocab_size": grid.vocab_size,
                "num_kv_pairs": point.kv_pairs,
                "num_train_examples": grid.train_examples,
                "num_eval_examples": grid.test_examples,
            },
        ),
        optimizer=OptimizerConfig(
            lr=lr,
            warmup_steps=int(grid.warmup_epochs * grid.steps_per_epoch),
            min_lr_ratio=0.0,
            b2=0.999,
            weight_decay=grid.weight_decay,
            grad_clip=0.0,
        ),
        mesh=MeshConfig(data=1),
        steps=grid.epochs * grid.steps_per_epoch,
        seed=grid.seed,
    )


def _accuracy_step(trainer, label_slots: int):
    def accuracy(params, batch):
        logits, targets, mask = labelled_logits(trainer.spec.bind(params), batch, label_slots)
        correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32) * mask
        return jnp.sum(correct), jnp.sum(mask)

    return jax.jit(accuracy)


def _accuracy(accuracy_step, params, data_cfg: DataConfig, mesh) -> float:
    correct, total = 0.0, 0.0
    for batch in data_lib.eval_batches(data_cfg):
        hits, count = accuracy_step(params, shd.global_batch(batch, mesh))
        correct, total = correct + float(hits), total + float(count)
    return correct / max(total, 1.0)


def train_and_score(grid: MqarGrid, point: MqarPoint, lr: float, device) -> dict[str, Any]:
    """Train one run epoch by epoch until early stop; score it at its length and the longer ones."""
    cfg = train_config(grid, point, lr)
    mesh = shd.make_mesh(cfg.mesh, [device])
    started = time.perf_counter()
    with shd.use_mesh(mesh):
        trainer = make_trainer(cfg, mesh)
        accuracy_step = _accuracy_step(trainer, data_lib.labels_per_example(cfg.data))
        state = trainer.init_state()
        batches = data_lib.train_iterator(cfg.data)
        accuracy, epochs, diverged = 0.0, 0, False
        for epochs in range(1, grid.epochs + 1):
            for _ in range(grid.steps_per_epoch):
                state, metrics = trainer.train_step(state, shd.global_batch(next(batches), mesh))
            if not math.isfinite(float(metrics["loss"])):
                diverged = True
                break
            accuracy = _accuracy(accuracy_step, state["params"], cfg.data, mesh)
            if accuracy >= grid.early_stop_accuracy:
                break
        longer = {
            factor * point.seq_len: 0.0
            if diverged
            else _accuracy(accuracy_step, state["params"], cfg.data.replace(seq_len=factor * point.seq_len), mesh)
            for factor in grid.test_length_factors
        }
        state_bytes = trainer.spec.bind(state["params"]).state_bytes(1, point.seq_len)
    return {
        **dataclasses.asdict(point),
        "lr": lr,
        "accuracy": 0.0 if diverged else accuracy,
        "longer_accuracy": longer,
        "epochs": epochs,
        "diverged": diverged,
        "state_bytes": state_bytes,
        "seconds": time.perf_counter() - started,
    }


def grid_points(grid: MqarGrid) -> list[MqarPoint]:
    return [
        MqarPoint(mixer, d_model, seq_len, grid.pairs_for(seq_len))
        for mixer in grid.mixers
        for seq_len in grid.seq_lens
        for d_model in grid.d_models
    ]


def run(grid: MqarGrid, out_dir: pathlib.Path | None = None, *, log=sys.stderr) -> dict[str, pathlib.Path]:
    """Run the whole grid; write leaderboard.md, leaderboard.csv, accuracy_vs_state.png and results.json."""
    from arch import registry

    for mixer in grid.mixers:
        registry.get_spec(grid.mixer_of(mixer))  # an unknown mixer fails before any training
    points = grid_points(grid)
    for point in points:
        for lr in grid.lrs:
            train_config(grid, point, lr)  # every run's config is valid before the first one trains
    out_dir = pathlib.Path(out_dir or f"runs/bench-mqar-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    out_dir.mkdir(parents=True, exist_ok=True)
    device = jax.devices()[0]
    started = time.perf_counter()
    runs, total = [], len(points) * len(grid.lrs)
    for point in points:
        for lr in grid.lrs:
            result = train_and_score(grid, point, lr, device)
            runs.append(result)
            print(
                f"mqar {point.mixer:<18} d={point.d_model:<4} L={point.seq_len:<5} K={point.kv_pairs:<3} lr={lr:<8.2g} "
                f"accuracy {result['accuracy']:.3f} after {result['epochs']} epochs ({result['seconds']:.0f}s)",
                file=log,
                flush=True,
            )
            # After every run, so a sweep that is stopped keeps what it finished.
            written = write_leaderboard(grid, runs, out_dir, time.perf_counter() - started, planned_runs=total)
    return written


def best_runs(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (mixer, d_model, seq_len, kv_pairs) point, its run with the best accuracy over learning rates."""
    best: dict[tuple, dict[str, Any]] = {}
    for result in runs:
        point = (result["mixer"], result["d_model"], result["seq_len"], result["kv_pairs"])
        if point not in best or result["accuracy"] > best[point]["accuracy"]:
            best[point] = result
    return list(best.values())


def write_leaderboard(
    grid: MqarGrid, runs: Sequence[dict[str, Any]], out_dir: pathlib.Path, seconds: float, *, planned_runs: int
) -> dict[str, pathlib.Path]:
    """The leaderboard of the runs so far (best per point); while fewer than the grid's
    planned_runs are in, the files say so."""
    progress = "" if len(runs) >= planned_runs else f" In progress: {len(runs)} of {planned_runs} runs."
    best = sorted(best_runs(runs), key=lambda r: (r["seq_len"], -r["accuracy"], r["state_bytes"]))
    longer_lengths = sorted({length for r in best for length in r["longer_accuracy"]})
    headers = [
        "mixer", "d_model", "seq_len", "kv_pairs", "state_bytes", "best_lr", "accuracy",
        *[f"accuracy@{length}" for length in longer_lengths], "epochs",
    ]
    rows = [
        [
            r["mixer"], r["d_model"], r["seq_len"], r["kv_pairs"], r["state_bytes"], r["lr"], r["accuracy"],
            *[r["longer_accuracy"].get(length, float("nan")) for length in longer_lengths], r["epochs"],
        ]
        for r in best
    ]
    markdown_rows = [[*row[:4], report.format_bytes(row[4]), f"{row[5]:.2g}", *row[6:]] for row in rows]
    markdown = (
        f"# MQAR leaderboard\n\nvocabulary {grid.vocab_size}, {grid.train_examples} training examples, "
        f"up to {grid.epochs} epochs of batch {grid.batch_size}, learning rates {', '.join(f'{lr:g}' for lr in grid.lrs)}; "
        f"accuracy on {grid.test_examples} held-out examples, best over learning rates; state = decode-state bytes "
        f"per sequence at the training length. {seconds / 60:.1f} minutes.{progress}\n\n"
        + report.markdown_table(headers, markdown_rows)
    )
    (out_dir / "leaderboard.md").write_text(markdown)
    points = [{**r, "longer_accuracy": {str(k): v for k, v in r["longer_accuracy"].items()}} for r in best]
    all_runs = [{**r, "longer_accuracy": {str(k): v for k, v in r["longer_accuracy"].items()}} for r in runs]
    grid_dict = {**dataclasses.asdict(grid), "mixer_settings": {k: dict(v) for k, v in grid.mixer_settings.items()}}
    return {
        "markdown": out_dir / "leaderboard.md",
        "csv": report.write_csv(out_dir / "leaderboard.csv", headers, rows),
        "plot": report.plot_accuracy_against_state(out_dir / "accuracy_vs_state.png", best, "MQAR: accuracy against state size"),
        "json": report.write_json(
            out_dir / "results.json",
            {"grid": grid_dict, "best": points, "runs": all_runs, "planned_runs": planned_runs, "seconds": seconds},
        ),
    }
