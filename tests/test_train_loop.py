"""The training loop on real files: exact resume after an interruption, and the CLI end to end."""
import json
import logging
import os
import re

import pytest

from configs import demo
from x2vlm_jax import cli


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("demo_data"))
  demo.get_config(f"quick,data_dir={path}")  # loading the demo config writes its data
  return path


def _config(demo_dir, **train):
  config = demo.get_config(f"quick,no_eval,data_dir={demo_dir}")
  config.unlock()
  config.train.log_every_steps = 1
  config.train.checkpoint_every_steps = 100
  for key, value in train.items():
    config.train[key] = value
  return config


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def _steps_logged(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r["step"] for r in map(json.loads, f) if "loss" in r]


def test_interrupted_run_resumes_with_identical_losses(demo_dir, tmp_path, caplog):
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  with caplog.at_level(logging.INFO):
    cli.train(_config(demo_dir), straight)
  progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
  assert len(progress) == 6  # one line per logged step: the losses, lr, speed and ETA only
  assert re.fullmatch(r"step 3/6 \| loss \S+ image_text/loss \S+ regions/loss \S+ lr \S+ \| "
                      r"[\d.]+ ex/s \| ETA \d\d:\d\d:\d\d", progress[2]), progress[2]
  cli.train(_config(demo_dir, max_steps_per_run=3), resumed)  # "preempted" after step 3
  assert sorted(_losses(resumed)) == [1, 2, 3]
  cli.train(_config(demo_dir), resumed)  # picks up the checkpoint of step 3 and its data
  a, b = _losses(straight), _losses(resumed)
  assert sorted(a) == sorted(b) == list(range(1, 7))
  assert _steps_logged(resumed) == list(range(1, 7))  # each step once, in order
  for step in a:
    assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])


def test_periodic_evaluation_builds_its_evaluators_once(demo_dir, tmp_path, monkeypatch):
  """Three evaluations (steps 2, 4 and the final 6) from evaluators built once: every jitted
  evaluation function is traced once, the evaluation files are read once, and the periodic
  evaluations write metrics but no prediction files."""
  from x2vlm_jax.data import eval_data
  from x2vlm_jax.evaluate import common as eval_common

  config = demo.get_config(f"quick,data_dir={demo_dir}")
  config.unlock()
  config.evals = {"retrieval": config.evals.retrieval, "grounding": config.evals.grounding}
  config.evals.retrieval.every_steps = config.evals.grounding.every_steps = 2
  reads = []
  read_split = eval_data.read_split
  monkeypatch.setattr(eval_data, "read_split", lambda *a: reads.append(a) or read_split(*a))
  before = dict(eval_common.TRACE_COUNTS)
  workdir = str(tmp_path / "run")
  cli.train(config, workdir)
  traces = {k: v - before.get(k, 0) for k, v in eval_common.TRACE_COUNTS.items()}
  traces = {k: v for k, v in traces.items() if v}
  assert traces.pop("pair_itm") in (1, 2)  # one shape per re-ranking group size used
  assert traces == {"encode_images": 1, "encode_texts": 1, "top_k": 2, "itc_ranks": 2,
                    "grounding_boxes": 1}
  assert len(reads) == 2  # one retrieval file, one grounding split
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    evals = [r for r in map(json.loads, f) if "eval/retrieval/txt_r1" in r]
  assert [r["step"] for r in evals] == [2, 4, 6]
  assert all("eval/grounding/val_grounding/acc" in r for r in evals)
  assert os.path.exists(os.path.join(workdir, "retrieval_scores.npz"))  # the final one writes
