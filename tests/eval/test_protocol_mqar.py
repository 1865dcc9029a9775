"""The MQAR protocol end to end in tiny sizes through `memzoo bench mqar`, and its bookkeeping."""

import csv
import json

import pytest

from arch.config import ConfigError
from eval import protocol_mqar
from train.cli import main

D_MODEL, SEQ_LEN, WINDOW = 16, 32, 16


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    status = main([
        "bench", "mqar", "--mixers", "attention,sliding_window", "--d-model", str(D_MODEL),
        "--seq-len", str(SEQ_LEN), "--kv-pairs", "2", "--lrs", "3e-3", "--vocab-size", "64",
        "--train-examples", "64", "--test-examples", "32", "--batch-size", "32", "--epochs", "2", "--out", str(out),
    ])
    assert status == 0
    return out


def test_bench_writes_the_leaderboard_plot_and_results(bench_dir):
    with open(bench_dir / "leaderboard.csv") as file:
        rows = list(csv.DictReader(file))
    assert sorted(row["mixer"] for row in rows) == ["attention", "sliding_window"]
    assert set(rows[0]) >= {"d_model", "seq_len", "kv_pairs", "state_bytes", "best_lr", "accuracy", f"accuracy@{2 * SEQ_LEN}"}
    for row in rows:
        assert 0.0 <= float(row["accuracy"]) <= 1.0 and 1 <= int(row["epochs"]) <= 2
    markdown = (bench_dir / "leaderboard.md").read_text()
    assert "| attention |" in markdown and "| sliding_window |" in markdown
    assert (bench_dir / "accuracy_vs_state.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((bench_dir / "results.json").read_text())
    assert len(results["runs"]) == 2 and results["planned_runs"] == 2 and results["grid"]["vocab_size"] == 64
    assert "In progress" not in markdown


def test_state_bytes_are_the_mixers_own_at_the_training_length(bench_dir):
    with open(bench_dir / "leaderboard.csv") as file:
        state = {row["mixer"]: int(row["state_bytes"]) for row in csv.DictReader(file)}
    conv = 2 * D_MODEL * 4  # BaseConv: kernel_size - 1 = 2 inputs of width d_model, float32
    assert state["attention"] == conv + 2 * SEQ_LEN * D_MODEL * 4  # keys and values of every token
    assert state["sliding_window"] == conv + 2 * WINDOW * D_MODEL * 4  # only the window's


def test_a_stopped_sweep_keeps_the_runs_it_finished(tmp_path, monkeypatch):
    finished = []

    def train_and_score(grid, point, lr, device):
        if finished:
            raise KeyboardInterrupt  # the sweep is stopped during its second run
        finished.append(lr)
        return {**vars(point), "lr": lr, "accuracy": 0.5, "longer_accuracy": {64: 0.25}, "epochs": 1,
                "diverged": False, "state_bytes": 1024, "seconds": 1.0}

    monkeypatch.setattr(protocol_mqar, "train_and_score", train_and_score)
    grid = protocol_mqar.MqarGrid(mixers=("attention",), d_models=(16,), seq_lens=(32,), kv_pairs=(2,), lrs=(1e-3, 3e-3))
    with pytest.raises(KeyboardInterrupt):
        protocol_mqar.run(grid, tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert [run["lr"] for run in results["runs"]] == [1e-3] and results["planned_runs"] == 2
    assert "In progress: 1 of 2 runs." in (tmp_path / "leaderboard.md").read_text()


def test_the_best_learning_rate_is_chosen_per_point():
    def run(mixer, lr, accuracy):
        return {"mixer": mixer, "d_model": 64, "seq_len": 64, "kv_pairs": 4, "lr": lr, "accuracy": accuracy}

    runs = [run("attention", 1e-3, 0.5), run("attention", 3e-3, 0.99), run("sliding_window", 1e-3, 0.3),
            run("sliding_window", 3e-3, 0.1)]
    best = {result["mixer"]: result["lr"] for result in protocol_mqar.best_runs(runs)}
    assert best == {"attention": 3e-3, "sliding_window": 1e-3}


def test_a_bad_grid_fails_before_training(tmp_path):
    with pytest.raises(ConfigError, match="--kv-pairs: give one value for all sequence lengths or one per length"):
        protocol_mqar.MqarGrid(mixers=("attention",), d_models=(16,), seq_lens=(32, 64), kv_pairs=(2, 4, 8), lrs=(1e-3,))
    grid = protocol_mqar.MqarGrid(
        mixers=("attention", "no_such_mixer"), d_models=(16,), seq_lens=(32,), kv_pairs=(2,), lrs=(1e-3,)
    )
    with pytest.raises(ConfigError, match="unknown mixer 'no_such_mixer'"):
        protocol_mqar.run(grid, tmp_path)
    assert main(["bench", "mqar", "--quick", "--seq-len", "8", "--kv-pairs", "4", "--out", str(tmp_path)]) == 2
