"""`memzoo eval`: train a tiny model on needles, score its checkpoint over lengths and depths; the
streaming decode that scoring relies on; the grid's argument parsing."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arch import ModelConfig, build_model
from arch.config import ConfigError
from eval import needles
from train.cli import main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny attention model trained for two steps on the niah-tiny preset (word-level needles)."""
    workdir = tmp_path_factory.mktemp("niah") / "run"
    trained = main([
        "train", "--config", "niah-tiny", "--workdir", str(workdir), "--set", "steps=2", "--set", "model.d_model=16",
        "--set", "data.seq_len=96", "--set", "data.batch_size=8", "--set", "data.eval_batches=1",
        "--set", "logging.progress_bar=false", "--set", "logging.tensorboard=false",
    ])
    assert trained == 0
    return workdir


def test_train_on_needles_then_eval_the_checkpoint_end_to_end(checkpoint, tmp_path):
    out = tmp_path / "eval"
    evaluated = main([
        "eval", "niah", "--checkpoint", str(checkpoint), "--lengths", "80,160", "--depths", "0:1:3",
        "--samples", "2", "--chunk", "16", "--out", str(out),
    ])
    assert evaluated == 0
    results = json.loads((out / "results.json").read_text())
    assert results["lengths"] == [80, 160] and results["depths"] == [0.0, 0.5, 1.0]
    assert np.shape(results["accuracy"]) == (2, 3)
    assert all(0.0 <= value <= 1.0 for row in results["accuracy"] for value in row)
    assert results["options"]["vocabulary"] == "words" and results["trained_seq_len"] == 96
    # Attention keeps a KV cache for the prompt and the answer: 2 layers, keys and values, float32.
    assert results["state_bytes"]["160"] == 2 * 2 * (160 + 6) * 16 * 4
    assert results["state_bytes"]["80"] == 2 * 2 * (80 + 6) * 16 * 4
    assert (out / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 160 |" in (out / "summary.md").read_text()


def test_streamed_greedy_answers_do_not_depend_on_the_chunk_and_start_at_the_parallel_argmax():
    cfg = ModelConfig(
        vocab_size=41, d_model=16, n_layers=2, n_heads=2, layers=("base_conv", "attention"), max_seq_len=64
    )
    model = build_model(cfg, seed=3)
    prompts = np.asarray(jax.random.randint(jax.random.key(0), (2, 24), 0, 41), np.int32)
    whole = needles.greedy_answers(model, prompts, 3, chunk=24, max_len=32)
    np.testing.assert_array_equal(needles.greedy_answers(model, prompts, 3, chunk=8, max_len=32), whole)
    extended = jnp.asarray(np.concatenate([prompts, whole[:, :2]], axis=1))
    np.testing.assert_array_equal(whole, np.argmax(model(extended)[:, -3:], axis=-1))


def test_lengths_and_depths_parse_and_bad_ones_are_refused():
    assert needles.parse_lengths("1k, 2k,512") == [1024, 2048, 512]
    assert needles.parse_depths("0:1:5") == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert needles.parse_depths("0,0.5") == [0.0, 0.5]
    with pytest.raises(ConfigError, match="--lengths"):
        needles.parse_lengths("1m")
    with pytest.raises(ConfigError, match=r"--depths: depths are fractions of the context in \[0, 1\]"):
        needles.parse_depths("0:2:3")


def test_a_checkpoint_whose_vocabulary_is_too_small_is_refused(checkpoint):
    from train.checkpoint import load_model

    _, cfg, _ = load_model(checkpoint)
    message = "the bytes vocabulary has 256 tokens, more than the checkpoint's model.vocab_size=192"
    with pytest.raises(ConfigError, match=message):
        needles.task_for_checkpoint("passkey", cfg, {"vocabulary": "bytes"})
    # Another needle task than the one trained on keeps the checkpoint's vocabulary.
    assert needles.task_for_checkpoint("passkey", cfg, {}).vocabulary.name == "words"
