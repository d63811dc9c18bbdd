"""grain input pipelines for pre-training: static-shape numpy batches, checkpointable iterators.

    it = make_image_text_iterator(cfg, image_res=224, patch_size=16, seed=0,
                                  shard_index=jax.process_index(), shard_count=jax.process_count())
    batch = next(it); state = it.get_state(); ...; it.set_state(state)

Pipeline: source (JSONL / ArrayRecord / TFDS, `records.py`) -> this process's shard
`ds[shard_index::shard_count]` -> `.seed(seed).shuffle().repeat()` (reshuffled every epoch) ->
`random_map(processor)` (decode + augment + tokenise + MLM, one deterministic numpy Generator per
element) -> `to_iter_dataset` (read_threads threads) -> a batcher that skips bad records and keeps
pulling until the batch is full -> `mp_prefetch` (num_workers > 0) or thread prefetch.

Image-text batch (B = image_text.batch_size, R = image_res, L = max_tokens, M = max_masks):
  image [B, R, R, 3] f32 (NHWC, CLIP-normalised); text_ids, text_atts, text_ids_masked [B, L] i32;
  masked_pos [B, M] i32 (pad 0); masked_ids [B, M] i32 (pad -100); image_idx [B] i32 (a hash of
  the image id: equal for captions of the same image; used by retrieval fine-tuning).
Region batch (N = regions.max_images, Rb = regions.batch_size, P = (R / patch_size)^2):
  image [N, R, R, 3] f32; idx_to_group_img [Rb] i32; image_atts [Rb, 1+P] i32;
  text_ids, text_atts, text_ids_masked [Rb, L] i32; masked_pos, masked_ids [Rb, M] i32;
  target_bbox [Rb, 4] f32 (cx, cy, w, h normalised); is_image [Rb] f32; pair_id [Rb] i32.
  The pairs of the N images are flattened; Rb of them are sampled without replacement, or, when
  fewer, all are kept and the rest is padded by repeating random pairs. pair_id is the index of a
  pair in the flattened list, so a repeated pair has the same pair_id as its original (the loss
  must not treat duplicates as each other's negatives).
Grounding batch (B = grounding.batch_size): image [B, R, R, 3] f32; text_ids, text_atts [B, L] i32;
  target_bbox [B, 4] f32.
VQA batch (B = vqa.batch_size, A = len(answer_list)): image [B, R, R, 3] f32; text_ids, text_atts
  [B, L] i32 (the question); answer_targets [B, A] f32. Generative VQA batch (kind vqa_generative,
  K = vqa.max_answers, La = vqa.answer_max_tokens): the same image and question, answer_ids,
  answer_atts [B, K, La] i32 (`[CLS] answer [SEP]`) and answer_weights [B, K] f32 (0 = padding).
NLVR2 batch (B = nlvr.batch_size): image0, image1 [B, R, R, 3] f32; text_ids, text_atts [B, L] i32;
  label [B] i32 (1 = the sentence is true of the pair).
Video-text / video-QA batches (B = video_text / video_qa.batch_size, F = num_frames; records and
  transforms in `video_examples.py`): frames [B, F, R, R, 3] f32 with the image-text text fields and
  video_idx [B] i32, or with the question's text_ids, text_atts and answer_label [B] i32 (-100:
  not in the answer list).
Caption batch (B = captioning.batch_size, Lc = captioning.max_tokens + max_masks, M = its
  max_masks; `captioning.py`): image [B, R, R, 3] f32; text_ids, position_ids [B, Lc] i32;
  text_atts [B, Lc, Lc] i32 (per-query visibility); masked_pos, masked_ids [B, M] i32;
  masked_weight [B, M] f32.
All of them also carry num_bad_records [] i32 (records skipped for this batch) and num_records [] i32
(records consumed for this batch, bad ones included); sum them over batches.

A record that cannot be used is logged (`logging.warning` with file:line and reason) and skipped.
`BadDataError` is raised when, after `min_records_before_abort` records, bad / seen exceeds
`max_bad_fraction` (counted per input stream: per worker process when num_workers > 0).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import grain
import numpy as np

from x2vlm_jax.data import captioning
from x2vlm_jax.data import examples as examples_lib
from x2vlm_jax.data import records
from x2vlm_jax.data import text as text_lib
from x2vlm_jax.data import video_examples
# Re-exported: the evaluation loaders live in eval_data.py.
from x2vlm_jax.data.eval_data import load_grounding_eval, load_retrieval_eval  # noqa: F401

logger = logging.getLogger(__name__)

BadExample = examples_lib.BadExample
_MAX_CONSECUTIVE_BAD = 10_000
_MAX_EXAMPLES_KEPT = 5


# Too many bad records: the dataset (or its paths / image_root) is probably broken.
BadDataError = records.BadDataError


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


def collate_grounding(examples: Sequence[dict], rng: np.random.Generator | None = None) -> dict:
  """Grounding examples -> batch (see the module docstring). `rng` is unused."""
  del rng
  batch = {k: np.stack([e[k] for e in examples]).astype(np.int32)
           for k in ("text_ids", "text_atts")}
  batch["image"] = np.stack([e["image"] for e in examples]).astype(np.float32)
  batch["target_bbox"] = np.stack([e["target_bbox"] for e in examples]).astype(np.float32)
  return batch


def collate_vqa(examples: Sequence[dict], rng: np.random.Generator | None = None) -> dict:
  """VQA examples -> {image [B,R,R,3] f32, text_ids/atts [B,L] i32, answer_targets [B,A] f32}."""
  del rng
  batch = {k: np.stack([e[k] for e in examples]).astype(np.int32) for k in ("text_ids", "text_atts")}
  batch["image"] = np.stack([e["image"] for e in examples]).astype(np.float32)
  batch["answer_targets"] = np.stack([e["answer_targets"] for e in examples]).astype(np.float32)
  return batch


def collate_vqa_answers(examples: Sequence[dict], rng: np.random.Generator | None = None) -> dict:
  """Generative VQA examples -> {image [B,R,R,3] f32, text_ids/atts [B,L] i32,
  answer_ids/atts [B,K,La] i32, answer_weights [B,K] f32}."""
  del rng
  keys = ("text_ids", "text_atts", "answer_ids", "answer_atts")
  batch = {k: np.stack([e[k] for e in examples]).astype(np.int32) for k in keys}
  batch["image"] = np.stack([e["image"] for e in examples]).astype(np.float32)
  batch["answer_weights"] = np.stack([e["answer_weights"] for e in examples]).astype(np.float32)
  return batch


def collate_nlvr(examples: Sequence[dict], rng: np.random.Generator | None = None) -> dict:
  """NLVR2 examples -> {image0, image1 [B,R,R,3] f32, text_ids/atts [B,L] i32, label [B] i32}."""
  del rng
  batch = {k: np.stack([e[k] for e in examples]).astype(np.int32)
           for k in ("text_ids", "text_atts", "label")}
  for k in ("image0", "image1"):
    batch[k] = np.stack([e[k] for e in examples]).astype(np.float32)
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


PAIR_ID_STRIDE = 1 << 20  # pair ids of process p are offset by p * this (one batch: < 2**20 pairs)


def to_global_indices(batch: dict, process_index: int) -> dict:
  """A process's batch with its batch-local indices made unique in the global batch.

  The global batch concatenates the processes' batches along dim 0, so a region batch's
  `idx_to_group_img [Rb]` (into this process's `image [N, ...]`) is offset by `process_index * N`
  and its `pair_id [Rb]` by `process_index * PAIR_ID_STRIDE` (equal ids mean "the same pair",
  which must never match a pair of another process). Other batches hold no such indices
  (`image_idx` is a hash of the image id, global already). Returns a new dict.
  """
  if process_index == 0 or "idx_to_group_img" not in batch:
    return batch
  if int(np.max(batch["pair_id"], initial=0)) >= PAIR_ID_STRIDE:
    raise ValueError(f"pair_id {int(np.max(batch['pair_id']))} >= {PAIR_ID_STRIDE}")
  out = dict(batch)
  out["idx_to_group_img"] = batch["idx_to_group_img"] + process_index * batch["image"].shape[0]
  out["pair_id"] = batch["pair_id"] + process_index * PAIR_ID_STRIDE
  return out


class _BadRecordLimit:
  """Counts records; raises BadDataError when the bad fraction passes the configured limit."""

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
               limit: _BadRecordLimit, seed: int):
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
    limit = _BadRecordLimit(self._max_bad_fraction, self._min_records)
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


def _make_iterator(cfg, sub, processor, num_good: int, collate: Callable, seed: int,
                   shard_index: int, shard_count: int) -> grain.DatasetIterator:
  ds = record_dataset(list(sub.files), seed=seed, shard_index=shard_index,
                      shard_count=shard_count, shuffle=cfg.shuffle,
                      tfds_data_dir=cfg.tfds_data_dir)
  ds = ds.random_map(processor)
  threads = max(int(cfg.read_threads), 1)
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


def make_iterator(
    kind: str,
    cfg,
    *,
    image_res: int,
    patch_size: int,
    seed: int | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
    tokenizer: text_lib.Tokenizer | None = None,
) -> grain.DatasetIterator:
  """Infinite iterator of `kind` batches ('image_text', 'regions', 'grounding', 'vqa', 'nlvr',
  'vqa_generative' (read from cfg.vqa), 'video_text', 'video_qa' or 'captioning'; see the module
  docstring) read from `cfg.<kind>`; `seed=None` uses cfg.seed."""
  if kind == "image_text":
    sub, processor_cls, collate = cfg.image_text, examples_lib.ImageTextProcessor, collate_image_text
    examples_per_batch = sub.batch_size
  elif kind == "regions":
    sub, processor_cls, collate = cfg.regions, examples_lib.RegionProcessor, RegionCollate(
        cfg.regions.batch_size)
    examples_per_batch = sub.max_images  # images; their pairs are sampled to batch_size
  elif kind == "grounding":
    sub, processor_cls, collate = cfg.grounding, examples_lib.GroundingProcessor, collate_grounding
    examples_per_batch = sub.batch_size
  elif kind == "vqa":
    sub, processor_cls, collate = cfg.vqa, examples_lib.VqaProcessor, collate_vqa
    examples_per_batch = sub.batch_size
  elif kind == "nlvr":
    sub, processor_cls, collate = cfg.nlvr, examples_lib.NlvrProcessor, collate_nlvr
    examples_per_batch = sub.batch_size
  elif kind == "vqa_generative":
    sub, processor_cls, collate = cfg.vqa, examples_lib.VqaAnswerProcessor, collate_vqa_answers
    examples_per_batch = sub.batch_size
  elif kind == "video_text":
    sub, processor_cls, collate = (cfg.video_text, video_examples.VideoTextProcessor,
                                   video_examples.collate_video_text)
    examples_per_batch = sub.batch_size
  elif kind == "video_qa":
    sub, processor_cls, collate = (cfg.video_qa, video_examples.VideoQaProcessor,
                                   video_examples.collate_video_qa)
    examples_per_batch = sub.batch_size
  elif kind == "captioning":
    sub, processor_cls, collate = (cfg.captioning, captioning.CaptionProcessor,
                                   captioning.collate_captioning)
    examples_per_batch = sub.batch_size
  else:
    raise ValueError(f"unknown batch kind {kind!r}: expected image_text, regions, grounding, vqa, "
                     "vqa_generative, nlvr, video_text, video_qa or captioning")
  seed = cfg.seed if seed is None else seed
  encoder = text_lib.TextEncoder.from_config(cfg, tokenizer)
  processor = processor_cls(cfg, image_res, patch_size, encoder)
  return _make_iterator(cfg, sub, processor, int(examples_per_batch), collate, seed, shard_index,
                        shard_count)


def make_image_text_iterator(cfg, **kwargs) -> grain.DatasetIterator:
  """Image-text batches: `make_iterator("image_text", cfg, **kwargs)`."""
  return make_iterator("image_text", cfg, **kwargs)


def make_region_iterator(cfg, **kwargs) -> grain.DatasetIterator:
  """Region batches: `make_iterator("regions", cfg, **kwargs)`."""
  return make_iterator("regions", cfg, **kwargs)


def make_grounding_iterator(cfg, **kwargs) -> grain.DatasetIterator:
  """Grounding batches: `make_iterator("grounding", cfg, **kwargs)`."""
  return make_iterator("grounding", cfg, **kwargs)
