"""Rematerialisation lowers the compiled train step's memory: measured on XLA's own buffer
assignment (`compiled.memory_analysis()`), at a depth where activations dominate."""
import logging

import jax
import numpy as np

from x2vlm_jax import sharding, tasks, train
from x2vlm_jax.configs_loader import load_config

# configs/tiny.py with an 8-block ViT at 64 px: the activations kept for the backward pass grow
# with the batch and the depth, the rest of the step's buffers do not.
DEEP = ("configs/tiny.py:model.image_res=64,model.vision_depth=8,model.vision_width=64,"
        "model.vision_mlp_dim=256,model.scan_layers=True")


def _temp_bytes(remat: bool, batch: int) -> int:
  config = load_config(f"{DEEP},model.remat={remat}")
  config.unlock()
  config.train.tasks = {"regions": 1.0}
  config.data.regions.batch_size = config.data.regions.max_images = batch
  # One device: memory_analysis() is per device, and the whole batch on it.
  trainer = train.Trainer.create(config, sharding.make_mesh(config.mesh,
                                                            devices=jax.devices()[:1]))
  rng = np.random.default_rng(0)
  batches = trainer.global_batches(
      {name: task.synthetic_batch(config, rng) for name, task in trainer.tasks.items()})
  return trainer.compile_train_step(batches).memory_analysis().temp_size_in_bytes


def test_remat_of_scanned_layers_cuts_the_memory_per_example():
  growth = {remat: (_temp_bytes(remat, 16) - _temp_bytes(remat, 8)) / 8
            for remat in (False, True)}
  # Measured with the tests' XLA flags: 1.53 MiB per example without remat, 0.51 MiB with
  # (nothing_saveable); the unrolled model grows as without remat (docs/benchmarks.md).
  assert growth[False] > 2**20
  assert growth[True] < 0.5 * growth[False], growth


def test_remat_of_unrolled_layers_warns(caplog):
  with caplog.at_level(logging.WARNING):
    tasks.build_model(load_config("configs/tiny.py:model.remat=True"))
  assert any("model.scan_layers=True" in r.getMessage() for r in caplog.records)
