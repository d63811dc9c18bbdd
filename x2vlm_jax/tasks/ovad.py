"""Open-vocabulary attribute detection, box-oracle setting (OVAD; Bravo et al., CVPR 2023).

Evaluation only (no training objective). Every annotated box of `ovad2000.json` is given (the
"box oracle"); the model scores each of the A attributes for it, zero-shot, by the ITC cosine of a
box feature with the attribute's text feature; the metric is OVAD's mAP over attributes.

The file, as published (COCO layout plus attributes; `read_ovad_json`, `write_ovad_json`):
  images       [{"id", "file_name", "width", "height"}]
  annotations  [{"id", "image_id", "bbox": [x, y, w, h] pixels, "area", "iscrowd",
                 "category_id", "att_vec": [A] of 1 (positive), 0 (negative), -1 (unknown)}]
  categories   [{"id", "name"}]
  attributes   [{"id": column of att_vec (0 .. A-1), "name": "<type>:<synonym>/<synonym>...",
                 "type", "parent_type", "is_has_att": "is" | "has", "freq_set": "head" |
                 "medium" | "tail"}]
Boxes of area < `min_box_area` (the benchmark's box extraction keeps area >= 50) are left out.
Per box, a bad record (unknown image, bad bbox, an att_vec that is not A values in {1, 0, -1}) is
left out, counted and named; a box with no known label is left out (it cannot change any AP),
counted and named. A missing (at construction) or undecodable (while running) image does not stop
the evaluation: its boxes get the lowest score, 0, for every attribute (the benchmark clips scores
to [0, 1], and scores 0 the boxes its detection setting misses), so that they stay in every AP
as misses; `eval/<name>/<split>/bad_images` counts those images.

Attribute text features (the benchmark's X-VLM protocol, `ovamc/ova_xvlm.py`): each synonym of an
attribute's name through each object-attribute template of its verb ("is" / "has") and of each
prompt kind of `prompts` (default "a", "the", "none": the benchmark's "all"), with
`object_word` as the noun (default none) and the type as the object of "has" (" tone" dropped),
"young/baby" and "adult/old/aged" widened by the benchmark's extra synonyms; each template's ITC
text feature (cleaned and tokenised as every evaluation text); an attribute's score for a box is
the mean (`synonym_reduce="mean"`, the benchmark README's X-VLM setting `--average_syn`) or the
max (its script's default) over its templates of the cosine with the box feature.

Box features, two protocols, both scored:
  region  (headline, metric `map`): X2-VLM's own region feature. The whole image is encoded once
          (test transform, R x R) and the box's feature is the model's region encoding of
          pre-training (`X2VLM.encode_regions`: the mean of the patches its patch mask covers,
          `boxes.box_patch_mask` of the box scaled to R x R), through `image_features`. Rows of
          one image and up to `boxes_per_row` of its boxes run through the ViT together; an image
          with more boxes takes several rows.
  crop    (metric `map_crop`): the benchmark's protocol. The box cut from the image as its box
          extraction does (x, y, w, h truncated to integers, the pixels [y, y+h) x [x, x+w),
          kept inside the image, at least one pixel) and encoded as an image: resized to R x R
          (bicubic, this project's test transform; the benchmark resizes bilinearly), the ITC
          image feature (`Predictor.embed_images` of the crop).
Images and crops go through the model in fixed-size batches on the mesh (`common.run_batched`),
never one box at a time.

Metric (the benchmark's `AttEvaluator`, datasets/ovad/ovad_evaluator.py of the OVAD download):
scores are clipped to [0, 1]; per attribute, over the boxes whose label is known (1 or 0), the
non-interpolated average precision of scikit-learn's `average_precision_score` (sum over distinct
score thresholds of (R_k - R_k-1) * P_k, tied scores one threshold); an attribute without a
positive box has no AP and is left out of the means.
eval/<name>/<split>/map = the mean AP (%) of the region protocol, .../map_head, map_medium,
map_tail the means over the attributes of each `freq_set` (a group with no AP is not reported),
.../map_crop the mean AP of the crop protocol. With `predictions_dir`:
`ovad_<name>_<split>.json` holds both protocols' means and per-attribute APs (null: no positive)
and the counts and names of the boxes left out.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import math
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from x2vlm_jax import boxes
from x2vlm_jax import sharding as sharding_lib
from x2vlm_jax.data import eval_data, image_ops
from x2vlm_jax.data import text as text_lib
from x2vlm_jax.evaluate import common
from x2vlm_jax.models import x2vlm
from x2vlm_jax.tasks import base

BadDataError = eval_data.BadDataError
FREQ_SETS = ("head", "medium", "tail")
PROTOCOLS = ("region", "crop")
MIN_BOX_AREA = 50.0  # the benchmark's box extraction keeps boxes with "area" >= 50

# The benchmark's object-attribute templates (ovamc/misc.py): verb -> prompt kind -> templates;
# {attr} is a synonym, {dobj} the attribute type (object of "has"), {noun} `object_word`.
TEMPLATES = {
    "is": {
        "none": ("{attr} {noun}",),
        "a": ("a {attr} {noun}", "a {noun} is {attr}"),
        "the": ("the {attr} {noun}", "the {noun} is {attr}"),
        "photo": ("a photo of a {attr} {noun}", "a photo of a {noun} which is {attr}",
                  "a photo of the {attr} {noun}", "a photo of the {noun} which is {attr}"),
    },
    "has": {
        "none": ("{attr} {dobj} {noun}",),
        "a": ("a {attr} {dobj} {noun}", "a {noun} has {attr} {dobj}"),
        "the": ("the {attr} {dobj} {noun}", "the {noun} has {attr} {dobj}"),
        "photo": ("a photo of a {attr} {dobj} {noun}",
                  "a photo of an {noun} which has {attr} {dobj}",
                  "a photo of the {attr} {dobj} {noun}",
                  "a photo of the {noun} which has {attr} {dobj}"),
    },
}
# Synonym lists the benchmark's X-VLM script widens (the maturity attributes).
EXTRA_SYNONYMS = {"young/baby": ("kid", "kids", "child", "toddler", "boy", "girl"),
                  "adult/old/aged": ("teen", "elder")}


# ------------------------------------------------------------------------------ the file
@dataclasses.dataclass
class OvadSplit:
  """One annotation file, read (`read_ovad_json`). I images, N kept boxes, A attributes."""
  path: str
  attribute_names: list[str]  # [A] "<type>:<synonyms>", in column (id) order
  freq_sets: list[str]  # [A] "head" | "medium" | "tail"
  is_has: list[str]  # [A] "is" | "has"
  image_paths: list[str]  # [I]
  image_sizes: np.ndarray  # [I, 2] int (W, H) as the file gives them
  image_where: list[str]  # [I] "file: images[k] (id ..)"
  missing_image: np.ndarray  # [I] bool: no file at the path
  box_image: np.ndarray  # [N] int index into the images
  bbox: np.ndarray  # [N, 4] float64 pixel (x, y, w, h)
  labels: np.ndarray  # [N, A] int8 1 / 0 / -1
  box_ids: list  # [N] the annotations' "id"
  box_where: list[str]  # [N]
  categories: list[str]  # [N] category name ("" when the id is not in "categories")
  skipped: dict[str, list[str]]  # reason -> the annotations left out for it

  @property
  def num_attributes(self) -> int:
    return len(self.attribute_names)


def _as_list(data: dict, key: str, path: str) -> list:
  value = data.get(key)
  if not isinstance(value, list):
    raise BadDataError(f"{path}: no '{key}' list (the OVAD / COCO layout: images, annotations, "
                       "categories, attributes)")
  return value


def _read_attributes(path: str, records: list) -> tuple[list[str], list[str], list[str]]:
  """The attribute table in column order -> (names, freq_sets, is_has) [A]; any problem fails
  naming the entry (scores cannot be computed without it)."""
  if not records:
    raise BadDataError(f"{path}: 'attributes' is empty")
  by_id: dict[int, dict] = {}
  for k, att in enumerate(records):
    where = f"{path}: attributes[{k}]"
    if not isinstance(att, dict) or not isinstance(att.get("id"), int):
      raise BadDataError(f"{where}: needs an integer 'id' (its column of att_vec)")
    name = att.get("name")
    if not isinstance(name, str) or ":" not in name or not name.split(":", 1)[1].strip("/ "):
      raise BadDataError(f"{where}: 'name' must be '<type>:<synonym>[/<synonym>...]', got "
                         f"{name!r}")
    if att.get("is_has_att") not in TEMPLATES:
      raise BadDataError(f"{where}: 'is_has_att' must be 'is' or 'has', got "
                         f"{att.get('is_has_att')!r}")
    if att.get("freq_set") not in FREQ_SETS:
      raise BadDataError(f"{where}: 'freq_set' must be one of {FREQ_SETS}, got "
                         f"{att.get('freq_set')!r}")
    if att["id"] in by_id:
      raise BadDataError(f"{where}: id {att['id']} appears twice")
    by_id[att["id"]] = att
  if sorted(by_id) != list(range(len(by_id))):
    raise BadDataError(f"{path}: attribute ids must be 0 .. {len(by_id) - 1} (the columns of "
                       f"att_vec), got {sorted(by_id)[:5]}...")
  table = [by_id[i] for i in range(len(by_id))]
  return ([a["name"] for a in table], [a["freq_set"] for a in table],
          [a["is_has_att"] for a in table])


def _image_size(path: str, exif_transpose: bool) -> tuple[int, int]:
  """(W, H) from the file's header, in the displayed frame when `exif_transpose` (orientations
  5-8 swap the sides); (0, 0) when unreadable."""
  try:
    with Image.open(path) as img:
      w, h = img.size
      rotated = exif_transpose and img.getexif().get(0x0112, 1) in (5, 6, 7, 8)
  except Exception:  # pylint: disable=broad-except  (PIL raises many types; the run counts it)
    return 0, 0
  return (h, w) if rotated else (w, h)


def _box_problem(ann: Any, images: dict, num_attributes: int) -> str | None:
  """Why an annotation cannot be scored (None: it can)."""
  if not isinstance(ann, dict):
    return "not an object"
  if ann.get("image_id") not in images:
    return f"image_id {ann.get('image_id')!r} is not in 'images'"
  if not isinstance(ann.get("bbox"), list) or not boxes.is_valid_box(ann["bbox"]):
    return f"bbox must be [x, y, w, h] with w, h > 0, got {ann.get('bbox')!r:.60}"
  vec = ann.get("att_vec")
  if (not isinstance(vec, list) or len(vec) != num_attributes
      or any(v not in (1, 0, -1) or isinstance(v, bool) for v in vec)):
    return f"att_vec must be {num_attributes} values in (1, 0, -1)"
  return None


def read_ovad_json(path: str, image_root: str = "", *, min_box_area: float = MIN_BOX_AREA,
                   exif_transpose: bool = True) -> OvadSplit:
  """The published `ovad2000.json` layout (module docstring) -> `OvadSplit`.

  A file that is not that layout, or a bad attribute table, fails naming it. A bad annotation,
  a box of area < `min_box_area` ("area", else w * h) and a box with no known label are left out
  and listed in `skipped` by reason; a missing image file is marked in `missing_image` (its boxes
  are kept and scored as misses).
  """
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (OSError, ValueError) as e:
    raise BadDataError(f"{path}: cannot read the OVAD annotation file: {e}") from e
  if not isinstance(data, dict):
    raise BadDataError(f"{path}: expected one JSON object (images, annotations, categories, "
                       "attributes)")
  names, freq_sets, is_has = _read_attributes(path, _as_list(data, "attributes", path))
  categories = {c.get("id"): str(c.get("name", "")) for c in _as_list(data, "categories", path)
                if isinstance(c, dict)}
  images: dict[Any, int] = {}
  image_paths, image_sizes, image_where = [], [], []
  for k, img in enumerate(_as_list(data, "images", path)):
    where = f"{path}: images[{k}]"
    if not isinstance(img, dict) or not isinstance(img.get("file_name"), str):
      raise BadDataError(f"{where}: needs 'id' and 'file_name'")
    if img.get("id") in images:
      raise BadDataError(f"{where}: image id {img.get('id')!r} appears twice")
    images[img.get("id")] = len(image_paths)
    name = img["file_name"]
    image_paths.append(name if os.path.isabs(name) or not image_root
                       else os.path.join(image_root, name))
    size = (img.get("width"), img.get("height"))
    if not all(isinstance(v, (int, float)) and v > 0 for v in size):
      size = _image_size(image_paths[-1], exif_transpose)
    image_sizes.append(size)
    image_where.append(f"{where} (id {img.get('id')})")
  missing = np.asarray([not os.path.exists(p) for p in image_paths], bool)

  skipped: dict[str, list[str]] = {}
  kept: list[tuple[dict, str]] = []
  for k, ann in enumerate(_as_list(data, "annotations", path)):
    where = f"{path}: annotations[{k}]" + (f" (id {ann.get('id')})" if isinstance(ann, dict)
                                           else "")
    problem = _box_problem(ann, images, len(names))
    if problem is not None:
      skipped.setdefault("bad record", []).append(f"{where}: {problem}")
      continue
    area = ann.get("area")
    area = float(area) if isinstance(area, (int, float)) else ann["bbox"][2] * ann["bbox"][3]
    if area < min_box_area:
      skipped.setdefault(f"area below {min_box_area:g}", []).append(where)
    elif all(v == -1 for v in ann["att_vec"]):
      skipped.setdefault("no known attribute label", []).append(where)
    else:
      kept.append((ann, where))
  return OvadSplit(
      path=path, attribute_names=names, freq_sets=freq_sets, is_has=is_has,
      image_paths=image_paths, image_sizes=np.asarray(image_sizes, np.int64).reshape(-1, 2),
      image_where=image_where, missing_image=missing,
      box_image=np.asarray([images[a["image_id"]] for a, _ in kept], np.int64),
      bbox=np.asarray([a["bbox"] for a, _ in kept], np.float64).reshape(-1, 4),
      labels=np.asarray([a["att_vec"] for a, _ in kept], np.int8).reshape(-1, len(names)),
      box_ids=[a.get("id") for a, _ in kept], box_where=[w for _, w in kept],
      categories=[categories.get(a.get("category_id"), "") for a, _ in kept], skipped=skipped)


def write_ovad_json(path: str, *, images: Sequence[dict], boxes_: Sequence[dict],
                    attributes: Sequence[dict], categories: Sequence[str]) -> dict:
  """Writes an annotation file in the published layout (module docstring) and returns it.

  images: [{"file_name", "width", "height"}] -> ids 1, 2, ... in order.
  categories: names -> ids 1, 2, ... in order.
  attributes: [{"name": "<type>:<synonyms>", "freq_set": "head" | "medium" | "tail",
    "is_has_att": "is" | "has" (default "is"), "type" (default: the name's prefix),
    "parent_type" (default: the type)}] -> ids 0 .. A-1 in order (the columns of att_vec).
  boxes_: [{"image": index into `images`, "bbox": [x, y, w, h], "category": a name of
    `categories`, "labels": {attribute name: 1 | 0}}]; attributes a box does not name are -1
    (unknown). -> annotations with ids 1, 2, ..., "area" w * h, "iscrowd" 0, "att_vec".
  """
  att_ids = {a["name"]: k for k, a in enumerate(attributes)}
  cat_ids = {name: k + 1 for k, name in enumerate(categories)}
  table = []
  for k, a in enumerate(attributes):
    att_type = a.get("type", a["name"].split(":", 1)[0])
    table.append({"id": k, "name": a["name"], "type": att_type,
                  "parent_type": a.get("parent_type", att_type),
                  "is_has_att": a.get("is_has_att", "is"), "freq_set": a["freq_set"]})
  annotations = []
  for k, box in enumerate(boxes_):
    vec = [-1] * len(attributes)
    for name, value in box["labels"].items():
      if name not in att_ids or value not in (0, 1):
        raise ValueError(f"boxes_[{k}]: label {name!r}: {value!r} (attributes: "
                         f"{sorted(att_ids)}, values 1 or 0)")
      vec[att_ids[name]] = int(value)
    x, y, w, h = (float(v) for v in box["bbox"])
    annotations.append({"id": k + 1, "image_id": int(box["image"]) + 1, "bbox": [x, y, w, h],
                        "area": w * h, "iscrowd": 0, "category_id": cat_ids[box["category"]],
                        "att_vec": vec})
  data = {"images": [{"id": k + 1, "file_name": img["file_name"], "width": int(img["width"]),
                      "height": int(img["height"])} for k, img in enumerate(images)],
          "annotations": annotations,
          "categories": [{"id": i, "name": name} for name, i in cat_ids.items()],
          "attributes": table}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(data, f)
  return data


# ------------------------------------------------------------------------------ the metric
def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
  """Non-interpolated AP of scikit-learn's `average_precision_score`: labels [n] bool (at least
  one True), scores [n]. With the distinct scores s_1 > s_2 > ... as thresholds (ties are one
  threshold), P_k / R_k the precision / recall of "score >= s_k": AP = sum_k (R_k - R_k-1) P_k,
  R_0 = 0."""
  order = np.argsort(-scores, kind="stable")
  s, y = scores[order], labels[order].astype(np.float64)
  last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last box of each distinct score
  tp = np.cumsum(y)[last]
  precision = tp / (last + 1.0)
  recall = tp / tp[-1]
  return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def attribute_aps(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """OVAD's per-attribute AP: scores [N, A] (clipped to [0, 1] first, as the benchmark does),
  labels [N, A] 1 / 0 / -1 -> [A] float64 AP over the boxes with a known label (-1: ignored), NaN
  where no box is positive."""
  scores = np.clip(np.asarray(scores, np.float64), 0.0, 1.0)
  labels = np.asarray(labels)
  aps = np.full(labels.shape[1], np.nan)
  for a in range(labels.shape[1]):
    known = labels[:, a] >= 0
    positive = labels[known, a] == 1
    if positive.any():
      aps[a] = average_precision(positive, scores[known, a])
  return aps


def map_metrics(aps: np.ndarray, freq_sets: Sequence[str]) -> dict[str, float]:
  """{"map": mean AP over the attributes with an AP, "map_<group>" over those of each freq_set
  (absent when none has an AP)} in percent."""
  aps = np.asarray(aps, np.float64)
  out = {}
  for key, members in [("map", np.ones(len(aps), bool))] + [
      (f"map_{g}", np.asarray([f == g for f in freq_sets], bool)) for g in FREQ_SETS]:
    values = aps[members & ~np.isnan(aps)]
    if values.size:
      out[key] = float(100.0 * values.mean())
  return out


# ------------------------------------------------------------------------------ text
def attribute_prompts(name: str, is_has: str, prompts: Sequence[str], object_word: str = ""
                      ) -> list[str]:
  """The templates of one attribute (module docstring): every synonym x prompt kind x template,
  whitespace collapsed. name: "<type>:<synonym>/<synonym>..."."""
  att_type, synonyms = name.split(":", 1)
  words = [s for s in synonyms.split("/") if s] + list(EXTRA_SYNONYMS.get(synonyms, ()))
  dobj = att_type.replace(" tone", "")
  return [" ".join(t.format(attr=w, dobj=dobj, noun=object_word).split())
          for w in words for kind in prompts for t in TEMPLATES[is_has][kind]]


def attribute_templates(split: OvadSplit, prompts: Sequence[str], object_word: str
                        ) -> tuple[list[str], np.ndarray]:
  """-> (texts [T], attribute of each text [T] int32)."""
  texts, owner = [], []
  for a, (name, is_has) in enumerate(zip(split.attribute_names, split.is_has)):
    mine = attribute_prompts(name, is_has, prompts, object_word)
    texts += mine
    owner += [a] * len(mine)
  return texts, np.asarray(owner, np.int32)


# ------------------------------------------------------------------------------ box inputs
def crop_window(bbox: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
  """The benchmark's crop of a box: x, y, w, h truncated to integers, the pixels [y, y+h) x
  [x, x+w) kept inside the width x height image, at least one pixel -> (x0, y0, x1, y1)."""
  x, y, w, h = (int(v) for v in bbox)
  x0, y0 = min(max(x, 0), width - 1), min(max(y, 0), height - 1)
  return x0, y0, max(min(x + w, width), x0 + 1), max(min(y + h, height), y0 + 1)


def region_rows(box_image: np.ndarray, per_row: int) -> tuple[np.ndarray, np.ndarray]:
  """Boxes grouped into rows of one image and up to `per_row` of its boxes, in image order:
  box_image [N] -> (row_image [rows] int, row_boxes [rows, per_row] int: box index, -1 = empty)."""
  row_image, row_boxes = [], []
  for image in np.unique(box_image):
    mine = np.flatnonzero(box_image == image)
    for start in range(0, len(mine), per_row):
      chunk = mine[start:start + per_row]
      row_image.append(image)
      row_boxes.append(np.r_[chunk, np.full(per_row - len(chunk), -1)])
  return (np.asarray(row_image, np.int64),
          np.asarray(row_boxes, np.int64).reshape(-1, per_row))


def region_masks(split: OvadSplit, row_image: np.ndarray, row_boxes: np.ndarray, image_res: int,
                 patch_size: int) -> np.ndarray:
  """[rows, per_row, 1 + G*G] uint8 patch masks of the rows' boxes (`boxes.box_patch_mask` of the
  box scaled from the image's (W, H) to R x R); empty slots, and boxes of an image whose size is
  unknown (an unreadable file, scored as a miss): the whole image."""
  full = boxes.full_patch_mask(image_res, patch_size).astype(np.uint8)
  masks = np.broadcast_to(full, row_boxes.shape + full.shape).copy()
  for r, k in zip(*np.nonzero(row_boxes >= 0)):
    box = int(row_boxes[r, k])
    w, h = split.image_sizes[row_image[r]]
    if w <= 0 or h <= 0:
      continue
    scaled = boxes.scale_box(split.bbox[box], image_res / w, image_res / h)
    masks[r, k] = boxes.box_patch_mask(scaled, image_res, patch_size)
  return masks


class BoxCrops:
  """The crop protocol's images: row n = the box `bboxes[n]` (pixel x, y, w, h) of the image at
  `paths[n]`, cut as the benchmark cuts it (`crop_window`) and resized to R x R uint8 (not
  normalised: `X2VLM.encode_image` normalises), decoded when read (a row loader of
  `common.run_batched`: each process reads only its rows; an image several rows of a batch share
  is decoded once, by `num_threads` threads; rows are best ordered by image).

  An image that cannot be decoded gives its rows the mean pixel, a warning naming it, and its
  rows go to `bad` (shared between processes after the last batch), as `eval_data.EvalImages`."""

  def __init__(self, paths: Sequence[str], bboxes: np.ndarray, where: Sequence[str],
               image_res: int, *, exif_transpose: bool = True, num_threads: int = 4):
    self.paths, self.bboxes, self.where = list(paths), np.asarray(bboxes), list(where)
    self.image_res, self.exif_transpose, self.num_threads = image_res, exif_transpose, num_threads
    self.bad: set[int] = set()
    self.failed: set[str] = set()  # paths that could not be decoded

  def __len__(self) -> int:
    return len(self.paths)

  def bad_mask(self) -> np.ndarray:
    """[N] bool: rows whose image could not be decoded."""
    mask = np.zeros(len(self.paths), bool)
    mask[sorted(self.bad)] = True
    return mask

  def load(self, rows: np.ndarray) -> np.ndarray:
    """The crops [len(rows), R, R, 3] uint8 of `rows`."""
    distinct = sorted({self.paths[int(r)] for r in rows})

    def decode(path):
      try:
        return image_ops.decode_image(path, exif_transpose=self.exif_transpose)
      except image_ops.ImageDecodeError as e:
        return e

    with concurrent.futures.ThreadPoolExecutor(max(1, self.num_threads)) as pool:
      decoded = dict(zip(distinct, pool.map(decode, distinct)))
    out = np.empty((len(rows), self.image_res, self.image_res, 3), np.uint8)
    for n, row in enumerate(int(r) for r in rows):
      img = decoded[self.paths[row]]
      if isinstance(img, Exception):
        if self.paths[row] not in self.failed:  # one warning per image
          logging.warning("Unreadable OVAD image %s (%s): %s; its boxes score 0",
                          self.where[row], self.paths[row], img)
        self.failed.add(self.paths[row])
        self.bad.add(row)
        out[n] = image_ops.MEAN_PIXEL
      else:
        window = crop_window(self.bboxes[row], *img.size)
        out[n] = np.asarray(image_ops.resize_square(img, self.image_res, box=window), np.uint8)
    return out

  def load_batches(self, batches: Sequence[np.ndarray]):
    """The crops of each array of rows, in order; then the processes share `bad`."""
    for rows in batches:
      yield self.load(np.asarray(rows))
    self._share_between_processes()

  def _share_between_processes(self) -> None:
    merged = eval_data.merge_across_processes(self.bad_mask().astype(np.int32))
    self.bad = {int(i) for i in np.flatnonzero(merged)}


# ------------------------------------------------------------------------------ model functions
def attribute_scores(feat: jax.Array, text_feat: jax.Array, owner: jax.Array, num_attrs: int,
                     reduce: str) -> jax.Array:
  """Box features [B, E] x template features [T, E] (unit norm) -> [B, A] float32: the cosine
  with each template, reduced over each attribute's templates (`owner` [T]: its attribute) by
  "mean" or "max"."""
  sims = jnp.matmul(feat.astype(jnp.float32), text_feat.astype(jnp.float32).T,
                    precision=jax.lax.Precision.HIGHEST)  # [B, T]
  if reduce == "max":
    return jax.ops.segment_max(sims.T, owner, num_segments=num_attrs).T
  total = jax.ops.segment_sum(sims.T, owner, num_segments=num_attrs)  # [A, B]
  count = jax.ops.segment_sum(jnp.ones_like(owner, jnp.float32), owner, num_segments=num_attrs)
  return (total / count[:, None]).T


def make_ovad_fns(model, mesh: jax.sharding.Mesh | None = None, reduce: str = "mean"
                  ) -> dict[str, Callable]:
  """The jitted functions (outputs replicated over `mesh`):
    text(params, ids [B, L], atts [B, L]) -> ITC text features [B, E]
    crop(params, text_feat [T, E], owner [T], images [B, R, R, 3], num_attrs=A)
      -> (ITC image features [B, E], scores [B, A])
    region(params, text_feat, owner, images [B, R, R, 3], masks [B, K, 1+P], num_attrs=A)
      -> (region features [B, K, E], scores [B, K, A]): box k of image b pooled from the patches
         of masks[b, k] (`X2VLM.encode_regions`), through `image_features`.
  """
  if reduce not in ("mean", "max"):
    raise ValueError(f"synonym_reduce must be 'mean' or 'max', got {reduce!r}")
  out = {} if mesh is None else dict(out_shardings=sharding_lib.replicated(mesh))

  def text(params, ids, atts):
    common.TRACE_COUNTS["ovad_text"] += 1
    return model.apply({"params": params}, ids, atts,
                       method=lambda m, i, a: m.text_features(m.encode_text(i, a)))

  def crop(params, text_feat, owner, images, num_attrs):
    common.TRACE_COUNTS["ovad_crop"] += 1
    feat = model.apply({"params": params}, images,
                       method=lambda m, x: m.image_features(m.encode_image(x)))
    return feat, attribute_scores(feat, text_feat, owner, num_attrs, reduce)

  def region(params, text_feat, owner, images, masks, num_attrs):
    common.TRACE_COUNTS["ovad_region"] += 1
    b, k = masks.shape[:2]

    def f(m, x, atts):
      if x.dtype == jnp.uint8:  # encode_regions reads normalised pixels
        x = x2vlm.normalize_pixels(x)
      region_embeds, _ = m.encode_regions(x, atts.reshape(b * k, -1),
                                          jnp.repeat(jnp.arange(b, dtype=jnp.int32), k))
      return m.image_features(region_embeds)

    feat = model.apply({"params": params}, images, masks, method=f)  # [B*K, E]
    scores = attribute_scores(feat, text_feat, owner, num_attrs, reduce)
    return feat.reshape(b, k, -1), scores.reshape(b, k, -1)

  return dict(text=jax.jit(text, **out),
              crop=jax.jit(crop, static_argnames="num_attrs", **out),
              region=jax.jit(region, static_argnames="num_attrs", **out))


# ------------------------------------------------------------------------------ evaluation
@dataclasses.dataclass
class OvadInputs:
  """What the model reads for one split (built once, `prepare_inputs`)."""
  split: OvadSplit
  text_ids: np.ndarray  # [T, L]
  text_atts: np.ndarray  # [T, L]
  owner: np.ndarray  # [T] attribute of each template
  scored: np.ndarray  # [M] boxes whose image file exists (the others score 0)
  row_image: np.ndarray  # [rows] image of each region row
  row_boxes: np.ndarray  # [rows, K] box of each slot (-1: empty)
  row_images: Any  # EvalImages [rows]
  row_masks: np.ndarray  # [rows, K, 1 + P] uint8
  crops: BoxCrops  # [M]


@dataclasses.dataclass
class OvadResult:
  """One split's evaluation: per protocol box features [N, E], scores [N, A] (0 for boxes of
  missing / unreadable images), per-attribute APs [A] and means; `bad_boxes` [N] bool."""
  features: dict[str, np.ndarray]
  scores: dict[str, np.ndarray]
  aps: dict[str, np.ndarray]
  maps: dict[str, dict[str, float]]
  bad_boxes: np.ndarray
  bad_images: int


def prepare_inputs(split: OvadSplit, tokenizer, *, image_res: int, patch_size: int,
                   max_tokens: int, max_words: int, prompts: Sequence[str], object_word: str,
                   boxes_per_row: int, exif_transpose: bool = True, decode_workers: int = 0
                   ) -> OvadInputs:
  """The templates tokenised, the region rows and their masks, the crops of `split`'s boxes
  whose image file exists."""
  texts, owner = attribute_templates(split, prompts, object_word)
  where = [f"{split.path}: attribute {split.attribute_names[a]!r}, template {t!r}"
           for t, a in zip(texts, owner)]
  ids, atts = eval_data.encode_texts(texts, where, eval_data.as_tokenizer(tokenizer),
                                     max_tokens, max_words)
  scored = np.flatnonzero(~split.missing_image[split.box_image])
  scored = scored[np.argsort(split.box_image[scored], kind="stable")]  # crops of an image together
  row_image, row_slots = region_rows(split.box_image[scored], boxes_per_row)
  row_boxes = np.where(row_slots >= 0, scored[np.maximum(row_slots, 0)], -1)
  images = eval_data.EvalImages([split.image_paths[i] for i in row_image],
                                [split.image_where[i] for i in row_image], image_res,
                                exif_transpose=exif_transpose, decode_workers=decode_workers)
  crops = BoxCrops([split.image_paths[split.box_image[n]] for n in scored], split.bbox[scored],
                   [split.box_where[n] for n in scored], image_res, exif_transpose=exif_transpose)
  return OvadInputs(split=split, text_ids=ids, text_atts=atts, owner=owner, scored=scored,
                    row_image=row_image, row_boxes=row_boxes, row_images=images,
                    row_masks=region_masks(split, row_image, row_boxes, image_res, patch_size),
                    crops=crops)


def evaluate_ovad(params, inputs: OvadInputs, fns: dict, *, batch_size: int,
                  mesh: jax.sharding.Mesh | None = None,
                  log_fn: Callable[[str], Any] = logging.info) -> OvadResult:
  """Both protocols on one split (module docstring)."""
  t0 = time.monotonic()
  split = inputs.split
  n, a = len(split.box_image), split.num_attributes
  params = common.place_params(params, mesh)
  text_feat = common.run_batched(lambda i, m: fns["text"](params, i, m),
                                 (inputs.text_ids, inputs.text_atts), batch_size, mesh)
  owner = common.put_replicated(inputs.owner, mesh)
  features, scores = {}, {}
  bad = split.missing_image[split.box_image].copy()  # [N]
  if len(inputs.scored):
    feat, score = common.run_batched(
        lambda x, m: fns["region"](params, text_feat, owner, x, m, num_attrs=a),
        (inputs.row_images, inputs.row_masks), batch_size, mesh)
    filled = inputs.row_boxes >= 0
    features["region"] = _scatter(np.asarray(jax.device_get(feat))[filled],
                                  inputs.row_boxes[filled], n)
    scores["region"] = _scatter(np.asarray(jax.device_get(score))[filled],
                                inputs.row_boxes[filled], n)
    bad[inputs.row_boxes[filled]] |= inputs.row_images.bad_mask()[np.nonzero(filled)[0]]
    feat, score = common.run_batched(
        lambda x: fns["crop"](params, text_feat, owner, x, num_attrs=a), (inputs.crops,),
        batch_size, mesh)
    features["crop"] = _scatter(np.asarray(jax.device_get(feat)), inputs.scored, n)
    scores["crop"] = _scatter(np.asarray(jax.device_get(score)), inputs.scored, n)
    bad[inputs.scored] |= inputs.crops.bad_mask()
  else:  # every image is missing
    dim = int(text_feat.shape[-1])
    features = {p: np.zeros((n, dim), np.float32) for p in PROTOCOLS}
    scores = {p: np.zeros((n, a), np.float32) for p in PROTOCOLS}
  for p in PROTOCOLS:
    scores[p][bad] = 0.0  # misses: the lowest score after clipping
  aps = {p: attribute_aps(scores[p], split.labels) for p in PROTOCOLS}
  maps = {p: map_metrics(aps[p], split.freq_sets) for p in PROTOCOLS}
  bad_images = len(np.unique(split.box_image[bad]))
  log_fn(f"{n} boxes, {a} attributes ({len(inputs.owner)} templates), "
         f"{len(inputs.row_image)} region rows, in {time.monotonic() - t0:.1f}s: mAP region "
         f"{maps['region'].get('map', float('nan')):.2f}, crop "
         f"{maps['crop'].get('map', float('nan')):.2f}")
  return OvadResult(features=features, scores=scores, aps=aps, maps=maps, bad_boxes=bad,
                    bad_images=bad_images)


def _scatter(values: np.ndarray, rows: np.ndarray, n: int) -> np.ndarray:
  """values [M, ...] at `rows` [M] of a zero [n, ...] float32 array."""
  out = np.zeros((n,) + values.shape[1:], np.float32)
  out[rows] = values
  return out


def report(split: OvadSplit, result: OvadResult) -> dict:
  """The prediction file's content: per protocol the means and per-attribute APs (null: no
  positive box), the counts, the boxes left out and the boxes scored as misses."""
  def ap_table(aps):
    return {name: (None if math.isnan(v) else round(100.0 * float(v), 4))
            for name, v in zip(split.attribute_names, aps)}

  return {
      "file": split.path, "headline": "region",
      "protocols": {p: {**result.maps[p], "ap": ap_table(result.aps[p])} for p in PROTOCOLS},
      "freq_set": dict(zip(split.attribute_names, split.freq_sets)),
      "counts": {"boxes": int(len(split.box_image)), "images": len(split.image_paths),
                 "missing_images": int(split.missing_image.sum()),
                 "bad_images": result.bad_images,
                 **{f"skipped: {k}": len(v) for k, v in split.skipped.items()}},
      "skipped": split.skipped,
      "scored_as_misses": [split.box_where[i] for i in np.flatnonzero(result.bad_boxes)],
  }


class OvadEvaluator(common.Evaluator):
  """OVAD box-oracle attribute mAP, two protocols, one split per file (module docstring)."""

  TYPE = "ovad"

  @classmethod
  def default_config(cls):
    cfg = super().default_config()
    cfg.update(dict(
        files=(),  # ovad2000.json-style annotation files, one split per file
        image_root="",  # their images' file_name are relative to it (COCO val2017)
        min_box_area=MIN_BOX_AREA,  # boxes with a smaller "area" are left out (the benchmark's)
        prompts=("a", "the", "none"),  # prompt kinds of the templates (also "photo")
        object_word="",  # the noun of the templates (the benchmark's --object_word: "object")
        synonym_reduce="mean",  # an attribute's score over its templates: "mean" or "max"
        boxes_per_row=16,  # region protocol: boxes pooled per ViT pass of their image
    ))
    return cfg

  def __init__(self, name, cfg, *, config, model, mesh=None):
    super().__init__(name, cfg, config=config, model=model, mesh=mesh)
    bad_prompts = [p for p in cfg.prompts if p not in TEMPLATES["is"]]
    if not cfg.prompts or bad_prompts:
      raise ValueError(f"{self.field('prompts')}: {tuple(cfg.prompts)}; use some of "
                       f"{tuple(TEMPLATES['is'])}")
    if int(cfg.boxes_per_row) < 1:
      raise ValueError(f"{self.field('boxes_per_row')} must be >= 1, got {cfg.boxes_per_row}")
    d = config.data
    tokenizer = text_lib.load_tokenizer(d.vocab_path)
    self.splits = []
    for path, split_name in common.named_splits(cfg.files, self.field("files")):
      split = read_ovad_json(path, cfg.image_root, min_box_area=float(cfg.min_box_area),
                             exif_transpose=d.exif_transpose)
      self._log_skipped(split_name, split)
      inputs = prepare_inputs(
          split, tokenizer, image_res=config.model.image_res,
          patch_size=config.model.patch_size, max_tokens=d.max_tokens, max_words=d.max_words,
          prompts=tuple(cfg.prompts), object_word=cfg.object_word,
          boxes_per_row=int(cfg.boxes_per_row), exif_transpose=d.exif_transpose,
          decode_workers=cfg.decode_workers)
      self.splits.append((split_name, inputs))
    self.fns = make_ovad_fns(model, mesh, cfg.synonym_reduce)

  def _log_skipped(self, split_name: str, split: OvadSplit) -> None:
    for reason, where in split.skipped.items():
      self.log(f"{split_name}: {len(where)} boxes left out ({reason}), e.g. "
               f"{'; '.join(where[:3])}")
    for k in np.flatnonzero(split.missing_image):
      logging.warning("eval/%s: %s: no image file %s; its boxes score 0", self.name,
                      split.image_where[k], split.image_paths[k])
    if not len(split.box_image):
      raise BadDataError(f"{split.path}: no box to evaluate")

  def evaluate(self, params, inputs: OvadInputs, split_name: str = "") -> OvadResult:
    return evaluate_ovad(params, inputs, self.fns, batch_size=self.batch_size, mesh=self.mesh,
                         log_fn=lambda line: self.log(f"{split_name}: {line}"))

  def run(self, params, step=0, *, predictions_dir=None):
    results = {}
    for split_name, inputs in self.splits:
      result = self.evaluate(params, inputs, split_name)
      for key, value in result.maps["region"].items():
        results[self.metric_name(split_name, key)] = value
      if "map" in result.maps["crop"]:
        results[self.metric_name(split_name, "map_crop")] = result.maps["crop"]["map"]
      if result.bad_images:
        results[self.metric_name(split_name, "bad_images")] = float(result.bad_images)
      common.write_json(predictions_dir, f"ovad_{self.name}_{split_name}.json",
                        report(inputs.split, result))
    return results


# ------------------------------------------------------------------------------ the task
class OvadTask(base.Task):
  """Evaluation only: the "ovad" evaluator (module docstring); nothing to train."""

  name = "ovad"
  evaluators = {OvadEvaluator.TYPE: OvadEvaluator}

  def config(self):
    return ml_collections.ConfigDict()  # no training data

  def validate(self, config):
    raise ValueError(f"config.train.tasks.{self.name}: OVAD is evaluation-only (an "
                     f"evaluator: config.evals.<name> = evaluator('ovad', files=[...])); give it "
                     "weight 0 or drop it")


TASK = OvadTask()
