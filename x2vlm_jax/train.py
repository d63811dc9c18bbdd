"""Training (pre-training and fine-tuning): the train state, the jitted train step and the loop.

The train step is a pure function `(state, batches, rng) -> (state, metrics)` where `batches` maps
each trained task (`config.train.tasks`, x2vlm_jax/tasks) to a batch of global arrays; the loss is
the sum over tasks of weight x (the task's loss terms, each times `config.train.loss_weights`).
The reference pre-training sums an image-text and a region batch per step. It is jitted once with
explicit shardings over the ('data', 'fsdp', 'tensor') mesh.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from x2vlm_jax import optim, sharding, tasks as tasks_lib
from x2vlm_jax.models import x2vlm

jax.config.update("jax_threefry_partitionable", True)

State = dict  # {'step': int32 [], 'params': tree, 'opt_state': tree, 'skipped': int32 []}
STAT_KEYS = ("num_bad_records", "num_records")  # per-batch record counts, not model inputs


def make_loss_fn(model: x2vlm.X2VLM, config) -> Callable:
  """loss_fn(params, batches, rng) -> (total loss, metrics dict): the weighted sum over tasks."""
  trained = tasks_lib.training_tasks(config)
  weights = tasks_lib.weights(config)
  loss_weights = config.train.loss_weights

  def loss_fn(params, batches: Mapping[str, Mapping[str, jax.Array]], rng: jax.Array):
    total = 0.0
    metrics = {}
    for i, name in enumerate(sorted(batches)):
      sample_rng, dropout_rng = jax.random.split(jax.random.fold_in(rng, i))
      task = trained[name]
      out = model.apply({"params": params}, batches[name], sample_rng,
                        method=lambda m, b, r, t=task: t.loss(m, b, r, deterministic=False,
                                                              config=config),
                        rngs={"dropout": dropout_rng})
      task_loss = sum(loss_weights[term] * value for term, value in out.items())
      total = total + weights[name] * task_loss
      metrics.update({f"{name}/{term}": value for term, value in out.items()})
      metrics[f"{name}/loss"] = task_loss
    metrics["loss"] = total
    return total, metrics

  return loss_fn


def make_train_step(model: x2vlm.X2VLM, tx: optax.GradientTransformation, config,
                    schedule: Callable | None = None) -> Callable:
  """The pure train step. Non-finite losses or gradients skip the update (counted in state)."""
  loss_fn = make_loss_fn(model, config)

  def train_step(state: State, batches, rng):
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batches, rng)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update(params, opt_state):
      updates, new_opt_state = tx.update(grads, opt_state, params)
      new_params = optax.apply_updates(params, updates)
      # The reference clamps the temperature in place before every step.
      return dict(new_params, temp=jnp.clip(new_params["temp"], 0.001, 0.5)), new_opt_state

    # A conditional, not a select: the skipped branch costs nothing when the step is finite.
    new_params, new_opt_state = jax.lax.cond(finite, update, lambda p, o: (p, o),
                                             state["params"], state["opt_state"])
    new_state = dict(step=state["step"] + 1, params=new_params, opt_state=new_opt_state,
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
  tasks: dict  # {name: Task} of the trained tasks, sorted by name

  @classmethod
  def create(cls, config, mesh: jax.sharding.Mesh | None = None) -> "Trainer":
    mesh = mesh or sharding.make_mesh(config.mesh)
    rules = sharding.logical_rules(config)
    model = tasks_lib.build_model(config)
    boxed = x2vlm.abstract_variables(model)["params"]
    optim_cfg = dict(config.optim, new_param_patterns=tasks_lib.new_param_patterns(config))
    tx, schedule = optim.make_optimizer(optim_cfg, boxed, total_steps=config.train.total_steps)
    boxed_state = jax.eval_shape(lambda p: dict(step=jnp.zeros((), jnp.int32), params=p,
                                                opt_state=tx.init(p),
                                                skipped=jnp.zeros((), jnp.int32)), boxed)
    abstract_state = sharding.abstract_with_shardings(boxed_state, mesh, rules)
    return cls(config, mesh, model, tx, schedule, rules, abstract_state,
               tasks_lib.training_tasks(config))

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
  def _jitted_step(self):
    step = make_train_step(self.model, self.tx, self.config, self.schedule)
    batch_sh = sharding.batch_sharding(self.mesh)
    repl = sharding.replicated(self.mesh)
    return jax.jit(step, in_shardings=(self.state_shardings, batch_sh, repl),
                   out_shardings=(self.state_shardings, repl), donate_argnums=(0,))

  @functools.cached_property
  def train_step(self) -> Callable:
    """Jitted step: (state, batches, rng) -> (state, metrics); the state buffer is donated."""
    def run(state, batches, rng):
      with self.mesh, nn.logical_axis_rules(self.rules):
        return self._jitted_step(state, batches, rng)

    return run

  def compile_train_step(self, batches) -> jax.stages.Compiled:
    """The train step compiled ahead of time for `batches` (global arrays or ShapeDtypeStructs)
    and the abstract state: its `memory_analysis()`, `cost_analysis()` and HLO text."""
    with self.mesh, nn.logical_axis_rules(self.rules):
      return self._jitted_step.lower(self.abstract_state, batches,
                                     jax.random.PRNGKey(0)).compile()

  def global_batches(self, local_batches: Mapping[str, Mapping[str, np.ndarray]]):
    """Per-process numpy batches -> global sharded arrays (record counts removed; batch-local
    indices made unique across processes by each task's `to_global`)."""
    process = jax.process_index()
    return {name: sharding.make_global_batch(self.tasks[name].to_global(
        {k: v for k, v in batch.items() if k not in STAT_KEYS}, process), self.mesh)
        for name, batch in local_batches.items()}

  def make_data_iterators(self) -> dict[str, Any]:
    """One grain iterator per trained task, sharded by process."""
    shard = dict(shard_index=jax.process_index(), shard_count=jax.process_count())
    return {name: task.make_iterator(self.config, seed=self.config.data.seed, **shard)
            for name, task in self.tasks.items()}

  def restore_or_init(self, checkpointer, iterators) -> State:
    """Resume from the latest checkpoint in the workdir, else start from `config.init.checkpoint`
    (a converted release, params dir or training workdir: `models/loading.py`), else from
    scratch."""
    from x2vlm_jax.models import loading

    latest = checkpointer.latest_step()
    if latest is not None:
      logging.info("Resuming from step %d (%s)", latest, checkpointer.directory)
      return checkpointer.restore(latest, self.abstract_state, iterators)
    init, seed = self.config.init, self.config.train.seed
    params = None
    if init.checkpoint:
      params, _ = loading.load_params(
          self.model, init.checkpoint, allow_missing=tasks_lib.allow_missing(self.config),
          ignore_unexpected=tuple(init.ignore_unexpected), seed=seed)
    return self.init_state(seed, params)


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
  return {k: float(np.asarray(v)) for k, v in jax.device_get(dict(metrics)).items()}


def train_and_evaluate(config, workdir: str) -> dict[str, float]:
  """Train with `config` in `workdir` (resuming if it holds checkpoints); run every evaluator of
  `config.evals` after the last step (writing its files) and every `every_steps` steps.

  Returns the final evaluation metrics (empty if no evaluation is configured or the run stopped
  early: preemption or `config.train.max_steps_per_run`).
  """
  from x2vlm_jax import checkpoint, metrics as metrics_lib, saved_config, train_guards
  from x2vlm_jax.evaluate import common as eval_common

  config = saved_config.with_checkpoint_tokenizer(config, config.init.checkpoint)
  tcfg = config.train
  tasks_lib.validate(config, training=True)  # everything that can fail before compiling
  trainer = Trainer.create(config)
  is_chief = jax.process_index() == 0
  writer = metrics_lib.MetricWriter(workdir, is_chief=is_chief)
  writer.write_hparams(config.to_dict())  # config.json
  if is_chief:  # the workdir describes itself: config.json + tokenizer, answer lists
    saved_config.save_assets(workdir, config)
  logging.info("Model: %s parameters", f"{x2vlm.count_params(trainer.abstract_state['params']):,}")
  logging.info("%s", sharding.describe_memory(trainer.abstract_state["params"],
                                              trainer.abstract_state["opt_state"], trainer.mesh))
  iterators = trainer.make_data_iterators()
  evaluators = tasks_lib.make_evaluators(config, trainer.model, trainer.mesh)
  checkpointer = checkpoint.Checkpointer(
      f"{workdir}/checkpoints", keep=tcfg.keep_checkpoints, every_steps=tcfg.checkpoint_every_steps,
      async_save=tcfg.async_checkpoints, data_names=tuple(iterators))
  state = trainer.restore_or_init(checkpointer, iterators)
  start = int(jax.device_get(state["step"]))
  writer.forget_after(start)  # a resumed run logs the steps after its checkpoint again
  examples_per_step = sum(t.texts_per_batch(config)
                          for t in trainer.tasks.values()) * jax.process_count()
  reporter = metrics_lib.ProgressReporter(tcfg.total_steps, examples_per_step,
                                          tcfg.log_every_steps, start_step=start)
  base_rng = jax.random.PRNGKey(tcfg.seed)
  nonfinite = train_guards.NonFiniteMonitor(tcfg.halt_after_nonfinite_steps, workdir)
  bad_records = 0  # for the log only; the budget that aborts is the pipeline's

  def stop_early(step: int, why: str) -> dict:
    checkpointer.save(step, state, iterators, force=True)
    checkpointer.wait()
    checkpointer.close()
    writer.close()
    logging.info("Stopped at step %d (%s); checkpoint saved. Rerun the same command to resume.",
                 step, why)
    return {}

  step = start
  with train_guards.Preemption() as preemption:
    while step < tcfg.total_steps:
      local = {name: next(it) for name, it in iterators.items()}
      bad_records += sum(int(b.get("num_bad_records", 0)) for b in local.values())
      # The first call compiles: the speed and ETA leave it out.
      with reporter.paused() if step == start else contextlib.nullcontext():
        state, step_metrics = trainer.train_step(state, trainer.global_batches(local),
                                                 jax.random.fold_in(base_rng, step))
      step += 1
      try:
        nonfinite.push(step, step_metrics["nonfinite"], local)
        if step == tcfg.total_steps:
          nonfinite.flush()
      except train_guards.NonFiniteError:
        stop_early(step, "non-finite steps")
        raise
      if step % tcfg.log_every_steps == 0 or step == tcfg.total_steps:
        scalars = _scalars(step_metrics)
        scalars.update({"data/bad_records": bad_records,
                        "skipped_updates": int(jax.device_get(state["skipped"]))})
        writer.write_scalars(step, scalars)
        shown = ["loss"] + sorted(k for k in scalars if k.endswith("/loss")) + ["lr"]
        reporter(step, {k: scalars[k] for k in shown if k in scalars})
      if step < tcfg.total_steps and preemption.should_stop(step):
        return stop_early(step, "preempted")
      with reporter.paused():
        checkpointer.save(step, state, iterators, force=step == tcfg.total_steps)
        due = {name: e for name, e in evaluators.items()
               if e.cfg.every_steps > 0 and step % e.cfg.every_steps == 0}
        if due and step < tcfg.total_steps:  # the last step's evaluation follows the loop
          results = eval_common.run_all(due, state["params"], step)
          if results:
            writer.write_scalars(step, results)
      if (tcfg.max_steps_per_run and step - start >= tcfg.max_steps_per_run
          and step < tcfg.total_steps):
        return stop_early(step, "config.train.max_steps_per_run")
  checkpointer.wait()
  checkpointer.close()
  results = eval_common.run_all(evaluators, state["params"], step,
                                predictions_dir=workdir if is_chief else None)
  if results:
    writer.write_scalars(step, results)
  writer.close()
  return results
