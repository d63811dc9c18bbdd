"""Config files: one `:arg` grammar for all of them, tasks and evaluators as data, and the checks
that fail before anything compiles, naming the field."""
import glob
import os

import pytest

from configs import common
from x2vlm_jax import tasks
from x2vlm_jax.configs_loader import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZED = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "configs", "finetune",
                                                                        "*.py"))
               if os.path.basename(p) not in ("__init__.py", "demo_tasks.py"))
PLAIN = ["configs/x2vlm_base.py", "configs/x2vlm_large.py", "configs/tiny.py",
         "configs/bench_small.py"]


def _check_shape(config):
  assert "total_steps" not in config.optim  # config.train.total_steps is the one step count
  assert "eval" not in config and "demo" not in config
  for name in config.train.tasks:
    tasks.get(name)
  for entry in config.evals.values():
    assert entry.type in tasks.evaluator_types()


@pytest.mark.parametrize("path", SIZED)
def test_fine_tuning_configs_take_a_size_and_field_overrides(path):
  config = load_config(f"{path}:large,train.seed=3,model.image_res=448")
  assert config.train.seed == 3 and config.model.image_res == 448
  assert config.model.vision_width == 1024  # large
  assert load_config(path).model.vision_width == 768  # base by default
  assert [w for w in config.train.tasks.values() if w > 0] == [1.0]  # one task, weight 1
  assert config.evals  # and its evaluation
  _check_shape(config)
  with pytest.raises(ValueError, match=r"unknown arg 'huge'; flags: base, large"):
    load_config(f"{path}:huge")


@pytest.mark.parametrize("path", PLAIN)
def test_other_configs_take_field_overrides(path):
  config = load_config(f"{path}:train.seed=3,model.image_res=448")
  assert config.train.seed == 3 and config.model.image_res == 448
  _check_shape(config)
  with pytest.raises(KeyError, match=r"no field 'model.image_rez'; did you mean model.image_res"):
    load_config(f"{path}:model.image_rez=384")


def test_demo_configs_write_their_data_and_take_the_same_grammar(tmp_path):
  data = str(tmp_path / "d")
  config = load_config(f"configs/demo.py:quick,data_dir={data},train.seed=2")
  assert os.path.exists(os.path.join(data, "README.txt")) and config.train.seed == 2
  assert sorted(config.evals) == ["grounding", "ovad", "retrieval", "winoground", "zeroshot"]
  assert not load_config(f"configs/demo.py:quick,no_eval,data_dir={data}").evals
  _check_shape(config)
  for task in ("vqa", "vqa_generative", "nlvr2", "captioning"):
    config = load_config(f"configs/finetune/demo_tasks.py:{task},quick,data_dir={data}")
    assert dict(config.train.tasks) == {task: 1.0}
    assert sorted(config.evals) == sorted([task, "vqa_free"] if task == "vqa_generative" else [task])
    _check_shape(config)
  with pytest.raises(ValueError, match="must name one task"):
    load_config(f"configs/finetune/demo_tasks.py:quick,data_dir={data}")
  with pytest.raises(ValueError, match=r"unknown arg 'fast'"):
    load_config(f"configs/demo.py:fast,data_dir={data}")


def test_evaluator_entries_are_typed_by_their_type():
  entry = common.evaluator("grounding", files=("a.jsonl",), plus_one=True)
  assert entry.type == "grounding" and entry.every_steps == 0 and entry.plus_one
  with pytest.raises(KeyError, match=r"'grounding' has no field \['k_test'\]"):
    common.evaluator("grounding", k_test=3)
  with pytest.raises(KeyError, match="no evaluator type 'groundng'"):
    common.evaluator("groundng")


def test_task_and_evaluator_mistakes_fail_before_anything_compiles(tmp_path):
  (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")

  def config_with(**train):
    config = load_config("configs/tiny.py")
    config.unlock()
    config.data.vocab_path = str(tmp_path / "vocab.txt")
    for key, value in train.items():
      config.train[key] = value  # replaces (update() would merge into train.tasks)
    return config

  with pytest.raises(ValueError, match=r"config.data.image_text.files is empty"):
    tasks.validate(config_with(), training=True)
  with pytest.raises(KeyError, match="no task 'retreival'"):
    tasks.validate(config_with(tasks={"retreival": 1.0}), training=True)
  with pytest.raises(ValueError, match="has no task with a weight > 0"):
    tasks.validate(config_with(tasks={"image_text": 0.0}), training=True)
  with pytest.raises(ValueError, match=r"config.train.tasks.regions = -1.0"):
    tasks.validate(config_with(tasks={"regions": -1.0}), training=True)
  config = config_with(tasks={"regions": 1.0})
  config.data.regions.files = ("x.jsonl",)
  config.evals.val = common.evaluator("retrieval")
  config.evals.val.type = "retreival"
  with pytest.raises(KeyError, match="no evaluator type 'retreival'"):
    tasks.validate(config, training=True)


def test_an_evaluation_file_that_matches_nothing_or_is_empty_fails_naming_the_entry(tmp_path):
  from x2vlm_jax.data import demo as demo_data
  from x2vlm_jax.models import x2vlm

  paths = demo_data.make_demo_data(str(tmp_path / "d"), num_train=2, num_val=2, image_size=48)
  config = load_config("configs/tiny.py")
  config.unlock()
  config.data.vocab_path = paths["vocab"]
  model = x2vlm.build_model(config.model)
  config.evals.val = common.evaluator("grounding", files=(str(tmp_path / "missing_*.jsonl"),))
  with pytest.raises(FileNotFoundError, match=r"config.evals.val \(grounding\): .*matches no file"):
    tasks.make_evaluators(config, model)
  (tmp_path / "empty.jsonl").write_text("")
  config.evals.val = common.evaluator("retrieval", file=str(tmp_path / "empty.jsonl"))
  with pytest.raises(ValueError, match=r"config.evals.val \(retrieval\): .*empty.jsonl.*no records"):
    tasks.make_evaluators(config, model)
  config.evals.val = common.evaluator("grounding", files=())
  with pytest.raises(ValueError, match=r"config.evals.val.files is empty"):
    tasks.make_evaluators(config, model)
