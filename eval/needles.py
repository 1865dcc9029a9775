"""`memzoo eval niah|passkey`: score a checkpoint over a grid of context lengths and needle depths.

Each prompt streams through the model's `prefill` in chunks against a decode state
sized for the prompt and answer, so a recurrent model's memory stays flat however long
the context (attention keeps its KV cache, as decoding must). The answer is decoded
greedily with `step` and scored by exact match per asked answer.
"""

from __future__ import annotations

import pathlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from arch.config import ConfigError
from eval import report
from eval.tasks import NEEDLE_TASKS, NeedleTask, score_answer
from eval.tasks.common import example_rng


def parse_lengths(spec: str) -> list[int]:
    """'1k,2k,4k' or '512,1000' -> token counts (k = 1024)."""
    lengths = []
    for item in (part.strip().lower() for part in spec.split(",") if part.strip()):
        try:
            lengths.append(int(float(item[:-1]) * 1024) if item.endswith("k") else int(item))
        except ValueError:
            raise ConfigError(f"--lengths: {item!r} is not a length; use token counts like 512,1k,2k") from None
    if not lengths or min(lengths) < 1:
        raise ConfigError(f"--lengths: expected positive lengths like 1k,2k,4k, got {spec!r}")
    return lengths


def parse_depths(spec: str) -> list[float]:
    """'START:STOP:COUNT' (evenly spaced, both ends included, like numpy.linspace) or '0,0.5,1'."""
    try:
        if ":" in spec:
            start, stop, count = spec.split(":")
            depths = np.linspace(float(start), float(stop), int(count)).tolist()
        else:
            depths = [float(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--depths: expected START:STOP:COUNT like 0:1:11 or a list like 0,0.5,1, got {spec!r}") from None
    if not depths or min(depths) < 0 or max(depths) > 1:
        raise ConfigError(f"--depths: depths are fractions of the context in [0, 1], got {spec!r}")
    return depths


@nnx.jit
def _prefill(model, tokens_BT, state):
    logits, state = model.prefill(tokens_BT, state)
    return logits[:, -1], state


@nnx.jit
def _step(model, token_B, state):
    return model.step(token_B, state)


def greedy_answers(
    model, prompts_BL: np.ndarray, answer_length: int, chunk: int, max_len: int | None = None
) -> np.ndarray:
    """The greedy continuation [B, answer_length] of each prompt, the prompt streamed in chunks.

    The decode state is sized for `max_len` tokens (default: prompt + answer); one size for
    every length of a grid lets the jitted prefill and step compile once.
    """
    batch, length = prompts_BL.shape
    state = model.init_state(batch, max_len or length + answer_length)
    for start in range(0, length, chunk):
        logits, state = _prefill(model, jnp.asarray(prompts_BL[:, start : start + chunk]), state)
    tokens = [jnp.argmax(logits, axis=-1).astype(jnp.int32)]
    for _ in range(answer_length - 1):
        logits, state = _step(model, tokens[-1], state)
        tokens.append(jnp.argmax(logits, axis=-1).astype(jnp.int32))
    return np.asarray(jnp.stack(tokens, axis=1))


def score_grid(
    model,
    task: NeedleTask,
    lengths: Sequence[int],
    depths: Sequence[float],
    samples: int,
    *,
    chunk: int = 512,
    batch_size: int = 8,
    seed: int = 0,
) -> np.ndarray:
    """Mean score per (length, depth) cell, over `samples` prompts from the task's test seeds."""
    accuracy = np.zeros((len(lengths), len(depths)))
    for row, length in enumerate(lengths):
        for column, depth in enumerate(depths):
            cell = [
                task.sample(example_rng(seed, "test", length, column, index), length, depth) for index in range(samples)
            ]
            scores = []
            for start in range(0, samples, batch_size):
                group = cell[start : start + batch_size]
                prompts = np.stack([sample.prompt for sample in group])
                predicted = greedy_answers(model, prompts, task.answer_length, chunk, max(lengths) + task.answer_length)
                scores += [score_answer(tokens, sample) for tokens, sample in zip(predicted, group)]
            accuracy[row, column] = float(np.mean(scores))
    return accuracy


def task_for_checkpoint(task_name: str, train_cfg, overrides: Mapping[str, Any]) -> NeedleTask:
    """The task with the options the checkpoint trained on (when it trained on this task), then `overrides`."""
    task_class = NEEDLE_TASKS[task_name]
    options = dict(train_cfg.data.task) if train_cfg.data.source == task_name else {}
    if train_cfg.data.source in NEEDLE_TASKS and "vocabulary" in train_cfg.data.task:
        options.setdefault("vocabulary", train_cfg.data.task["vocabulary"])  # another needle task, same tokens
    task = task_class.from_task_options({**options, **overrides})
    if task.vocabulary.name == "bytes" and train_cfg.data.tokenizer != "bytes":
        raise ConfigError(
            f"--set vocabulary: the checkpoint reads {train_cfg.data.tokenizer} tokens, but {task_name} prompts "
            "would be bytes; evaluate a byte-level checkpoint, or one trained on this task"
        )
    if task.vocabulary.vocab_size > train_cfg.model.vocab_size:
        raise ConfigError(
            f"--set vocabulary: the {task.vocabulary.name} vocabulary has {task.vocabulary.vocab_size} tokens, more "
            f"than the checkpoint's model.vocab_size={train_cfg.model.vocab_size}"
        )
    return task


def run(
    task_name: str,
    checkpoint: str,
    *,
    lengths: Sequence[int],
    depths: Sequence[float],
    samples: int,
    out_dir: pathlib.Path,
    overrides: Mapping[str, Any] | None = None,
    chunk: int = 512,
    batch_size: int = 8,
    seed: int = 0,
    step: int | None = None,
) -> dict[str, pathlib.Path]:
    """Score a checkpoint and write results.json, summary.md and heatmap.png into out_dir."""
    from train.checkpoint import load_model

    if samples < 1 or chunk < 1 or batch_size < 1:
        raise ConfigError("--samples, --chunk and --batch-size must be positive")
    model, train_cfg, step = load_model(checkpoint, step)
    task = task_for_checkpoint(task_name, train_cfg, overrides or {})
    for length in lengths:
        task.check_prompt_length(length, "--lengths")
    started = time.perf_counter()
    accuracy = score_grid(model, task, lengths, depths, samples, chunk=chunk, batch_size=batch_size, seed=seed)
    seconds = time.perf_counter() - started

    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    title = f"{task_name} ({train_cfg.name}, step {step})"
    results = {
        "task": task_name,
        "options": task.options.to_dict(),
        "checkpoint": str(checkpoint),
        "step": step,
        "run": train_cfg.name,
        "layers": list(train_cfg.model.layer_mixers),
        "trained_seq_len": train_cfg.data.seq_len,
        "lengths": list(lengths),
        "depths": list(depths),
        "samples": samples,
        "chunk": chunk,
        "seed": seed,
        "accuracy": accuracy.tolist(),
        "mean_accuracy": float(accuracy.mean()),
        "state_bytes": {str(length): model.state_bytes(1, length + task.answer_length) for length in lengths},
        "seconds": seconds,
    }
    rows = [
        [length, report.format_bytes(results["state_bytes"][str(length)]), *accuracy[row], float(accuracy[row].mean())]
        for row, length in enumerate(lengths)
    ]
    summary = (
        f"# {title}\n\n{samples} samples per cell, exact match per answer; mean accuracy "
        f"{results['mean_accuracy']:.3f}. Trained at length {train_cfg.data.seq_len}.\n\n"
        + report.markdown_table(["length", "state", *[f"{depth:.0%}" for depth in depths], "mean"], rows)
    )
    (out_dir / "summary.md").write_text(summary)
    return {
        "json": report.write_json(out_dir / "results.json", results),
        "markdown": out_dir / "summary.md",
        "heatmap": report.plot_heatmap(out_dir / "heatmap.png", accuracy, lengths, depths, title),
    }
