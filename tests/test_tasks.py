"""VQA (classification) and NLVR2: data, heads that learn, and fine-tuning + evaluation from the
CLI code path on the demo scenes."""
import json
import os

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from configs import tiny
from configs.finetune import demo_tasks
from tools import score_vqa
from x2vlm_jax import cli, tasks
from x2vlm_jax.data import eval_data, examples
from x2vlm_jax.models import x2vlm
from x2vlm_jax.tasks import nlvr2, vqa


def test_vqa_answer_targets_are_the_vqa_accuracy_of_each_answer():
  index = {"red": 0, "blue": 1, "2": 2}
  t = vqa.answer_targets(["red"] * 7 + ["blue"] * 2 + ["green"], index)
  np.testing.assert_allclose(t, [1.0, 2 / 3, 0.0])
  np.testing.assert_allclose(vqa.answer_targets("Blue ", index), [0, 1, 0])
  np.testing.assert_allclose(vqa.answer_targets(["2"], index), [0, 0, 1 / 3])


def test_nlvr_labels():
  assert [nlvr2.nlvr_label(v) for v in ("True", "false", True, 0, 1)] == [1, 0, 1, 0, 1]
  with pytest.raises(examples.BadRecordError, match="True/False"):
    nlvr2.nlvr_label("maybe")


def _tiny_model(heads):
  cfg = tiny.get_config()
  cfg.unlock()
  cfg.model.hidden_dropout = cfg.model.attention_dropout = cfg.model.drop_path_rate = 0.0
  return cfg, x2vlm.build_model(cfg.model, heads=heads)


def _fit(model, task, batch, steps=40):
  """Adam on `task`'s loss (deterministic: no dropout) over one batch."""
  objective = lambda m, b, r: task.loss(m, b, r, deterministic=True, config=None)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), *x2vlm.init_inputs(model))["params"])
  tx = optax.adam(2e-3)
  opt = tx.init(params)

  @jax.jit
  def step(p, o):
    loss, g = jax.value_and_grad(lambda q: sum(model.apply(
        {"params": q}, batch, None, method=objective).values()))(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, loss

  losses = []
  for _ in range(steps):
    params, opt, loss = step(params, opt)
    losses.append(float(loss))
  return losses


def test_vqa_and_nlvr_heads_fit_a_batch():
  cfg, model = _tiny_model((("vqa_head", 5, 1), ("nlvr_cls", 2, 2)))
  rng = np.random.default_rng(0)
  r, b, l = cfg.model.image_res, 4, cfg.data.max_tokens
  ids = rng.integers(5, cfg.model.vocab_size, (b, l)).astype(np.int32)
  atts = np.ones((b, l), np.int32)
  targets = np.eye(5, dtype=np.float32)[[0, 3, 1, 3]]
  vqa_batch = dict(image=rng.normal(size=(b, r, r, 3)).astype(np.float32), text_ids=ids,
                   text_atts=atts, answer_targets=targets)
  losses = _fit(model, vqa.TASK, vqa_batch)
  assert losses[-1] < 0.2 * losses[0], losses[::8]
  nlvr = dict(image0=rng.normal(size=(b, r, r, 3)).astype(np.float32),
              image1=rng.normal(size=(b, r, r, 3)).astype(np.float32), text_ids=ids,
              text_atts=atts, label=np.array([1, 0, 0, 1], np.int32))
  losses = _fit(model, nlvr2.TASK, nlvr)
  assert losses[0] == pytest.approx(np.log(2), abs=0.2) and losses[-1] < 0.1, losses[::8]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("demo_data"))
  demo_tasks.get_config(f"vqa,quick,data_dir={path}")  # loading the config writes the data
  return path


def test_demo_vqa_records(demo_dir):
  answers = json.load(open(os.path.join(demo_dir, "answer_list.json")))
  rows = [json.loads(line) for line in open(os.path.join(demo_dir, "train_vqa.jsonl"))]
  assert len(answers) == 11 and rows
  assert all(r["answer"][0] in answers and len(r["answer"]) == 10 for r in rows)
  assert {r["answer_type"] for r in rows} == {"yes/no", "other"}
  nlvr = [json.loads(line) for line in open(os.path.join(demo_dir, "train_nlvr.jsonl"))]
  labels = [r["label"] for r in nlvr]
  assert 0.3 < np.mean(labels) < 0.8  # both answers well represented


def test_vqa_fine_tunes_and_evaluates_from_the_config(demo_dir, tmp_path):
  config = demo_tasks.get_config(f"vqa,quick,data_dir={demo_dir}")
  workdir = str(tmp_path / "vqa")
  results = cli.train(config, workdir)
  assert 0.0 <= results["eval/vqa/val_vqa/acc"] <= 100.0
  predictions = json.load(open(os.path.join(workdir, "vqa_val_vqa.json")))
  val = [json.loads(line) for line in open(os.path.join(demo_dir, "val_vqa.jsonl"))]
  assert [p["question_id"] for p in predictions] == [r["question_id"] for r in val]
  # The official scorer on the written predictions agrees with the number in metrics.jsonl.
  scored = score_vqa.main(["--predictions", os.path.join(workdir, "vqa_val_vqa.json"),
                           "--annotations", os.path.join(demo_dir, "val_vqa.jsonl")])
  assert scored["overall"] == pytest.approx(results["eval/vqa/val_vqa/acc"], abs=1e-6)


def test_nlvr_fine_tunes_and_evaluates_from_the_config(demo_dir, tmp_path):
  config = demo_tasks.get_config(f"nlvr2,quick,data_dir={demo_dir}")
  results = cli.train(config, str(tmp_path / "nlvr"))
  assert 0.0 <= results["eval/nlvr2/val_nlvr/acc"] <= 100.0
  records = [json.loads(line) for line in open(os.path.join(tmp_path / "nlvr", "metrics.jsonl"))]
  assert any("nlvr2/nlvr" in r for r in records)


def test_answer_list_must_match_the_head(demo_dir, tmp_path):
  config = demo_tasks.get_config(f"vqa,quick,data_dir={demo_dir}")
  config.unlock()
  config.data.vqa.num_answers = 12
  with pytest.raises(ValueError, match="lists 11 answers but config.data.vqa.num_answers is 12"):
    cli.train(config, str(tmp_path / "bad"))


def test_the_head_size_is_checked_before_anything_compiles(demo_dir):
  config = demo_tasks.get_config(f"vqa,quick,data_dir={demo_dir}")
  config.unlock()
  config.data.vqa.num_answers = 0
  with pytest.raises(ValueError, match=r"config.data.vqa.num_answers is 0"):
    tasks.build_model(config)
  config.data.vqa.num_answers = 12  # an evaluator checks the head against the answer list
  with pytest.raises(ValueError, match=r"vqa_head has 12 answer logits but "
                                       r"config.data.vqa.answer_list .* lists 11 answers"):
    tasks.make_evaluators(config, tasks.build_model(config))


def test_evaluation_splits_name_the_bad_record(demo_dir, tmp_path):
  vocab = os.path.join(demo_dir, "vocab.txt")
  path = tmp_path / "nlvr.jsonl"
  path.write_text(json.dumps({"images": ["a.png", "b.png"], "sentence": "a red circle",
                              "label": "True"}) + "\n"
                  + json.dumps({"images": ["a.png", "b.png"], "sentence": "a red circle",
                                "label": "maybe"}) + "\n")
  with pytest.raises(eval_data.BadDataError, match=f"{path}:2: label must be True/False"):
    nlvr2.load_nlvr_eval(str(path), demo_dir, 32, vocab, 16)
  path = tmp_path / "vqa.jsonl"
  path.write_text(json.dumps({"image": "a.png", "question": "what colour"}) + "\n")
  with pytest.raises(eval_data.BadDataError, match=f"{path}:1: record has no 'question_id'"):
    vqa.load_vqa_eval(str(path), demo_dir, 32, vocab, 16)
