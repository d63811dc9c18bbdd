"""One process of the multi-process test (tests/test_multiprocess.py); not collected by pytest.

  python tests/multiprocess_worker.py OUT_DIR NUM_PROCESSES PROCESS_ID PORT

Trains the tiny model for 3 steps on a fixed sequence of synthetic global batches over a
(data=2, fsdp=2) mesh of 4 CPU devices, each process feeding its half of every batch (region
batches with process-local image and pair indices, as the pipeline makes them). A single process
(NUM_PROCESSES=1) feeds the same global batches whole. Writes OUT_DIR/losses.json (process 0) and
an Orbax checkpoint of the final state under OUT_DIR/checkpoints.
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

NUM_STEPS = 3
KINDS = ("image_text", "regions")


def local_parts(config, step: int) -> list[dict]:
  """The two halves of step `step`'s global batches, each as one process's pipeline makes it."""
  from tools import benchmark

  return [benchmark.synthetic_batches(config, seed=100 * step + half) for half in range(2)]


def whole(parts: list[dict], kind: str) -> dict:
  """The global batch made by hand from the halves: concatenated, the second half's image
  indices shifted by the first half's image count and its pair ids made distinct."""
  first, second = parts[0][kind], dict(parts[1][kind])
  if kind == "regions":
    second["idx_to_group_img"] = second["idx_to_group_img"] + first["image"].shape[0]
    second["pair_id"] = second["pair_id"] + 1000
  return {k: (np.concatenate([first[k], second[k]]) if np.ndim(first[k]) else first[k])
          for k in first}


def main(out_dir: str, num_processes: int, process_id: int, port: int) -> None:
  if num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id)
  from configs import tiny
  from x2vlm_jax import checkpoint, train

  assert jax.device_count() == 4, jax.devices()
  config = tiny.get_config()
  config.unlock()
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 1
  config.model.hidden_dropout = config.model.attention_dropout = 0.0
  config.model.drop_path_rate = 0.0
  half = dict(image_text=4, regions=4)  # per-half batch sizes: 8 in the global batch
  config.data.image_text.batch_size = half["image_text"]
  config.data.regions.max_images = config.data.regions.batch_size = half["regions"]
  trainer = train.Trainer.create(config)
  state = trainer.init_state(0)
  losses = []
  for step in range(NUM_STEPS):
    parts = local_parts(config, step)
    if num_processes == 1:
      local = {kind: whole(parts, kind) for kind in KINDS}
    else:
      local = parts[process_id]
    state, metrics = trainer.train_step(state, trainer.global_batches(local),
                                        jax.random.PRNGKey(step))
    losses.append({k: float(v) for k, v in jax.device_get(metrics).items() if np.ndim(v) == 0})
  with checkpoint.Checkpointer(os.path.join(out_dir, "checkpoints"), async_save=True) as ckpt:
    ckpt.save(NUM_STEPS, state, force=True)
    ckpt.wait()
  if jax.process_index() == 0:
    with open(os.path.join(out_dir, "losses.json"), "w") as f:
      json.dump(losses, f)


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
