"""Record sources: JSONL line index, ArrayRecord conversion, TFDS adapter, record parsing."""
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from configs import common
from x2vlm_jax.data import examples as examples_lib
from x2vlm_jax.data import pipeline
from x2vlm_jax.data import records
from x2vlm_jax.data import text as text_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE_VOCAB = os.path.join(ROOT, "tests", "fixtures", "pretrain_tiny", "vocab.txt")


def test_jsonl_source_indexes_lines(tmp_path):
  a = tmp_path / "a.jsonl"
  a.write_bytes(b'{"k": 1}\n\n{"k": 2}\r\n{"k": 3}')  # blank line, CRLF, no final newline
  b = tmp_path / "b.jsonl"
  b.write_bytes(b'{"k": 4}\n')
  src = records.JsonlSource([str(a), str(b)])
  assert len(src) == 4
  assert [src[i].where for i in range(4)] == [f"{a}:1", f"{a}:3", f"{a}:4", f"{b}:1"]
  assert [records.parse_record(src[i])["k"] for i in range(4)] == [1, 2, 3, 4]
  with pytest.raises(IndexError):
    src[4]
  clone = pickle.loads(pickle.dumps(src))
  assert clone[2] == src[2]


def test_make_source_globs_and_mixes_formats(tmp_path):
  for name, ks in (("p1.jsonl", [1, 2]), ("p2.jsonl", [3])):
    (tmp_path / name).write_text("".join(json.dumps({"k": k}) + "\n" for k in ks))
  out = tmp_path / "p3.array_record"
  subprocess.run([sys.executable, os.path.join(ROOT, "tools", "jsonl_to_arrayrecord.py"),
                  str(tmp_path / "p1.jsonl"), str(out)], check=True, capture_output=True)
  src = records.make_source([str(tmp_path / "p*.jsonl"), str(out)])
  assert len(src) == 5
  assert [records.parse_record(src[i])["k"] for i in range(5)] == [1, 2, 3, 1, 2]
  assert src[3].where == f"{out}:record 0"
  assert records.parse_record(pickle.loads(pickle.dumps(src))[4]) == {"k": 2}
  with pytest.raises(FileNotFoundError, match="matches no file"):
    records.make_source([str(tmp_path / "nothing*.jsonl")])


def test_parse_record_errors():
  ok = records.RawRecord("f:1", b'{"a": 1}')
  assert records.parse_record(ok) == {"a": 1}
  for data, msg in ((b"\xff\xfe{}", "UTF-8"), (b'{"a": ', "malformed JSON"), (b"[1, 2]", "JSON list")):
    with pytest.raises(records.BadRecordError, match=msg):
      records.parse_record(records.RawRecord("f:2", data))


def test_record_dataset_shards_are_disjoint(tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_text("".join(json.dumps({"k": k}) + "\n" for k in range(10)))
  seen = []
  for shard in range(3):
    ds = pipeline.record_dataset([str(path)], seed=1, shard_index=shard, shard_count=3)
    n = len(range(shard, 10, 3))
    epoch = [records.parse_record(ds[i])["k"] for i in range(n)]
    assert sorted(epoch) == list(range(shard, 10, 3))  # a permutation of this shard's records
    second = [records.parse_record(ds[i])["k"] for i in range(n, 2 * n)]
    assert sorted(second) == sorted(epoch)  # repeated, reshuffled
    seen += epoch
  assert sorted(seen) == list(range(10))


class _FakeTfds:
  """Stands in for tfds.data_source: a sequence of numpy feature dicts."""

  def __init__(self, rows):
    self.rows = rows

  def __len__(self):
    return len(self.rows)

  def __getitem__(self, i):
    return self.rows[i]


def test_tfds_adapter_feeds_the_image_text_processor():
  image = np.zeros((20, 30, 3), np.uint8)
  image[:, :15] = 255
  fake = _FakeTfds([{"image": image, "captions": np.array([b"a dog on the left"], dtype=object)}])
  src = records.TfdsSource("fake", "train", rename={"captions": "caption"}, data_source=fake)
  raw = src[0]
  assert raw.where == "tfds:fake:train:0"
  assert raw.data["caption"] == ["a dog on the left"] and raw.data["image"].shape == (20, 30, 3)
  cfg = common.base_config().data
  cfg.max_tokens = 12
  cfg.image_text.hflip_prob = 0.0
  enc = text_lib.TextEncoder.from_config(cfg, text_lib.load_tokenizer(FIXTURE_VOCAB))
  proc = examples_lib.ImageTextProcessor(cfg, cfg.image_text, 32, 16, enc)
  ex = proc(raw, np.random.default_rng(0))
  assert not examples_lib.is_bad(ex)
  assert ex["image"].shape == (32, 32, 3)
  np.testing.assert_array_equal(ex["text_ids"][:7], [2, 5, 18, 9, 7, 28, 3])


def test_base64_image_record(tmp_path):
  import base64
  import io

  buf = io.BytesIO()
  Image.new("RGB", (10, 10), (255, 0, 0)).save(buf, "PNG")
  b64 = base64.b64encode(buf.getvalue()).decode()
  for key in ("image_b64", "binary"):
    img = examples_lib.load_record_image({key: b64}, "image", "")
    assert img.size == (10, 10) and img.getpixel((5, 5)) == (255, 0, 0)
  with pytest.raises(records.BadRecordError, match="base64"):
    examples_lib.load_record_image({"binary": "not base64!!"}, "image", "")
  with pytest.raises(records.BadRecordError, match="no image"):
    examples_lib.load_record_image({"caption": "x"}, "image", "")


def test_validate_data_tool_reports_bad_lines(tmp_path):
  Image.new("RGB", (16, 16), (1, 2, 3)).save(tmp_path / "ok.png")
  path = tmp_path / "d.jsonl"
  path.write_text(json.dumps({"image": "ok.png", "caption": "a dog"}) + "\n"
                  + json.dumps({"image": "gone.png", "caption": "a dog"}) + "\n{oops\n")
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "tools", "validate_data.py"), "--task", "image_text",
       "--files", str(path), "--image_root", str(tmp_path), "--vocab", FIXTURE_VOCAB,
       "--image_res", "32"], capture_output=True, text=True)
  assert proc.returncode == 1, proc.stderr
  assert "3 records checked, 2 bad" in proc.stdout
  assert f"{path}:2: image file not found" in proc.stdout and f"{path}:3: malformed JSON" in proc.stdout
