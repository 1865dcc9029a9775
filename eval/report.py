"""Benchmark outputs: JSON results, Markdown and CSV tables, and PNG plots (matplotlib, no display)."""

from __future__ import annotations

import csv
import json
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure


def write_json(path: pathlib.Path, data: Any) -> pathlib.Path:
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_csv(path: pathlib.Path, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> pathlib.Path:
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(headers)
        writer.writerows(rows)
    return path


def format_bytes(count: int) -> str:
    units = ("B", "KiB", "MiB", "GiB")
    value, unit = float(count), 0
    while value >= 1024 and unit < len(units) - 1:
        value, unit = value / 1024, unit + 1
    return f"{value:.0f} B" if unit == 0 else f"{value:.1f} {units[unit]}"


def plot_heatmap(
    path: pathlib.Path, accuracy: np.ndarray, lengths: Sequence[int], depths: Sequence[float], title: str
) -> pathlib.Path:
    """Accuracy [len(lengths), len(depths)]: depth across, context length down, green is right."""
    figure = Figure(figsize=(1.0 + 0.6 * len(depths), 1.2 + 0.45 * len(lengths)), layout="constrained")
    axes = figure.subplots()
    image = axes.imshow(np.asarray(accuracy), cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    axes.set_xticks(range(len(depths)), [f"{depth:.0%}" for depth in depths], rotation=45)
    axes.set_yticks(range(len(lengths)), [str(length) for length in lengths])
    axes.set_xlabel("needle depth")
    axes.set_ylabel("context length (tokens)")
    axes.set_title(title)
    for row in range(len(lengths)):
        for column in range(len(depths)):
            axes.text(column, row, f"{accuracy[row][column]:.2f}", ha="center", va="center", fontsize=7)
    figure.colorbar(image, ax=axes, label="accuracy")
    figure.savefig(path, dpi=120)
    return path


def plot_accuracy_against_state(path: pathlib.Path, points: Sequence[dict[str, Any]], title: str) -> pathlib.Path:
    """One panel per sequence length; per mixer, accuracy against decode-state bytes (log scale).

    Each point needs the keys "mixer", "seq_len", "state_bytes" and "accuracy".
    """
    seq_lens = sorted({point["seq_len"] for point in points})
    mixers = sorted({point["mixer"] for point in points})
    figure = Figure(figsize=(4.0 * len(seq_lens), 3.6), layout="constrained")
    panels = np.atleast_1d(figure.subplots(1, len(seq_lens), sharey=True))
    for panel, seq_len in zip(panels, seq_lens):
        for mixer in mixers:
            chosen = sorted(
                (p for p in points if p["mixer"] == mixer and p["seq_len"] == seq_len), key=lambda p: p["state_bytes"]
            )
            if chosen:
                panel.plot(
                    [p["state_bytes"] for p in chosen], [p["accuracy"] for p in chosen], marker="o", label=mixer
                )
        panel.set_xscale("log")
        panel.set_ylim(-0.02, 1.02)
        panel.set_xlabel("decode state (bytes)")
        panel.set_title(f"sequence length {seq_len}")
        panel.grid(alpha=0.3)
    panels[0].set_ylabel("accuracy")
    panels[-1].legend(fontsize=8)
    figure.suptitle(title)
    figure.savefig(path, dpi=120)
    return path
