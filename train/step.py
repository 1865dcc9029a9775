"""Train state, optimizer, loss and the jitted train / eval steps.

The train state is a plain dict {"params", "opt_state", "step"} of arrays, so it
checkpoints with orbax as it is and shards with one pytree of NamedShardings.
The model is rebuilt inside the step from its graph definition and the params.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from arch import build_model
from arch.config import ModelConfig
from train import data as data_lib
from train import sharding as shd
from train.config import OptimizerConfig, TrainConfig

TrainState = dict[str, Any]


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then cosine decay to `min_lr_ratio * lr` at `total_steps`."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=cfg.lr * cfg.min_lr_ratio,
    )


def _decay_mask(params):
    # Weight decay on matrices only: norms' scales and biases are left alone.
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    adamw = optax.adamw(
        learning_rate_schedule(cfg, total_steps),
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=_decay_mask,
    )
    if cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)
    return adamw


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What is needed to rebuild the model from params: its graph and the params' abstract shapes."""

    graphdef: Any
    abstract_params: nnx.State

    def bind(self, params: dict) -> Any:
        return nnx.merge(self.graphdef, nnx.State(params))


def model_spec(cfg: ModelConfig, seed: int = 0) -> ModelSpec:
    # jax.eval_shape rather than nnx.eval_shape: the latter would turn the logical
    # axis names into mesh shardings when called under a mesh; train.sharding owns that mapping.
    graphdefs = []

    def build():
        graphdef, params = nnx.split(build_model(cfg, seed), nnx.Param)
        graphdefs.append(graphdef)
        return params

    abstract_params = jax.eval_shape(build)
    return ModelSpec(graphdefs[0], abstract_params)


def masked_cross_entropy(logits_BTV, targets_BT, mask_BT):
    """Mean float32 cross-entropy over the positions where mask is 1; also returns the mask's sum."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32), targets_BT)
    mask = mask_BT.astype(jnp.float32)
    count = jnp.sum(mask)
    return jnp.sum(ce * mask) / jnp.maximum(count, 1.0), count


def labelled_logits(model, batch: dict, label_slots: int = 0, remat: str = "none"):
    """(logits [B, N, V], targets [B, N], mask [B, N]): every position (N = T) when label_slots is 0, else
    only the label_slots highest-mask positions of each row (N = label_slots).

    Tasks that score a few positions per example (recall queries) then pay for the vocabulary
    head only there. A row with fewer labels fills its spare slots with mask-0 positions,
    which add nothing to the loss, so both forms give the same loss.
    """
    hidden = model.hidden(batch["inputs"], segment_ids=batch.get("segment_ids"), remat=remat)
    targets, mask = batch["targets"], batch["mask"]
    if label_slots:
        _, positions = jax.lax.top_k(mask, label_slots)
        hidden = jnp.take_along_axis(hidden, positions[..., None], axis=1)
        targets = jnp.take_along_axis(targets, positions, axis=1)
        mask = jnp.take_along_axis(mask, positions, axis=1)
    return model.logits(hidden), targets, mask


def batch_loss(spec: ModelSpec, params: dict, batch: dict, remat: str = "none", label_slots: int = 0):
    logits, targets, mask = labelled_logits(spec.bind(params), batch, label_slots, remat)
    return masked_cross_entropy(logits, targets, mask)


@dataclasses.dataclass
class Trainer:
    """The jitted steps of one run, with the shardings they were compiled for."""

    spec: ModelSpec
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    state_shardings: dict
    mesh: jax.sharding.Mesh
    train_step: Callable
    eval_step: Callable
    init_state: Callable[[], TrainState]


def make_trainer(cfg: TrainConfig, mesh: jax.sharding.Mesh) -> Trainer:
    spec = model_spec(cfg.model, cfg.seed)
    label_slots = data_lib.labels_per_example(cfg.data) or 0
    optimizer = make_optimizer(cfg.optimizer, cfg.steps)
    schedule = learning_rate_schedule(cfg.optimizer, cfg.steps)
    params_sharding = shd.param_shardings(spec.abstract_params, mesh)
    abstract_params = nnx.to_pure_dict(spec.abstract_params)
    abstract_opt_state = jax.eval_shape(optimizer.init, abstract_params)
    # Optimizer moments mirror the params' sharding; scalars (counts) are replicated.
    opt_shardings = _opt_state_shardings(abstract_opt_state, abstract_params, params_sharding, mesh)
    state_shardings = {"params": params_sharding, "opt_state": opt_shardings, "step": shd.replicated(mesh)}
    batch_sharding = shd.batch_sharding(mesh)

    def init_state() -> TrainState:
        def init():
            params = nnx.to_pure_dict(nnx.state(build_model(cfg.model, cfg.seed), nnx.Param))
            return {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}

        return jax.jit(init, out_shardings=state_shardings)()

    def train_step(state: TrainState, batch: dict):
        def loss_fn(params):
            return batch_loss(spec, params, batch, cfg.remat, label_slots)

        (loss, tokens), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {
            "loss": loss,
            "tokens": tokens,
            "grad_norm": optax.global_norm(grads),
            "lr": schedule(state["step"]),
        }
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    def eval_step(params: dict, batch: dict):
        loss, tokens = batch_loss(spec, params, batch, label_slots=label_slots)
        return {"loss_sum": loss * tokens, "tokens": tokens}

    return Trainer(
        spec=spec,
        optimizer=optimizer,
        schedule=schedule,
        state_shardings=state_shardings,
        mesh=mesh,
        train_step=jax.jit(
            train_step,
            in_shardings=(state_shardings, batch_sharding),
            out_shardings=(state_shardings, shd.replicated(mesh)),
            donate_argnums=0,
        ),
        eval_step=jax.jit(
            eval_step,
            in_shardings=(params_sharding, batch_sharding),
            out_shardings=shd.replicated(mesh),
        ),
        init_state=init_state,
    )


def _opt_state_shardings(abstract_opt_state, abstract_params, params_sharding, mesh):
    """Shard every optimizer leaf shaped like the params as the params are; replicate the rest."""
    params_treedef = jax.tree.structure(abstract_params)

    def is_params_like(node):
        return jax.tree.structure(node) == params_treedef if not isinstance(node, jax.ShapeDtypeStruct) else False

    def shard(node):
        if is_params_like(node):
            return params_sharding
        return shd.replicated(mesh)

    return jax.tree.map(shard, abstract_opt_state, is_leaf=lambda n: is_params_like(n) or isinstance(n, jax.ShapeDtypeStruct))
