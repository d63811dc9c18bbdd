"""Two processes on this machine (loopback, CPU collectives over gloo) train exactly like one
process fed the same global batches: same losses, same checkpointed parameters."""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np

import xla_env

from x2vlm_jax import checkpoint, convert

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "multiprocess_worker.py")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(out_dir, num_processes):
  devices_per_process = 4 // num_processes
  env = xla_env.subprocess_env(devices_per_process, cache=False)
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, WORKER, out_dir, str(num_processes), str(i),
                             str(port)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
           for i in range(num_processes)]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-4000:]
  with open(os.path.join(out_dir, "losses.json")) as f:
    return json.load(f)


def test_two_processes_match_one_process(tmp_path):
  one = _launch(str(tmp_path / "one"), 1)
  two = _launch(str(tmp_path / "two"), 2)
  assert len(one) == len(two) == 3
  for step, (a, b) in enumerate(zip(one, two)):
    for key in ("loss", "image_text/itc", "image_text/itm", "regions/itc", "regions/itm",
                "regions/mlm", "regions/bbox_l1", "regions/bbox_giou", "grad_norm"):
      assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (step, key, a[key], b[key])
  assert all(s["nonfinite"] == 0 for s in one + two)

  params = [convert.flatten(checkpoint.Checkpointer(str(tmp_path / d / "checkpoints"))
                            .restore_params()) for d in ("one", "two")]
  assert sorted(params[0]) == sorted(params[1])
  for name in params[0]:
    np.testing.assert_allclose(np.asarray(params[1][name]), np.asarray(params[0][name]),
                               rtol=1e-5, atol=1e-6, err_msg=name)
