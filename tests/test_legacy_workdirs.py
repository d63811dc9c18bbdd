"""Workdirs written before tasks were one file each still load.

tests/fixtures/legacy_workdirs/ holds two training workdirs written by the code of commit e4ab8ac
(the last one with `config.eval` and per-kind weights): 2 steps of
`configs/finetune/demo_tasks.py:nlvr,quick` (from scratch) and of `:vqa_generative,quick` (the
answer decoder), each with its final evaluation in metrics.jsonl (and the answers, vqa_val_vqa.json). Evaluated by today's code with
today's configs, their parameters give the same numbers; resuming one in place fails with one line
saying how to start from it, and starting from it works.
"""
import json
import os
import shutil

import pytest

from configs.finetune import demo_tasks
from x2vlm_jax import cli

LEGACY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "legacy_workdirs")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("demo_data"))  # the quick demo data, as when written


def _old_metric(workdir, key):
  with open(os.path.join(LEGACY, workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f][-1][key]


def test_an_old_workdir_evaluates_to_its_old_numbers(data_dir, tmp_path):
  config = demo_tasks.get_config(f"nlvr2,quick,data_dir={data_dir}")
  results = cli.evaluate(config, str(tmp_path / "eval"), os.path.join(LEGACY, "nlvr"))
  assert results["eval/nlvr2/val_nlvr/acc"] == pytest.approx(
      _old_metric("nlvr", "eval/nlvr/val_nlvr/acc"), abs=1e-9)


def test_an_old_answer_decoder_workdir_gives_its_old_answers(data_dir, tmp_path):
  """The answer decoder's workdir ranks the answer list as it did: the same answer for every
  question (its accuracy is scored by today's official-accuracy code, so compare the answers)."""
  config = demo_tasks.get_config(f"vqa_generative,quick,data_dir={data_dir}")
  out = tmp_path / "eval"
  cli.evaluate(config, str(out), os.path.join(LEGACY, "vqa_generative"))
  with open(os.path.join(LEGACY, "vqa_generative", "vqa_val_vqa.json")) as f:
    old = json.load(f)
  with open(out / "vqa_generative_val_vqa.json") as f:
    assert json.load(f) == old


def test_an_old_workdir_resumes_no_further_but_starts_a_new_run(data_dir, tmp_path):
  old = str(tmp_path / "old")
  shutil.copytree(os.path.join(LEGACY, "nlvr"), old)
  config = demo_tasks.get_config(f"nlvr2,quick,data_dir={data_dir},train.total_steps=4")
  with pytest.raises(ValueError, match=r"no data iterator 'nlvr2'; saved: \['nlvr'\].*"
                                       rf"--config.init.checkpoint={old}"):
    cli.train(config, old)
  config = demo_tasks.get_config(f"nlvr2,quick,data_dir={data_dir},train.total_steps=2,"
                                 f"init.checkpoint={old}")
  results = cli.train(config, str(tmp_path / "new"))
  assert 0.0 <= results["eval/nlvr2/val_nlvr/acc"] <= 100.0
