"""One process of the two-process evaluation test (tests/test_multiprocess.py); not collected.

  python tests/eval_multiprocess_worker.py DATA_DIR OUT_DIR NUM_PROCESSES PROCESS_ID PORT WORKERS

Evaluates retrieval of the tiny model (random parameters, the same in every process) on
DATA_DIR/test.jsonl over a data=4 mesh of 4 CPU devices (NUM_PROCESSES x 4 / NUM_PROCESSES),
the images decoded by WORKERS grain worker processes (0: threads). Each process writes
OUT_DIR/process_<i>.json: its metrics, how many images it decoded, the unreadable rows and the
image sizes it knows after the evaluation; process 0 also OUT_DIR/scores.npz (the dense
re-ranked scores).
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

K_TEST, BATCH = 3, 4


def main(data_dir: str, out_dir: str, num_processes: int, process_id: int, port: int,
         workers: int) -> None:
  if num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id)
  import flax.linen as nn
  from configs import tiny
  from x2vlm_jax import sharding
  from x2vlm_jax.evaluate import retrieval
  from x2vlm_jax.models import x2vlm
  from x2vlm_jax.tasks import retrieval as retrieval_task

  assert jax.device_count() == 4, jax.devices()
  config = tiny.get_config()
  model = x2vlm.build_model(config.model)
  params = jax.device_get(nn.meta.unbox(
      model.init(jax.random.PRNGKey(0), *x2vlm.init_inputs(model)))["params"])
  data = retrieval_task.load_retrieval_eval(
      os.path.join(data_dir, "test.jsonl"), data_dir, config.model.image_res,
      os.path.join(data_dir, "vocab.txt"), config.data.max_tokens, decode_workers=workers)
  mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
  result = retrieval.evaluate_retrieval(model, params, data, k_test=K_TEST, batch_size=BATCH,
                                        mesh=mesh)
  images = data["images"]
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, f"process_{jax.process_index()}.json"), "w") as f:
    json.dump(dict(metrics=result.metrics, decoded=images.num_decoded,
                   bad=sorted(images.bad), sizes=images.sizes.tolist()), f)
  if jax.process_index() == 0:
    np.savez(os.path.join(out_dir, "scores.npz"), *result.dense())


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7]))
