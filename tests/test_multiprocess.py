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


# ------------------------------------------------------------------------------- evaluation
EVAL_WORKER = os.path.join(ROOT, "tests", "eval_multiprocess_worker.py")
N_IMAGES, BROKEN = 7, 5  # batches of 4: rows 0-3 and 4, 5, 6 + row 6 again (padding)


def _eval_files(data_dir):
  """N_IMAGES images of different sizes with two captions each; image BROKEN is not an image."""
  from PIL import Image

  words = ["a", "red", "blue", "circle", "square", "on", "the"]
  (data_dir / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
                                                + words) + "\n")
  rng = np.random.default_rng(0)
  with open(data_dir / "test.jsonl", "w") as f:
    for i in range(N_IMAGES):
      pixels = rng.integers(0, 256, (20 + i, 30 + 2 * i, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(data_dir / f"{i}.png")
      f.write(json.dumps({"image": f"{i}.png", "caption": [
          f"a {words[1 + i % 2]} circle", f"the {words[3 + i % 2]} on a {words[1 + i % 3]}"]})
              + "\n")
  (data_dir / f"{BROKEN}.png").write_bytes(b"not a png")


def _launch_eval(data_dir, out_dir, num_processes, workers):
  env = xla_env.subprocess_env(4 // num_processes, cache=False)
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, EVAL_WORKER, str(data_dir), str(out_dir),
                             str(num_processes), str(i), str(port), str(workers)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
           for i in range(num_processes)]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-4000:]
  runs = []
  for i in range(num_processes):
    with open(out_dir / f"process_{i}.json") as f:
      runs.append(json.load(f))
  with np.load(out_dir / "scores.npz") as scores:
    return runs, [scores[k] for k in sorted(scores.files)], outputs


def test_two_processes_each_decode_their_rows_and_evaluate_as_one(tmp_path):
  """Retrieval over a data=4 mesh split between two processes: each process decodes only the
  images of the rows its two devices hold (grain worker processes decoding them), the unreadable
  image one of them found counts as a miss in both, and the metrics and scores are the
  one-process run's."""
  data_dir = tmp_path / "data"
  data_dir.mkdir()
  _eval_files(data_dir)
  (one,), one_scores, _ = _launch_eval(data_dir, tmp_path / "one", 1, workers=0)
  two, two_scores, logs = _launch_eval(data_dir, tmp_path / "two", 2, workers=1)
  assert one["decoded"] == N_IMAGES
  # Process 0 holds positions 0, 1 of each batch (rows 0, 1 and 4, 5); process 1 positions 2, 3
  # (rows 2, 3 and 6, 6: the padding repeats row 6, decoded once).
  assert [run["decoded"] for run in two] == [4, 3]
  assert f"{BROKEN}.png" in logs[0] and f"{BROKEN}.png" not in logs[1]  # process 0 decoded it
  for run in two:
    assert run["bad"] == one["bad"] == [BROKEN]
    assert run["sizes"] == one["sizes"]  # every process knows every image's size
    assert run["metrics"]["bad_images"] == 1.0
    assert sorted(run["metrics"]) == sorted(one["metrics"])
    for key, value in one["metrics"].items():
      assert abs(run["metrics"][key] - value) <= 1e-5, (key, run["metrics"][key], value)
  assert one["sizes"][0] == [30, 20] and one["sizes"][BROKEN] == [0, 0]
  for a, b in zip(one_scores, two_scores):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
