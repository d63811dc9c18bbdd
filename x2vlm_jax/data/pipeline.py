"""grain input pipelines: static-shape numpy batches, checkpointable iterators.

    it = make_iterator(processor, collate, files=..., examples_per_batch=B, cfg=config.data,
                       seed=0, shard_index=jax.process_index(), shard_count=jax.process_count())
    batch = next(it); state = it.get_state(); ...; it.set_state(state)

A task (x2vlm_jax/tasks/) supplies the processor (record -> example, `examples.py`) and the
collate function (examples -> batch); `Task.make_iterator` calls this. Pipeline: source (JSONL /
ArrayRecord / TFDS, `records.py`) -> this process's shard `ds[shard_index::shard_count]` ->
`.seed(seed).shuffle().repeat()` (reshuffled every epoch) -> `random_map(processor)` (decode +
augment + tokenise + MLM, one deterministic numpy Generator per element) -> `to_iter_dataset`
(read_threads threads) -> a batcher that skips bad records and keeps pulling until the batch is
full -> `mp_prefetch` (num_workers > 0) or thread prefetch.

Two collate functions shared by several tasks live here:
Image-text batch (`collate_image_text`; B examples, R = image_res, L = max_tokens, M = max_masks):
  image [B, R, R, 3] f32 (NHWC, CLIP-normalised); text_ids, text_atts, text_ids_masked [B, L] i32;
  masked_pos [B, M] i32 (pad 0); masked_ids [B, M] i32 (pad -100); image_idx [B] i32 (a hash of
  the image id: equal for captions of the same image; used by retrieval fine-tuning).
Region batch (`RegionCollate`; N images, Rb pairs, P = (R / patch_size)^2):
  image [N, R, R, 3] f32; idx_to_group_img [Rb] i32; image_atts [Rb, 1+P] i32;
  text_ids, text_atts, text_ids_masked [Rb, L] i32; masked_pos, masked_ids [Rb, M] i32;
  target_bbox [Rb, 4] f32 (cx, cy, w, h normalised); is_image [Rb] f32; pair_id [Rb] i32.
  The pairs of the N images are flattened; Rb of them are sampled without replacement, or, when
  fewer, all are kept and the rest is padded by repeating random pairs. pair_id is the index of a
  pair in the flattened list, so a repeated pair has the same pair_id as its original (the loss
  must not treat duplicates as each other's negatives).
Every batch also carries num_bad_records [] i32 (records skipped for this batch) and num_records
[] i32 (records consumed for this batch, bad ones included).

A record that cannot be used is logged (`logging.warning` with file:line and reason) and skipped.
The one bad-record budget of a run is `BadRecordBudget`, kept by each input stream (per worker
process when num_workers > 0) and saved with the iterator's position: `BadDataError` is raised
when, after `min_records_before_abort` records, bad / seen exceeds `max_bad_fraction`.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Sequence

import grain
import numpy as np

from x2vlm_jax import errors
from x2vlm_jax.data import examples as examples_lib
from x2vlm_jax.data import records

logger = logging.getLogger(__name__)

BadExample = examples_lib.BadExample
_MAX_CONSECUTIVE_BAD = 10_000
_MAX_EXAMPLES_KEPT = 5


# Too many bad records: the dataset (or its paths / image_root) is probably broken.
BadDataError = records.BadDataError


def stack_fields(examples: Sequence[dict], dtypes: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """{key: the examples' `key` values stacked on a new leading axis, as `dtypes[key]`}: the
  collate function of a task whose batch is its examples' fields stacked."""
  return {k: np.stack([e[k] for e in examples]).astype(dt) for k, dt in dtypes.items()}


def _text_fields(examples: Sequence[dict]) -> dict[str, np.ndarray]:
  keys = ("text_ids", "text_atts", "text_ids_masked", "masked_pos", "masked_ids")
  return {k: np.stack([e[k] for e in examples]).astype(np.int32) for k in keys}


def collate_image_text(examples: Sequence[dict], rng: np.random.Generator | None = None) -> dict:
  """Image-text examples -> batch (see the module docstring). `rng` is unused."""
  del rng
  batch = _text_fields(examples)
  batch["image"] = np.stack([e["image"] for e in examples]).astype(np.float32)
  batch["image_idx"] = np.array([e["image_idx"] for e in examples], np.int32)
  return batch


class RegionCollate:
  """Region examples (one per image) -> region batch with exactly `batch_size` pairs."""

  def __init__(self, batch_size: int):
    self.batch_size = int(batch_size)

  def __call__(self, examples: Sequence[dict], rng: np.random.Generator) -> dict:
    flat = [(slot, pair) for slot, ex in enumerate(examples) for pair in ex["pairs"]]
    n, rb = len(flat), self.batch_size
    if n >= rb:
      sel = rng.permutation(n)[:rb]
    else:
      sel = np.concatenate([np.arange(n), rng.integers(0, n, size=rb - n)])
    pairs = [flat[int(k)][1] for k in sel]
    batch = _text_fields(pairs)
    batch["image"] = np.stack([e["image"] for e in examples]).astype(np.float32)
    batch["idx_to_group_img"] = np.array([flat[int(k)][0] for k in sel], np.int32)
    batch["image_atts"] = np.stack([p["image_atts"] for p in pairs]).astype(np.int32)
    batch["target_bbox"] = np.stack([p["target_bbox"] for p in pairs]).astype(np.float32)
    batch["is_image"] = np.array([p["is_image"] for p in pairs], np.float32)
    batch["pair_id"] = np.asarray(sel, np.int32)
    return batch


class BadRecordBudget:
  """Counts the records of one input stream; raises BadDataError when the bad fraction passes the
  configured limit (or when `_MAX_CONSECUTIVE_BAD` records in a row are bad: a stream that yields
  nothing good would never fill a batch)."""

  def __init__(self, max_bad_fraction: float, min_records: int):
    self.max_bad_fraction = float(max_bad_fraction)
    self.min_records = int(min_records)
    self.seen = 0
    self.bad = 0
    self.consecutive_bad = 0
    self.examples: list[str] = []

  def add(self, example: Any) -> None:
    self.seen += 1
    if isinstance(example, BadExample):
      self.bad += 1
      self.consecutive_bad += 1
      if len(self.examples) < _MAX_EXAMPLES_KEPT:
        self.examples.append(f"{example.where}: {example.reason}")
    else:
      self.consecutive_bad = 0
    too_many = (self.seen >= self.min_records
                and self.bad > self.max_bad_fraction * self.seen)
    if too_many or self.consecutive_bad >= _MAX_CONSECUTIVE_BAD:
      raise BadDataError(
          f"{self.bad} of {self.seen} records were bad ({self.bad / self.seen:.1%}; limit "
          f"{self.max_bad_fraction:.1%} after {self.min_records} records). First bad records:\n  "
          + "\n  ".join(self.examples or ["(none kept: counts restored from a checkpoint)"]))


class _SkipBadBatchDatasetIterator(grain.DatasetIterator):
  """Pulls examples, skips bad ones, collates `num_good` good ones into a batch."""

  def __init__(self, parent: grain.DatasetIterator, num_good: int, collate: Callable,
               limit: BadRecordBudget, seed: int):
    super().__init__(parent)
    self._num_good = num_good
    self._collate = collate
    self._limit = limit
    self._seed = seed

  def __next__(self) -> dict:
    good = []
    seen_before, bad_before = self._limit.seen, self._limit.bad
    while len(good) < self._num_good:
      example = next(self._parent)
      self._limit.add(example)
      if not isinstance(example, BadExample):
        good.append(example)
    # Batch-level randomness (region pair sampling) is keyed by the batch's first example, so it
    # does not depend on which worker process built the batch.
    rng = np.random.default_rng([self._seed, good[0]["key"]])
    batch = self._collate(good, rng)
    batch["num_bad_records"] = np.asarray(self._limit.bad - bad_before, np.int32)
    batch["num_records"] = np.asarray(self._limit.seen - seen_before, np.int32)
    return batch

  def get_state(self) -> dict:
    return {"parent": self._parent.get_state(), "seen": self._limit.seen, "bad": self._limit.bad}

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state["parent"])
    self._limit.seen = int(state["seen"])
    self._limit.bad = int(state["bad"])
    self._limit.consecutive_bad = 0

  def __str__(self) -> str:
    return f"SkipBadBatchDatasetIterator(num_good={self._num_good})"


class SkipBadBatchIterDataset(grain.IterDataset):
  """Batches `num_good` good examples per batch, skipping and counting `BadExample`s."""

  def __init__(self, parent: grain.IterDataset, num_good: int, collate: Callable,
               max_bad_fraction: float, min_records_before_abort: int, seed: int):
    super().__init__(parent)
    self._num_good = int(num_good)
    self._collate = collate
    self._max_bad_fraction = max_bad_fraction
    self._min_records = min_records_before_abort
    self._seed = int(seed)

  def __iter__(self) -> grain.DatasetIterator:
    limit = BadRecordBudget(self._max_bad_fraction, self._min_records)
    return _SkipBadBatchDatasetIterator(self._parent.__iter__(), self._num_good, self._collate,
                                        limit, self._seed)

  def __str__(self) -> str:
    return f"SkipBadBatchIterDataset(num_good={self._num_good})"


def _ensure_absl_flags_parsed() -> None:
  """grain worker processes read absl flags; outside absl.app nobody parsed them."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def process_shard() -> tuple[int, int]:
  """(jax.process_index(), jax.process_count()): the shard this host should read."""
  import jax  # pylint: disable=g-import-not-at-top

  return jax.process_index(), jax.process_count()


def record_dataset(files: Sequence[str], *, seed: int, shard_index: int = 0, shard_count: int = 1,
                   shuffle: bool = True, tfds_data_dir: str = "") -> grain.MapDataset:
  """Infinite MapDataset of this shard's `RawRecord`s, reshuffled every epoch."""
  if not files:
    raise ValueError("no data files configured (files is empty)")
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
  source = records.make_source(list(files), tfds_data_dir)
  if len(source) < shard_count:
    raise ValueError(f"{len(source)} records cannot be split into {shard_count} shards")
  ds = grain.MapDataset.source(source)
  if shard_count > 1:
    ds = ds[shard_index::shard_count]
  ds = ds.seed(seed)
  if shuffle:
    ds = ds.shuffle()
  return ds.repeat()


def make_iterator(processor: Callable, collate: Callable, *, files: Sequence[str],
                  examples_per_batch: int, cfg, seed: int, shard_index: int = 0,
                  shard_count: int = 1, what: str = "files") -> grain.DatasetIterator:
  """Infinite iterator of batches: `collate(examples_per_batch good examples, rng)` of
  `processor(raw record, rng)` over this shard of `files` (module docstring). `cfg` is
  `config.data` (threads, workers, prefetch, shuffling, the bad-record budget); `what` names the
  files' config field in messages."""
  if not files:
    raise errors.InputError(f"{what} is empty: no data files configured")
  try:
    ds = record_dataset(list(files), seed=seed, shard_index=shard_index, shard_count=shard_count,
                        shuffle=cfg.shuffle, tfds_data_dir=cfg.tfds_data_dir)
  except FileNotFoundError as e:  # a pattern that matches nothing, a missing file
    raise errors.InputError(f"{what}: {e}") from e
  ds = ds.random_map(processor)
  threads = max(int(cfg.read_threads), 1)
  num_good = int(examples_per_batch)
  ds = ds.to_iter_dataset(
      grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(2 * num_good, 2 * threads)))
  ds = SkipBadBatchIterDataset(ds, num_good, collate, cfg.max_bad_fraction,
                               cfg.min_records_before_abort, seed)
  if cfg.num_workers > 0:
    _ensure_absl_flags_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=int(cfg.num_workers), per_worker_buffer_size=max(int(cfg.prefetch), 1)))
  elif cfg.prefetch > 0:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=int(cfg.prefetch))
  return iter(ds)
