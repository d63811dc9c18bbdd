"""What `main.py`'s modes do, kept importable (and testable) apart from absl flag parsing."""
from __future__ import annotations

import logging
import os

import jax


def prepare_demo_data(config) -> None:
  """Writes the synthetic demo dataset to `config.demo.data_dir` if set and not there yet."""
  demo = config.demo
  if not demo.data_dir:
    return
  from x2vlm_jax.data import demo as demo_lib

  if demo_lib.is_complete(demo.data_dir):
    return
  logging.info("Writing the demo dataset to %s", demo.data_dir)
  if jax.process_index() == 0:
    demo_lib.make_demo_data(demo.data_dir, num_train=demo.num_train, num_val=demo.num_val,
                            image_size=demo.image_size, seed=demo.seed)


def pretrain(config, workdir: str) -> dict:
  from x2vlm_jax import train

  return train.train_and_evaluate(config, workdir)


def load_eval_params(config, checkpoint: str | None, workdir: str):
  """(model, params, step) for evaluation from a training workdir (its latest checkpoint) or an
  Orbax params dir, checked against `config.model` as an init checkpoint is (names and shapes;
  `config.init.ignore_unexpected` applies and relative-position tables are interpolated to
  `config.model.image_res`)."""
  from x2vlm_jax import train

  directory = checkpoint or config.eval.checkpoint or workdir
  train.check_task_heads(config)
  trainer = train.Trainer.create(config)
  params, step = train.load_init_params(trainer, directory, (), config.train.seed,
                                        tuple(config.init.ignore_unexpected), with_step=True)
  logging.info("Evaluating %s (step %d)", directory, step)
  return trainer.model, params, step


def evaluate(config, workdir: str, checkpoint: str | None = None) -> dict:
  from x2vlm_jax import metrics as metrics_lib
  from x2vlm_jax.evaluate import from_config

  model, params, step = load_eval_params(config, checkpoint, workdir)
  results = from_config.run(config, model, params, predictions_dir=workdir)
  with metrics_lib.MetricWriter(workdir, is_chief=jax.process_index() == 0) as writer:
    writer.write_scalars(step, results)
  for name, value in results.items():
    print(f"{name}: {value:.2f}")
  return results
