"""The shape of the code: everything particular to a task lives in x2vlm_jax/tasks/ (and the
configs and tools that use it). Outside them a task is named only by its metric module, the
demo-data generator and the surfaces that name heads for users (`Predictor.answer` / `caption` /
`nlvr`, the `x2vlm predict` subcommands, the table of released checkpoints), and no module keeps
a table keyed by task names."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXEMPT_DIRS = ("tests", os.path.join("x2vlm_jax", "tasks"), "configs", "tools")
USER_SURFACES = {"x2vlm_jax/inference.py", "x2vlm_jax/predict_cli.py", "x2vlm_jax/command.py",
                 "x2vlm_jax/releases.py"}
ALLOWED = {
    "nlvr": {"x2vlm_jax/data/demo.py"},
    "vqa": {"x2vlm_jax/evaluate/vqa_metrics.py", "x2vlm_jax/data/demo.py"},
    "captioning": {"x2vlm_jax/evaluate/caption_metrics.py", "x2vlm_jax/data/demo.py"},
    "grounding": {"x2vlm_jax/data/demo.py"},
    "video_qa": {"x2vlm_jax/data/demo.py"},
}


def _python_files():
  for dirpath, dirnames, filenames in os.walk(ROOT):
    rel = os.path.relpath(dirpath, ROOT)
    dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
    if rel.split(os.sep)[0] in ("tests", "configs", "tools") or rel.startswith(EXEMPT_DIRS[1]):
      continue
    for name in filenames:
      if name.endswith(".py"):
        yield os.path.relpath(os.path.join(dirpath, name), ROOT)


@pytest.mark.parametrize("name", sorted(ALLOWED))
def test_a_task_is_named_only_by_its_metric_module_and_the_demo_data(name):
  naming = set()
  for path in _python_files():
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
      if name in f.read().lower():
        naming.add(path.replace(os.sep, "/"))
  assert naming <= ALLOWED[name] | USER_SURFACES, sorted(naming - ALLOWED[name] - USER_SURFACES)


def test_the_trainer_holds_only_the_step_and_the_loop():
  with open(os.path.join(ROOT, "x2vlm_jax", "train.py"), encoding="utf-8") as f:
    source = f.read()
  assert len(source.splitlines()) <= 350
  # No task name and no string-keyed dispatch: the registry decides.
  assert not re.search(r'"(image_text|regions|retrieval|nlvr2?|vqa\w*|video\w*|captioning)"',
                       source)
