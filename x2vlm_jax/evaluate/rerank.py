"""Top-k ITM re-ranking of retrieval candidates, grouped by vision row over both directions.

The reference's retrieval evaluation (REFERENCE_DETAILED.md §4.1) re-scores, for each image, its
top-k texts by ITC similarity with the ITM head (the raw class-1 logit), and for each text its
top-k images; everything else scores -100. The fusion layers project an image's keys and values
from its [1+N, D] embeddings, the expensive part of a fusion pass. So here:

  1. the pairs of both directions are merged (`union_pairs`): a pair that is in an image's top-k
     and in its text's top-k is scored once, for both;
  2. they are grouped by image (`group_pairs`): each image goes to the fusion layers with all the
     texts it is paired with, in groups of G texts (one vision row each: its keys and values are
     projected once per group); an image's texts fill groups of the large size, what is left
     groups of the small size, the last one padded (padding dropped);
  3. `score_groups` runs `rows_per_call` groups per call: one compiled shape per group size.
Only [rows, k] candidates and scores exist on the host; nothing of size N_img x N_txt.

`score_fn(vision_rows [R] int32, texts [R * G] int32) -> [R * G]` (numpy or jax; copied to the host
one call late, so a jitted `score_fn` overlaps the device's next call with host bookkeeping).

Multi-host evaluation splits rows, not pairs (`sharded_row_range`, `assemble_row_shards`).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Callable, Sequence

import numpy as np

ScoreFn = Callable[[np.ndarray, np.ndarray], Any]

# Value of the entries that were not re-scored (the reference's fill value).
NOT_RERANKED = -100.0


@dataclasses.dataclass(frozen=True)
class Pairs:
  """The distinct (image, text) pairs of both directions' candidates, and where each score goes:
  `slot_i2t[p]` into the flattened [N_img, k] image -> text candidates (-1: not there), `slot_t2i[p]`
  into the flattened [N_txt, k] text -> image ones."""
  images: np.ndarray  # [P] int32
  texts: np.ndarray  # [P] int32
  slot_i2t: np.ndarray  # [P] int64
  slot_t2i: np.ndarray  # [P] int64


def union_pairs(candidates_i2t: np.ndarray, candidates_t2i: np.ndarray) -> Pairs:
  """Both directions' candidate pairs, each distinct pair once: `candidates_i2t [N_img, k1]` text
  indices, `candidates_t2i [N_txt, k2]` image indices."""
  cand_i2t = np.asarray(candidates_i2t, np.int64)
  cand_t2i = np.asarray(candidates_t2i, np.int64)
  n_img, k1 = cand_i2t.shape
  n_txt, k2 = cand_t2i.shape
  img = np.concatenate([np.repeat(np.arange(n_img), k1), cand_t2i.reshape(-1)])
  txt = np.concatenate([cand_i2t.reshape(-1), np.repeat(np.arange(n_txt), k2)])
  keys, index = np.unique(img * n_txt + txt, return_inverse=True)  # sorted by image, then text
  slot_i2t = np.full(len(keys), -1, np.int64)
  slot_t2i = np.full(len(keys), -1, np.int64)
  slot_i2t[index[:n_img * k1]] = np.arange(n_img * k1)
  slot_t2i[index[n_img * k1:]] = np.arange(n_txt * k2)
  return Pairs((keys // n_txt).astype(np.int32), (keys % n_txt).astype(np.int32), slot_i2t,
               slot_t2i)


@dataclasses.dataclass(frozen=True)
class Groups:
  """Pairs grouped by vision row: group c pairs image `rows[c]` with the texts of the pairs
  `pairs[c, :]`; `valid[c, j]` is False for padding (which repeats the group's first pair)."""
  rows: np.ndarray  # [C] int32
  pairs: np.ndarray  # [C, G] int64 indices into the `Pairs`
  valid: np.ndarray  # [C, G] bool

  @property
  def group_size(self) -> int:
    return int(self.pairs.shape[1])

  @property
  def num_pairs(self) -> int:
    return int(self.valid.sum())


def _groups(images: np.ndarray, members: np.ndarray, group_size: int) -> Groups:
  """`members` (pair indices, sorted by `images[members]`) in groups of `group_size` per image."""
  member_images = images[members]
  if len(members) == 0:
    return Groups(np.zeros(0, np.int32), np.zeros((0, group_size), np.int64),
                  np.zeros((0, group_size), bool))
  starts = np.flatnonzero(np.r_[True, member_images[1:] != member_images[:-1]])
  counts = np.diff(np.r_[starts, len(members)])
  per_image = -(-counts // group_size)
  first_group = np.r_[0, np.cumsum(per_image)[:-1]]
  position = np.arange(len(members)) - np.repeat(starts, counts)
  group = np.repeat(first_group, counts) + position // group_size
  slot = position % group_size
  pairs = np.zeros((int(per_image.sum()), group_size), np.int64)
  valid = np.zeros(pairs.shape, bool)
  pairs[group, slot] = members
  valid[group, slot] = True
  pairs = np.where(valid, pairs, pairs[:, :1])
  return Groups(np.repeat(member_images[starts], per_image).astype(np.int32), pairs, valid)


def group_pairs(pairs: Pairs, sizes: Sequence[int]) -> list[Groups]:
  """The pairs of each image in groups of `sizes[0]` texts; the rest of each image in groups of
  `sizes[1]` (and so on; the last size's last group padded). `pairs` must be sorted by image
  (`union_pairs` is)."""
  members = np.arange(len(pairs.images))
  out = []
  for n, size in enumerate(sizes):
    last = n == len(sizes) - 1
    member_images = pairs.images[members]
    starts = np.flatnonzero(np.r_[True, member_images[1:] != member_images[:-1]]) \
        if len(members) else np.zeros(0, np.int64)
    counts = np.diff(np.r_[starts, len(members)]) if len(members) else np.zeros(0, np.int64)
    position = np.arange(len(members)) - np.repeat(starts, counts)
    whole = np.repeat(counts // size * size, counts)
    take = np.ones(len(members), bool) if last else position < whole
    out.append(_groups(pairs.images, members[take], size))
    members = members[~take]
  return out


def _format_seconds(seconds: float) -> str:
  seconds = int(round(seconds))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def score_groups(groups: Groups, texts: np.ndarray, score_fn: ScoreFn, *, rows_per_call: int,
                 out: np.ndarray, name: str = "rerank", progress_every_s: float | None = 10.0,
                 log_fn: Callable[[str], Any] = logging.info,
                 clock: Callable[[], float] = time.monotonic) -> None:
  """Scores every valid pair of `groups` (text of pair p: `texts[p]`), `rows_per_call` groups per
  call (the last call padded by repeating the last group), into `out[p]`."""
  if rows_per_call < 1:
    raise ValueError(f"rows_per_call must be >= 1, got {rows_per_call}")
  num_groups, group = groups.pairs.shape
  if num_groups == 0:
    return
  n_calls = math.ceil(num_groups / rows_per_call)
  total = groups.num_pairs
  log_fn(f"{name}: {total} pairs in {num_groups} groups of {group} texts per vision row, "
         f"{n_calls} calls of {rows_per_call} rows")
  t_start = last_log = clock()
  done = 0
  pending = None

  def store(item):
    nonlocal done
    index, result = item
    result = np.asarray(result, np.float32).reshape(-1)
    if result.shape != (rows_per_call * group,):
      raise ValueError(f"score_fn returned shape {result.shape} for {rows_per_call * group} "
                       f"pairs")
    result = result.reshape(rows_per_call, group)[:len(index)]
    valid = groups.valid[index]
    out[groups.pairs[index][valid]] = result[valid]
    done += int(valid.sum())

  for call in range(n_calls):
    index = np.arange(call * rows_per_call, min(num_groups, (call + 1) * rows_per_call))
    padded = np.concatenate([index, np.full(rows_per_call - len(index), index[-1])])
    result = score_fn(groups.rows[padded], texts[groups.pairs[padded].reshape(-1)])
    if pending is not None:
      store(pending)
    pending = (index, result)
    now = clock()
    if progress_every_s is not None and now - last_log >= progress_every_s and done:
      last_log = now
      rate = done / max(now - t_start, 1e-9)
      log_fn(f"{name}: {done}/{total} pairs ({100.0 * done / total:.1f}%), {rate:.0f} pairs/s, "
             f"ETA {_format_seconds((total - done) / rate)}")
  store(pending)
  elapsed = clock() - t_start
  log_fn(f"{name}: done, {total} pairs in {_format_seconds(elapsed)} "
         f"({total / max(elapsed, 1e-9):.0f} pairs/s)")


def rerank(candidates_i2t: np.ndarray, candidates_t2i: np.ndarray, score_fn: ScoreFn, *,
           group_sizes: Sequence[int], rows_per_call: Callable[[int], int],
           log_fn: Callable[[str], Any] = logging.info,
           progress_every_s: float | None = 10.0) -> tuple[np.ndarray, np.ndarray]:
  """Re-scores both directions' candidates (module docstring) -> (scores_i2t [N_img, k1],
  scores_t2i [N_txt, k2]) float32. `rows_per_call(group_size)` gives the groups per call."""
  pairs = union_pairs(candidates_i2t, candidates_t2i)
  scores = np.full(len(pairs.images), NOT_RERANKED, np.float32)
  asked = candidates_i2t.size + candidates_t2i.size
  log_fn(f"rerank: {asked} candidate pairs, {len(pairs.images)} distinct")
  for groups in group_pairs(pairs, group_sizes):
    score_groups(groups, pairs.texts, score_fn, rows_per_call=rows_per_call(groups.group_size),
                 out=scores, name=f"rerank (groups of {groups.group_size})", log_fn=log_fn,
                 progress_every_s=progress_every_s)
  scores_i2t = np.full(candidates_i2t.size, NOT_RERANKED, np.float32)
  scores_t2i = np.full(candidates_t2i.size, NOT_RERANKED, np.float32)
  scores_i2t[pairs.slot_i2t[pairs.slot_i2t >= 0]] = scores[pairs.slot_i2t >= 0]
  scores_t2i[pairs.slot_t2i[pairs.slot_t2i >= 0]] = scores[pairs.slot_t2i >= 0]
  return scores_i2t.reshape(candidates_i2t.shape), scores_t2i.reshape(candidates_t2i.shape)


def dense_scores(candidates: np.ndarray, scores: np.ndarray, num_columns: int,
                 dtype=np.float32) -> np.ndarray:
  """The reference's [rows, num_columns] matrix: the re-ranked scores at the candidates,
  NOT_RERANKED elsewhere (memory rows x num_columns: only when a score file is asked for)."""
  out = np.full((len(candidates), num_columns), NOT_RERANKED, dtype)
  np.put_along_axis(out, np.asarray(candidates, np.int64), np.asarray(scores, dtype), axis=1)
  return out


def top_columns(candidates: np.ndarray, scores: np.ndarray, num_columns: int,
                m: int = 10) -> list[list[int]]:
  """The best `m` columns of each row of the dense matrix (`dense_scores`) without building it:
  candidates by score (ties: lower column first), merged with the lowest non-candidate columns
  at NOT_RERANKED."""
  out = []
  for cols, vals in zip(np.asarray(candidates), np.asarray(scores, np.float32)):
    entries = sorted(zip((-vals).tolist(), cols.tolist()))
    taken = set(cols.tolist())
    others = [c for c in range(min(num_columns, m + len(taken))) if c not in taken][:m]
    entries = sorted(entries + [(-NOT_RERANKED, c) for c in others])
    out.append([c for _, c in entries[:m]])
  return out


# ------------------------------------------------------------------------------ multi-host rows
def sharded_row_range(n_rows: int, process_index: int, process_count: int) -> tuple[int, int]:
  """Contiguous, balanced [start, stop) row block of one process (sizes differ by at most 1)."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  base, extra = divmod(n_rows, process_count)
  start = process_index * base + min(process_index, extra)
  return start, start + base + (1 if process_index < extra else 0)


def max_rows_per_shard(n_rows: int, process_count: int) -> int:
  """Largest `sharded_row_range` block: the common padded size for an all-gather."""
  return -(-n_rows // process_count)


def assemble_row_shards(shards: Sequence[np.ndarray] | np.ndarray, n_rows: int) -> np.ndarray:
  """Stacks per-process row blocks (process order, each possibly padded at the end) into the
  full [n_rows, ...] array, using `sharded_row_range` to know how many rows each block owns."""
  count = len(shards)
  parts = []
  for p in range(count):
    start, stop = sharded_row_range(n_rows, p, count)
    if len(shards[p]) < stop - start:
      raise ValueError(f"shard {p} has {len(shards[p])} rows; its range [{start}, {stop}) needs "
                       f"{stop - start}")
    parts.append(np.asarray(shards[p][:stop - start]))
  return np.concatenate(parts, axis=0)
