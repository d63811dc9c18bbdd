"""Deterministic evaluation data (test transform: bicubic resize to R x R + CLIP normalisation).

The shared pieces of the evaluators' loaders (each task reads its own record layout, in
x2vlm_jax/tasks/): files are JSONL or JSON lists (the reference's `coco_test.json` format);
any unusable record raises BadDataError naming file:line (evaluation data must be complete).

  read_records(path) / read_split(path, what)   every record, in order, as (where, dict)
  image_path(rec, where, image_root)            the record's "image", joined to image_root
  encode_texts(texts, where, tokenizer, L, W)   -> ids, atts [N, L] i32 (pre_caption, [CLS] ... [SEP])
  load_eval_images(paths, R)                    -> images [N, R, R, 3] f32, sizes [N, 2] (W, H)
  EvalImages(paths, where, R)                   the same, decoded lazily one slice (batch) at a time
  check_files_exist(paths, where)               a missing file fails naming its record
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
from typing import Iterator, Sequence

import numpy as np

from x2vlm_jax.data import image_ops
from x2vlm_jax.data import records
from x2vlm_jax.data import text as text_lib

BadDataError = records.BadDataError


def read_records(path: str) -> list[tuple[str, dict]]:
  """Every record of a JSONL or JSON-list file, in order; any bad record is an error."""
  src = records.make_source([path])
  out = []
  for i in range(len(src)):
    raw = src[i]
    try:
      out.append((raw.where, records.parse_record(raw)))
    except records.BadRecordError as e:
      raise BadDataError(f"{raw.where}: {e}") from e
  return out


def as_tokenizer(tokenizer) -> text_lib.Tokenizer:
  if isinstance(tokenizer, (str, os.PathLike)):
    return text_lib.load_tokenizer(tokenizer)
  return tokenizer


def image_path(rec: dict, where: str, image_root: str) -> str:
  value = rec.get("image")
  if not isinstance(value, str) or not value:
    raise BadDataError(f"{where}: record has no 'image' path")
  return value if os.path.isabs(value) or not image_root else os.path.join(image_root, value)


def _load_test_image(path: str, image_res: int, exif_transpose: bool):
  img = image_ops.decode_image(path, exif_transpose=exif_transpose)
  size = img.size
  return image_ops.normalize(image_ops.resize_square(img, image_res)), size


def load_eval_images(
    paths: Sequence[str],
    image_res: int,
    *,
    where: Sequence[str] | None = None,
    exif_transpose: bool = True,
    num_threads: int = 4,
) -> tuple[np.ndarray, np.ndarray]:
  """Test-transformed images [N, R, R, 3] f32 and their original sizes [N, 2] (W, H) i32."""
  where = list(where) if where is not None else list(paths)
  images = np.zeros((len(paths), image_res, image_res, 3), np.float32)
  sizes = np.zeros((len(paths), 2), np.int32)

  def load(k):
    try:
      images[k], sizes[k] = _load_test_image(paths[k], image_res, exif_transpose)
    except image_ops.ImageDecodeError as e:
      raise BadDataError(f"{where[k]}: {e}") from e

  with concurrent.futures.ThreadPoolExecutor(max(num_threads, 1)) as pool:
    list(pool.map(load, range(len(paths))))
  return images, sizes


def check_files_exist(paths: Sequence[str], where: Sequence[str]) -> None:
  """BadDataError naming the first record whose file is missing (checked when an evaluator is
  built, so a wrong image_root fails before training, not at its end)."""
  for path, w in zip(paths, where):
    if not os.path.exists(path):
      raise BadDataError(f"{w}: no file {path}")


class EvalImages:
  """The test-transformed images of `paths`, decoded when sliced: `images[a:b]` -> [b - a, R, R, 3]
  f32 (a batch at a time, so a split of any size never sits in host memory; an image that several
  rows of one batch share, as the questions asked about one image, is decoded once). The original
  (W, H) of every image decoded so far is kept in `sizes` [N, 2] (0 before).

  An image that cannot be decoded does not stop the evaluation: a warning names its record and
  the reason, its rows get a zero image, and its index goes to `bad`, so that the evaluators score
  those rows as misses (they stay in every denominator)."""

  def __init__(self, paths: Sequence[str], where: Sequence[str], image_res: int, *,
               exif_transpose: bool = True, num_threads: int = 4):
    self.paths, self.where = list(paths), list(where)
    self.image_res, self.exif_transpose, self.num_threads = image_res, exif_transpose, num_threads
    self.sizes = np.zeros((len(self.paths), 2), np.int32)
    self.bad: set[int] = set()

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: slice) -> np.ndarray:
    if not isinstance(index, slice):
      raise TypeError("EvalImages is read in slices (batches)")
    start, stop, _ = index.indices(len(self.paths))
    first_row = {}  # path -> the first row of this slice that reads it
    for row in range(start, stop):
      first_row.setdefault(self.paths[row], row)
    decoded = {}

    def load(path):
      try:
        decoded[path] = _load_test_image(path, self.image_res, self.exif_transpose)
      except image_ops.ImageDecodeError as e:
        logging.warning("Unreadable evaluation image %s (%s): %s; its rows count as misses",
                        self.where[first_row[path]], path, e)

    with concurrent.futures.ThreadPoolExecutor(max(self.num_threads, 1)) as pool:
      list(pool.map(load, first_row))
    images = np.zeros((stop - start, self.image_res, self.image_res, 3), np.float32)
    for row in range(start, stop):
      path = self.paths[row]
      if path in decoded:
        images[row - start], self.sizes[row] = decoded[path]
      else:
        self.bad.add(row)
    return images

  def bad_mask(self) -> np.ndarray:
    """[N] bool: the rows whose image could not be decoded (so far)."""
    mask = np.zeros(len(self.paths), bool)
    mask[sorted(self.bad)] = True
    return mask


def iter_eval_images(
    paths: Sequence[str], image_res: int, batch_size: int, *, exif_transpose: bool = True
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields (images [b, R, R, 3] f32, valid [b] bool), b = batch_size (last batch padded)."""
  for start in range(0, len(paths), batch_size):
    chunk = list(paths[start:start + batch_size])
    images, _ = load_eval_images(chunk, image_res, exif_transpose=exif_transpose)
    valid = np.zeros((batch_size,), bool)
    valid[: len(chunk)] = True
    if len(chunk) < batch_size:
      images = np.concatenate(
          [images, np.zeros((batch_size - len(chunk),) + images.shape[1:], np.float32)])
    yield images, valid


def encode_texts(texts: Sequence[str], where: Sequence[str], tokenizer: text_lib.Tokenizer,
                 max_tokens: int, max_words: int) -> tuple[np.ndarray, np.ndarray]:
  """Texts -> (ids [M, L] i32, atts [M, L] i32): pre_caption, [CLS] WordPiece [SEP], padded.

  Raises BadDataError naming `where[k]` for a text that is empty after cleaning."""
  ids = np.full((len(texts), max_tokens), tokenizer.pad_id, np.int32)
  atts = np.zeros((len(texts), max_tokens), np.int32)
  cleaned = []
  for t, w in zip(texts, where):
    try:
      cleaned.append(text_lib.pre_caption(t, max_words))
    except text_lib.EmptyCaptionError as e:
      raise BadDataError(f"{w}: {e}") from e
  for k, toks in enumerate(tokenizer.encode_batch(cleaned)):
    full = text_lib.add_specials(toks, tokenizer, max_tokens)
    ids[k, : len(full)] = full
    atts[k, : len(full)] = 1
  return ids, atts


def read_split(jsonl: str, what: str) -> list[tuple[str, dict]]:
  """Every record of an evaluation split, refusing an empty one."""
  recs = read_records(jsonl)
  if not recs:
    raise BadDataError(f"{jsonl}: no {what}")
  return recs


