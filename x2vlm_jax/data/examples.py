"""Per-record processing shared by the tasks: a raw record -> one example, or a `BadExample`.

A task (x2vlm_jax/tasks/) builds its examples with a `Processor` subclass; the ones here are the
record kinds several tasks read:

`ImageTextProcessor` (image_text, retrieval): an {"image", "caption"} record ->
  image [R, R, 3] f32; text_ids, text_atts, text_ids_masked [L] i32; masked_pos, masked_ids [M] i32;
  image_idx i32: a stable 31-bit hash of the record's image_id (or of its image path), so that
  retrieval fine-tuning can tell captions of the same image apart from negatives.
  Transform: RandomResizedCrop(scale=(crop_scale_min, 1), ratio 3/4..4/3, bicubic) -> horizontal
  flip (p = hflip_prob; "left"/"right" swapped in the caption unless swap_left_right_on_flip is
  False) -> RandAugment(N, M) with colour and geometric ops -> CLIP normalisation.
  (R = image_res, L = max_tokens, M = max_masks.)

`RegionProcessor` (regions, and the box tasks built on it): an {"image", "elems": [{"bbox",
  "caption"}, ...]} record (REFERENCE_DETAILED §3.3) -> image [R, R, 3] f32 and `pairs`, a list of
  at most max_regions dicts, each with the text fields above plus image_atts [1+P] i32,
  target_bbox [4] f32 (cx, cy, w, h in [0, 1]), is_image f32.
  A random valid element anchors a random crop containing it; flip; resize to R x R;
  colour-only RandAugment; an image-level caption gives one pair with all-ones image_atts and
  target [0.5, 0.5, 1, 1], is_image = 1; elements whose clipped-area / area <= min_perc_in_image
  are dropped.

`QuestionProcessor` (question-answering tasks): the question's text fields and the augmented
  image of a {"image", "question", "answer"} record, never flipped when the question or an answer
  says "left" or "right" (reference); subclasses turn the answers into targets.

Bad records (missing / undecodable image, malformed JSON, empty caption, no valid box) become
`BadExample(where, reason)` and are logged with `logging.warning`; bad elements inside a good
region record are dropped and reported in one warning.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import logging
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image

from x2vlm_jax import boxes as box_ops
from x2vlm_jax.data import image_ops
from x2vlm_jax.data import records
from x2vlm_jax.data import text as text_lib

logger = logging.getLogger(__name__)

BadRecordError = records.BadRecordError


@dataclasses.dataclass(frozen=True)
class BadExample:
  """Marker for a skipped record; `where` is "file:line", `reason` a short explanation."""

  where: str
  reason: str


def load_record_image(
    rec: dict,
    image_key: str,
    image_root: str,
    *,
    exif_transpose: bool = True,
    max_pixels: int = 89_478_485,
) -> Image.Image:
  """The record's image as PIL RGB: base64 in "image_b64"/"binary", a path or a uint8 array."""
  for key in ("image_b64", "binary"):
    if key in rec and key != image_key:
      value = rec[key]
      if not isinstance(value, str) or not value:
        raise BadRecordError(f"{key!r} is not a non-empty base64 string")
      try:
        data = base64.b64decode(value, validate=True)
      except (binascii.Error, ValueError) as e:
        raise BadRecordError(f"{key!r} is not valid base64 ({e})") from e
      return image_ops.decode_image(data, exif_transpose=exif_transpose, max_pixels=max_pixels)
  if image_key not in rec:
    raise BadRecordError(f"record has no image (keys {sorted(rec)}; expected {image_key!r}, "
                         "'image_b64' or 'binary')")
  value = rec[image_key]
  if isinstance(value, np.ndarray):
    if value.dtype != np.uint8 or value.ndim not in (2, 3):
      raise BadRecordError(f"image array has dtype {value.dtype} and shape {value.shape}")
    return image_ops.to_rgb(Image.fromarray(value))
  if not isinstance(value, str) or not value:
    raise BadRecordError(f"{image_key!r} is not a path string: {value!r:.80}")
  path = value if os.path.isabs(value) or not image_root else os.path.join(image_root, value)
  return image_ops.decode_image(path, exif_transpose=exif_transpose, max_pixels=max_pixels)


def text_list(value: Any) -> list[str]:
  """str | [str] | {lang: str} -> list of strings (non-strings dropped)."""
  if isinstance(value, str):
    return [value]
  if isinstance(value, dict):
    value = list(value.values())
  if isinstance(value, (list, tuple)):
    return [v for v in value if isinstance(v, str)]
  return []


def valid_captions(values: Sequence[str], encoder: text_lib.TextEncoder,
                    errors: list[str] | None = None) -> list[str]:
  """The captions that survive pre_caption and tokenisation; reasons of the others in `errors`."""
  out = []
  for v in values:
    try:
      encoder.token_ids(v)
    except text_lib.EmptyCaptionError as e:
      if errors is not None:
        errors.append(str(e))
      continue
    out.append(v)
  return out


def pick(rng: np.random.Generator, values: Sequence[Any]) -> Any:
  return values[int(rng.integers(0, len(values)))]


def stable_id(value: Any) -> int:
  """A process-independent 31-bit integer for an image id (str / int / anything printable)."""
  digest = hashlib.blake2b(str(value).encode("utf-8"), digest_size=4).digest()
  return int.from_bytes(digest, "little") & 0x7FFFFFFF


class Processor:
  """Shared parts: config, text encoder, error capture. Subclasses implement `process`.

  cfg: `config.data` (the shared fields); sub: the task's section (`config.data.<task>`).
  """

  def __init__(self, cfg, sub, image_res: int, patch_size: int, encoder: text_lib.TextEncoder):
    self.image_res = int(image_res)
    self.patch_size = int(patch_size)
    self.encoder = encoder
    self.image_root = sub.image_root
    self.image_key = sub.image_key
    self.caption_key = sub.caption_key
    self.hflip_prob = float(sub.hflip_prob)
    self.randaug = bool(sub.randaug)
    self.swap_left_right = bool(cfg.swap_left_right_on_flip)
    self.randaug_num_ops = int(cfg.randaug_num_ops)
    self.randaug_magnitude = float(cfg.randaug_magnitude)
    self.exif_transpose = bool(cfg.exif_transpose)
    self.max_pixels = int(cfg.max_image_pixels)
    if self.image_res % self.patch_size:
      raise ValueError(f"image_res {image_res} is not a multiple of patch_size {patch_size}")

  def _image(self, rec: dict) -> Image.Image:
    return load_record_image(rec, self.image_key, self.image_root,
                             exif_transpose=self.exif_transpose, max_pixels=self.max_pixels)

  def _augment(self, img: Image.Image, rng: np.random.Generator, crop_scale: tuple[float, float],
               flipped: bool) -> np.ndarray:
    """RandomResizedCrop -> resize R x R -> optional flip -> RandAugment -> normalised [R, R, 3]."""
    i, j, h, w = image_ops.random_resized_crop_params(img.width, img.height, rng, crop_scale)
    img = image_ops.resize_square(img, self.image_res, box=(j, i, j + w, i + h))
    if flipped:
      img = image_ops.hflip(img)
    if self.randaug:
      img = image_ops.rand_augment(img, rng, self.randaug_num_ops, self.randaug_magnitude,
                                   image_ops.ALL_OPS)
    return image_ops.normalize(img)

  def _choose_caption(self, rec: dict, rng: np.random.Generator) -> str:
    """A random usable caption of `rec[caption_key]` (str or list); BadRecordError if none."""
    errors: list[str] = []
    captions = valid_captions(text_list(rec.get(self.caption_key)), self.encoder, errors)
    if not captions:
      detail = errors[0] if errors else f"found {rec.get(self.caption_key)!r:.80}"
      raise BadRecordError(f"no usable caption in {self.caption_key!r} ({detail})")
    return pick(rng, captions)

  def _flip_text(self, text: str, flipped: bool) -> str:
    return text_lib.swap_left_right(text) if flipped and self.swap_left_right else text

  def __call__(self, raw: records.RawRecord, rng: np.random.Generator):
    try:
      rec = records.parse_record(raw)
      out = self.process(raw.where, rec, rng)
    except (BadRecordError, image_ops.ImageDecodeError, text_lib.EmptyCaptionError) as e:
      return self._bad(raw.where, str(e))
    except Exception as e:  # pylint: disable=broad-except
      # Never crash a worker on one record; the bad-fraction limit still stops a broken dataset.
      return self._bad(raw.where, f"unexpected {type(e).__name__}: {e}")
    out["key"] = int(rng.integers(0, 2**62))
    return out

  @staticmethod
  def _bad(where: str, reason: str) -> BadExample:
    logger.warning("Skipping bad record %s: %s", where, reason)
    return BadExample(where, reason)

  def process(self, where: str, rec: dict, rng: np.random.Generator) -> dict:
    raise NotImplementedError


class ImageTextProcessor(Processor):
  """Raw image-text record -> image-text example (see the module docstring)."""

  def __init__(self, cfg, sub, image_res: int, patch_size: int, encoder: text_lib.TextEncoder):
    super().__init__(cfg, sub, image_res, patch_size, encoder)
    self.crop_scale = (float(sub.crop_scale_min), 1.0)
    self.image_id_key = sub.image_id_key

  def process(self, where: str, rec: dict, rng: np.random.Generator) -> dict:
    caption = self._choose_caption(rec, rng)
    flipped = bool(rng.random() < self.hflip_prob)
    caption = self._flip_text(caption, flipped)
    image = self._augment(self._image(rec), rng, self.crop_scale, flipped)
    out = self.encoder(caption, rng)
    out["image"] = image
    image_id = rec.get(self.image_id_key)
    if image_id is None:
      image_id = rec.get(self.image_key, where)  # base64 images without an id: the record itself
    out["image_idx"] = np.int32(stable_id(image_id))
    return out


class RegionProcessor(Processor):
  """Raw region record -> region example (image + list of region-text pairs)."""

  def __init__(self, cfg, sub, image_res: int, patch_size: int, encoder: text_lib.TextEncoder):
    """sub: the task's section; without `max_regions`, one pair per record."""
    super().__init__(cfg, sub, image_res, patch_size, encoder)
    self.max_regions = int(sub.get("max_regions", 1))
    self.min_perc = float(sub.min_perc_in_image)
    self.region_crop = bool(sub.random_crop)

  def _elem_texts(self, elem: dict) -> tuple[list[str], list[str]]:
    captions = text_list(elem.get("caption"))
    attributes = [a for a in text_list(elem.get("attributes")) if a.strip()]
    return captions, attributes

  def process(self, where: str, rec: dict, rng: np.random.Generator) -> dict:
    elems = rec.get("elems")
    if not isinstance(elems, list) or not elems:
      raise BadRecordError("record has no 'elems' list")
    dropped: list[str] = []
    valid = []  # (box, captions, attributes)
    for k, elem in enumerate(elems):
      if not isinstance(elem, dict):
        dropped.append(f"elem {k}: not an object")
        continue
      box = elem.get("bbox", elem.get("bb"))
      if box is None or not box_ops.is_valid_box(box):
        dropped.append(f"elem {k}: invalid box {box!r}")
        continue
      captions, attributes = self._elem_texts(elem)
      # An attribute prefix can only add words, so validating the bare captions suffices.
      captions = valid_captions(captions, self.encoder)
      if not captions:
        dropped.append(f"elem {k}: no usable caption")
        continue
      valid.append(([float(v) for v in box], captions, attributes))
    if not valid:
      raise BadRecordError(f"no valid region ({'; '.join(dropped[:3])})")

    img = self._image(rec)
    width, height = img.size
    inside = []
    for box, captions, attributes in valid:
      frac = box_ops.visible_fraction(box, 0, 0, width, height)
      if frac <= self.min_perc:
        dropped.append(f"box {box} outside the {width}x{height} image")
        continue
      inside.append((box, captions, attributes))
    if not inside:
      raise BadRecordError(f"all boxes lie outside the {width}x{height} image "
                           f"({'; '.join(dropped[:3])})")
    if dropped:
      logger.warning("Record %s: dropped %d of %d regions (%s)", where, len(dropped), len(elems),
                     "; ".join(dropped[:5]))

    image_captions = valid_captions(text_list(rec.get(self.caption_key)), self.encoder)

    anchor = box_ops.clip_box(pick(rng, inside)[0], width, height)
    if self.region_crop:
      x0, y0, x1, y1 = image_ops.region_crop_params(anchor, width, height, rng)
    else:  # whole image: boxes keep the scale they have at evaluation
      x0, y0, x1, y1 = 0, 0, width, height
    cw, ch = x1 - x0, y1 - y0
    flipped = bool(rng.random() < self.hflip_prob)
    r = self.image_res
    img = image_ops.resize_square(img, r, box=(x0, y0, x1, y1))
    if flipped:
      img = image_ops.hflip(img)
    if self.randaug:
      img = image_ops.rand_augment(img, rng, self.randaug_num_ops, self.randaug_magnitude,
                                   image_ops.COLOUR_OPS)

    pairs = []
    budget = self.max_regions
    if image_captions:
      caption = self._flip_text(pick(rng, image_captions), flipped)
      pair = self.encoder(caption, rng)
      pair["image_atts"] = box_ops.full_patch_mask(r, self.patch_size)
      pair["target_bbox"] = np.array([0.5, 0.5, 1.0, 1.0], np.float32)
      pair["is_image"] = np.float32(1.0)
      pairs.append(pair)
      budget -= 1
    for k in rng.permutation(len(inside)):
      if budget <= 0:
        break
      box, captions, attributes = inside[int(k)]
      if box_ops.visible_fraction(box, x0, y0, x1, y1) <= self.min_perc:
        continue
      b = box_ops.crop_box(box, x0, y0, x1, y1)
      if flipped:
        b = box_ops.flip_box(b, cw)
      b = box_ops.scale_box(b, r / cw, r / ch)
      caption = pick(rng, captions)
      if attributes:
        caption = pick(rng, attributes) + " " + caption
      pair = self.encoder(self._flip_text(caption, flipped), rng)
      pair["image_atts"] = box_ops.box_patch_mask(b, r, self.patch_size)
      pair["target_bbox"] = box_ops.box_target(b, r)
      pair["is_image"] = np.float32(0.0)
      pairs.append(pair)
      budget -= 1
    if not pairs:
      raise BadRecordError("no region-text pair survived the crop")
    return {"image": image_ops.normalize(img), "pairs": pairs}


class QuestionProcessor(Processor):
  """Question-answering records `{"image", "question", "answer": [str] | str}`: the question's
  text fields and the augmented image (module docstring); `process` is the subclass's.

  Transform: RandomResizedCrop(scale=(crop_scale_min, 1)) -> flip (p = hflip_prob) only when
  neither the question nor an answer says "left" or "right" (reference) -> RandAugment.
  """

  def __init__(self, cfg, sub, image_res: int, patch_size: int, encoder: text_lib.TextEncoder):
    super().__init__(cfg, sub, image_res, patch_size, encoder)
    self.crop_scale = (float(sub.crop_scale_min), 1.0)
    self.answer_key = sub.answer_key

  def question_and_image(self, rec: dict, rng: np.random.Generator) -> tuple[dict, Any]:
    """Question text fields + augmented image; returns (fields, the record's answers)."""
    question = rec.get(self.caption_key)
    if not isinstance(question, str):
      raise BadRecordError(f"{self.caption_key!r} must be a string, found {question!r:.80}")
    answers = rec.get(self.answer_key)
    if not (isinstance(answers, str) and answers.strip()) and not text_list(answers):
      raise BadRecordError(f"no answer in {self.answer_key!r} (found {answers!r:.80})")
    out = self.encoder(question, rng)  # raises EmptyCaptionError for an empty question
    words = " ".join([question] + text_list(answers)).lower().split()
    may_flip = "left" not in words and "right" not in words
    flipped = may_flip and bool(rng.random() < self.hflip_prob)
    out["image"] = self._augment(self._image(rec), rng, self.crop_scale, flipped)
    return out, answers


def load_answer_list(path: str, field: str) -> list[str]:
  """Candidate answers: a JSON list of distinct strings (the reference's answer_list.json), or
  an {answer: label} object with labels 0..A-1 (the reference's `ans2label` files), in label
  order. `field` names the config field in messages."""
  import json

  if not path:
    raise ValueError(f"{field} is empty: the task needs its candidate answer list")
  try:
    with open(path) as f:
      answers = json.load(f)
  except FileNotFoundError as e:
    raise ValueError(f"{field}: no file {path}") from e
  except json.JSONDecodeError as e:
    raise ValueError(f"{field}: {path} is not JSON ({e})") from e
  if isinstance(answers, dict):
    labels = sorted(answers.values()) if all(isinstance(v, int) for v in answers.values()) else []
    if labels != list(range(len(answers))):
      raise ValueError(f"{path}: an answer -> label object must map to the labels "
                       f"0..{len(answers) - 1}")
    answers = sorted(answers, key=answers.get)
  if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
    raise ValueError(f"{path}: expected a JSON list of answer strings or an {{answer: label}} "
                     "object")
  if len({a.strip().lower() for a in answers}) != len(answers):
    raise ValueError(f"{path}: the answer list has duplicates")
  return answers


def answer_index(answers: Sequence[str]) -> dict[str, int]:
  """{normalised answer: its index}: answers compare stripped and lower-cased."""
  return {a.strip().lower(): k for k, a in enumerate(answers)}


def is_bad(example: Any) -> bool:
  return isinstance(example, BadExample)
