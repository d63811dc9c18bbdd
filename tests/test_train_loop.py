"""The training loop on real files: exact resume after an interruption, and the CLI end to end."""
import json
import os

import pytest

from configs import demo
from x2vlm_jax import cli


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("demo_data"))
  cli.prepare_demo_data(demo.get_config(f"quick,data_dir={path}"))
  return path


def _config(demo_dir, **train):
  config = demo.get_config(f"quick,data_dir={demo_dir}")
  config.unlock()
  config.eval.retrieval_file = ""
  config.eval.grounding_files = []
  config.train.log_every_steps = 1
  config.train.checkpoint_every_steps = 100
  for key, value in train.items():
    config.train[key] = value
  return config


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def test_interrupted_run_resumes_with_identical_losses(demo_dir, tmp_path):
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  cli.pretrain(_config(demo_dir), straight)
  cli.pretrain(_config(demo_dir, max_steps_per_run=3), resumed)  # "preempted" after step 3
  assert sorted(_losses(resumed)) == [1, 2, 3]
  cli.pretrain(_config(demo_dir), resumed)  # picks up the checkpoint of step 3 and its data
  a, b = _losses(straight), _losses(resumed)
  assert sorted(a) == sorted(b) == list(range(1, 7))
  for step in a:
    assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])
