"""Bad input is skipped, counted and logged, batches stay full, and BadDataError stops a broken set."""
import base64
import io
import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from configs import common
from x2vlm_jax import tasks
from x2vlm_jax.data import pipeline

FIXTURE_VOCAB = os.path.join(os.path.dirname(__file__), "fixtures", "pretrain_tiny", "vocab.txt")
R, PATCH = 32, 16


def _png(img):
  buf = io.BytesIO()
  img.save(buf, "PNG")
  return buf.getvalue()


def _write_images(root):
  """Good images in every awkward mode, and broken files. Returns {name: path}."""
  rng = np.random.default_rng(0)
  rgb = Image.fromarray(rng.integers(0, 255, (24, 30, 3), dtype=np.uint8))
  rgb.save(root / "rgb.png")
  rgb.convert("L").save(root / "gray.png")
  rgb.convert("CMYK").save(root / "cmyk.jpg")
  rgb.convert("P").save(root / "palette.png")
  rgb.convert("RGBA").save(root / "rgba.png")
  Image.fromarray((np.arange(24 * 30).reshape(24, 30) * 80).astype(np.uint16)).save(root / "g16.png")
  exif = Image.Exif()
  exif[0x0112] = 6  # stored 40 x 20, displayed 20 x 40
  Image.new("RGB", (40, 20), (200, 30, 30)).save(root / "exif.jpg", exif=exif.tobytes())
  (root / "zero.png").write_bytes(b"")
  png = _png(rgb)
  (root / "trunc.png").write_bytes(png[: len(png) // 2])
  (root / "notimage.png").write_bytes(b"GIF89a but not really an image at all")
  jpeg = io.BytesIO()
  rgb.save(jpeg, "JPEG")
  (root / "trunc.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
  Image.new("RGB", (200, 150), (9, 9, 9)).save(root / "huge.png")  # above max_image_pixels below
  return base64.b64encode(png).decode()


def _cfg(files, root, **kw):
  """A full config (unlocked) at R px; `kw` are config.data fields."""
  config = common.base_config()
  config.model.image_res, config.model.patch_size = R, PATCH
  cfg = config.data
  cfg.vocab_path = FIXTURE_VOCAB
  cfg.max_tokens = 12
  cfg.max_masks = 4
  cfg.read_threads = 2
  cfg.shuffle = False  # file order: the first batch consumes exactly the whole file
  cfg.max_bad_fraction = 1.0
  for sub in (cfg.image_text, cfg.regions):
    sub.files = files
    sub.image_root = str(root)
  for k, v in kw.items():
    node = cfg
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return config


def _write_lines(path, lines):
  with open(path, "wb") as f:
    for line in lines:
      f.write((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n")


def test_image_text_bad_records_are_skipped_and_counted(tmp_path, caplog):
  b64 = _write_images(tmp_path)
  cap = "a dog on the left"
  lines = [
      {"image": "rgb.png", "caption": cap},  # 1 good
      {"image": "missing.png", "caption": cap},  # 2 bad: missing file
      {"image": "gray.png", "caption": [cap, "a cat"]},  # 3 good
      {"image": "zero.png", "caption": cap},  # 4 bad: zero bytes
      {"image": "cmyk.jpg", "caption": cap},  # 5 good
      {"image": "trunc.png", "caption": cap},  # 6 bad: truncated PNG
      {"image": "palette.png", "caption": cap},  # 7 good
      {"image": "notimage.png", "caption": cap},  # 8 bad: not an image
      {"image": "rgba.png", "caption": cap},  # 9 good
      {"image": "rgb.png", "caption": "?! ..."},  # 10 bad: empty after pre_caption
      {"image": "g16.png", "caption": cap},  # 11 good
      b'{"image": "rgb.png", "caption": "caf\xe9"}',  # 12 bad: not UTF-8
      {"image_b64": b64, "caption": cap},  # 13 good
      b'{"image": "rgb.png", "caption": ',  # 14 bad: malformed JSON
      {"binary": b64, "caption": cap},  # 15 good
      {"binary": "@@not base64@@", "caption": cap},  # 16 bad: base64
      {"image": "exif.jpg", "caption": [cap]},  # 17 good
      {"image": "rgb.png"},  # 18 bad: no caption
      {"image": "rgb.png", "caption": cap},  # 19 good
      {"image": "trunc.jpg", "caption": cap},  # 20 bad: truncated JPEG
      {"image": "huge.png", "caption": cap},  # 21 bad: more pixels than max_image_pixels
      {"image": "rgb.png", "caption": " \t\n "},  # 22 bad: whitespace only
      {"image": "rgb.png", "caption": "dog " * 20000},  # 23 good: truncated to max_tokens
  ]
  path = tmp_path / "it.jsonl"
  _write_lines(path, lines)
  bad_lines = [2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 21, 22]
  n_good = len(lines) - len(bad_lines)
  cfg = _cfg([str(path)], tmp_path, **{"image_text.batch_size": n_good, "prefetch": 0,
                                       "max_image_pixels": 10_000})
  with caplog.at_level(logging.WARNING):
    it = tasks.get("image_text").make_iterator(cfg, seed=0)
    batch = next(it)
  assert batch["image"].shape == (n_good, R, R, 3)  # full batch
  assert np.isfinite(batch["image"]).all()
  assert int(batch["num_records"]) == len(lines)
  assert int(batch["num_bad_records"]) == len(bad_lines)
  for line in bad_lines:
    assert f"{path}:{line}:" in caplog.text, line
  for reason in ("not found", "0 bytes", "cannot decode", "empty after cleaning", "UTF-8",
                 "malformed JSON", "base64", "no usable caption", "above the limit 10000"):
    assert reason in caplog.text, reason
  # The very long caption is kept, cut to max_tokens: [CLS] dog ... dog [SEP].
  long_row = batch["text_atts"].sum(axis=1).max()
  assert long_row == 12 and batch["text_atts"].shape[1] == 12
  # Batches never shrink: the next one pulls from the next epoch.
  second = next(it)
  assert second["image"].shape[0] == n_good and int(second["num_bad_records"]) == len(bad_lines)
  it.close()


def test_region_bad_records_and_bad_elements(tmp_path, caplog):
  _write_images(tmp_path)
  good_elem = {"bbox": [2, 3, 10, 8], "caption": "dog"}
  nan = float("nan")
  lines = [
      # 1 good: EXIF-rotated JPEG, box valid only in the displayed 20 x 40 frame.
      {"image": "exif.jpg", "caption": "a red dog", "elems": [{"bbox": [2, 25, 10, 10], "caption": "dog"}]},
      # 2 bad: all boxes degenerate.
      {"image": "rgb.png", "elems": [{"bbox": [1, 1, 0, 5], "caption": "dog"},
                                     {"bbox": [1, 1, 5, -2], "caption": "dog"},
                                     {"bb": [nan, 1, 5, 5], "caption": "dog"}]},
      # 3 good: one usable element among bad ones ("bb" key accepted).
      {"image": "rgb.png", "elems": [{"bb": [1, 1, 8, 8], "caption": ["cat"], "attributes": "red"},
                                     {"bbox": [1, 1, -3, 4], "caption": "dog"},
                                     {"bbox": [1, 1, 3, 0], "caption": "dog"},
                                     {"bbox": [nan, 1, 3, 3], "caption": "dog"},
                                     {"bbox": [500, 500, 10, 10], "caption": "dog"},
                                     {"bbox": [2, 2, 5, 5], "caption": "!!"}]},
      # 4 bad: every box outside the 30 x 24 image.
      {"image": "rgb.png", "elems": [{"bbox": [100, 100, 10, 10], "caption": "dog"},
                                     {"bbox": [-50, 2, 20, 5], "caption": "dog"}]},
      # 5 bad: no elems.
      {"image": "rgb.png", "caption": "a dog", "elems": []},
      # 6 bad: missing image.
      {"image": "missing.png", "elems": [good_elem]},
      # 7 good.
      {"image": "gray.png", "elems": [good_elem]},
  ]
  path = tmp_path / "regions.jsonl"
  _write_lines(path, lines)
  cfg = _cfg([str(path)], tmp_path, **{"regions.max_images": 3, "regions.batch_size": 6})
  with caplog.at_level(logging.WARNING):
    it = tasks.get("regions").make_iterator(cfg, seed=0)
    batch = next(it)
  assert batch["image"].shape == (3, R, R, 3) and batch["text_ids"].shape == (6, 12)
  assert int(batch["num_records"]) == 7 and int(batch["num_bad_records"]) == 4
  for line in (2, 4, 5, 6):
    assert f"Skipping bad record {path}:{line}:" in caplog.text, line
  assert f"Record {path}:3: dropped 5 of 6 regions" in caplog.text
  # Pairs: exif record -> image caption + 1 region, record 3 -> 1, record 7 -> 1: 4 distinct pairs.
  assert len(set(batch["pair_id"].tolist())) == 4
  assert sorted(set(batch["idx_to_group_img"].tolist())) == [0, 1, 2]
  it.close()


def test_bad_data_error_after_min_records(tmp_path):
  _write_images(tmp_path)
  lines = [{"image": "rgb.png", "caption": "a dog"}] + [
      {"image": f"missing{k}.png", "caption": "a dog"} for k in range(3)]
  path = tmp_path / "mostly_bad.jsonl"
  _write_lines(path, lines)
  # 75% bad is tolerated below min_records_before_abort ...
  cfg = _cfg([str(path)], tmp_path, max_bad_fraction=0.5, min_records_before_abort=1000,
             **{"image_text.batch_size": 2})
  it = tasks.get("image_text").make_iterator(cfg, seed=0)
  batches = [next(it) for _ in range(3)]
  # G B B B | G B B B G | B B B G: 5 + 8 + 8 records, 3 + 6 + 6 bad.
  assert sum(int(b["num_bad_records"]) for b in batches) == 15
  assert sum(int(b["num_records"]) for b in batches) == 21
  it.close()
  # ... and stops the run once enough records were seen.
  cfg = _cfg([str(path)], tmp_path, max_bad_fraction=0.5, min_records_before_abort=8,
             **{"image_text.batch_size": 2})
  it = tasks.get("image_text").make_iterator(cfg, seed=0)
  with pytest.raises(pipeline.BadDataError) as err:
    for _ in range(3):
      next(it)
  msg = str(err.value)
  assert "6 of 8 records were bad" in msg and f"{path}:2: image file not found" in msg
  it.close()
