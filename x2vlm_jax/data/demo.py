"""Synthetic multi-grained demo dataset ("shapes"), written in the pipeline's own formats.

Each scene is a PIL-drawn image (plain or lightly noisy grey background) with two non-overlapping
shapes; shape in {circle, square, triangle}, colour in {red, green, blue, yellow, white, black},
size in {small, large}. Files under `out_dir`:

  images/{train,val}_NNNNNN.png
  train_image_text.jsonl  {"image": "images/train_000000.png",
                           "caption": ["a red circle left of a blue square", ...]}
  train_regions.jsonl     {"image": ..., "caption": [scene captions],
                           "elems": [{"bbox": [x, y, w, h],
                                      "caption": ["circle", "circle on the left"],
                                      "attributes": ["red", "small red"]}, ...]}
  train_grounding.jsonl   {"image": ..., "text": "the small red circle", "bbox": [x, y, w, h]}
                          (one per shape; for grounding fine-tuning)
  val_retrieval.jsonl     {"image": ..., "caption": [scene captions]}
  val_grounding.jsonl     {"image": ..., "text": "the small red circle", "bbox": [x, y, w, h]}
                          (one per shape)
  {train,val}_vqa.jsonl   {"question_id", "image", "question": "what colour is the circle",
                           "answer": [10 x "red"], "answer_type", "question_type"}; also "what
                          shape is the red one", "is there a blue square" (yes / no)
  answer_list.json        the 11 answers: colours, shapes, yes, no
  {train,val}_nlvr.jsonl  {"images": [scene 2k, scene 2k+1], "sentence": "the left image has a red
                          circle", "label": true | false}
  zeroshot_val.jsonl      {"image": "images/zeroshot_val_NNNNNN_K.png", "label": "red circle"}: each
                          shape of each validation scene cropped (zero-shot classification)
  zeroshot_classes.txt    the 18 colour-shape classes, one a line
  ovad_val.json           the validation shapes as OVAD boxes (the benchmark's COCO-style layout):
                          category = shape, attributes color:<colour> and size:<small|large>
  winoground/             examples.jsonl + images/ex_G_img_{0,1}.png in Winoground's layout: two
                          shapes, and the same two with their places swapped; captions that swap
                          the objects (even groups) or the relation (odd groups)
  vocab.txt               BERT-format WordPiece vocab: [PAD] [UNK] [CLS] [SEP] [MASK], every word
                          the generator emits, a-z / 0-9 and their "##" pieces, punctuation
  README.txt              this description (written last: its presence marks a complete dataset)

Relations: "left of" / "right of" when the horizontal centre distance dominates, else "above" /
"below". Validation scenes each contain at least one HELD_OUT colour-shape combination, which never
appears in training scenes (compositional generalisation). Deterministic for a seed.
"""
from __future__ import annotations

import json
import os
import string

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 215, 40),
    "white": (248, 248, 248),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": (0.16, 0.22), "large": (0.28, 0.36)}  # side as a fraction of the image size
HELD_OUT = (("red", "triangle"), ("blue", "circle"), ("yellow", "square"))

_EXTRA_WORDS = ("a an the of on at in and with to is are there two shapes shape image picture "
                "left right above below top bottom small large").split()

README = """Synthetic "shapes" demo dataset for x2vlm_jax (x2vlm_jax.data.demo.make_demo_data).

seed={seed} image_size={image_size} train scenes={num_train} val scenes={num_val}

Every image holds two non-overlapping shapes (circle / square / triangle) in one of six colours
(red, green, blue, yellow, white, black) and two sizes (small, large) on a plain or lightly noisy
grey background.

train_image_text.jsonl  image-text pairs: {{"image", "caption": [3 scene captions]}}
train_regions.jsonl     region records: {{"image", "caption", "elems": [{{"bbox": [x, y, w, h]
                        pixels, "caption": [object, object + position],
                        "attributes": [colour, size + colour]}}]}}
train_grounding.jsonl   grounding fine-tuning format: {{"image", "text", "bbox"}} (one per shape)
val_retrieval.jsonl     retrieval test format: {{"image", "caption": [captions]}}
val_grounding.jsonl     grounding test format: {{"image", "text", "bbox"}} (one per shape)
zeroshot_val.jsonl      zero-shot classification: {{"image": crop of one shape, "label"}}
ovad_val.json           open-vocabulary attributes of every validation shape (OVAD layout)
winoground/             Winoground-style groups (examples.jsonl, images/)
vocab.txt               BERT WordPiece vocabulary covering every generated word
images/                 PNG files (paths in the JSONL files are relative to this directory)

Held-out colour-shape combinations (in validation scenes only, never in training scenes):
{held_out}
"""


def _vocab() -> list[str]:
  words = set(_EXTRA_WORDS) | set(COLOURS) | set(SHAPES) | set(SIZES)
  chars = list(string.ascii_lowercase + string.digits)
  punct = list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
  return (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(words - set(chars)) + chars
          + ["##" + c for c in chars] + punct)


def _place(rng: np.random.Generator, size: int, sides: list[int], tries: int = 200):
  """Top-left corners of squares of the given sides, non-overlapping with a 2-pixel gap."""
  margin = max(1, size // 32)
  for _ in range(tries):
    boxes = []
    for s in sides:
      x = int(rng.integers(margin, size - s - margin + 1))
      y = int(rng.integers(margin, size - s - margin + 1))
      boxes.append((x, y, s))
    (x1, y1, s1), (x2, y2, s2) = boxes
    if x1 + s1 + 2 <= x2 or x2 + s2 + 2 <= x1 or y1 + s1 + 2 <= y2 or y2 + s2 + 2 <= y1:
      return boxes
  return None


def _draw(draw: ImageDraw.ImageDraw, shape: str, colour, x: int, y: int, s: int) -> None:
  if shape == "circle":
    draw.ellipse([x, y, x + s - 1, y + s - 1], fill=colour)
  elif shape == "square":
    draw.rectangle([x, y, x + s - 1, y + s - 1], fill=colour)
  else:
    draw.polygon([(x, y + s - 1), (x + s - 1, y + s - 1), (x + (s - 1) / 2, y)], fill=colour)


def _background(rng: np.random.Generator, size: int) -> Image.Image:
  base = rng.integers(95, 165) + rng.integers(-12, 13, size=3)
  if rng.random() < 0.5:
    arr = np.broadcast_to(base, (size, size, 3))
  else:
    arr = base + rng.normal(0.0, 8.0, size=(size, size, 3))
  return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def _combos(held_out: bool) -> list[tuple[str, str]]:
  return [(c, s) for c in COLOURS for s in SHAPES if ((c, s) in HELD_OUT) == held_out]


def _scene(rng: np.random.Generator, image_size: int, val: bool):
  """Draws one scene; returns (image, objects: list of dicts)."""
  allowed = _combos(False)
  if val:
    first = _combos(True)[int(rng.integers(0, len(HELD_OUT)))]
    pool = [c for c in allowed + _combos(True) if c != first]
  else:
    first = allowed[int(rng.integers(0, len(allowed)))]
    pool = [c for c in allowed if c != first]
  second = pool[int(rng.integers(0, len(pool)))]
  while True:
    size_names = [list(SIZES)[int(rng.integers(0, 2))] for _ in range(2)]
    sides = [max(4, int(round(image_size * rng.uniform(*SIZES[n])))) for n in size_names]
    boxes = _place(rng, image_size, sides)
    if boxes is not None:
      break
  img = _background(rng, image_size)
  draw = ImageDraw.Draw(img)
  objects = []
  for (colour, shape), size_name, (x, y, s) in zip((first, second), size_names, boxes):
    _draw(draw, shape, COLOURS[colour], x, y, s)
    objects.append(dict(colour=colour, shape=shape, size=size_name, bbox=[x, y, s, s]))
  return img, objects


def _relation(a: dict, b: dict) -> tuple[str, str]:
  """Relation of a to b and its inverse."""
  ax, ay = a["bbox"][0] + a["bbox"][2] / 2, a["bbox"][1] + a["bbox"][3] / 2
  bx, by = b["bbox"][0] + b["bbox"][2] / 2, b["bbox"][1] + b["bbox"][3] / 2
  if abs(bx - ax) >= abs(by - ay):
    return ("left of", "right of") if ax < bx else ("right of", "left of")
  return ("above", "below") if ay < by else ("below", "above")


def _captions(objects: list[dict]) -> list[str]:
  a, b = objects
  rel, inv = _relation(a, b)
  return [
      f"a {a['colour']} {a['shape']} {rel} a {b['colour']} {b['shape']}",
      f"a {a['size']} {a['colour']} {a['shape']} {rel} a {b['size']} {b['colour']} {b['shape']}",
      f"a {b['colour']} {b['shape']} {inv} a {a['colour']} {a['shape']}",
  ]


def _elems(objects: list[dict]) -> list[dict]:
  out = []
  for k, obj in enumerate(objects):
    rel, _ = _relation(obj, objects[1 - k])
    where = {"left of": "on the left", "right of": "on the right",
             "above": "at the top", "below": "at the bottom"}[rel]
    out.append(dict(bbox=obj["bbox"], caption=[obj["shape"], f"{obj['shape']} {where}"],
                    attributes=[obj["colour"], f"{obj['size']} {obj['colour']}"]))
  return out


def _vqa(rel_path: str, objects: list[dict], first_id: int) -> list[dict]:
  """Questions about one scene (no randomness: the scene decides), 10 identical human answers
  each, in the official annotation's spirit (answer_type, question_type)."""
  rows = []

  def add(question, answer, answer_type, question_type):
    rows.append({"question_id": first_id + len(rows), "image": rel_path, "question": question,
                 "answer": [answer] * 10, "answer_type": answer_type,
                 "question_type": question_type})

  a, b = objects
  if a["shape"] != b["shape"]:
    for obj in objects:
      add(f"what colour is the {obj['shape']}", obj["colour"], "other", "what colour")
  if a["colour"] != b["colour"]:
    for obj in objects:
      add(f"what shape is the {obj['colour']} one", obj["shape"], "other", "what shape")
  add(f"is there a {a['colour']} {a['shape']}", "yes", "yes/no", "is there")
  absent = (b["colour"], a["shape"])  # present only if b has a's shape
  add(f"is there a {absent[0]} {absent[1]}", "yes" if b["shape"] == a["shape"] else "no",
      "yes/no", "is there")
  return rows


def _nlvr(left: tuple[str, list[dict]], right: tuple[str, list[dict]]) -> list[dict]:
  """Statements about a pair of scenes: two true by construction, two that are usually false."""
  (left_path, left_objs), (right_path, right_objs) = left, right
  has = lambda objs, o: any((x["colour"], x["shape"]) == (o["colour"], o["shape"]) for x in objs)
  rows = []
  for side, objs, other in (("left", left_objs, right_objs), ("right", right_objs, left_objs)):
    for obj in (objs[1], other[0]):
      rows.append({"images": [left_path, right_path],
                   "sentence": f"the {side} image has a {obj['colour']} {obj['shape']}",
                   "label": has(objs, obj)})
  return rows


def _crop(img: Image.Image, bbox: list[int]) -> Image.Image:
  """The square box [x, y, s, s] with a margin of s / 4 on each side (clipped to the image)."""
  x, y, s, _ = bbox
  m = s // 4
  return img.crop((max(0, x - m), max(0, y - m), min(img.width, x + s + m),
                   min(img.height, y + s + m)))


def _zeroshot_rows(out_dir: str, img: Image.Image, objects: list[dict], scene: int) -> list[dict]:
  """Each object of a validation scene cropped to its own image, labelled "colour shape"."""
  rows = []
  for k, obj in enumerate(objects):
    rel_path = f"images/zeroshot_val_{scene:06d}_{k}.png"
    _crop(img, obj["bbox"]).save(os.path.join(out_dir, rel_path), compress_level=1)
    rows.append({"image": rel_path, "label": f"{obj['colour']} {obj['shape']}"})
  return rows


def _two_object_scene(rng: np.random.Generator, image_size: int, a: tuple[str, str],
                      b: tuple[str, str], relation: str):
  """Two same-sized objects a, b placed so that `a relation b` holds, and the same scene with
  their places swapped: (image, swapped image, side)."""
  size_name = list(SIZES)[int(rng.integers(0, 2))]
  side = max(4, int(round(image_size * rng.uniform(*SIZES[size_name]))))
  while True:
    boxes = _place(rng, image_size, [side, side])
    if boxes is None:
      continue
    objs = [dict(bbox=[x, y, s, s]) for x, y, s in boxes]
    if _relation(objs[0], objs[1])[0] == relation:
      break
  background = _background(rng, image_size)
  images = []
  for first, second in ((a, b), (b, a)):
    img = background.copy()
    draw = ImageDraw.Draw(img)
    for (colour, shape), (x, y, s) in zip((first, second), boxes):
      _draw(draw, shape, COLOURS[colour], x, y, s)
    images.append(img)
  return images[0], images[1], size_name


def _winoground_groups(out_dir: str, rng: np.random.Generator, image_size: int,
                       num_groups: int) -> list[dict]:
  """Winoground-style groups in its published layout (examples.jsonl + images/<stem>.png): two
  objects, and the same two with their places swapped. Even groups swap the objects in the
  caption ("a red circle left of a blue square" / "a blue square left of a red circle"), odd
  groups the relation ("a red circle above a blue square" / "a red circle below a blue
  square")."""
  inverse = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
  combos = [(c, s) for c in COLOURS for s in SHAPES]
  os.makedirs(os.path.join(out_dir, "winoground", "images"), exist_ok=True)
  rows = []
  for g in range(num_groups):
    i, j = rng.choice(len(combos), size=2, replace=False)
    a, b = combos[int(i)], combos[int(j)]
    relation = list(inverse)[int(rng.integers(0, 4))]
    img0, img1, _ = _two_object_scene(rng, image_size, a, b, relation)
    name_a, name_b = " ".join(a), " ".join(b)
    caption_0 = f"a {name_a} {relation} a {name_b}"
    if g % 2 == 0:
      caption_1, tag = f"a {name_b} {relation} a {name_a}", "Object"
    else:
      caption_1, tag = f"a {name_a} {inverse[relation]} a {name_b}", "Relation"
    stems = [f"ex_{g}_img_0", f"ex_{g}_img_1"]
    for stem, img in zip(stems, (img0, img1)):
      img.save(os.path.join(out_dir, "winoground", "images", f"{stem}.png"), compress_level=1)
    rows.append({"id": g, "image_0": stems[0], "image_1": stems[1], "caption_0": caption_0,
                 "caption_1": caption_1, "tag": tag, "secondary_tag": "", "num_main_preds": 1,
                 "collapsed_tag": tag})
  return rows


def _write_attribute_boxes(path: str, scenes: list[tuple[str, list[dict]]],
                           image_size: int) -> None:
  """Every shape of the validation scenes as an OVAD box (`tasks.ovad.write_ovad_json`, the
  benchmark's published layout): category = its shape, attributes "color:<colour>" and
  "size:small" / "size:large", each known for every box (1 for its own, 0 for the others). The
  attributes are split into head / medium / tail thirds by their number of positive boxes."""
  from x2vlm_jax.tasks import ovad  # pylint: disable=import-outside-toplevel

  names = [f"color:{c}" for c in COLOURS] + [f"size:{s}" for s in SIZES]
  boxes_ = []
  for k, (_, objects) in enumerate(scenes):
    for obj in objects:
      own = {f"color:{obj['colour']}", f"size:{obj['size']}"}
      boxes_.append({"image": k, "bbox": obj["bbox"], "category": obj["shape"],
                     "labels": {name: int(name in own) for name in names}})
  positives = {name: sum(b["labels"][name] for b in boxes_) for name in names}
  ranked = sorted(names, key=lambda n: (-positives[n], n))
  third = -(-len(names) // 3)
  freq = {name: ovad.FREQ_SETS[min(r // third, 2)] for r, name in enumerate(ranked)}
  ovad.write_ovad_json(
      path, images=[{"file_name": rel, "width": image_size, "height": image_size}
                    for rel, _ in scenes],
      boxes_=boxes_, attributes=[{"name": n, "freq_set": freq[n]} for n in names],
      categories=list(SHAPES))


def _write_jsonl(path: str, rows: list[dict]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")


def demo_paths(out_dir: str) -> dict[str, str]:
  names = dict(train_image_text="train_image_text.jsonl",
               train_regions="train_regions.jsonl", train_grounding="train_grounding.jsonl",
               val_retrieval="val_retrieval.jsonl",
               val_grounding="val_grounding.jsonl", train_vqa="train_vqa.jsonl",
               val_vqa="val_vqa.jsonl", answer_list="answer_list.json",
               train_nlvr="train_nlvr.jsonl", val_nlvr="val_nlvr.jsonl",
               val_zeroshot="zeroshot_val.jsonl", zeroshot_classes="zeroshot_classes.txt",
               val_attributes="ovad_val.json",
               winoground=os.path.join("winoground", "examples.jsonl"), vocab="vocab.txt",
               readme="README.txt")
  paths = {k: os.path.join(out_dir, v) for k, v in names.items()}
  paths["image_root"] = out_dir
  return paths


def make_demo_data(
    out_dir: str,
    num_train: int = 2000,
    num_val: int = 100,
    image_size: int = 96,
    seed: int = 0,
) -> dict[str, str]:
  """Writes the demo dataset (module docstring) and returns its paths (keys of `demo_paths`)."""
  if image_size < 32:
    raise ValueError(f"image_size must be >= 32, got {image_size}")
  paths = demo_paths(out_dir)
  os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
  if os.path.exists(paths["readme"]):
    os.remove(paths["readme"])  # not complete until rewritten
  rng_train, rng_val = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
  image_text, regions, train_grounding, retrieval, grounding = [], [], [], [], []
  vqa = {"train": [], "val": []}
  nlvr = {"train": [], "val": []}
  zeroshot = []
  for split, n, rng in (("train", num_train, rng_train), ("val", num_val, rng_val)):
    scenes = []
    for i in range(n):
      img, objects = _scene(rng, image_size, val=(split == "val"))
      rel_path = f"images/{split}_{i:06d}.png"
      img.save(os.path.join(out_dir, rel_path), compress_level=1)
      captions = _captions(objects)
      referring = [{"image": rel_path, "text": f"the {obj['size']} {obj['colour']} {obj['shape']}",
                    "bbox": obj["bbox"]} for obj in objects]
      if split == "train":
        image_text.append({"image": rel_path, "caption": captions})
        regions.append({"image": rel_path, "caption": captions[:2], "elems": _elems(objects)})
        train_grounding.extend(referring)
      else:
        retrieval.append({"image": rel_path, "caption": captions})
        grounding.extend(referring)
        zeroshot.extend(_zeroshot_rows(out_dir, img, objects, i))
      # VQA and NLVR2 follow from the scenes; they draw nothing from `rng`.
      vqa[split].extend(_vqa(rel_path, objects, first_id=(split == "val") * 10**6 + 10 * i))
      scenes.append((rel_path, objects))
    for left, right in zip(scenes[0::2], scenes[1::2]):
      nlvr[split].extend(_nlvr(left, right))
    if split == "val":
      _write_attribute_boxes(paths["val_attributes"], scenes, image_size)
  _write_jsonl(paths["train_image_text"], image_text)
  _write_jsonl(paths["train_regions"], regions)
  _write_jsonl(paths["train_grounding"], train_grounding)
  _write_jsonl(paths["val_retrieval"], retrieval)
  _write_jsonl(paths["val_grounding"], grounding)
  for split in ("train", "val"):
    _write_jsonl(paths[f"{split}_vqa"], vqa[split])
    _write_jsonl(paths[f"{split}_nlvr"], nlvr[split])
  _write_jsonl(paths["val_zeroshot"], zeroshot)
  with open(paths["zeroshot_classes"], "w", encoding="utf-8") as f:
    f.write("\n".join(f"{c} {s}" for c in COLOURS for s in SHAPES) + "\n")
  # Its own generator: the training and validation scenes above do not change.
  winoground = _winoground_groups(out_dir, np.random.default_rng([seed, 26]), image_size,
                                  num_val // 2)
  _write_jsonl(paths["winoground"], winoground)
  with open(paths["answer_list"], "w", encoding="utf-8") as f:
    json.dump(list(COLOURS) + list(SHAPES) + ["yes", "no"], f)
  with open(paths["vocab"], "w", encoding="utf-8") as f:
    f.write("\n".join(_vocab()) + "\n")
  held_out = ", ".join(f"{c} {s}" for c, s in HELD_OUT)
  with open(paths["readme"], "w", encoding="utf-8") as f:
    f.write(README.format(seed=seed, image_size=image_size, num_train=num_train, num_val=num_val,
                          held_out=held_out))
  return paths


def ensure_demo_data(out_dir: str, **kwargs) -> dict[str, str]:
  """Generates the demo dataset unless a complete one (README.txt present) is already there."""
  paths = demo_paths(out_dir)
  if not is_complete(out_dir):
    return make_demo_data(out_dir, **kwargs)
  return paths


def is_complete(out_dir: str) -> bool:
  """README.txt (written last) and every file of this version of the dataset are there."""
  return all(os.path.exists(p) for p in demo_paths(out_dir).values())
