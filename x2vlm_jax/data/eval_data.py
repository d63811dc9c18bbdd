"""Deterministic evaluation data (test transform: bicubic resize to R x R + CLIP normalisation).

The shared pieces of the evaluators' loaders (each task reads its own record layout, in
x2vlm_jax/tasks/): files are JSONL or JSON lists (the reference's `coco_test.json` format);
any unusable record raises BadDataError naming file:line (evaluation data must be complete).

  read_records(path) / read_split(path, what)   every record, in order, as (where, dict)
  image_path(rec, where, image_root)            the record's "image", joined to image_root
  encode_texts(texts, where, tokenizer, L, W)   -> ids, atts [N, L] i32 (pre_caption, [CLS] ... [SEP])
  load_eval_images(paths, R)                    -> images [N, R, R, 3] f32, sizes [N, 2] (W, H)
  EvalImages(paths, where, R)                   uint8 pixels [N, R, R, 3] (the model normalises
                                                them on the device), decoded a batch of rows at
                                                a time, by threads or grain worker processes
  decode_images(paths, R)                       -> pixels [n, R, R, 3] u8, sizes [n, 2], errors
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


def _decode_test_image(path: str, image_res: int, exif_transpose: bool):
  """-> (pixels [R, R, 3] uint8, resized, not normalised; original (W, H))."""
  img = image_ops.decode_image(path, exif_transpose=exif_transpose)
  return np.asarray(image_ops.resize_square(img, image_res), np.uint8), img.size


def _load_test_image(path: str, image_res: int, exif_transpose: bool):
  """-> (image [R, R, 3] float32, CLIP-normalised; original (W, H))."""
  pixels, size = _decode_test_image(path, image_res, exif_transpose)
  return image_ops.normalize(pixels), size


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


def decode_images(paths: Sequence[str], image_res: int, *, exif_transpose: bool = True,
                  num_threads: int = 4) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
  """Image files -> (pixels [n, R, R, 3] uint8, resized, not normalised; sizes [n, 2] i32, the
  original (W, H); errors [n]: None, or why the file could not be decoded, its pixels then
  `image_ops.MEAN_PIXEL` and its size 0). `num_threads` threads decode (PIL releases the GIL)."""
  pixels = np.empty((len(paths), image_res, image_res, 3), np.uint8)
  sizes = np.zeros((len(paths), 2), np.int32)
  errors: list[str | None] = [None] * len(paths)

  def load(k):
    try:
      pixels[k], sizes[k] = _decode_test_image(paths[k], image_res, exif_transpose)
    except image_ops.ImageDecodeError as e:
      pixels[k], errors[k] = image_ops.MEAN_PIXEL, str(e)

  with concurrent.futures.ThreadPoolExecutor(max(num_threads, 1)) as pool:
    list(pool.map(load, range(len(paths))))
  return pixels, sizes, errors


class _DecodeBatch:
  """grain map (picklable, run in a worker process): batch index b -> `decode_images` of the b-th
  list of paths."""

  def __init__(self, path_lists: list[list[str]], image_res: int, exif_transpose: bool,
               num_threads: int):
    self.path_lists, self.image_res = path_lists, image_res
    self.exif_transpose, self.num_threads = exif_transpose, num_threads

  def __call__(self, b: int):
    return decode_images(self.path_lists[b], self.image_res, exif_transpose=self.exif_transpose,
                         num_threads=self.num_threads)


def _ensure_absl_flags_parsed() -> None:
  """grain reads absl flags (in its worker processes too); outside absl.app nobody parsed them."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def decode_with_workers(path_lists: list[list[str]], image_res: int, *, num_workers: int,
                        exif_transpose: bool = True, num_threads: int = 4,
                        buffer_size: int = 2) -> Iterator:
  """`decode_images` of every list of `path_lists`, in order, by a grain pipeline of
  `num_workers` worker processes (worker w decodes lists w, w + num_workers, ...), each reading
  up to `buffer_size` lists ahead. Close the returned iterator to stop the workers."""
  import grain  # pylint: disable=g-import-not-at-top

  _ensure_absl_flags_parsed()
  ds = grain.MapDataset.range(len(path_lists)).map(
      _DecodeBatch(path_lists, image_res, exif_transpose, num_threads))
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
  ds = ds.mp_prefetch(grain.MultiprocessingOptions(
      num_workers=max(1, min(num_workers, len(path_lists))), per_worker_buffer_size=buffer_size))
  return iter(ds)


class EvalImages:
  """The test-transformed images of `paths` as uint8 pixels (resized to R x R, not normalised:
  `X2VLM.encode_image` normalises them on the device), decoded when read, a batch at a time, so
  a split of any size never sits in host memory:

    images[a:b]                   -> [b - a, R, R, 3] uint8, decoded now
    images.load_batches(batches)  -> for each array of rows, their pixels [len(rows), R, R, 3],
                                     in order (`common.run_batched` asks each process for the
                                     rows its devices hold); decoded by threads in this process
                                     as each batch is asked for, or with `decode_workers` > 0 by
                                     a grain pipeline of that many worker processes, read ahead

  An image that several rows of one batch share (the questions asked about one image) is
  decoded once. The original (W, H) of every image decoded so far is kept in `sizes` [N, 2] (0
  before); `num_decoded` counts the images this process decoded.

  An image that cannot be decoded does not stop the evaluation: a warning names its record and
  the reason, its rows get the mean pixel (`image_ops.MEAN_PIXEL`), and its index goes to `bad`,
  so that the evaluators score those rows as misses (they stay in every denominator). After the
  last batch of `load_batches`, the processes of a multi-process run share `sizes` and `bad`, so
  that each knows every row's."""

  def __init__(self, paths: Sequence[str], where: Sequence[str], image_res: int, *,
               exif_transpose: bool = True, num_threads: int = 4, decode_workers: int = 0):
    self.paths, self.where = list(paths), list(where)
    self.image_res, self.exif_transpose, self.num_threads = image_res, exif_transpose, num_threads
    self.decode_workers = int(decode_workers)
    self.sizes = np.zeros((len(self.paths), 2), np.int32)
    self.bad: set[int] = set()
    self.num_decoded = 0

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: slice) -> np.ndarray:
    if not isinstance(index, slice):
      raise TypeError("EvalImages is read in slices (batches)")
    rows = np.arange(*index.indices(len(self.paths)))
    paths, inverse = self._distinct(rows)
    return self._place(rows, paths, inverse, self._decode(paths))

  def load_batches(self, batches: Sequence[np.ndarray]) -> Iterator[np.ndarray]:
    """The pixels [len(rows), R, R, 3] uint8 of each array of `batches` (row indices), in order
    (class docstring)."""
    plans = [self._distinct(np.asarray(rows)) for rows in batches]
    stream = self._stream([paths for paths, _ in plans])
    try:
      for rows, (paths, inverse) in zip(batches, plans):
        yield self._place(np.asarray(rows), paths, inverse, next(stream))
    finally:
      stream.close()
    self._share_between_processes()

  def bad_mask(self) -> np.ndarray:
    """[N] bool: the rows whose image could not be decoded (so far)."""
    mask = np.zeros(len(self.paths), bool)
    mask[sorted(self.bad)] = True
    return mask

  def _decode(self, paths: Sequence[str]):
    return decode_images(paths, self.image_res, exif_transpose=self.exif_transpose,
                         num_threads=self.num_threads)

  def _stream(self, path_lists: list[list[str]]) -> Iterator:
    """`decode_images` of each list: here when asked for, or by worker processes, read ahead."""
    if self.decode_workers <= 0 or not path_lists:
      return (self._decode(paths) for paths in path_lists)
    return decode_with_workers(path_lists, self.image_res, num_workers=self.decode_workers,
                               exif_transpose=self.exif_transpose, num_threads=self.num_threads)

  def _distinct(self, rows: np.ndarray) -> tuple[list[str], np.ndarray]:
    """The distinct paths of `rows` [r] in order of first use, and each row's index among them."""
    first: dict[str, int] = {}  # path -> its index among the distinct paths
    inverse = [first.setdefault(self.paths[int(row)], len(first)) for row in rows]
    return list(first), np.asarray(inverse, np.int64)

  def _place(self, rows: np.ndarray, paths: list[str], inverse: np.ndarray, decoded
             ) -> np.ndarray:
    """The decoded distinct images -> the pixels of `rows`; records their sizes and failures."""
    pixels, sizes, errors = decoded
    self.num_decoded += len(paths)
    failed = np.asarray([e is not None for e in errors], bool)
    for k in np.flatnonzero(failed):
      logging.warning("Unreadable evaluation image %s (%s): %s; its rows count as misses",
                      self.where[int(rows[np.argmax(inverse == k)])], paths[k], errors[k])
    self.sizes[rows] = sizes[inverse]
    self.bad.update(int(row) for row in rows[failed[inverse]])
    return pixels[inverse]

  def _share_between_processes(self) -> None:
    """Every process's `sizes` and `bad` merged (each decoded only its own rows)."""
    local = np.concatenate([self.sizes, self.bad_mask()[:, None]], axis=1).astype(np.int32)
    merged = merge_across_processes(local)
    self.sizes = np.ascontiguousarray(merged[:, :2])
    self.bad = {int(i) for i in np.flatnonzero(merged[:, 2])}


def merge_across_processes(local: np.ndarray) -> np.ndarray:
  """[N, ...] non-negative ints known by this process (0 where another process decoded the row)
  -> their element-wise max over every process of the run (`local` itself with one process): how
  the row loaders share what each process found (unreadable rows, original sizes)."""
  import jax  # pylint: disable=g-import-not-at-top

  if jax.process_count() == 1:
    return local
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  return np.max(np.asarray(multihost_utils.process_allgather(local)), axis=0)


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


