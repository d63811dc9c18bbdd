"""grain pipelines: batch shapes and values, determinism, iterator state, region pairs, eval sets."""
import json

import numpy as np
import pytest
from PIL import Image

from configs import common
from x2vlm_jax import boxes as box_ops
from x2vlm_jax import tasks
from x2vlm_jax.data import config as data_config_lib
from x2vlm_jax.data import demo
from x2vlm_jax.data import eval_data
from x2vlm_jax.data import examples as examples_lib
from x2vlm_jax.data import image_ops
from x2vlm_jax.data import records
from x2vlm_jax.data import text as text_lib
from x2vlm_jax.tasks import grounding, retrieval

R, PATCH = 32, 16


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("demo")
  return demo.make_demo_data(str(out), num_train=24, num_val=4, image_size=48, seed=0)


def _cfg(paths, **overrides):
  """A full config (unlocked) reading the demo files at R px; `overrides` are config.data fields."""
  config = common.base_config()
  config.model.image_res, config.model.patch_size = R, PATCH
  cfg = config.data
  cfg.vocab_path = paths["vocab"]
  cfg.max_tokens = 16
  cfg.max_words = 16
  cfg.max_masks = 5
  cfg.read_threads = 2
  cfg.image_text.files = [paths["train_image_text"]]
  cfg.image_text.image_root = paths["image_root"]
  cfg.image_text.batch_size = 4
  cfg.regions.files = [paths["train_regions"]]
  cfg.regions.image_root = paths["image_root"]
  cfg.regions.max_images = 3
  cfg.regions.batch_size = 8
  for k, v in overrides.items():
    node = cfg
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return config


def _iterator(config, task, seed=0):
  return tasks.get(task).make_iterator(config, seed=seed)


def _same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_config_is_typed_and_locked():
  cfg = common.base_config().data
  cfg.lock()
  assert data_config_lib.data_config().max_tokens == 40
  assert cfg.max_tokens == 40 and cfg.mask_prob == 0.5 and cfg.regions.max_regions == 5
  assert cfg.image_text.files == () and cfg.swap_left_right_on_flip
  with pytest.raises(AttributeError):
    cfg.max_token = 30  # misspelt key
  with pytest.raises(TypeError):
    cfg.max_tokens = "forty"


def test_image_text_batch(demo_dir):
  cfg = _cfg(demo_dir)
  it = _iterator(cfg, "image_text")
  batch = next(it)
  shapes = {k: (v.shape, v.dtype.name) for k, v in batch.items()}
  assert shapes == {
      "image": ((4, R, R, 3), "float32"),
      "text_ids": ((4, 16), "int32"), "text_atts": ((4, 16), "int32"),
      "text_ids_masked": ((4, 16), "int32"),
      "masked_pos": ((4, 5), "int32"), "masked_ids": ((4, 5), "int32"),
      "image_idx": ((4,), "int32"),
      "num_bad_records": ((), "int32"), "num_records": ((), "int32"),
  }
  assert int(batch["num_bad_records"]) == 0 and int(batch["num_records"]) == 4
  tok = text_lib.load_tokenizer(demo_dir["vocab"])
  assert (batch["text_ids"][:, 0] == tok.cls_id).all()
  lengths = batch["text_atts"].sum(1)
  assert (batch["text_ids"][np.arange(4), lengths - 1] == tok.sep_id).all()
  assert tok.unk_id not in batch["text_ids"]  # the demo vocab covers every generated word
  valid = batch["masked_ids"] != -100
  rows = np.nonzero(valid)[0]
  np.testing.assert_array_equal(batch["text_ids"][rows, batch["masked_pos"][valid]],
                                batch["masked_ids"][valid])
  # Normalised pixels lie in [(0 - mean) / std, (1 - mean) / std].
  lo = (-image_ops.CLIP_MEAN / image_ops.CLIP_STD).min()
  hi = ((1 - image_ops.CLIP_MEAN) / image_ops.CLIP_STD).max()
  assert lo - 1e-5 <= batch["image"].min() and batch["image"].max() <= hi + 1e-5
  it.close()


def test_determinism_and_state_round_trip(demo_dir):
  cfg = _cfg(demo_dir)
  make = lambda seed: _iterator(cfg, "image_text", seed)
  a, b, c = make(3), make(3), make(4)
  first_a, first_b, first_c = next(a), next(b), next(c)
  _same(first_a, first_b)
  assert not np.array_equal(first_a["image"], first_c["image"])
  next(a)
  state = a.get_state()
  json.dumps(state)  # checkpointable as JSON (orbax / grain checkpoint handlers)
  expected = [next(a) for _ in range(2)]
  d = make(3)
  d.set_state(state)
  for want in expected:
    _same(next(d), want)
  for x in (a, b, c, d):
    x.close()


def test_region_batch_fields(demo_dir):
  cfg = _cfg(demo_dir)
  it = _iterator(cfg, "regions")
  batch = next(it)
  p1 = 1 + (R // PATCH) ** 2
  shapes = {k: v.shape for k, v in batch.items()}
  assert shapes["image"] == (3, R, R, 3) and shapes["image_atts"] == (8, p1)
  assert shapes["target_bbox"] == (8, 4) and shapes["text_ids"] == (8, 16)
  for k in ("idx_to_group_img", "is_image", "pair_id"):
    assert shapes[k] == (8,)
  assert batch["idx_to_group_img"].dtype == np.int32 and batch["is_image"].dtype == np.float32
  assert set(batch["idx_to_group_img"].tolist()) <= {0, 1, 2}
  assert int(batch["num_records"]) == 3
  img_rows = batch["is_image"] == 1
  assert (batch["image_atts"][img_rows] == 1).all()
  np.testing.assert_array_equal(batch["target_bbox"][img_rows],
                                np.tile([0.5, 0.5, 1, 1], (img_rows.sum(), 1)))
  reg = ~img_rows
  assert reg.any()
  t = batch["target_bbox"][reg]
  assert ((t > 0) & (t <= 1)).all()
  # image_atts are the patch mask of the target box (back in pixels of the R x R image).
  for (cx, cy, w, h), atts in zip(t, batch["image_atts"][reg]):
    box = ((cx - w / 2) * R, (cy - h / 2) * R, w * R, h * R)
    np.testing.assert_array_equal(atts, box_ops.box_patch_mask(box, R, PATCH))
  it.close()


def test_region_padding_repeats_pairs_with_same_pair_id(demo_dir):
  # 1 image x at most 2 pairs (its caption + one shape) padded to 6 rows.
  cfg = _cfg(demo_dir, **{"regions.max_images": 1, "regions.max_regions": 2,
                          "regions.batch_size": 6})
  it = _iterator(cfg, "regions")
  for _ in range(3):
    batch = next(it)
    ids = batch["pair_id"]
    assert sorted(set(ids.tolist())) == [0, 1]
    for pid in set(ids.tolist()):
      rows = np.flatnonzero(ids == pid)
      for k in ("text_ids", "text_ids_masked", "masked_pos", "image_atts", "target_bbox",
                "is_image", "idx_to_group_img"):
        assert (batch[k][rows] == batch[k][rows[0]]).all(), k
    assert (batch["idx_to_group_img"] == 0).all()
  it.close()
  # More pairs than rows: sampled without replacement, every pair_id distinct.
  cfg = _cfg(demo_dir, **{"regions.max_images": 3, "regions.batch_size": 4})
  it = _iterator(cfg, "regions")
  ids = next(it)["pair_id"]
  assert len(set(ids.tolist())) == 4
  it.close()


def _region_processor(tmp_path, hflip_prob, caption="circle on the left", image_caption=None):
  Image.new("RGB", (40, 20), (90, 90, 90)).save(tmp_path / "r.png")
  rec = {"image": "r.png", "elems": [{"bbox": [10, 4, 8, 6], "caption": caption}]}
  if image_caption:
    rec["caption"] = image_caption
  cfg = common.base_config().data
  cfg.max_tokens = 16
  cfg.regions.image_root = str(tmp_path)
  cfg.regions.hflip_prob = hflip_prob
  cfg.regions.randaug = False
  vocab = tmp_path / "vocab.txt"
  if not vocab.exists():
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "circle", "on",
                                "the", "left", "right", "a", "scene"]) + "\n")
  enc = text_lib.TextEncoder.from_config(cfg, text_lib.load_tokenizer(str(vocab)))
  raw = records.RawRecord("mem:1", json.dumps(rec).encode())
  return examples_lib.RegionProcessor(cfg, cfg.regions, 64, 16, enc), raw


def test_region_flip_target_by_hand(tmp_path, monkeypatch):
  # Force the crop to (2, 1, 34, 17): box [10, 4, 8, 6] -> crop [8, 3, 8, 6] -> flipped in width 32
  # -> [16, 3, 8, 6] -> resized x2 / x4 to 64 x 64 -> [32, 12, 16, 24] -> target by hand.
  monkeypatch.setattr(image_ops, "region_crop_params", lambda *a, **k: (2, 1, 34, 17))
  proc, raw = _region_processor(tmp_path, hflip_prob=1.0)
  ex = proc(raw, np.random.default_rng(0))
  (pair,) = ex["pairs"]
  np.testing.assert_allclose(pair["target_bbox"], [0.625, 0.375, 0.25, 0.375])
  assert np.flatnonzero(pair["image_atts"]).tolist() == [0, 3, 7, 11]
  assert pair["is_image"] == 0
  # "circle on the left" became "circle on the right" ([CLS] circle on the right [SEP]).
  np.testing.assert_array_equal(pair["text_ids"][:6], [2, 5, 6, 7, 9, 3])
  proc_noflip, _ = _region_processor(tmp_path, hflip_prob=0.0)
  (pair0,) = proc_noflip(raw, np.random.default_rng(0))["pairs"]
  np.testing.assert_allclose(pair0["target_bbox"], [0.375, 0.375, 0.25, 0.375])  # x = 16
  np.testing.assert_array_equal(pair0["text_ids"][:6], [2, 5, 6, 7, 8, 3])


def test_region_flip_mirrors_image_box_and_caption(tmp_path):
  arr = np.random.default_rng(0).integers(0, 255, (20, 40, 3), dtype=np.uint8)
  proc, raw = _region_processor(tmp_path, 1.0, image_caption="a scene")
  Image.fromarray(arr).save(tmp_path / "r.png")
  proc0, _ = _region_processor(tmp_path, 0.0, image_caption="a scene")
  Image.fromarray(arr).save(tmp_path / "r.png")  # _region_processor rewrote it
  for seed in range(5):
    f, n = proc(raw, np.random.default_rng(seed)), proc0(raw, np.random.default_rng(seed))
    np.testing.assert_allclose(f["image"], n["image"][:, ::-1], atol=1e-6)
    (img_f, reg_f), (img_n, reg_n) = f["pairs"], n["pairs"]
    assert img_f["is_image"] == 1 and img_n["is_image"] == 1
    tf, tn = reg_f["target_bbox"], reg_n["target_bbox"]
    np.testing.assert_allclose([tf[0], tf[1], tf[2], tf[3]], [1 - tn[0], tn[1], tn[2], tn[3]],
                               atol=1e-6)


def test_swap_left_right_can_be_disabled(tmp_path, monkeypatch):
  monkeypatch.setattr(image_ops, "region_crop_params", lambda *a, **k: (2, 1, 34, 17))
  proc, raw = _region_processor(tmp_path, hflip_prob=1.0)
  proc.swap_left_right = False  # the reference behaviour (cfg.swap_left_right_on_flip = False)
  (pair,) = proc(raw, np.random.default_rng(0))["pairs"]
  np.testing.assert_array_equal(pair["text_ids"][:6], [2, 5, 6, 7, 8, 3])


def test_worker_processes_match_in_process(demo_dir):
  cfg = _cfg(demo_dir)
  it0 = _iterator(cfg, "image_text")
  cfg.data.num_workers = 1
  it1 = _iterator(cfg, "image_text")
  for _ in range(2):
    _same(next(it0), next(it1))
  it0.close()
  it1.close()


def test_retrieval_eval(demo_dir):
  tok = text_lib.load_tokenizer(demo_dir["vocab"])
  out = retrieval.load_retrieval_eval(demo_dir["val_retrieval"], demo_dir["image_root"], R, tok,
                                     16)
  recs = [json.loads(l) for l in open(demo_dir["val_retrieval"])]
  n_txt = sum(len(r["caption"]) for r in recs)
  images = out["images"][0:4]  # decoded when sliced (a batch at a time), resized uint8 pixels
  assert len(out["images"]) == 4
  assert images.shape == (4, R, R, 3) and images.dtype == np.uint8
  assert out["text_ids"].shape == (n_txt, 16) and out["text_atts"].shape == (n_txt, 16)
  assert out["txt2img"].dtype == np.int32
  for i, txts in enumerate(out["img2txt"]):
    assert (out["txt2img"][txts] == i).all() and len(txts) == len(recs[i]["caption"])
  want = np.asarray(image_ops.resize_square(
      Image.open(f"{demo_dir['image_root']}/{recs[1]['image']}").convert("RGB"), R))
  np.testing.assert_array_equal(images[1], want)
  np.testing.assert_array_equal(out["images"][1:2][0], want)
  first = text_lib.add_specials(tok.encode(recs[0]["caption"][0]), tok, 16)
  np.testing.assert_array_equal(out["text_ids"][0, : len(first)], first)
  again = retrieval.load_retrieval_eval(demo_dir["val_retrieval"], demo_dir["image_root"], R,
                                        demo_dir["vocab"], 16)
  np.testing.assert_array_equal(again["images"][0:4], images)


def test_grounding_eval(demo_dir, tmp_path):
  out = grounding.load_grounding_eval(demo_dir["val_grounding"], demo_dir["image_root"], R,
                                      demo_dir["vocab"], 16)
  recs = [json.loads(l) for l in open(demo_dir["val_grounding"])]
  assert out["images"][0:len(recs)].shape == (len(recs), R, R, 3)
  np.testing.assert_array_equal(out["bbox_xywh"], [r["bbox"] for r in recs])
  np.testing.assert_array_equal(out["images"].sizes, np.tile([48, 48], (len(recs), 1)))
  assert out["text_ids"].shape == (len(recs), 16)
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"image": "missing.png", "text": "a", "bbox": [0, 0, 1, 1]}) + "\n")
  with pytest.raises(eval_data.BadDataError, match=f"{bad}:1: no file .*missing.png"):
    grounding.load_grounding_eval(str(bad), str(tmp_path), R, demo_dir["vocab"], 16)


def test_iter_eval_images_pads_the_last_batch(demo_dir):
  recs = [json.loads(l) for l in open(demo_dir["val_retrieval"])]
  paths = [f"{demo_dir['image_root']}/{r['image']}" for r in recs]
  full, _ = eval_data.load_eval_images(paths, R)
  batches = list(eval_data.iter_eval_images(paths, R, batch_size=3))
  assert [b[0].shape for b in batches] == [(3, R, R, 3), (3, R, R, 3)]
  np.testing.assert_array_equal(batches[1][1], [True, False, False])
  np.testing.assert_array_equal(np.concatenate([b[0] for b in batches])[:4], full)
  assert (batches[1][0][1:] == 0).all()


def test_eval_images_decode_a_shared_image_once_per_batch(demo_dir, monkeypatch):
  recs = [json.loads(l) for l in open(demo_dir["val_retrieval"])]
  paths = [f"{demo_dir['image_root']}/{recs[i]['image']}" for i in (0, 0, 1, 0, 1, 2)]
  calls = []
  decode = eval_data._decode_test_image  # pylint: disable=protected-access
  monkeypatch.setattr(eval_data, "_decode_test_image", lambda *a: calls.append(a[0]) or decode(*a))
  images = eval_data.EvalImages(paths, [f"q:{i}" for i in range(6)], R)
  batch = images[0:5]
  assert sorted(calls) == sorted({paths[0], paths[2]})  # rows 0-4 read two distinct images
  np.testing.assert_array_equal(batch[0], batch[3])
  # Rows asked for by batch (as `common.run_batched` asks a process for its rows): rows 5, 0 and
  # rows 1, 4, 3 read two distinct images each.
  calls.clear()
  rows = list(images.load_batches([np.array([5, 0]), np.array([1, 4, 3])]))
  assert sorted(calls) == sorted([paths[5], paths[0], paths[1], paths[4]])
  assert images.num_decoded == 2 + 2 + 2
  np.testing.assert_array_equal(rows[0][1], batch[0])
  np.testing.assert_array_equal(rows[1][1], batch[4])
  # uint8 pixels; normalised as the float32 loader does on the host
  full, _ = eval_data.load_eval_images(paths, R)
  pixels = np.concatenate([batch, images[5:6]])
  assert pixels.dtype == np.uint8
  np.testing.assert_array_equal(np.stack([image_ops.normalize(p) for p in pixels]), full)
  assert not images.bad_mask().any()
