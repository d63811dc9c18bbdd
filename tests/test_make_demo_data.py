"""Synthetic demo dataset: formats, determinism, held-out combinations, vocab coverage, speed."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from x2vlm_jax.data import demo
from x2vlm_jax.data import text as text_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  out = tmp_path_factory.mktemp("demo_small")
  return demo.make_demo_data(str(out), num_train=60, num_val=12, image_size=64, seed=3)


def test_files_and_record_formats(small):
  for key in ("train_image_text", "train_regions", "val_retrieval", "val_grounding", "vocab",
              "readme"):
    assert os.path.exists(small[key]), key
  it, regions = _read(small["train_image_text"]), _read(small["train_regions"])
  retrieval, grounding = _read(small["val_retrieval"]), _read(small["val_grounding"])
  assert len(it) == len(regions) == 60 and len(retrieval) == 12 and len(grounding) == 24
  for rec in it:
    assert isinstance(rec["caption"], list) and all(isinstance(c, str) for c in rec["caption"])
    with Image.open(os.path.join(small["image_root"], rec["image"])) as img:
      assert img.size == (64, 64) and img.mode == "RGB"
  for rec in regions:
    assert len(rec["elems"]) == 2 and rec["caption"]
    for elem in rec["elems"]:
      x, y, w, h = elem["bbox"]
      assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 64 and y + h <= 64
      assert elem["caption"][0] in demo.SHAPES and elem["attributes"][0] in demo.COLOURS
  for rec in grounding:
    assert set(rec) == {"image", "text", "bbox"} and rec["text"].startswith("the ")
  assert "Held-out" in open(small["readme"]).read()


def test_boxes_cover_the_drawn_shapes(small):
  for rec in _read(small["train_regions"])[:20]:
    arr = np.asarray(Image.open(os.path.join(small["image_root"], rec["image"])))
    for elem in rec["elems"]:
      x, y, w, h = elem["bbox"]
      colour = np.array(demo.COLOURS[elem["attributes"][0]])
      centre = arr[y + int(h * 0.7), x + w // 2]  # inside circles, squares and triangles
      assert np.abs(centre.astype(int) - colour).max() <= 2
      # The shape's pixels touch all four sides of its box: the box is tight.
      inside = np.abs(arr[y:y + h, x:x + w].astype(int) - colour).max(-1) <= 2
      rows, cols = np.flatnonzero(inside.any(1)), np.flatnonzero(inside.any(0))
      assert (rows[0], rows[-1], cols[0], cols[-1]) == (0, h - 1, 0, w - 1)


def test_relations_match_the_boxes(small):
  for rec in _read(small["train_regions"]):
    a, b = rec["elems"]
    ca = (a["bbox"][0] + a["bbox"][2] / 2, a["bbox"][1] + a["bbox"][3] / 2)
    cb = (b["bbox"][0] + b["bbox"][2] / 2, b["bbox"][1] + b["bbox"][3] / 2)
    cap = rec["caption"][0]
    if abs(cb[0] - ca[0]) >= abs(cb[1] - ca[1]):
      assert (" left of " in cap) == (ca[0] < cb[0]) and (" right of " in cap) == (ca[0] > cb[0])
      assert a["caption"][1].endswith("on the left" if ca[0] < cb[0] else "on the right")
    else:
      assert (" above " in cap) == (ca[1] < cb[1]) and (" below " in cap) == (ca[1] > cb[1])


def test_held_out_combinations_only_in_val(small):
  held = [f"{c} {s}" for c, s in demo.HELD_OUT]
  for rec in _read(small["train_image_text"]):
    assert not any(h in cap for cap in rec["caption"] for h in held)
  for rec in _read(small["val_retrieval"]):
    assert any(h in rec["caption"][0] for h in held)


def test_vocab_covers_every_generated_word(small):
  tok = text_lib.load_tokenizer(small["vocab"])
  assert tok.convert_ids_to_tokens(range(5)) == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
  texts = [c for r in _read(small["train_image_text"]) for c in r["caption"]]
  texts += [a + " " + c for r in _read(small["train_regions"]) for e in r["elems"]
            for a in e["attributes"] for c in e["caption"]]
  texts += [r["text"] for r in _read(small["val_grounding"])]
  for t in texts:
    ids = tok.encode(t)
    assert tok.unk_id not in ids and len(ids) == len(t.split()), t
  assert tok.unk_id not in tok.encode("zebra 42")  # unseen words fall back to letter pieces


def test_zeroshot_crops_and_winoground_groups(small):
  """Each zero-shot crop is labelled with its shape's colour and shape (the grounding texts of the
  same scene name them); each Winoground group is two images whose captions swap the objects or
  the relation, every word in the vocabulary."""
  crops = _read(small["val_zeroshot"])
  classes = open(small["zeroshot_classes"]).read().split("\n")[:-1]
  assert len(classes) == len(demo.COLOURS) * len(demo.SHAPES) == 18
  grounding = _read(small["val_grounding"])
  assert len(crops) == len(grounding) == 24
  for crop, ref in zip(crops, grounding):
    assert crop["label"] in classes and ref["text"].endswith(crop["label"])
    img = Image.open(os.path.join(small["image_root"], crop["image"]))
    assert min(img.size) >= ref["bbox"][2] and max(img.size) <= 1.5 * ref["bbox"][2] + 1
  groups = _read(small["winoground"])
  assert len(groups) == 6 and {g["tag"] for g in groups} == {"Object", "Relation"}
  tok = text_lib.load_tokenizer(small["vocab"])
  for g in groups:
    c0, c1 = g["caption_0"].split(), g["caption_1"].split()
    if g["tag"] == "Object":
      assert sorted(c0) == sorted(c1) and c0 != c1
    else:
      assert c0[:3] == c1[:3] and c0[-3:] == c1[-3:] and c0 != c1
    for k in (0, 1):
      assert tok.unk_id not in tok.encode(g[f"caption_{k}"])
      path = os.path.join(small["image_root"], "winoground", "images", g[f"image_{k}"] + ".png")
      assert Image.open(path).size == (64, 64)
    a = np.asarray(Image.open(os.path.join(small["image_root"], "winoground", "images",
                                           g["image_0"] + ".png")))
    b = np.asarray(Image.open(os.path.join(small["image_root"], "winoground", "images",
                                           g["image_1"] + ".png")))
    assert (a != b).any() and a.shape == b.shape


def test_attribute_boxes_in_the_ovad_layout(small):
  """ovad_val.json: one box per validation shape, its own colour and size positive, the other
  colours and size negative, read back by the OVAD evaluator's reader."""
  from x2vlm_jax.tasks import ovad

  data = json.load(open(small["val_attributes"]))
  names = [a["name"] for a in data["attributes"]]
  assert names == [f"color:{c}" for c in demo.COLOURS] + ["size:small", "size:large"]
  refs = _read(small["val_grounding"])  # "the <size> <colour> <shape>", one per shape, in order
  assert len(data["annotations"]) == len(refs) == 24
  shapes = {c["id"]: c["name"] for c in data["categories"]}
  for ann, ref in zip(data["annotations"], refs):
    size, colour, shape = ref["text"].split()[1:]
    assert ann["att_vec"] == [int(n in (f"color:{colour}", f"size:{size}")) for n in names]
    assert shapes[ann["category_id"]] == shape and ann["bbox"] == ref["bbox"]
  split = ovad.read_ovad_json(small["val_attributes"], small["image_root"])
  assert len(split.attribute_names) == 8


def test_deterministic_for_a_seed(tmp_path, small):
  again = demo.make_demo_data(str(tmp_path / "a"), num_train=60, num_val=12, image_size=64, seed=3)
  for key in ("train_image_text", "train_regions", "val_retrieval", "val_grounding", "vocab"):
    assert open(again[key]).read() == open(small[key]).read(), key
  for name in ("train_000007.png", "val_000003.png"):
    a = open(os.path.join(again["image_root"], "images", name), "rb").read()
    b = open(os.path.join(small["image_root"], "images", name), "rb").read()
    assert a == b
  other = demo.make_demo_data(str(tmp_path / "b"), num_train=60, num_val=12, image_size=64, seed=4)
  assert open(other["train_regions"]).read() != open(small["train_regions"]).read()


def test_speed_and_cli(tmp_path):
  start = time.time()
  demo.make_demo_data(str(tmp_path / "speed"), num_train=200, num_val=0, image_size=96)
  assert time.time() - start < 3.0  # 2000 scenes must take < 30 s on one core
  out = tmp_path / "cli"
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_demo_data.py"),
                         "--out", str(out), "--num_train", "5", "--num_val", "2",
                         "--image_size", "48", "--seed", "1"], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr
  assert len(_read(out / "train_image_text.jsonl")) == 5
  assert len(_read(out / "val_grounding.jsonl")) == 4
  # ensure_demo_data keeps a complete dataset untouched.
  mtime = os.path.getmtime(out / "train_image_text.jsonl")
  paths = demo.ensure_demo_data(str(out), num_train=9)
  assert os.path.getmtime(out / "train_image_text.jsonl") == mtime
  assert paths["image_root"] == str(out)
