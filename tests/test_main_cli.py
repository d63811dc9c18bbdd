"""main.py end to end on real files: the demo (shortened) trains, evaluates and writes metrics."""
import json
import os
import subprocess
import sys

import numpy as np

import xla_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=600):
  env = xla_env.subprocess_env(1)
  return subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, env=env, timeout=timeout,
                        capture_output=True, text=True)


def test_demo_pretrains_and_evaluates_from_the_command_line(tmp_path):
  data, workdir = str(tmp_path / "data"), str(tmp_path / "run")
  config = f"configs/demo.py:quick,data_dir={data}"
  proc = _run("--config", config, "--workdir", workdir, "--config.evals.retrieval.every_steps=3",
              "--config.evals.grounding.every_steps=3")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert os.path.exists(os.path.join(data, "README.txt"))  # the data was made because missing
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  train_steps = [r["step"] for r in records if "loss" in r]
  assert train_steps == [2, 4, 6]
  evals = [r for r in records if "eval/grounding/val_grounding/miou" in r]
  assert [r["step"] for r in evals] == [3, 6]  # every 3 steps, the last one after training
  final = records[-1]
  assert final is evals[-1]
  for key in ("eval/retrieval/txt_r1", "eval/retrieval/img_r1", "eval/grounding/val_grounding/acc"):
    assert 0.0 <= evals[0][key] <= 100.0 and 0.0 <= final[key] <= 100.0
  # The step-3 evaluation saw the step-3 parameters, not the final ones.
  assert evals[0]["eval/grounding/val_grounding/miou"] != final["eval/grounding/val_grounding/miou"]
  assert "step 6/6" in proc.stderr and "ex/s" in proc.stderr and "ETA" in proc.stderr
  assert os.listdir(os.path.join(workdir, "tensorboard"))

  # The workdir describes itself (config.json + a copy of its tokenizer), and evaluation mode with that
  # saved config (`--config DIR`) reproduces the end-of-training numbers.
  assert open(os.path.join(workdir, "assets", "vocab.txt")).read() == open(
      os.path.join(data, "vocab.txt")).read()
  eval_dir = str(tmp_path / "eval")
  proc = _run("--mode", "eval", "--config", workdir, "--workdir", eval_dir, "--checkpoint", workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  again = [json.loads(line) for line in open(os.path.join(eval_dir, "metrics.jsonl"))][-1]
  assert again["step"] == 6
  for key in ("eval/retrieval/txt_r1", "eval/retrieval/img_r1", "eval/grounding/val_grounding/acc"):
    assert abs(again[key] - final[key]) < 1e-6, key
  assert os.path.exists(os.path.join(eval_dir, "retrieval_scores.npz"))


def test_scanned_layers_train_from_the_command_line_and_evaluate_unrolled(tmp_path):
  """Pre-training with model.scan_layers (stacked params in the Orbax checkpoint), then evaluating
  that checkpoint with the default unrolled model: the same scores, bit for bit or nearly."""
  data, workdir = str(tmp_path / "data"), str(tmp_path / "run")
  config = f"configs/demo.py:quick,data_dir={data}"
  proc = _run("--config", config, "--workdir", workdir, "--config.model.scan_layers=True")
  assert proc.returncode == 0, proc.stderr[-3000:]
  final = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))][-1]
  assert final["step"] == 6
  from x2vlm_jax import checkpoint, convert
  from x2vlm_jax.models import layer_stack
  stored = convert.flatten(checkpoint.load_any_params(workdir)[0])
  assert layer_stack.is_stacked(stored) and "vision/blocks/attn/qkv/kernel" in stored

  eval_dir = str(tmp_path / "eval")
  proc = _run("--mode", "eval", "--config", config, "--workdir", eval_dir, "--checkpoint", workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  again = [json.loads(line) for line in open(os.path.join(eval_dir, "metrics.jsonl"))][-1]
  assert again["step"] == 6
  scanned = np.load(os.path.join(workdir, "retrieval_scores.npz"))
  unrolled = np.load(os.path.join(eval_dir, "retrieval_scores.npz"))
  for name in scanned.files:
    np.testing.assert_allclose(unrolled[name], scanned[name], atol=1e-5, err_msg=name)
  assert abs(again["eval/grounding/val_grounding/miou"]
             - final["eval/grounding/val_grounding/miou"]) < 1e-3


def test_config_typo_fails_before_anything_compiles(tmp_path):
  proc = _run("--config", "configs/tiny.py", "--workdir", str(tmp_path),
              "--config.optim.lrr=0.1", timeout=120)
  assert proc.returncode != 0
  assert "has no field 'optim.lrr'; did you mean" in proc.stderr and "optim.lr," in proc.stderr
  assert "Traceback" not in proc.stderr
  assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))
  proc = _run("--config", "configs/tiny.py", "--workdir", str(tmp_path), "--config.seed=1",
              timeout=120)  # a field that exists under other sections: all of them offered
  assert proc.returncode != 0
  assert "has no field 'seed'; did you mean data.seed, train.seed?" in proc.stderr
  proc = _run("--config", "configs/tiny.py", "--workdir", str(tmp_path),
              "--config.model.vision_width=wide", timeout=120)
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  assert "--config.model.vision_width=wide: invalid literal for int()" in proc.stderr
