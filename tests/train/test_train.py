"""The training loop: loss falls, exact resume, preemption, non-finite loss, and sharded steps."""

import json
import os
import signal

import jax
import numpy as np
import pytest

from arch.config import ModelConfig
from train import data as data_lib
from train import loop
from train import sharding as shd
from train.config import (
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    MeshConfig,
    OptimizerConfig,
    TrainConfig,
)
from train.loop import NonFiniteLossError, unigram_entropy
from train.step import make_trainer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small, learnable text corpus: repetitive code-like lines with some variety."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "return", "value", "index", "count"]
    for i in range(24):
        lines = [f"def {rng.choice(words)}_{j}(x):\n    return x + {j % 7}\n" for j in range(60)]
        (root / f"doc{i:02d}.txt").write_text("".join(lines))
    return str(root / "*.txt")


def small_config(corpus, **changes) -> TrainConfig:
    cfg = TrainConfig(
        name="test",
        model=ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=2, max_seq_len=64),
        data=DataConfig(paths=corpus, seq_len=32, batch_size=8, eval_batches=2, eval_fraction=0.1, prefetch=0),
        optimizer=OptimizerConfig(lr=1e-2, warmup_steps=5),
        mesh=MeshConfig(data=1),
        checkpoint=CheckpointConfig(every_steps=5, keep=3, async_save=False),
        logging=LoggingConfig(log_every=5, eval_every=10, progress_bar=False, tensorboard=True),
        steps=20,
    )
    return cfg.replace(**changes)


def train(cfg, workdir, **kwargs):
    """The loop on the first CPU device: the loop tests need no mesh."""
    return loop.train(cfg, workdir, devices=jax.local_devices()[:1], **kwargs)


def test_short_run_loss_falls_below_unigram_entropy(corpus, tmp_path):
    cfg = small_config(corpus, steps=60, logging=LoggingConfig(log_every=5, eval_every=30, progress_bar=False))
    result = train(cfg, tmp_path / "run")
    entropy = unigram_entropy(data_lib.eval_batches(cfg.data))
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert losses[0] > entropy
    assert np.mean(losses[-5:]) < 0.7 * entropy, (losses[-5:], entropy)
    assert result.eval_losses[60] < entropy
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_loss" in line for line in lines) and any("tokens_per_s" in line for line in lines)
    assert list((tmp_path / "run" / "tensorboard").iterdir()), "TensorBoard events are written"


class _StepHook:
    """Wraps the jitted train step to act at a given step: send SIGTERM or poison the loss."""

    def __init__(self, monkeypatch, at_step, action):
        real = make_trainer

        def patched(cfg, mesh):
            trainer = real(cfg, mesh)
            inner = trainer.train_step

            def step(state, batch):
                state, metrics = inner(state, batch)
                if int(state["step"]) == at_step:
                    if action == "sigterm":
                        os.kill(os.getpid(), signal.SIGTERM)
                    else:
                        metrics = {**metrics, "loss": metrics["loss"] * float("nan")}
                return state, metrics

            trainer.train_step = step
            return trainer

        monkeypatch.setattr(loop, "make_trainer", patched)


def test_sigterm_checkpoints_and_resume_matches_an_uninterrupted_run_bit_for_bit(corpus, tmp_path, monkeypatch):
    cfg = small_config(corpus)
    reference = train(cfg, tmp_path / "straight")

    with monkeypatch.context() as patch:
        _StepHook(patch, at_step=7, action="sigterm")
        first = train(cfg, tmp_path / "interrupted")
    assert first.preempted and first.steps_done == 7
    steps_saved = sorted(int(p.name) for p in (tmp_path / "interrupted" / "checkpoints").iterdir() if p.name.isdigit())
    assert 7 in steps_saved

    second = train(cfg, tmp_path / "interrupted", resume=True)
    assert min(second.losses) == 8 and second.steps_done == 20
    for step in range(8, 21):
        assert second.losses[step] == reference.losses[step], f"step {step} differs after resume"


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(corpus, tmp_path, monkeypatch):
    _StepHook(monkeypatch, at_step=8, action="nan")
    with pytest.raises(NonFiniteLossError, match="step 8") as error:
        train(small_config(corpus), tmp_path / "run")
    assert "step 5" in str(error.value)
    saved = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [5]


def test_existing_checkpoints_are_not_overwritten_without_resume(corpus, tmp_path):
    cfg = small_config(corpus, steps=5)
    train(cfg, tmp_path / "run")
    with pytest.raises(Exception, match="--resume"):
        train(cfg, tmp_path / "run")


def test_resume_refuses_a_changed_model(corpus, tmp_path):
    cfg = small_config(corpus, steps=5)
    train(cfg, tmp_path / "run")
    changed = cfg.replace(model=cfg.model.replace(d_model=64))
    with pytest.raises(Exception, match="model"):
        train(changed, tmp_path / "run", resume=True)


@pytest.mark.parametrize("mesh_cfg", [MeshConfig(data=2, fsdp=4), MeshConfig(data=2, tensor=4)], ids=["data-fsdp", "data-tensor"])
def test_sharded_step_equals_single_device_step(corpus, mesh_cfg):
    devices = jax.local_devices()
    assert len(devices) == 8, "tests/conftest.py provides 8 CPU devices"
    cfg = small_config(corpus, model=ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=4, max_seq_len=64))
    batches = []
    iterator = data_lib.train_iterator(cfg.data)
    for _ in range(3):
        batches.append(next(iterator))

    def run(mesh):
        with jax.set_mesh(mesh):
            trainer = make_trainer(cfg, mesh)
            state = trainer.init_state()
            losses = []
            for batch in batches:
                state, metrics = trainer.train_step(state, shd.global_batch(batch, mesh))
                losses.append(float(metrics["loss"]))
            return losses, state

    single_losses, _ = run(shd.make_mesh(MeshConfig(data=1), devices[:1]))
    sharded_losses, state = run(shd.make_mesh(mesh_cfg, devices))
    np.testing.assert_allclose(sharded_losses, single_losses, rtol=2e-5)
    # The parameters really are spread over the mesh, not replicated.
    kernel = state["params"]["blocks"][0]["mlp"]["gate"]["kernel"]
    assert not kernel.sharding.is_fully_replicated


def test_sharded_step_runs_pallas_kernels_per_shard(corpus):
    """Under the training mesh the Pallas attention runs per shard (batch over data×fsdp,
    heads over tensor) and the step's loss equals the single-device one."""
    devices = jax.local_devices()
    model = ModelConfig(
        vocab_size=256, d_model=32, n_layers=1, n_heads=2, max_seq_len=64,
        mixer_options={"attention": {"implementation": "pallas"}},
    )
    cfg = small_config(corpus, model=model)
    batch = next(data_lib.train_iterator(cfg.data))

    def first_loss(mesh, per_shard):
        with shd.use_mesh(mesh):
            trainer = make_trainer(cfg, mesh)
            step = jax.jit(trainer.train_step)
            global_batch = shd.global_batch(batch, mesh)
            state = trainer.init_state()
            assert ("shard_map" in str(jax.make_jaxpr(trainer.train_step)(state, global_batch))) == per_shard
            _, metrics = step(state, global_batch)
            return float(metrics["loss"])

    single = first_loss(shd.make_mesh(MeshConfig(data=1), devices[:1]), per_shard=False)
    sharded = first_loss(shd.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), devices), per_shard=True)
    np.testing.assert_allclose(sharded, single, rtol=2e-5)
