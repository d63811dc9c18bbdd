"""What `main.py`'s modes do, kept importable (and testable) apart from absl flag parsing."""
from __future__ import annotations

import logging

import jax


def train(config, workdir: str) -> dict:
  """`--mode train`: train (or resume) in `workdir`, then evaluate."""
  from x2vlm_jax import train as train_lib

  return train_lib.train_and_evaluate(config, workdir)


def load_for_eval(config, checkpoint: str):
  """(model, params, step) of `checkpoint` (a training workdir, its latest checkpoint, or a params
  dir), checked against the config's model as an init checkpoint is (names and shapes;
  `config.init.ignore_unexpected` applies and relative-position tables are interpolated to
  `config.model.image_res`). No optimizer is built."""
  from x2vlm_jax import tasks
  from x2vlm_jax.models import loading

  model = tasks.build_model(config)
  params, step = loading.load_params(model, checkpoint,
                                     ignore_unexpected=tuple(config.init.ignore_unexpected),
                                     seed=config.train.seed)
  logging.info("Evaluating %s (step %d)", checkpoint, step)
  return model, params, step


def place_params(config, model, params, mesh):
  """Host params -> the device shardings training gives them on `mesh` (FSDP / tensor axes by
  the config's logical-axis rules): evaluation never holds a full copy per device it need not."""
  from x2vlm_jax import sharding
  from x2vlm_jax.models import x2vlm

  abstract = sharding.abstract_with_shardings(x2vlm.abstract_variables(model)["params"], mesh,
                                              sharding.logical_rules(config))
  return jax.device_put(params, sharding.tree_shardings(abstract))


def evaluate(config, workdir: str, checkpoint: str | None = None) -> dict:
  """`--mode eval`: every evaluator of `config.evals` on `checkpoint` (default: `workdir`'s latest
  checkpoint), with the tokenizer and answer lists the checkpoint carries (saved_config.py);
  metrics to `workdir/metrics.jsonl` (at the checkpoint's step) and stdout, prediction files to
  `workdir`."""
  from x2vlm_jax import errors, metrics as metrics_lib, saved_config, sharding, tasks
  from x2vlm_jax.evaluate import common

  home = saved_config.checkpoint_home(checkpoint or workdir)
  if home is not None:  # the tokenizer and answer lists the checkpoint was trained with
    config = saved_config.use_assets(config, home)
  tasks.validate(config, training=False)
  if not config.evals:
    raise errors.InputError("config.evals is empty: nothing to evaluate (add evaluators to the "
                            "config: docs/tasks.md)")
  model, params, step = load_for_eval(config, checkpoint or workdir)
  mesh = sharding.make_mesh(config.mesh)
  params = place_params(config, model, params, mesh)
  evaluators = tasks.make_evaluators(config, model, mesh)
  results = common.run_all(evaluators, params, step, predictions_dir=workdir)
  with metrics_lib.MetricWriter(workdir, is_chief=jax.process_index() == 0) as writer:
    writer.write_scalars(step, results)
  for name, value in results.items():
    print(f"{name}: {value:.2f}")
  return results
