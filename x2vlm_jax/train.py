"""Pre-training: train state, the jitted train step, and the loop.

The train step is a pure function `(state, batches, rng) -> (state, metrics)` where `batches` maps
a batch kind ('image_text', 'regions') to a batch of global arrays; the kinds present and their loss
weights come from the config (the reference sums an image-text and a region batch per step).
It is jitted once with explicit shardings over the ('data', 'fsdp', 'tensor') mesh.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Any, Callable, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from x2vlm_jax import objectives, optim, sharding
from x2vlm_jax.models import x2vlm

jax.config.update("jax_threefry_partitionable", True)

State = dict  # {'step': int32 [], 'params': tree, 'opt_state': tree, 'skipped': int32 []}

OBJECTIVES: dict[str, Callable] = {
    "image_text": objectives.image_text_objective,
    "regions": objectives.region_objective,
}


def batch_kinds(train_cfg) -> tuple[str, ...]:
  """The batch kinds that make one optimizer step (those with a non-zero loss weight)."""
  weights = {"image_text": train_cfg.image_text_weight, "regions": train_cfg.region_weight}
  kinds = tuple(k for k, w in weights.items() if w > 0)
  if not kinds:
    raise ValueError("config.train: image_text_weight and region_weight are both 0")
  return kinds


def make_loss_fn(model: x2vlm.X2VLM, train_cfg) -> Callable:
  """loss_fn(params, batches, rng) -> (total loss, metrics dict). Weighted sum over batch kinds."""
  weights = {"image_text": train_cfg.image_text_weight, "regions": train_cfg.region_weight}

  def loss_fn(params, batches: Mapping[str, Mapping[str, jax.Array]], rng: jax.Array):
    total = 0.0
    metrics = {}
    for i, kind in enumerate(sorted(batches)):
      itm_rng, dropout_rng = jax.random.split(jax.random.fold_in(rng, i))
      kwargs = dict(deterministic=False, itc_feature_grad_scale=train_cfg.itc_feature_grad_scale)
      if kind == "regions":
        kwargs["dedupe_padded_pairs"] = train_cfg.dedupe_padded_pairs
      out = model.apply({"params": params}, batches[kind], itm_rng, method=OBJECTIVES[kind],
                        rngs={"dropout": dropout_rng}, **kwargs)
      kind_loss = sum(out.values())
      total = total + weights[kind] * kind_loss
      metrics.update({f"{kind}/{name}": value for name, value in out.items()})
      metrics[f"{kind}/loss"] = kind_loss
    metrics["loss"] = total
    return total, metrics

  return loss_fn


def make_train_step(model: x2vlm.X2VLM, tx: optax.GradientTransformation, train_cfg,
                    schedule: Callable | None = None) -> Callable:
  """The pure train step. Non-finite losses or gradients skip the update (counted in state)."""
  loss_fn = make_loss_fn(model, train_cfg)

  def train_step(state: State, batches, rng):
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batches, rng)
    grad_norm = optax.global_norm(grads)
    updates, new_opt_state = tx.update(grads, state["opt_state"], state["params"])
    new_params = optax.apply_updates(state["params"], updates)
    # The reference clamps the temperature in place before every step.
    new_params = dict(new_params, temp=jnp.clip(new_params["temp"], 0.001, 0.5))
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = dict(step=state["step"] + 1,
                     params=keep(new_params, state["params"]),
                     opt_state=keep(new_opt_state, state["opt_state"]),
                     skipped=state["skipped"] + (1 - finite.astype(jnp.int32)))
    metrics = dict(metrics, grad_norm=grad_norm, temp=new_params["temp"],
                   nonfinite=1 - finite.astype(jnp.int32))
    if schedule is not None:
      metrics["lr"] = schedule(state["step"])
    return new_state, metrics

  return train_step


@dataclasses.dataclass
class Trainer:
  """Everything built from a config on a mesh: model, optimizer, shardings, jitted functions."""
  config: Any
  mesh: jax.sharding.Mesh
  model: x2vlm.X2VLM
  tx: optax.GradientTransformation
  schedule: Callable
  rules: tuple
  abstract_state: Any  # ShapeDtypeStructs carrying their shardings
  kinds: tuple[str, ...]

  @classmethod
  def create(cls, config, mesh: jax.sharding.Mesh | None = None) -> "Trainer":
    mesh = mesh or sharding.make_mesh(config.mesh)
    rules = sharding.logical_rules(config)
    model = x2vlm.build_model(config.model)
    boxed = x2vlm.abstract_variables(model)["params"]
    tx, schedule = optim.make_optimizer(config.optim, boxed, total_steps=config.train.total_steps)
    boxed_state = jax.eval_shape(lambda p: dict(step=jnp.zeros((), jnp.int32), params=p,
                                                opt_state=tx.init(p),
                                                skipped=jnp.zeros((), jnp.int32)), boxed)
    abstract_state = sharding.abstract_with_shardings(boxed_state, mesh, rules)
    return cls(config, mesh, model, tx, schedule, rules, abstract_state,
               batch_kinds(config.train))

  @property
  def state_shardings(self):
    return sharding.tree_shardings(self.abstract_state)

  def init_state(self, seed: int, params: Any | None = None) -> State:
    """Fresh state (random init with `seed`, or the given numpy/jax params), placed sharded."""
    model, tx = self.model, self.tx

    def init(rng, given):
      p = given if given is not None else nn.meta.unbox(
          model.init(rng, *x2vlm.init_inputs(model))["params"])
      return dict(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
                  skipped=jnp.zeros((), jnp.int32))

    if params is not None:
      params = jax.device_put(params, self.state_shardings["params"])
    with self.mesh, nn.logical_axis_rules(self.rules):
      return jax.jit(init, out_shardings=self.state_shardings)(jax.random.PRNGKey(seed), params)

  @functools.cached_property
  def train_step(self) -> Callable:
    """Jitted step: (state, batches, rng) -> (state, metrics); the state buffer is donated."""
    step = make_train_step(self.model, self.tx, self.config.train, self.schedule)
    batch_sh = sharding.batch_sharding(self.mesh)
    repl = sharding.replicated(self.mesh)
    jitted = jax.jit(step, in_shardings=(self.state_shardings, batch_sh, repl),
                     out_shardings=(self.state_shardings, repl), donate_argnums=(0,))

    def run(state, batches, rng):
      with self.mesh, nn.logical_axis_rules(self.rules):
        return jitted(state, batches, rng)

    return run

  def global_batches(self, local_batches: Mapping[str, Mapping[str, np.ndarray]]):
    """Per-process numpy batches -> global sharded arrays (batch statistics removed)."""
    return {kind: sharding.make_global_batch(
        {k: v for k, v in batch.items() if k not in STAT_KEYS}, self.mesh)
        for kind, batch in local_batches.items()}


STAT_KEYS = ("num_bad_records", "num_records")
