"""Winoground (x2vlm_jax/tasks/winoground.py): the three scores against a hand-computed case and a
brute force, the reader on a small file of the released layout, and the evaluator on a tiny random
model: its pair scores equal `Predictor.score`, bad groups are named and fail."""
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from configs import common as config_common
from configs import tiny
from x2vlm_jax import inference, sharding, tasks
from x2vlm_jax.data import text as text_lib
from x2vlm_jax.evaluate import common
from x2vlm_jax.models import x2vlm
from x2vlm_jax.tasks import winoground

WORDS = ["a", "red", "blue", "green", "circle", "square", "triangle", "left", "right", "of",
         "above", "below", "small", "large"]


# ------------------------------------------------------------------------------ the scores
def test_scores_of_a_hand_computed_case_with_ties():
  s = np.array([
      [[0.9, 0.1], [0.2, 0.8]],  # both captions and both images right: all three
      [[0.5, 0.6], [0.1, 0.7]],  # text yes; image no: caption 0 prefers image 1 (0.6 > 0.5)
      [[0.5, 0.5], [0.2, 0.9]],  # text yes; image tie s(c0,i0) = s(c0,i1): a failure
      [[0.4, 0.1], [0.4, 0.8]],  # text tie s(c0,i0) = s(c1,i0): a failure; image yes
      [[0.3, 0.3], [0.3, 0.3]],  # all equal: nothing
      [[np.nan, 0.1], [0.2, 0.8]],  # NaN (a bad group's score): nothing
  ])
  got = winoground.winoground_correct(s)
  np.testing.assert_array_equal(got["text"], [1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(got["image"], [1, 0, 0, 1, 0, 0])
  np.testing.assert_array_equal(got["group"], [1, 0, 0, 0, 0, 0])
  bad = np.array([0, 0, 0, 0, 0, 1], bool)
  pct = winoground.percent_correct(got, bad)
  assert pct == pytest.approx({"text": 50.0, "image": 100 / 3, "group": 100 / 6})
  # A bad group stays in the denominator even when its scores look right.
  pct = winoground.percent_correct(got, np.array([1, 0, 0, 0, 0, 0], bool))
  assert pct == pytest.approx({"text": 100 / 3, "image": 100 / 6, "group": 0.0})


def _brute_force(s):
  """Per group, per image / caption, in plain Python: text = every image's own caption strictly
  beats the other caption on it; image = every caption's own image strictly beats the other."""
  text, image = [], []
  for g in s.tolist():  # g[c][i]
    text.append(all(g[i][i] > g[1 - i][i] for i in (0, 1)))
    image.append(all(g[c][c] > g[c][1 - c] for c in (0, 1)))
  return np.array(text), np.array(image), np.array(text) & np.array(image)


@pytest.mark.parametrize("kind", ["ties", "floats"])
def test_scores_equal_a_brute_force_over_random_tensors(kind):
  rng = np.random.default_rng(0 if kind == "ties" else 1)
  s = (rng.integers(0, 3, (2000, 2, 2)).astype(np.float32) if kind == "ties"
       else rng.normal(size=(2000, 2, 2)).astype(np.float32))
  got = winoground.winoground_correct(s)
  text, image, group = _brute_force(s)
  np.testing.assert_array_equal(got["text"], text)
  np.testing.assert_array_equal(got["image"], image)
  np.testing.assert_array_equal(got["group"], group)
  assert 0 < group.sum() < text.sum() < len(s)  # the cases are all there
  if kind == "floats":  # the paper's chance: text, image 1/4; group 1/6 (both diagonal scores
    assert text.mean() == pytest.approx(0.25, abs=0.03)  # above both others: 2! 2! / 4!)
    assert image.mean() == pytest.approx(0.25, abs=0.03)
    assert group.mean() == pytest.approx(1 / 6, abs=0.025)


# ------------------------------------------------------------------------------ the data
def _png(path, colour, size=40):
  Image.new("RGB", (size, size), colour).save(path)


@pytest.fixture(scope="module")
def wino(tmp_path_factory):
  """A Winoground folder in the released layout: examples.jsonl (extension-less stems) and
  images/, with a .jpg image, a stem given with its extension, and bad groups: a missing image,
  an empty caption, a line that is not JSON and an image that cannot be decoded."""
  root = tmp_path_factory.mktemp("winoground")
  (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
                                            + WORDS) + "\n")
  images = root / "images"
  images.mkdir()
  rng = np.random.default_rng(0)
  for g in range(7):
    for i in (0, 1):
      if (g, i) == (3, 1):
        continue  # missing
      ext = ".jpg" if (g, i) == (1, 0) else ".png"
      colour = tuple(int(v) for v in rng.integers(0, 256, 3))
      if (g, i) == (5, 0):
        (images / f"ex_{g}_img_{i}{ext}").write_bytes(b"not an image")
      else:
        _png(str(images / f"ex_{g}_img_{i}{ext}"), colour)
  caps = [("a red circle left of a blue square", "a blue square left of a red circle"),
          ("a small green triangle", "a large green triangle"),
          ("a circle above a square", "a square above a circle"),
          ("a red square", "a blue square"),
          ("a green circle", "?!"),
          ("a blue triangle right of a red circle", "a red circle right of a blue triangle"),
          ("a large red square below a small blue circle",
           "a small blue square below a large red circle")]
  tags = ["Relation", "Object", "Relation", "Object", "Both", "Both", "Object"]
  lines = []
  for g, (c0, c1) in enumerate(caps):
    stem = f"ex_{g}_img_{{}}" + (".png" if g == 6 else "")
    lines.append(json.dumps({
        "id": g, "image_0": stem.format(0), "image_1": stem.format(1), "caption_0": c0,
        "caption_1": c1, "tag": "Noun", "secondary_tag": "", "num_main_preds": 1,
        "collapsed_tag": tags[g]}))
  lines.insert(5, "{not json")  # line 6
  (root / "examples.jsonl").write_text("\n".join(lines) + "\n")
  return root


def test_reader_resolves_the_released_layout_and_names_bad_groups(wino):
  tokenizer = text_lib.load_tokenizer(str(wino / "vocab.txt"))
  data = winoground.load_winoground(str(wino / "examples.jsonl"), "", 32, tokenizer, 12)
  assert len(data) == 8
  assert data.ids == [0, 1, 2, 3, 4, f"{wino / 'examples.jsonl'}:6", 5, 6]
  assert data.tags[:3] == ["Relation", "Object", "Relation"] and data.tags[5] is None
  np.testing.assert_array_equal(data.good, [0, 1, 2, 6, 7])  # group 5's image fails only later
  assert sorted(data.bad) == [3, 4, 5]
  assert "no image file for image_1 'ex_3_img_1'" in data.bad[3]
  assert "caption_1 is empty" in data.bad[4] and "'?!'" in data.bad[4]
  assert "malformed JSON" in data.bad[5]
  names = [os.path.relpath(p, wino / "images") for p in data.images.paths]
  assert names == ["ex_0_img_0.png", "ex_0_img_1.png", "ex_1_img_0.jpg", "ex_1_img_1.png",
                   "ex_2_img_0.png", "ex_2_img_1.png", "ex_5_img_0.png", "ex_5_img_1.png",
                   "ex_6_img_0.png", "ex_6_img_1.png"]
  assert data.text_ids.shape == (10, 12) and data.text_atts[:, 0].all()
  # image_root naming the images folder itself finds the same files; a wrong one fails at once.
  roots = winoground.image_roots(str(wino / "images"), "elsewhere/examples.jsonl")
  assert winoground.resolve_image("ex_1_img_0", roots) == str(wino / "images" / "ex_1_img_0.jpg")
  assert winoground.resolve_image("ex_3_img_1", roots) is None
  with pytest.raises(winoground.BadDataError, match="none of its 8 groups"):
    winoground.load_winoground(str(wino / "examples.jsonl"), str(wino / "nowhere"), 32,
                               tokenizer, 12)


# ------------------------------------------------------------------------------ the evaluator
@pytest.fixture(scope="module")
def evaluated(wino, tmp_path_factory):
  """The evaluator as the config builds it (file + image_root) on the 8-device mesh, run twice
  (the second time writing predictions), and a Predictor over the same random params."""
  config = tiny.get_config()
  config.unlock()
  config.data.vocab_path = str(wino / "vocab.txt")
  config.evals.wino = config_common.evaluator("winoground", file=str(wino / "examples.jsonl"),
                                              image_root=str(wino), batch_size=8)
  model = tasks.build_model(config)
  params = jax.device_get(nn.meta.unbox(jax.jit(model.init)(
      jax.random.PRNGKey(0), *x2vlm.init_inputs(model))["params"]))
  mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
  evaluator = tasks.make_evaluators(config, model, mesh)["wino"]
  traces = common.TRACE_COUNTS["winoground_scores"]
  evaluator.run(params)
  out = tmp_path_factory.mktemp("predictions")
  metrics = evaluator.run(params, predictions_dir=str(out))
  rows = [json.loads(line) for line in open(out / "winoground_wino_examples.jsonl")]
  predictor = inference.Predictor(model, params, text_lib.load_tokenizer(config.data.vocab_path),
                                  config.model.image_res, config.data.max_tokens,
                                  max_words=config.data.max_words, batch_size=8)
  return dict(metrics=metrics, rows=rows, predictor=predictor, evaluator=evaluator,
              traces=common.TRACE_COUNTS["winoground_scores"] - traces)


def test_pair_scores_equal_predictor_score(evaluated):
  data = evaluated["evaluator"].data
  scored = [k for k, g in enumerate(data.good) if g != 6]  # group 6 (id 5): image unreadable
  paths = [data.images.paths[2 * k + i] for k in scored for i in (0, 1)]
  wanted = evaluated["predictor"].score(paths, _captions(data, scored))  # [images, captions]
  rows = {r["id"]: r for r in evaluated["rows"]}
  for n, k in enumerate(scored):
    row = rows[data.ids[data.good[k]]]
    for c in (0, 1):
      for i in (0, 1):
        pair = f"c{c}_i{i}"
        assert row["itm"][pair] == pytest.approx(wanted["itm"][2 * n + i, 2 * n + c], abs=1e-5)
        assert row["itc"][pair] == pytest.approx(wanted["itc"][2 * n + i, 2 * n + c], abs=1e-5)
        assert row["itm_log_odds"][pair] == pytest.approx(
            np.log(row["itm"][pair] / (1 - row["itm"][pair])), abs=1e-4)
  assert np.ptp(wanted["itm"]) > 1e-4 and np.ptp(wanted["itc"]) > 1e-3  # distinct scores


def _captions(data, scored):
  """The captions of the scored groups, in row order, from the file."""
  recs = {}
  for line in open(data.file):
    try:
      rec = json.loads(line)
    except json.JSONDecodeError:
      continue
    recs[rec["id"]] = rec
  return [recs[data.ids[data.good[k]]][f"caption_{c}"] for k in scored for c in (0, 1)]


def test_metrics_and_bad_groups(evaluated):
  metrics, rows = evaluated["metrics"], evaluated["rows"]
  assert evaluated["traces"] == 1  # the group scorer compiled once over two runs
  assert [r["id"] for r in rows][:5] == [0, 1, 2, 3, 4] and len(rows) == 8
  bad = {r["id"]: r["bad"] for r in rows if "bad" in r}
  assert sorted(map(str, bad)) == sorted(["3", "4", "5", rows[5]["id"]])
  assert "ex_5_img_0.png cannot be decoded" in bad[5]
  assert metrics["eval/wino/examples/bad_groups"] == 4.0
  for r in rows:
    if "bad" in r:  # failures in all six scores, no scores
      assert r["itm"] is None and r["itc"] is None
      assert not any(r[k] for k in ("text", "image", "group", "itc_text", "itc_image",
                                    "itc_group"))
  # The metrics from the written scores by the brute force, bad groups failing, over all 8.
  for prefix, key in (("", "itm"), ("itc_", "itc")):
    s = np.array([[[r[key][f"c{c}_i{i}"] for i in (0, 1)] for c in (0, 1)] if r[key] else
                  np.full((2, 2), np.nan) for r in rows])
    for name, flags in zip(("text", "image", "group"), _brute_force(s)):
      assert [r[prefix + name] for r in rows] == flags.tolist()
      assert metrics[f"eval/wino/examples/{prefix}{name}"] == pytest.approx(100 * flags.mean())
      for tag in ("Object", "Relation", "Both"):
        chosen = np.array([r["collapsed_tag"] == tag for r in rows])
        assert metrics[f"eval/wino/examples/{tag.lower()}/{prefix}{name}"] == pytest.approx(
            100 * flags[chosen].mean())
  assert len(metrics) == 6 + 1 + 3 * 6
