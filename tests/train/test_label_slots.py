"""The loss at labelled positions only: the same loss and gradients as the full head, and plugin sources."""

import pathlib
import re

import jax
import numpy as np
import pytest
from flax import nnx

from arch import ModelConfig, build_model
from train import data
from train.config import DataConfig
from train.plugins import load_plugins
from train.step import ModelSpec, batch_loss


@pytest.fixture(scope="module")
def spec_and_params():
    model = build_model(ModelConfig(vocab_size=97, d_model=16, n_layers=2, n_heads=2, max_seq_len=32), seed=2)
    graphdef, params = nnx.split(model, nnx.Param)
    return ModelSpec(graphdef, params), nnx.to_pure_dict(params)


def sparse_batch(labels_per_row):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 97, size=(3, 20)).astype(np.int32)
    mask = np.zeros((3, 20), np.float32)
    for row, count in enumerate(labels_per_row):
        mask[row, rng.choice(20, size=count, replace=False)] = 1.0
    return {"inputs": tokens, "targets": np.roll(tokens, -1, axis=1), "mask": mask}


def test_gathered_loss_and_gradients_equal_the_full_head(spec_and_params):
    spec, params = spec_and_params
    batch = sparse_batch([4, 2, 0])  # rows with fewer labels than slots, and one with none

    def loss(params, slots):
        return batch_loss(spec, params, batch, label_slots=slots)

    value_and_grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (full, full_count), full_grads = value_and_grad(params, 0)
    (gathered, count), grads = value_and_grad(params, 4)
    assert float(count) == float(full_count) == 6.0
    np.testing.assert_allclose(gathered, full, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7, rtol=1e-5), grads, full_grads)


def test_examples_with_more_labels_than_the_source_declares_are_refused():
    cfg = DataConfig(source="mqar", seq_len=24, batch_size=2, task={"vocab_size": 32, "num_kv_pairs": 3})
    assert data.labels_per_example(cfg) == 3
    assert data.labels_per_example(DataConfig()) is None  # text: every position is scored
    example = data.split_dataset(cfg, "train")[0]
    example["mask"][:5] = 1.0
    with pytest.raises(ValueError, match="declares at most 3 per example"):
        data._checked_example(example, source="mqar", length=24, max_labels=3)


def test_plugins_register_the_eval_tasks_without_train_importing_eval():
    assert "eval.plugin" in [module.__name__ for module in load_plugins()]
    assert {"mqar", "passkey", "niah"} <= set(data.SOURCES)
    train_dir = pathlib.Path(data.__file__).parent
    for path in train_dir.glob("*.py"):
        assert not re.search(r"^\s*(from|import) eval\b", path.read_text(), re.MULTILINE), path
