"""OVAD box-oracle attribute detection (x2vlm_jax/tasks/ovad.py): the benchmark's AP by hand and
against scikit-learn, unknown labels ignored, the reader and writer of the published layout, the
prompts, and both feature protocols on a tiny random model on 8 devices (the crop features are
`Predictor.embed_images` of the crops, the region features `encode_regions` of each box alone)."""
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import average_precision_score

from configs import tiny
from x2vlm_jax import boxes, inference, sharding, tasks
from x2vlm_jax.data import image_ops
from x2vlm_jax.data import text as text_lib
from x2vlm_jax.evaluate import common
from x2vlm_jax.models import x2vlm
from x2vlm_jax.tasks import ovad

VOCAB = os.path.join(os.path.dirname(__file__), "fixtures", "pretrain_tiny", "vocab.txt")
ATTRIBUTES = [
    {"name": "colour:red", "freq_set": "head"},
    {"name": "colour:blue/navy", "freq_set": "medium"},
    {"name": "size:small", "freq_set": "tail"},
    {"name": "pattern:striped", "freq_set": "head", "is_has_att": "has"},
]


# ------------------------------------------------------------------------------ the metric
def test_average_precision_by_hand():
  # Positives at ranks 1, 3, 5: precisions 1/1, 2/3, 3/5 -> AP = (1 + 2/3 + 3/5) / 3 = 34/45.
  ap = ovad.average_precision(np.array([1, 0, 1, 0, 1], bool),
                              np.array([0.9, 0.8, 0.7, 0.6, 0.5]))
  assert ap == pytest.approx(34 / 45, abs=1e-12)
  # A tie is one threshold: {0.9, 0.9} gives P = 1/2 at R = 1/2, then P = 2/3 at R = 1:
  # AP = 1/2 * 1/2 + 1/2 * 2/3 = 7/12 (scikit-learn's definition; no interpolation).
  ap = ovad.average_precision(np.array([1, 0, 1], bool), np.array([0.9, 0.9, 0.5]))
  assert ap == pytest.approx(7 / 12, abs=1e-12)


def test_attribute_aps_clip_ignore_unknowns_and_skip_attributes_without_positives():
  scores = np.array([[0.9, -0.1, 0.3], [0.8, -0.2, 0.2], [0.7, 0.5, 0.1], [0.6, 0.4, 0.0],
                     [0.5, 0.3, 0.9], [0.95, 0.9, 0.8]])
  labels = np.array([[1, 1, 0], [0, 0, 0], [1, -1, -1], [0, -1, 0], [1, -1, 0], [-1, -1, -1]])
  aps = ovad.attribute_aps(scores, labels)
  assert aps[0] == pytest.approx(34 / 45, abs=1e-12)  # the 0.95 box is unknown: ignored
  # Known boxes -0.1 (positive) and -0.2: both clipped to 0 as the benchmark does -> a tie,
  # AP 1/2 (unclipped it would be 1).
  assert aps[1] == pytest.approx(0.5, abs=1e-12)
  assert np.isnan(aps[2])  # no positive box: no AP
  metrics = ovad.map_metrics(np.array([34 / 45, 7 / 12, np.nan, 0.5]),
                             ["head", "head", "medium", "tail"])
  # map = (34/45 + 7/12 + 1/2) / 3 = 0.612963; head = (34/45 + 7/12) / 2 = 0.669444; medium has
  # no AP (not reported); tail = 1/2.
  assert metrics == pytest.approx({"map": 61.296296, "map_head": 66.944444, "map_tail": 50.0},
                                  abs=1e-5)


def test_average_precision_is_scikit_learns_on_random_data_with_ties():
  rng = np.random.default_rng(0)
  for trial in range(20):
    n = int(rng.integers(2, 300))
    labels = rng.random(n) < rng.uniform(0.05, 0.6)
    labels[rng.integers(n)] = True
    scores = rng.random(n)
    if trial % 2:
      scores = np.round(scores, 1)  # many ties
    assert ovad.average_precision(labels, scores) == pytest.approx(
        average_precision_score(labels, scores), abs=1e-12)


def test_unknown_labels_do_not_change_the_aps():
  rng = np.random.default_rng(1)
  labels = rng.choice([-1, 0, 1], size=(200, 6), p=[0.5, 0.35, 0.15]).astype(np.int8)
  scores = rng.random((200, 6))
  other = np.where(labels == -1, rng.normal(size=scores.shape), scores)
  np.testing.assert_array_equal(ovad.attribute_aps(scores, labels),
                                ovad.attribute_aps(other, labels))
  known = labels[:, 0] >= 0
  assert ovad.attribute_aps(scores, labels)[0] == pytest.approx(
      average_precision_score(labels[known, 0] == 1, scores[known, 0]), abs=1e-12)


def test_attribute_scores_reduce_each_attributes_templates_by_mean_or_max():
  rng = np.random.default_rng(3)
  feat, text_feat = rng.normal(size=(3, 4)), rng.normal(size=(5, 4))
  owner = np.array([0, 0, 1, 2, 2], np.int32)
  sims = feat @ text_feat.T
  for reduce, fn in (("mean", np.mean), ("max", np.max)):
    got = ovad.attribute_scores(feat, text_feat, owner, 3, reduce)
    want = np.stack([fn(sims[:, owner == a], axis=1) for a in range(3)], axis=1)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
  with pytest.raises(ValueError, match="synonym_reduce"):
    ovad.make_ovad_fns(None, None, "median")


# ------------------------------------------------------------------------------ prompts, boxes
def test_prompts_are_the_benchmarks_templates():
  assert ovad.attribute_prompts("colour:red", "is", ("a", "the", "none")) == [
      "a red", "a is red", "the red", "the is red", "red"]
  assert ovad.attribute_prompts("hair color:blond/blonde", "has", ("a",)) == [
      "a blond hair color", "a has blond hair color", "a blonde hair color",
      "a has blonde hair color"]
  assert ovad.attribute_prompts("skin tone:dark", "has", ("the",), "object") == [
      "the dark skin object", "the object has dark skin"]
  assert ovad.attribute_prompts("maturity:young/baby", "is", ("none",)) == [
      "young", "baby", "kid", "kids", "child", "toddler", "boy", "girl"]


def test_crop_window_truncates_like_the_benchmark_and_stays_inside():
  assert ovad.crop_window([3.7, 5.2, 20.9, 14.5], 64, 48) == (3, 5, 23, 19)
  assert ovad.crop_window([50.0, 40.0, 30.0, 30.0], 64, 48) == (50, 40, 64, 48)
  assert ovad.crop_window([10.0, 10.0, 0.5, 3.0], 64, 48) == (10, 10, 11, 13)  # >= 1 pixel


def test_region_rows_split_images_with_more_boxes_than_a_row_holds():
  row_image, row_boxes = ovad.region_rows(np.array([0, 0, 2, 0, 2]), 2)
  np.testing.assert_array_equal(row_image, [0, 0, 2])
  np.testing.assert_array_equal(row_boxes, [[0, 1], [3, -1], [2, 4]])


# ------------------------------------------------------------------------------ the file
def _published(tmp_path):
  """A small file in the published layout, written by hand (not by write_ovad_json)."""
  Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "a.png")
  data = {
      "images": [{"id": 7, "file_name": "a.png", "width": 40, "height": 30},
                 {"id": 9, "file_name": "gone.png", "width": 20, "height": 20},
                 {"id": 11, "file_name": "a.png"}],  # no size: read from the file
      "annotations": [
          {"id": 1, "image_id": 7, "bbox": [1.5, 2.0, 20.0, 10.0], "area": 200.0, "iscrowd": 0,
           "category_id": 3, "att_vec": [1, 0, -1]},
          {"id": 2, "image_id": 9, "bbox": [0, 0, 10, 10], "area": 100.0, "iscrowd": 0,
           "category_id": 3, "att_vec": [0, -1, 1]},
          {"id": 3, "image_id": 7, "bbox": [0, 0, 5, 5], "area": 25.0, "iscrowd": 0,
           "category_id": 3, "att_vec": [1, 1, 1]},
          {"id": 4, "image_id": 7, "bbox": [0, 0, 10, 10], "area": 100.0, "iscrowd": 0,
           "category_id": 3, "att_vec": [-1, -1, -1]},
          {"id": 5, "image_id": 8, "bbox": [0, 0, 10, 10], "area": 100.0, "iscrowd": 0,
           "category_id": 3, "att_vec": [1, 0, 0]},
          {"id": 6, "image_id": 7, "bbox": [0, 0, 10], "area": 100.0, "iscrowd": 0,
           "category_id": 3, "att_vec": [1, 0, 0]},
          {"id": 7, "image_id": 7, "bbox": [0, 0, 10, 10], "area": 100.0, "iscrowd": 0,
           "category_id": 3, "att_vec": [1, 2, 0]},
      ],
      "categories": [{"id": 3, "name": "cup"}],
      "attributes": [
          {"id": 1, "name": "material:wood/wooden", "type": "material", "parent_type": "material",
           "is_has_att": "is", "freq_set": "medium"},
          {"id": 0, "name": "color:red", "type": "color", "parent_type": "color",
           "is_has_att": "is", "freq_set": "head"},
          {"id": 2, "name": "pattern:striped", "type": "pattern", "parent_type": "pattern",
           "is_has_att": "has", "freq_set": "tail"},
      ],
  }
  path = tmp_path / "ovad_small.json"
  path.write_text(json.dumps(data))
  return str(path)


def test_reader_reads_the_published_layout_and_names_what_it_leaves_out(tmp_path):
  split = ovad.read_ovad_json(_published(tmp_path), str(tmp_path))
  assert split.attribute_names == ["color:red", "material:wood/wooden", "pattern:striped"]
  assert split.freq_sets == ["head", "medium", "tail"] and split.is_has == ["is", "is", "has"]
  assert split.image_paths == [str(tmp_path / "a.png"), str(tmp_path / "gone.png"),
                               str(tmp_path / "a.png")]
  np.testing.assert_array_equal(split.missing_image, [False, True, False])
  np.testing.assert_array_equal(split.image_sizes, [[40, 30], [20, 20], [40, 30]])
  assert split.box_ids == [1, 2] and split.categories == ["cup", "cup"]
  np.testing.assert_array_equal(split.box_image, [0, 1])
  np.testing.assert_array_equal(split.bbox, [[1.5, 2.0, 20.0, 10.0], [0, 0, 10, 10]])
  np.testing.assert_array_equal(split.labels, [[1, 0, -1], [0, -1, 1]])
  skipped = split.skipped
  assert [w.split(": ")[1] for w in skipped["area below 50"]] == ["annotations[2] (id 3)"]
  assert [w.split(": ")[1] for w in skipped["no known attribute label"]] == [
      "annotations[3] (id 4)"]
  bad = skipped["bad record"]
  assert len(bad) == 3
  assert "annotations[4] (id 5): image_id 8 is not in 'images'" in bad[0]
  assert "annotations[5] (id 6): bbox must be" in bad[1]
  assert "annotations[6] (id 7): att_vec must be 3 values in (1, 0, -1)" in bad[2]


def test_writer_round_trips_through_the_reader(tmp_path):
  Image.new("RGB", (64, 48)).save(tmp_path / "s.png")
  data = ovad.write_ovad_json(
      str(tmp_path / "demo.json"), images=[{"file_name": "s.png", "width": 64, "height": 48}],
      boxes_=[{"image": 0, "bbox": [4, 4, 20, 10], "category": "circle",
               "labels": {"colour:red": 1, "colour:blue/navy": 0, "size:small": 1}},
              {"image": 0, "bbox": [30, 20, 16, 16], "category": "square",
               "labels": {"colour:blue/navy": 1}}],
      attributes=ATTRIBUTES, categories=["circle", "square"])
  assert data["attributes"][3] == {"id": 3, "name": "pattern:striped", "type": "pattern",
                                   "parent_type": "pattern", "is_has_att": "has",
                                   "freq_set": "head"}
  assert data["annotations"][1]["att_vec"] == [-1, 1, -1, -1]
  assert data["annotations"][0]["area"] == 200.0
  split = ovad.read_ovad_json(str(tmp_path / "demo.json"), str(tmp_path))
  np.testing.assert_array_equal(split.labels, [[1, 0, 1, -1], [-1, 1, -1, -1]])
  assert split.categories == ["circle", "square"] and not split.skipped
  with pytest.raises(ValueError, match="label 'colour:green'"):
    ovad.write_ovad_json(str(tmp_path / "x.json"), images=[], categories=["circle"],
                         boxes_=[{"image": 0, "bbox": [0, 0, 9, 9], "category": "circle",
                                  "labels": {"colour:green": 1}}], attributes=ATTRIBUTES)


# ------------------------------------------------------------------------------ the model
def _shape_image(size, seed):
  rng = np.random.default_rng(seed)
  return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("ovad")
  for k, size in enumerate([(64, 48), (40, 40)]):
    _shape_image(size, k).save(tmp / f"img{k}.png")
  (tmp / "corrupt.png").write_bytes(b"not a png")
  images = [{"file_name": "img0.png", "width": 64, "height": 48},
            {"file_name": "img1.png", "width": 40, "height": 40},
            {"file_name": "corrupt.png", "width": 30, "height": 30},
            {"file_name": "missing.png", "width": 30, "height": 30}]
  rng = np.random.default_rng(2)

  def labels():
    return {a["name"]: int(v) for a, v in zip(ATTRIBUTES, rng.integers(0, 2, 4))}

  boxes_ = [{"image": 0, "bbox": [3.7, 5.2, 20.9, 14.5], "category": "circle",
             "labels": {"colour:red": 1, "colour:blue/navy": 0, "size:small": 1,
                        "pattern:striped": 0}},
            {"image": 0, "bbox": [30, 20, 30, 25], "category": "square", "labels": labels()},
            {"image": 1, "bbox": [0, 0, 40, 40], "category": "circle", "labels": labels()},
            {"image": 0, "bbox": [10, 30, 12, 15], "category": "square", "labels": labels()},
            {"image": 1, "bbox": [20.5, 4.5, 12, 30], "category": "square",
             "labels": {"colour:red": 0, "colour:blue/navy": 1, "size:small": 0,
                        "pattern:striped": 1}},
            {"image": 2, "bbox": [0, 0, 20, 20], "category": "circle", "labels": labels()},
            {"image": 3, "bbox": [0, 0, 20, 20], "category": "circle", "labels": labels()}]
  ovad.write_ovad_json(str(tmp / "ovad_val.json"), images=images, boxes_=boxes_,
                       attributes=ATTRIBUTES, categories=["circle", "square"])
  config = tiny.get_config()
  config.unlock()
  m = config.model
  m.vocab_size = 512
  m.hidden_dropout = m.attention_dropout = m.drop_path_rate = 0.0
  config.data.vocab_path = VOCAB
  config.evals.ovad = tasks.evaluator_config("ovad", files=(str(tmp / "ovad_val.json"),),
                                              image_root=str(tmp), batch_size=8,
                                              boxes_per_row=2)
  model = tasks.build_model(config)
  params = jax.device_get(nn.meta.unbox(
      jax.jit(model.init)(jax.random.PRNGKey(0), *x2vlm.init_inputs(model))["params"]))
  mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
  evaluator = tasks.make_evaluators(config, model, mesh)["ovad"]
  split_name, inputs = evaluator.splits[0]
  result = evaluator.evaluate(params, inputs, split_name)
  return dict(tmp=tmp, config=config, model=model, params=params, evaluator=evaluator,
              inputs=inputs, result=result)


def test_both_protocols_score_every_box_and_bad_images_score_zero(env):
  split, result = env["inputs"].split, env["result"]
  assert len(split.box_image) == 7
  np.testing.assert_array_equal(env["inputs"].row_image, [0, 0, 1, 2])  # image 0: 3 boxes
  for p in ovad.PROTOCOLS:
    assert result.scores[p].shape == (7, 4) and result.features[p].shape == (7, 8)
    assert np.isfinite(result.scores[p]).all()
    assert np.abs(result.scores[p][:5]).max() > 0
    np.testing.assert_array_equal(result.scores[p][5:], 0.0)  # corrupt and missing images
  np.testing.assert_array_equal(result.bad_boxes, [0, 0, 0, 0, 0, 1, 1])
  assert result.bad_images == 2


def test_crop_features_are_predictor_embed_images_of_the_crops(env):
  split = env["inputs"].split
  config = env["config"]
  predictor = inference.Predictor(env["model"], env["params"],
                                  text_lib.load_tokenizer(VOCAB), config.model.image_res,
                                  config.data.max_tokens, batch_size=8)
  img0 = Image.open(env["tmp"] / "img0.png").convert("RGB")
  crops = [img0.crop((3, 5, 23, 19))]  # box 0 [3.7, 5.2, 20.9, 14.5] truncated
  for n in range(1, 5):
    img = Image.open(split.image_paths[split.box_image[n]]).convert("RGB")
    crops.append(img.crop(ovad.crop_window(split.bbox[n], *img.size)))
  expected = predictor.embed_images(crops)
  np.testing.assert_allclose(env["result"].features["crop"][:5], expected, atol=1e-5)


def test_region_features_are_encode_regions_of_each_box_alone(env):
  split, model, res = env["inputs"].split, env["model"], env["config"].model.image_res
  patch = env["config"].model.patch_size

  @jax.jit
  def one_region(params, image, mask):
    def f(m, x, a):
      region_embeds, _ = m.encode_regions(x, a, np.zeros((1,), np.int32))
      return m.image_features(region_embeds)
    return model.apply({"params": params}, image, mask, method=f)

  for n in range(5):
    img = Image.open(split.image_paths[split.box_image[n]]).convert("RGB")
    w, h = img.size
    pixels = image_ops.normalize(image_ops.resize_square(img, res))[None]
    mask = boxes.box_patch_mask(boxes.scale_box(split.bbox[n], res / w, res / h), res, patch)
    feat = one_region(env["params"], pixels, mask[None])
    np.testing.assert_allclose(env["result"].features["region"][n], np.asarray(feat)[0],
                               atol=1e-5)


def test_scores_are_the_mean_template_cosine_and_run_reports_the_metrics(env, tmp_path):
  inputs, result, evaluator = env["inputs"], env["result"], env["evaluator"]
  texts, owner = ovad.attribute_templates(inputs.split, ("a", "the", "none"), "")
  np.testing.assert_array_equal(owner, inputs.owner)
  text_feat = inference.Predictor(env["model"], env["params"], text_lib.load_tokenizer(VOCAB),
                                  32, 12, batch_size=8).embed_texts(texts)
  sims = result.features["region"][:5] @ text_feat.T
  expected = np.stack([sims[:, inputs.owner == a].mean(axis=1) for a in range(4)], axis=1)
  np.testing.assert_allclose(result.scores["region"][:5], expected, atol=1e-5)
  assert len(inputs.owner) == 5 * 4 + 5  # "colour:blue/navy": two synonyms

  traces = common.TRACE_COUNTS["ovad_region"], common.TRACE_COUNTS["ovad_crop"]
  metrics = evaluator.run(env["params"], predictions_dir=str(tmp_path))
  assert (common.TRACE_COUNTS["ovad_region"], common.TRACE_COUNTS["ovad_crop"]) == traces
  split = inputs.split
  want = ovad.map_metrics(ovad.attribute_aps(result.scores["region"], split.labels),
                          split.freq_sets)
  crop = ovad.map_metrics(ovad.attribute_aps(result.scores["crop"], split.labels),
                          split.freq_sets)
  assert set(metrics) == {f"eval/ovad/ovad_val/{k}" for k in (
      "map", "map_head", "map_medium", "map_tail", "map_crop", "bad_images")}
  for key, value in want.items():
    assert metrics[f"eval/ovad/ovad_val/{key}"] == pytest.approx(value, abs=1e-9)
  assert metrics["eval/ovad/ovad_val/map_crop"] == pytest.approx(crop["map"], abs=1e-9)
  assert metrics["eval/ovad/ovad_val/bad_images"] == 2.0
  assert all(0.0 <= v <= 100.0 for v in metrics.values() if v != 2.0)
  written = json.load(open(tmp_path / "ovad_ovad_ovad_val.json"))
  assert written["protocols"]["region"]["map"] == pytest.approx(want["map"], abs=1e-9)
  assert set(written["protocols"]["crop"]["ap"]) == {a["name"] for a in ATTRIBUTES}
  assert written["counts"]["bad_images"] == 2 and written["counts"]["missing_images"] == 1
  assert [w.split(": ")[1] for w in written["scored_as_misses"]] == [
      "annotations[5] (id 6)", "annotations[6] (id 7)"]


def test_a_split_whose_images_are_all_missing_scores_every_box_as_a_miss(env, tmp_path):
  ovad.write_ovad_json(
      str(tmp_path / "gone.json"),
      images=[{"file_name": "nowhere.png", "width": 20, "height": 20}],
      boxes_=[{"image": 0, "bbox": [0, 0, 10, 10], "category": "circle",
               "labels": {"colour:red": 1, "size:small": 0}},
              {"image": 0, "bbox": [5, 5, 10, 10], "category": "circle",
               "labels": {"colour:red": 0, "size:small": 0}}],
      attributes=ATTRIBUTES, categories=["circle"])
  config = env["config"].copy_and_resolve_references()
  config.evals.ovad.files = (str(tmp_path / "gone.json"),)
  evaluator = tasks.make_evaluators(config, env["model"])["ovad"]
  metrics = evaluator.run(env["params"])
  # Both boxes score 0: "colour:red" has one positive among two tied boxes, AP 1/2; no other
  # attribute has a positive.
  assert metrics == {"eval/ovad/gone/map": 50.0, "eval/ovad/gone/map_head": 50.0,
                     "eval/ovad/gone/map_crop": 50.0, "eval/ovad/gone/bad_images": 1.0}
