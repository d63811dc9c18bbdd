"""Predictor.answer / caption / nlvr / classify against the heads' own functions and evaluators,
the errors of a checkpoint without the head, x2vlm_jax/predict_cli.py's commands and the labels
tools/ground.py draws. Two tiny checkpoints saved with their config: one with every head (VQA
classification head, answer decoder, NLVR2 head, MLM head), one pre-training model without."""
import json
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import xla_env

from configs import common, tiny
from x2vlm_jax import checkpoint, errors, inference, predict_cli, tasks
from x2vlm_jax.data import demo, eval_data
from x2vlm_jax.evaluate import generation
from x2vlm_jax.models import x2vlm
from x2vlm_jax.tasks import nlvr2, vqa, vqa_generative

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTIONS = ["what colour is the circle", "is there a blue square", "what shape is red"]
HEAD_TASKS = {"vqa": 1.0, "vqa_generative": 1.0, "nlvr2": 1.0, "captioning": 1.0}


def _config(paths, train_tasks, *, mlm_head=True):
  """configs/tiny.py over the demo vocabulary, no dropout, training `train_tasks`."""
  config = tiny.get_config()
  config.unlock()
  m = config.model
  m.vocab_size, m.max_position, m.mlm_head = 160, 32, mlm_head
  m.hidden_dropout = m.attention_dropout = m.drop_path_rate = 0.0
  d = config.data
  d.vocab_path = paths["vocab"]
  d.vqa.answer_list = d.vqa_generative.answer_list = paths["answer_list"]
  d.vqa.num_answers = 11
  d.vqa_generative.answer_max_tokens = 4
  config.train.tasks = train_tasks
  return config


def _save(config, directory, seed):
  """Random params of the config's model, saved with the config; -> (model, params)."""
  model = tasks.build_model(config)
  params = jax.device_get(nn.meta.unbox(
      jax.jit(model.init)(jax.random.PRNGKey(seed), *x2vlm.init_inputs(model))["params"]))
  checkpoint.save_params(directory, params, config=config)
  return model, params


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("predict")
  paths = demo.make_demo_data(str(tmp / "data"), num_train=1, num_val=4, image_size=96, seed=0)
  config = _config(paths, HEAD_TASKS)
  config.evals.vqa_generative = common.evaluator("vqa_generative", k_test=4, batch_size=4)
  config.evals.captioning = common.evaluator("captioning", beams=2, max_length=6, min_length=2,
                                             batch_size=4)
  model, params = _save(config, str(tmp / "heads"), 0)
  _save(_config(paths, {"image_text": 1.0}, mlm_head=False), str(tmp / "plain"), 1)
  images = [os.path.join(paths["image_root"], "images", f"val_{i:06d}.png") for i in range(4)]
  return dict(tmp=tmp, paths=paths, config=config, model=model, params=params,
              ckpt=str(tmp / "heads"), plain=str(tmp / "plain"), images=images,
              answers=json.load(open(paths["answer_list"])),
              predictor=inference.Predictor.load(str(tmp / "heads"), batch_size=4))


def _inputs(env, images, texts):
  """The evaluation's own preprocessing: pixels [N, R, R, 3], ids / atts [N, L]."""
  pixels, _ = eval_data.load_eval_images(images, env["config"].model.image_res)
  d = env["config"].data
  ids, atts = eval_data.encode_texts(texts, texts, env["predictor"].tokenizer, d.max_tokens,
                                     d.max_words)
  return pixels, ids, atts


def _apply(env, method, *args):
  return jax.jit(lambda p, *a: env["model"].apply({"params": p}, *a, method=method))(
      env["params"], *args)


# ------------------------------------------------------------------------------ the heads
def test_answer_with_the_classification_head_is_the_arg_max_of_its_logits(env, monkeypatch):
  images = [env["images"][0], env["images"][1], env["images"][0]]
  decoded = []
  load_image = inference.load_image
  monkeypatch.setattr(inference, "load_image", lambda im: decoded.append(im) or load_image(im))
  got = env["predictor"].answer(images, QUESTIONS)  # mode "auto": the head
  assert decoded == images[:2]  # the shared image is decoded once

  pixels, ids, atts = _inputs(env, images, QUESTIONS)
  logits = np.asarray(_apply(env, vqa.vqa_logits, dict(image=pixels, text_ids=ids,
                                                        text_atts=atts)))
  best = logits.argmax(axis=1)
  assert [r["answer"] for r in got] == [env["answers"][k] for k in best]
  np.testing.assert_allclose([r["score"] for r in got],
                             1 / (1 + np.exp(-logits.max(axis=1))), rtol=1e-5)
  np.testing.assert_array_equal(vqa.make_vqa_fn(env["model"])(env["params"], pixels, ids, atts),
                                best)  # the evaluator's choice
  one = env["predictor"].answer(images[0], QUESTIONS[:2], mode="head")  # one image, 2 questions
  assert [r["answer"] for r in one] == [r["answer"] for r in got[:2]]
  with pytest.raises(errors.InputError, match="11 answer logits but the answer list has 2"):
    env["predictor"].answer(images[0], QUESTIONS[0], answers=["yes", "no"], mode="head")


def test_rank_is_the_vqa_generative_evaluators_choice(env, tmp_path):
  record = {"question_id": 7, "image": env["images"][2], "question": QUESTIONS[0]}
  (tmp_path / "one.jsonl").write_text(json.dumps(record) + "\n")
  config = env["config"].copy_and_resolve_references()
  config.unlock()
  config.evals = {"vqa_generative": config.evals.vqa_generative}
  config.evals.vqa_generative.files = (str(tmp_path / "one.jsonl"),)
  evaluator = tasks.make_evaluators(config, env["model"])["vqa_generative"]
  evaluator.run(env["params"], predictions_dir=str(tmp_path))
  chosen = json.load(open(tmp_path / "vqa_generative_one.json"))[0]["answer"]

  got = env["predictor"].answer([env["images"][2], env["images"][3]], QUESTIONS[:1],
                                mode="rank")
  assert got[0]["answer"] == chosen
  pixels, ids, atts = _inputs(env, env["images"][2:], QUESTIONS[:1] * 2)
  answer_ids, answer_atts = vqa_generative.tokenize_answers(env["answers"],
                                                            env["predictor"].tokenizer, 4)
  ranked, probs = _apply(env, lambda m, *a: vqa_generative.rank_answers(m, *a, 4),
                         dict(image=pixels, text_ids=ids, text_atts=atts), answer_ids,
                         answer_atts)
  assert [r["answer"] for r in got] == [env["answers"][k] for k in np.asarray(ranked)[:, 0]]
  np.testing.assert_allclose([r["score"] for r in got], np.asarray(probs)[:, 0], rtol=1e-5)
  # k = 1 keeps only the likeliest first token: its answer, with all the probability.
  assert env["predictor"].answer(env["images"][2], QUESTIONS[0], mode="rank", k=1)[0][
      "score"] == pytest.approx(1.0)


def test_generate_is_the_decoders_greedy_answer_and_beam_one_equals_greedy(env):
  p, tok = env["predictor"], env["predictor"].tokenizer
  images, questions = env["images"][:2], QUESTIONS[:2]
  greedy = p.answer(images, questions, mode="generate", max_len=3)

  # By hand: [CLS], then the arg-max of the decoder's next-token distribution ([SEP] not first),
  # the score the product of the chosen tokens' probabilities.
  pixels, ids, atts = _inputs(env, images, questions)
  states = _apply(env, vqa.question_states, dict(image=pixels, text_ids=ids, text_atts=atts))
  for b in range(2):
    seq, log_p = [tok.cls_id], 0.0
    for step in range(3):
      tokens = jnp.asarray([seq], jnp.int32)
      logits = np.asarray(_apply(env, x2vlm.X2VLM.answer_logits, tokens, jnp.ones_like(tokens),
                                 states[b:b + 1], atts[b:b + 1]))[0, -1]
      allowed = logits[:tok.vocab_size].copy()
      if step == 0:
        allowed[tok.sep_id] = -np.inf
      seq.append(int(np.argmax(allowed)))
      log_p += float(jax.nn.log_softmax(logits)[seq[-1]])
      if seq[-1] == tok.sep_id:
        break
    assert greedy[b]["answer"] == generation.decode_text(tok, seq)
    assert greedy[b]["score"] == pytest.approx(np.exp(log_p), rel=1e-4)

  beam_one = vqa_generative.make_answer_generator(
      env["model"], num_beams=1, max_length=3, cls_id=tok.cls_id, eos_id=tok.sep_id,
      mask_id=tok.mask_id, pad_id=tok.pad_id, vocab_size=tok.vocab_size, greedy=False)
  out = beam_one(env["params"], pixels, ids, atts)
  assert out.token_ids.shape == (3, 2, 1)  # a beam search, not the greedy loop
  assert [generation.decode_text(tok, s) for s in generation.best_sequences(
      out, eos_id=tok.sep_id)] == [g["answer"] for g in greedy]
  beams = p.answer(images, questions, mode="generate", max_len=3, beam_size=2)
  assert all(0.0 < r["score"] <= 1.0 and isinstance(r["answer"], str) for r in beams)


def test_free_form_evaluation_scores_the_decoders_answers(env, tmp_path):
  """`vqa_generative` with mode "generate": the predictions are Predictor.answer(mode="generate")'s
  (greedy and beam 2), scored by the official accuracy; no answer list is read."""
  p = env["predictor"]
  images, questions = env["images"][:3], QUESTIONS[:3]
  greedy = [r["answer"] for r in p.answer(images, questions, mode="generate", max_len=3)]
  beam = [r["answer"] for r in p.answer(images, questions, mode="generate", max_len=3,
                                         beam_size=2)]
  # Human answers: the first question answered as greedy decodes it, the others not.
  humans = [[greedy[0]] * 10, ["zzz"] * 10, [greedy[2]] * 3 + ["zzz"] * 7]
  records = [{"question_id": k, "image": im, "question": q, "answer": h}
             for k, (im, q, h) in enumerate(zip(images, questions, humans))]
  (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  config = env["config"].copy_and_resolve_references()
  config.unlock()
  config.data.vqa_generative.answer_list = "/no/list/needed.json"
  config.evals = {
      "free": common.evaluator("vqa_generative", files=(str(tmp_path / "val.jsonl"),),
                               mode="generate", max_answer_tokens=3, batch_size=2),
      "free_beam": common.evaluator("vqa_generative", files=(str(tmp_path / "val.jsonl"),),
                                    mode="generate", max_answer_tokens=3, beam_size=2,
                                    batch_size=2)}
  evaluators = tasks.make_evaluators(config, env["model"])
  metrics = {}
  for evaluator in evaluators.values():
    metrics.update(evaluator.run(env["params"], predictions_dir=str(tmp_path)))
  assert [r["answer"] for r in json.load(open(tmp_path / "free_val.json"))] == greedy
  assert [r["answer"] for r in json.load(open(tmp_path / "free_beam_val.json"))] == beam
  # Official accuracy, leave-one-out over the 10 humans: 1, 0, and for 3 matching humans
  # (3 x min(1, 2/3) + 7 x min(1, 3/3)) / 10 = 0.9 -> (1 + 0 + 0.9) / 3 ("zzz" is never generated).
  assert "zzz" not in greedy and metrics["eval/free/val/acc"] == pytest.approx(63.33)
  with pytest.raises(ValueError, match="config.evals.free.mode is 'sample'"):
    config.evals.free.mode = "sample"
    tasks.make_evaluators(config, env["model"])


def test_caption_is_the_captioning_evaluators_output(env, tmp_path):
  (tmp_path / "caps.jsonl").write_text("".join(
      json.dumps({"image": path, "image_id": n}) + "\n" for n, path in enumerate(env["images"])))
  config = env["config"].copy_and_resolve_references()
  config.unlock()
  config.evals = {"captioning": config.evals.captioning}
  config.evals.captioning.files = (str(tmp_path / "caps.jsonl"),)
  evaluator = tasks.make_evaluators(config, env["model"])["captioning"]
  evaluator.run(env["params"], predictions_dir=str(tmp_path))
  want = [p["caption"] for p in json.load(open(tmp_path / "captioning_caps.json"))]
  got = env["predictor"].caption(env["images"])  # the evaluator's beams 2, lengths 2..6
  assert got == want and all(isinstance(c, str) for c in got)
  assert any(c for c in got)


def test_nlvr_is_the_heads_softmax_and_the_evaluators_label(env):
  a, b, c, d = env["images"]
  pairs = [(a, b), (c, d), (b, a)]
  sentences = ["the left image has a red circle", "there are two squares", "a blue triangle"]
  got = env["predictor"].nlvr(pairs, sentences)
  pixels, ids, atts = _inputs(env, [p[k] for p in pairs for k in (0, 1)], sentences * 2)
  ids, atts = ids[:3], atts[:3]
  batch = dict(image0=pixels[0::2], image1=pixels[1::2], text_ids=ids, text_atts=atts)
  logits = _apply(env, nlvr2.nlvr_logits, batch)
  np.testing.assert_allclose([r["prob_true"] for r in got],
                             np.asarray(jax.nn.softmax(logits, axis=-1))[:, 1], rtol=1e-5)
  labels = nlvr2.make_nlvr_fn(env["model"])(env["params"], *batch.values())
  assert [r["label"] for r in got] == [bool(x) for x in np.asarray(labels)]
  assert len({round(r["prob_true"], 6) for r in got}) == 3  # each pair its own


def test_classify_is_the_mean_of_normalised_template_features(env):
  p = env["predictor"]
  labels, templates = ["red circle", "blue square", "green triangle"], ["a {} here", "{}"]
  got = p.classify(env["images"][:2], labels, templates, top_k=2)
  text = p.embed_texts([t.replace("{}", label) for label in labels for t in templates])
  classes = text.reshape(3, 2, -1).mean(axis=1)
  classes /= np.linalg.norm(classes, axis=1, keepdims=True)
  scores = p.embed_images(env["images"][:2]) @ classes.T
  for row, image_scores in zip(got, scores):
    best = np.argsort(-image_scores)[:2]
    assert [r["label"] for r in row] == [labels[k] for k in best]
    np.testing.assert_allclose([r["score"] for r in row], image_scores[best], rtol=1e-5)
  default = p.classify(env["images"][0], labels, top_k=5)[0]  # the built-in templates
  assert len(default) == 3 and default != got[0]
  np.testing.assert_allclose(p.label_features(labels), p.label_features(
      labels, inference.DEFAULT_TEMPLATES), atol=0)


def test_a_missing_head_names_the_checkpoints_tasks(env):
  plain = inference.Predictor.load(env["plain"], batch_size=4)
  with pytest.raises(errors.InputError, match=r"no VQA head .*trained for tasks \['image_text'\]"
                                              r".*configs/finetune/vqa.py"):
    plain.answer(env["images"][0], QUESTIONS[0])
  with pytest.raises(errors.InputError, match=r"no NLVR2 head: it was trained for tasks "
                                              r"\['image_text'\]; .*configs/finetune/nlvr2.py"):
    plain.nlvr([env["images"][:2]], "a red circle")
  with pytest.raises(errors.InputError, match="no MLM head.*coco_captioning.py"):
    plain.caption(env["images"][0])
  with pytest.raises(errors.InputError, match="VQA mode 'guess'"):
    env["predictor"].answer(env["images"][0], QUESTIONS[0], mode="guess")


# ------------------------------------------------------------------------------ the CLI
@pytest.fixture(autouse=True)
def _load_once(env, monkeypatch):
  """`Predictor.load` with the same arguments returns the Predictor loaded first (the fixture's
  for the heads checkpoint): the commands share its compiled functions."""
  loaded = {(env["ckpt"], None, None, 4): env["predictor"]}
  load = inference.Predictor.load

  def load_once(checkpoint, config=None, *, vocab_path=None, batch_size=8):
    key = (checkpoint, config, vocab_path, batch_size)
    if key not in loaded:
      loaded[key] = load(checkpoint, config, vocab_path=vocab_path, batch_size=batch_size)
    return loaded[key]

  monkeypatch.setattr(inference.Predictor, "load", load_once)


def _cli(env, tmp_path, *args):
  """predict_cli.main in-process -> (status, rows written to --out)."""
  out = str(tmp_path / "out.json")
  status = predict_cli.main([*args, "--checkpoint", env["ckpt"], "--out", out,
                             "--batch-size", "4"])
  return status, (json.load(open(out)) if status == 0 else None)


def test_cli_answer_caption_nlvr_classify_ground(env, tmp_path, capsys):
  a, b = env["images"][:2]
  status, rows = _cli(env, tmp_path, "answer", "--image", a, "--image", b,
                      "--question", QUESTIONS[0], "--question", QUESTIONS[1])
  assert status == 0
  assert [(r["image"], r["question"]) for r in rows] == [(a, QUESTIONS[0]), (a, QUESTIONS[1]),
                                                          (b, QUESTIONS[0]), (b, QUESTIONS[1])]
  want = env["predictor"].answer([a, a, b, b], QUESTIONS[:2] * 2)
  assert [r["answer"] for r in rows] == [w["answer"] for w in want]
  lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert lines == rows  # stdout: one line per result

  status, rows = _cli(env, tmp_path, "caption", "--image", a, "--beam", "1")
  assert status == 0 and rows == [{"image": a, "caption": env["predictor"].caption(
      a, beam_size=1)[0]}]

  status, rows = _cli(env, tmp_path, "nlvr", "--pair", a, b, "--sentence", "a red circle")
  want = env["predictor"].nlvr([(a, b)], ["a red circle"])[0]
  assert status == 0 and rows[0]["images"] == [a, b] and rows[0]["label"] == want["label"]
  assert rows[0]["prob_true"] == pytest.approx(want["prob_true"], abs=1e-5)

  status, rows = _cli(env, tmp_path, "classify", "--image", b, "--label", "circle",
                      "--label", "square", "--label", "triangle", "--top-k", "2")
  want = env["predictor"].classify(b, ["circle", "square", "triangle"], top_k=2)[0]
  assert status == 0 and [t["label"] for t in rows[0]["top"]] == [w["label"] for w in want]

  drawn = str(tmp_path / "boxed.png")
  status, rows = _cli(env, tmp_path, "ground", "--image", a, "--text", "the red circle",
                      "--text", "the blue square", "--draw", drawn)
  want = env["predictor"].ground_batch([a, a], ["the red circle", "the blue square"])
  assert status == 0 and [r["text"] for r in rows] == ["the red circle", "the blue square"]
  np.testing.assert_allclose([r["box_xywh"] for r in rows], want, atol=0.01)
  assert Image.open(drawn).size == Image.open(a).size


def test_cli_embed_then_retrieve_from_the_embeddings(env, tmp_path, capsys):
  folder = tmp_path / "pictures"
  folder.mkdir()
  for path in env["images"]:
    shutil.copy(path, folder / os.path.basename(path))
  (folder / "broken.png").write_bytes(b"\x89PNG not really")
  texts = tmp_path / "texts.jsonl"
  texts.write_text('{"text": "a red circle"}\n{"text": "two squares"}\n')
  emb = str(tmp_path / "emb")
  assert predict_cli.embed_main(["--checkpoint", env["ckpt"], "--images", str(folder),
                                 "--texts", str(texts), "--out", emb]) == 0
  err = capsys.readouterr().err
  assert "broken.png" in err
  paths = json.load(open(os.path.join(emb, "images.json")))
  assert paths == [str(folder / os.path.basename(p)) for p in env["images"]]
  feats = np.load(os.path.join(emb, "image_embeddings.npy"))
  assert feats.dtype == np.float32 and feats.shape == (4, env["config"].model.embed_dim)
  np.testing.assert_allclose(feats, env["predictor"].embed_images(paths), atol=1e-5)
  assert json.load(open(os.path.join(emb, "texts.json"))) == ["a red circle", "two squares"]
  np.testing.assert_allclose(np.load(os.path.join(emb, "text_embeddings.npy")),
                             env["predictor"].embed_texts(["a red circle", "two squares"]),
                             atol=1e-5)

  queries = ["a red circle", "a small blue square"]
  status, rows = _cli(env, tmp_path, "retrieve", "--embeddings", emb, "--query", queries[0],
                      "--query", queries[1], "--top", "2", "--rerank", "3")
  assert status == 0 and [(r["query"], r["rank"]) for r in rows] == [
      (q, k) for q in queries for k in (1, 2)]
  scores = env["predictor"].score(paths, queries)
  for q, query in enumerate(queries):
    order = np.argsort(-scores["itc"][:, q], kind="stable")[:3]
    best = order[np.argsort(-scores["itm"][order, q], kind="stable")][:2]
    got = [r for r in rows if r["query"] == query]
    assert [r["path"] for r in got] == [paths[i] for i in best]
    np.testing.assert_allclose([r["itm"] for r in got], scores["itm"][best, q], atol=1e-4)
  status, folder_rows = _cli(env, tmp_path, "retrieve", "--images", str(folder),
                             "--query", queries[0], "--query", queries[1], "--top", "2",
                             "--rerank", "3")
  assert status == 0 and [r["path"] for r in folder_rows] == [r["path"] for r in rows]


def test_cli_user_mistakes_are_one_error_line(env, tmp_path, capsys):
  empty = tmp_path / "empty"
  empty.mkdir()
  cases = [(["caption", "--images", str(empty)], "no picture in the folder"),
           (["caption", "--image", str(tmp_path / "nope.png")], "nope.png: no such file"),
           (["answer", "--image", env["images"][0]], "no questions"),
           (["nlvr", "--pair", env["images"][0], env["images"][1], "--sentence", "x",
             "--checkpoint", env["plain"]], "no NLVR2 head")]
  for args, message in cases:
    assert predict_cli.main(args + (["--checkpoint", env["ckpt"]] if "--checkpoint" not in args
                                    else [])) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
  # A wrong checkpoint path from a fresh process: one line, status 1, no traceback.
  proc = subprocess.run([sys.executable, "-m", "x2vlm_jax.predict_cli", "classify",
                         "--checkpoint", str(tmp_path / "no_such_run"), "--image",
                         env["images"][0], "--label", "circle"], cwd=ROOT,
                        env=xla_env.subprocess_env(1), capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 1 and proc.stdout == ""
  assert proc.stderr.strip().splitlines() == [
      f"error: checkpoint {tmp_path / 'no_such_run'}: no such directory (a training workdir, "
      "its checkpoints/<step>, or a params dir from tools/convert_checkpoint.py)"]


# ------------------------------------------------------------------------------ drawing
@pytest.mark.parametrize("size", [96, 1000])
def test_labels_are_inside_the_picture_and_apart(size):
  image = Image.new("RGB", (size, size), (0, 0, 0))
  s = size / 96
  boxes = [(60 * s, 80 * s, 30 * s, 14 * s),  # near the bottom-right corner
           (62 * s, 82 * s, 20 * s, 10 * s),  # on top of it
           (0, 0, 40 * s, 30 * s),  # no room above
           (90 * s, 40 * s, 6 * s, 6 * s)]  # at the right edge
  texts = ["the small white triangle", "the large red circle", "a blue square", "green"]
  placed = predict_cli.place_labels(image, texts, boxes, line_width=2)
  rects = [r for _, _, r in placed]
  for x0, y0, x1, y1 in rects:
    assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
  for i in range(len(rects)):
    for j in range(i):
      assert not predict_cli._overlaps(rects[i], rects[j]), (rects[i], rects[j])
  assert [t for t, _, _ in placed] == texts  # every label whole
  font_size = placed[0][1].size
  assert font_size == (8 if size == 96 else 31)
  drawn = np.asarray(predict_cli.draw_boxes(image, texts, boxes))
  for k, (x0, y0, x1, y1) in enumerate(rects):  # each label's background in its colour
    patch = drawn[y0:y1, x0:x1].reshape(-1, 3)
    share = np.mean(np.all(patch == predict_cli.COLOURS[k], axis=1))
    assert share > 0.4, (k, share)
