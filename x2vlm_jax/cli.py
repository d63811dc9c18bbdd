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

  if os.path.exists(demo_lib.demo_paths(demo.data_dir)["readme"]):
    return
  logging.info("Writing the demo dataset to %s", demo.data_dir)
  if jax.process_index() == 0:
    demo_lib.make_demo_data(demo.data_dir, num_train=demo.num_train, num_val=demo.num_val,
                            image_size=demo.image_size, seed=demo.seed)


def pretrain(config, workdir: str) -> dict:
  from x2vlm_jax import train

  return train.train_and_evaluate(config, workdir)


def load_eval_params(config, checkpoint: str | None, workdir: str):
  """Params for evaluation: a training checkpoint (latest in a workdir) or an Orbax params dir."""
  from x2vlm_jax import checkpoint as ckpt_lib, train

  directory = checkpoint or config.eval.checkpoint or workdir
  ckpt_dir = os.path.join(directory, "checkpoints")
  if os.path.isdir(ckpt_dir):
    trainer = train.Trainer.create(config)
    checkpointer = ckpt_lib.Checkpointer(ckpt_dir)
    step = checkpointer.latest_step()
    if step is None:
      raise FileNotFoundError(f"{ckpt_dir} holds no finished checkpoint")
    logging.info("Evaluating %s step %d", ckpt_dir, step)
    state = checkpointer.restore(step, trainer.abstract_state)
    checkpointer.close()
    return trainer.model, state["params"], step
  from x2vlm_jax.models import x2vlm

  model = x2vlm.build_model(config.model)
  trainer = train.Trainer.create(config)
  params = train.load_init_params(trainer, directory, (), config.train.seed)
  return model, params, 0


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
