"""Zero-shot classification (x2vlm_jax/tasks/zeroshot.py): the metrics against a hand-computed
case and a brute force over random scores with ties; prompt ensembling against
`Predictor.embed_texts`; the evaluator on the demo's crops (JSONL, with an unknown label and an
unreadable image, ITM re-ranking checked pair by pair), on an ImageFolder tree and on a TFDS
dataset built here; the config checks."""
import io
import json
import logging
import os
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from configs import common, tiny
from x2vlm_jax import errors, inference, sharding, tasks
from x2vlm_jax.data import demo, eval_data, image_ops
from x2vlm_jax.evaluate import retrieval as engine
from x2vlm_jax.models import x2vlm
from x2vlm_jax.tasks import zeroshot

SCALE = 20.0
BATCH = 4  # rounded up to the mesh's 8 batch shards: the 10 JSONL rows make two batches


def _config(paths):
  """configs/tiny.py over the demo vocabulary, no dropout."""
  config = tiny.get_config()
  config.unlock()
  m = config.model
  m.vocab_size, m.max_position = 160, 32
  m.hidden_dropout = m.attention_dropout = m.drop_path_rate = 0.0
  config.data.vocab_path = paths["vocab"]
  config.train.tasks = {"image_text": 1.0}
  return config


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("zeroshot")
  paths = demo.make_demo_data(str(tmp / "data"), num_train=1, num_val=4, image_size=64, seed=0)
  config = _config(paths)
  model = tasks.build_model(config)
  params = jax.device_get(nn.meta.unbox(
      jax.jit(model.init)(jax.random.PRNGKey(0), *x2vlm.init_inputs(model))["params"]))
  # A fresh tiny model maps every text to nearly one feature (cosines 0.99999): its kernels and
  # embeddings x20 tell the prompts, classes and ITM pairs apart (template cosines 0.6 - 0.95).
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x * SCALE if getattr(path[-1], "key", "") in ("kernel", "embedding") else x,
      params)
  tokenizer = eval_data.as_tokenizer(paths["vocab"])
  predictor = inference.Predictor(model, params, tokenizer, config.model.image_res,
                                  config.data.max_tokens, batch_size=BATCH, config=config)
  classes = zeroshot.read_classes(paths["zeroshot_classes"])
  return dict(tmp=tmp, paths=paths, config=config, model=model, params=params,
              predictor=predictor, classes=classes,
              mesh=sharding.make_mesh(dict(data=2, fsdp=4, tensor=1)))


def _evaluator(env, name, **fields):
  config = env["config"].copy_and_resolve_references()
  config.unlock()
  config.evals = {name: common.evaluator("zeroshot", batch_size=BATCH, **fields)}
  return tasks.make_evaluators(config, env["model"], env["mesh"])[name]


# ------------------------------------------------------------------------------ metrics
def test_metrics_of_a_hand_computed_case():
  # 5 images, 6 classes; rankings (ties: the lower class first) and where the label lands:
  #   0: [2, 0, 1, 3, 4] label 2: first      1: [5, 4, 3, 2, 1] label 0: sixth, a miss
  #   2: [1, 0, 2, 3, 4] label 0: second     3: all tied [0, 1, 2, 3, 4] label 1: second
  #   4: unreadable (label 3): a miss whatever it scores
  scores = np.array([[0.5, 0.4, 0.9, 0.3, 0.2, 0.1],
                     [0.0, 0.1, 0.2, 0.3, 0.4, 0.5],
                     [0.5, 0.6, 0.4, 0.3, 0.2, 0.1],
                     [0.7, 0.7, 0.7, 0.7, 0.7, 0.7],
                     [0.0, 0.0, 0.0, 0.9, 0.0, 0.0]])
  labels = np.array([2, 0, 0, 1, 3])
  miss = np.array([False, False, False, False, True])
  ranked = zeroshot.rank_classes(scores, 5)
  np.testing.assert_array_equal(ranked[3], [0, 1, 2, 3, 4])
  np.testing.assert_array_equal(ranked[2, :3], [1, 0, 2])
  m = zeroshot.classification_metrics(ranked, labels, 6, miss)
  assert m["top1"] == pytest.approx(20.0)  # image 0
  assert m["top5"] == pytest.approx(60.0)  # images 0, 2, 3 (1: rank 6; 4: unreadable)
  # per class: 0 -> images 1, 2 both wrong at top-1: 0%; 1 -> image 3 predicted 0: 0%;
  # 2 -> 100%; 3 -> image 4 unreadable: 0%; 4, 5: no images
  np.testing.assert_allclose(m["per_class"], [0, 0, 100, 0, np.nan, np.nan])
  assert m["mean_per_class"] == pytest.approx(25.0)
  counts = zeroshot.confusion_matrix(ranked[:, 0], labels, 6, ~miss)
  want = np.zeros((6, 6), int)
  want[2, 2] = want[0, 5] = want[0, 1] = want[1, 0] = 1
  np.testing.assert_array_equal(counts, want)
  # an unknown label (-1) is a miss wherever its image ranks
  assert zeroshot.topk_accuracy(ranked, np.array([2, -1, -1, -1, -1]), 5) == pytest.approx(20.0)
  # ITM re-ranking of the first 3 of image 0 ([2, 0, 1] scored 0.8, 0.1, 0.8): 2 and 1 tie
  # and keep their ITC order, 0 drops to third; the rest stay
  itm = np.array([[0.8, 0.1, 0.8]] + [[0.0, 0.0, 0.0]] * 4)
  np.testing.assert_array_equal(zeroshot.rerank(ranked, itm)[0], [2, 1, 0, 3, 4])
  np.testing.assert_array_equal(zeroshot.rerank(ranked, itm)[1:], ranked[1:])


def _brute_rank(scores, label):
  """0-based place of `label` in a row: classes scoring higher, then equal ones of lower index."""
  s = scores[label]
  return int(np.sum(scores > s) + np.sum(scores[:label] == s))


def test_metrics_match_a_brute_force_over_random_scores_with_ties():
  rng = np.random.default_rng(3)
  n, c = 300, 7
  scores = rng.integers(0, 4, (n, c)).astype(np.float32)  # many ties
  labels = rng.integers(-1, c, n)  # -1: a label outside the classes
  miss = rng.random(n) < 0.1
  ranked = zeroshot.rank_classes(scores, 5)
  m = zeroshot.classification_metrics(ranked, labels, c, miss)
  places = np.array([_brute_rank(scores[i], labels[i]) if labels[i] >= 0 else c
                     for i in range(n)])
  for k, key in ((1, "top1"), (5, "top5")):
    hits = sum(1 for i in range(n) if labels[i] >= 0 and not miss[i] and places[i] < k)
    assert m[key] == pytest.approx(100.0 * hits / n)
  per_class = []
  for k in range(c):
    rows = [i for i in range(n) if labels[i] == k]
    per_class.append(100.0 * sum(places[i] == 0 and not miss[i] for i in rows) / len(rows))
  np.testing.assert_allclose(m["per_class"], per_class)
  assert m["mean_per_class"] == pytest.approx(np.mean(per_class))
  assert 5 < m["top1"] < m["top5"] < 95  # the case is not degenerate
  # the device takes the same top K, ties included
  _, device = jax.jit(zeroshot.top_classes, static_argnums=1)(scores, 5)
  np.testing.assert_array_equal(np.asarray(device), ranked)
  # re-ranking: the first k by ITM (stable), brute force
  itm = rng.integers(0, 3, (n, 3)).astype(np.float32)
  got = zeroshot.rerank(ranked, itm)
  for i in range(n):
    order = sorted(range(3), key=lambda j: (-itm[i, j], j))
    assert list(got[i]) == [ranked[i, j] for j in order] + list(ranked[i, 3:])


# ------------------------------------------------------------------------------ the classifier
def test_prompt_ensembling_is_the_mean_of_normalised_template_features(env):
  p, classes = env["predictor"], env["classes"][:4]
  templates = ["a {} here", "{}", "the {}"]
  feats = p.embed_texts([t.format(c) for c in classes for t in templates])
  want = feats.reshape(4, 3, -1).mean(axis=1)
  want /= np.linalg.norm(want, axis=1, keepdims=True)
  np.testing.assert_allclose(zeroshot.class_embeddings(feats, 4), want, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(p.label_features(classes, templates), want, rtol=1e-5, atol=1e-6)
  assert zeroshot.prompts(["red circle"], zeroshot.DEFAULT_TEMPLATES) == [
      "a photo of a red circle.", "red circle"]
  assert inference.DEFAULT_TEMPLATES is zeroshot.DEFAULT_TEMPLATES
  with pytest.raises(errors.InputError, match="must hold"):
    p.label_features(classes, ["no placeholder"])


# ------------------------------------------------------------------------------ JSONL
@pytest.fixture(scope="module")
def jsonl_run(env, tmp_path_factory):
  """The demo's crops plus a crop labelled with an unknown class and an unreadable image, run
  with just files, image_root and classes (the demo's wiring) and rerank_k=3."""
  tmp = tmp_path_factory.mktemp("jsonl")
  root = env["paths"]["image_root"]
  rows = [json.loads(line) for line in open(env["paths"]["val_zeroshot"])]
  (tmp / "broken.png").write_bytes(b"not a png")
  # labelled with the class its stand-in (the mean pixel) is given: a hit unless scored a miss
  p = env["predictor"]
  mean_image = np.broadcast_to(image_ops.MEAN_PIXEL, (32, 32, 3)).copy()
  stand_in = env["classes"][int(np.argmax(p.embed_images(mean_image)
                                          @ p.label_features(env["classes"]).T))]
  rows += [{"image": rows[0]["image"], "label": "purple hexagon"},
           {"image": str(tmp / "broken.png"), "label": stand_in}]
  path = tmp / "zeroshot_val.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  evaluator = _evaluator(env, "zs", files=(str(path),), image_root=root,
                         classes=env["paths"]["zeroshot_classes"], rerank_k=3)
  metrics = evaluator.run(env["params"], predictions_dir=str(tmp / "out"))
  return dict(tmp=tmp, rows=rows, path=str(path), evaluator=evaluator, metrics=metrics,
              out=tmp / "out")


def test_jsonl_metrics_are_those_of_the_predictor(env, jsonl_run):
  rows, metrics, classes = jsonl_run["rows"], jsonl_run["metrics"], env["classes"]
  n = len(rows)
  assert n == 10 and len(classes) == 18
  assert set(metrics) == {f"eval/zs/zeroshot_val/{k}" for k in (
      "top1", "top5", "mean_per_class", "top1_itm", "bad_images", "unknown_labels")}
  assert metrics["eval/zs/zeroshot_val/bad_images"] == 1
  assert metrics["eval/zs/zeroshot_val/unknown_labels"] == 1
  # independent: the Predictor's image features against its own label features
  p = env["predictor"]
  good = rows[:-1]  # the broken image cannot be embedded; it is a miss anyway
  scores = p.embed_images([os.path.join(env["paths"]["image_root"], r["image"]) for r in good]
                          ) @ p.label_features(classes).T
  order = np.argsort(-scores, axis=1)
  labels = [classes.index(r["label"]) if r["label"] in classes else -1 for r in good]
  top1 = sum(order[i, 0] == labels[i] for i in range(len(good)))
  top5 = sum(labels[i] in order[i, :5] for i in range(len(good)))
  assert metrics["eval/zs/zeroshot_val/top1"] == pytest.approx(100.0 * top1 / n)
  assert metrics["eval/zs/zeroshot_val/top5"] == pytest.approx(100.0 * top5 / n)
  assert top5 > top1  # the figures say something
  predictions = [json.loads(line) for line in open(
      jsonl_run["out"] / "zeroshot_zs_zeroshot_val_predictions.jsonl")]
  assert [r["where"] for r in predictions] == [f"{jsonl_run['path']}:{k}" for k in range(1, n + 1)]
  for i, pred in enumerate(predictions[:-1]):
    assert pred["top"] == [classes[k] for k in order[i, :5]]
    np.testing.assert_allclose(pred["scores"], scores[i, order[i, :5]], atol=1e-4)
  assert predictions[-1]["unreadable"] and "unreadable" not in predictions[0]
  assert predictions[-2]["label"] == "purple hexagon"


def test_itm_reranking_is_the_mean_itm_logit_over_templates(env, jsonl_run):
  """Brute force: each image's top-3 classes, every (image, prompt) pair scored on its own by
  the retrieval engine's pair scorer, averaged over the templates."""
  classes, rows = env["classes"], jsonl_run["rows"][:-1]
  n = len(rows)
  fns = engine.make_retrieval_fns(env["model"])
  images = eval_data.EvalImages([os.path.join(env["paths"]["image_root"], r["image"])
                                 for r in rows], [str(i) for i in range(n)], 32)[0:n]
  image_embeds, image_feat = fns["encode_images"](env["params"], images)
  texts = zeroshot.prompts(classes, zeroshot.DEFAULT_TEMPLATES)
  ids, atts = inference.encode_texts(texts, env["predictor"].tokenizer, 12, 12)
  text_embeds, text_feat = fns["encode_texts"](env["params"], ids, atts)
  class_feat = zeroshot.class_embeddings(np.asarray(text_feat), len(classes))
  top3 = zeroshot.rank_classes(np.asarray(image_feat) @ class_feat.T, 3)
  img_idx = np.repeat(np.arange(n), 6).astype(np.int32)  # 3 classes x 2 templates per image
  txt_idx = (top3[:, :, None] * 2 + np.arange(2)).reshape(-1).astype(np.int32)
  logits = np.asarray(fns["pair_itm"](env["params"], image_embeds, text_embeds, atts, img_idx,
                                      txt_idx))[:, 1].reshape(n, 3, 2).mean(axis=-1)
  best = top3[np.arange(n), logits.argmax(axis=1)]
  labels = np.array([classes.index(r["label"]) if r["label"] in classes else -1 for r in rows])
  assert jsonl_run["metrics"]["eval/zs/zeroshot_val/top1_itm"] == pytest.approx(
      100.0 * np.sum(best == labels) / (n + 1))
  predictions = [json.loads(line) for line in open(
      jsonl_run["out"] / "zeroshot_zs_zeroshot_val_predictions.jsonl")]
  for i in range(n):
    order = np.argsort(-logits[i], kind="stable")
    assert predictions[i]["top_itm"] == [classes[top3[i, j]] for j in order]
    np.testing.assert_allclose(predictions[i]["itm"], logits[i, order], atol=1e-4)
  assert len({tuple(p["top_itm"]) for p in predictions}) > 1


def test_confusion_file_and_the_named_bad_rows(env, jsonl_run, caplog):
  classes = env["classes"]
  confusion = json.load(open(jsonl_run["out"] / "zeroshot_zs_zeroshot_val_confusion.json"))
  assert confusion["classes"] == classes and confusion["predicted_by"] == "itm"
  counts = np.array(confusion["counts"])
  assert counts.shape == (18, 18) and counts.sum() == 8  # 10 rows - unknown label - unreadable
  assert confusion["unknown_labels"] == {"purple hexagon": 1}
  unreadable = np.array(confusion["unreadable"])
  assert unreadable.sum() == 1 and unreadable[classes.index(jsonl_run["rows"][-1]["label"])] == 1
  totals = counts.sum(axis=1) + unreadable
  for c, value in enumerate(confusion["per_class_top1"]):
    assert (value is None) == (totals[c] == 0)
    if value is not None:
      assert value == pytest.approx(100.0 * counts[c, c] / totals[c], abs=1e-3)
  predictions = [json.loads(line) for line in open(
      jsonl_run["out"] / "zeroshot_zs_zeroshot_val_predictions.jsonl")]
  assert np.trace(counts) == sum(p["top_itm"][0] == p["label"] for p in predictions[:-1])
  # the unknown label is named with its record when the evaluator is built
  with caplog.at_level(logging.WARNING):
    _evaluator(env, "again", files=(jsonl_run["path"],), image_root=env["paths"]["image_root"],
               classes=env["paths"]["zeroshot_classes"])
  assert any("'purple hexagon' x1 (first " + jsonl_run["path"] + ":9)" in r.getMessage()
             for r in caplog.records)


# ------------------------------------------------------------------------------ ImageFolder
def test_image_folder_tree(env, tmp_path, caplog):
  rows = [json.loads(line) for line in open(env["paths"]["val_zeroshot"])]
  root = tmp_path / "val"
  for n, r in enumerate(rows[:6]):
    folder = root / r["label"] / ("sub" if n % 2 else "")
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(os.path.join(env["paths"]["image_root"], r["image"]), folder / f"{n}.png")
  (root / "aaa empty").mkdir()
  (root / rows[0]["label"] / "notes.txt").write_text("not an image")
  paths, labels, classes, empty = zeroshot.read_image_folder(str(root))
  want = sorted({r["label"] for r in rows[:6]} | {"aaa empty"})
  assert classes == want and empty == ["aaa empty"]
  assert sorted(labels) == sorted(r["label"] for r in rows[:6]) and len(paths) == 6
  assert labels == sorted(labels) and not any(p.endswith(".txt") for p in paths)
  templates = tmp_path / "templates.txt"
  templates.write_text("a {} here\n\nthe {}\n")
  with caplog.at_level(logging.WARNING):
    evaluator = _evaluator(env, "folder", image_folders=(str(root),), templates=str(templates))
  assert any("1 class folders hold no image: aaa empty" in r.getMessage() for r in caplog.records)
  assert evaluator.classes == want and evaluator.templates == ("a {} here", "the {}")
  # the evaluator's classifier (prompts encoded on the mesh) is the hand-made ensemble
  feats = env["predictor"].embed_texts([t.format(c) for c in want for t in ("a {} here", "the {}")])
  hand = feats.reshape(6, 2, -1).mean(axis=1)
  hand /= np.linalg.norm(hand, axis=1, keepdims=True)
  class_feat, text_embeds, _ = evaluator.classifier(env["params"])
  np.testing.assert_allclose(np.asarray(class_feat), hand, rtol=1e-5, atol=1e-6)
  assert text_embeds is None  # no re-ranking: the prompts' token embeddings are not kept
  metrics = evaluator.run(env["params"])
  assert metrics["eval/folder/val/empty_classes"] == 1
  p = env["predictor"]
  scores = p.embed_images(paths) @ p.label_features(want, ["a {} here", "the {}"]).T
  truth = [want.index(label) for label in labels]
  order = np.argsort(-scores, axis=1)
  assert len(want) == 6 and "aaa empty" in want  # the empty folder is a class all the same
  assert metrics["eval/folder/val/top1"] == pytest.approx(100.0 * np.mean(order[:, 0] == truth))
  assert metrics["eval/folder/val/top5"] == pytest.approx(
      100.0 * np.mean([t in o[:5] for t, o in zip(truth, order)]))


# ------------------------------------------------------------------------------ TFDS
def test_tfds_dataset(env, tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  rows = [json.loads(line) for line in open(env["paths"]["val_zeroshot"])][:5]
  names = ["green square", rows[0]["label"], rows[1]["label"], "white circle"]
  names = list(dict.fromkeys(names))  # ClassLabel order, not sorted
  images = [Image.open(os.path.join(env["paths"]["image_root"], r["image"])).convert("RGB")
            for r in rows]

  def png(img):
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()

  examples = [(png(images[0]), rows[0]["label"]), (png(images[1]), rows[1]["label"]),
              (png(images[2]), names[0]), (b"\x89PNG broken", rows[0]["label"])]

  class ZeroshotTiny(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3)),
          "label": tfds.features.ClassLabel(names=names)}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"test": self._generate_examples()}

    def _generate_examples(self):
      for n, (data, label) in enumerate(examples):
        yield n, {"image": io.BytesIO(data), "label": label}

  ZeroshotTiny(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  evaluator = _evaluator(env, "tf", tfds_name="zeroshot_tiny", tfds_data_dir=str(tmp_path))
  assert evaluator.classes == names  # the ClassLabel's order
  split = evaluator.splits[0]
  assert split.name == "test" and len(split.where) == 4
  assert sorted(split.labels) == sorted(label for _, label in examples)
  metrics = evaluator.run(env["params"])
  assert metrics["eval/tf/test/bad_images"] == 1
  bad = split.images.bad_mask()
  assert split.labels[int(np.flatnonzero(bad)[0])] == rows[0]["label"]  # the broken record
  # independent: the decoded images of the readable records through the Predictor
  decoded = {data: img for (data, _), img in zip(examples[:3], images[:3])}
  source = tfds.data_source("zeroshot_tiny", split="test", data_dir=str(tmp_path),
                            decoders={"image": tfds.decode.SkipDecoding()})
  p = env["predictor"]
  good = [i for i in range(4) if not bad[i]]
  scores = p.embed_images([np.asarray(decoded[source[i]["image"]]) for i in good]
                          ) @ p.label_features(names).T
  hits = sum(np.argmax(s) == names.index(split.labels[i]) for s, i in zip(scores, good))
  assert metrics["eval/tf/test/top1"] == pytest.approx(100.0 * hits / 4)
  assert metrics["eval/tf/test/mean_per_class"] >= 0 and "eval/tf/test/top1_itm" not in metrics


# ------------------------------------------------------------------------------ config checks
def test_config_mistakes_fail_naming_the_field(env, tmp_path):
  root = env["paths"]["image_root"]
  with pytest.raises(ValueError, match="set exactly one of files, image_folders, tfds_name"):
    _evaluator(env, "x", files=(env["paths"]["val_zeroshot"],), image_folders=(root,))
  with pytest.raises(ValueError, match=r"set exactly one .* \(got none\)"):
    _evaluator(env, "x")
  bad = tmp_path / "templates.txt"
  bad.write_text("a photo of a {}\nno placeholder\n")
  with pytest.raises(ValueError, match=rf"config.evals.x.templates: {bad}:2: template "):
    _evaluator(env, "x", files=(env["paths"]["val_zeroshot"],), image_root=root,
               templates=str(bad))
  dup = tmp_path / "classes.txt"
  dup.write_text("red circle\nblue square\nred circle\n")
  with pytest.raises(ValueError, match=rf"classes: {dup}:3: class 'red circle' repeats"):
    _evaluator(env, "x", files=(env["paths"]["val_zeroshot"],), image_root=root,
               classes=str(dup))
  labelless = tmp_path / "labelless.jsonl"
  labelless.write_text(json.dumps({"image": "images/val_000000.png", "label": 3}) + "\n")
  with pytest.raises(eval_data.BadDataError, match=rf"{labelless}:1: 'label' must be"):
    _evaluator(env, "x", files=(str(labelless),), image_root=root)
  config = env["config"].copy_and_resolve_references()
  config.unlock()
  config.train.tasks = {"zeroshot": 1.0}
  with pytest.raises(errors.InputError, match="zero-shot classification has no training"):
    tasks.validate(config, training=True)
