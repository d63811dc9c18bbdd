"""Top-k ITM re-ranking of retrieval candidates, streamed in fixed-size batches of pairs.

The reference's retrieval evaluation (REFERENCE_DETAILED.md §4.1): ITC similarities `sims`
[N_img, N_txt] for all pairs; then for each image its top-k texts by `sims` are re-scored with the
ITM head (raw logit of class 1), everything else is -100; symmetrically for each text over images.
This module is the model-agnostic driver of that second step:

  scores_i2t = rerank_scores(sims, 256, fn, batch_size=512, direction="i2t")  # [N_img, N_txt]
  scores_t2i = rerank_scores(sims, 256, fn, batch_size=512, direction="t2i")  # [N_txt, N_img]

`fn(image_idx [P] int32, text_idx [P] int32) -> [P] float32` scores P = batch_size pairs (the
caller wraps its jitted fusion + ITM head and gathers the cached image/text features by index).
It is always called with exactly `batch_size` pairs (the last batch is padded by repeating its
last pair, and the padded results are dropped), so a jitted `fn` compiles once. Only one batch of
pairs exists at a time: nothing of size N_img x N_txt x ... is ever built; the only large arrays
are `sims` and the [rows, cols] output. Pairs are issued row by row (the k candidates of one
image, or one text, are consecutive, best first), which lets a caller reuse per-row features.
Results are copied to host one call late, so a `fn` that returns a `jax.Array` without blocking
overlaps the device's next batch with host-side bookkeeping.

Top-k with tied similarities (deterministic): the k largest values of the row; among equal values
at the boundary the lower column index is taken (torch.topk leaves this unspecified).

Multi-host evaluation: split rows, not pairs, and assemble rows; do not sum -100-filled matrices.
(The reference all-reduces SUM over -100-initialised matrices: each entry gains -100 * (W - 1), a
constant per row that keeps ranks but corrupts the scores.) Recipe:

  n_rows = sims.shape[0] if direction == "i2t" else sims.shape[1]
  max_rows = max_rows_per_shard(n_rows, jax.process_count())
  start, stop = sharded_row_range(n_rows, jax.process_index(), jax.process_count())
  part = rerank_scores(sims, k, fn, batch_size=B, direction=direction, row_range=(start, stop),
                       pad_to_rows=max_rows)
  padded = np.full((max_rows, part.shape[1]), -100, np.float32)
  padded[:len(part)] = part
  full = assemble_row_shards(multihost_utils.process_allgather(padded), n_rows)

`pad_to_rows` makes every process issue the same number of `fn` calls (needed when `fn` is a
jitted computation over a global mesh, which all processes must enter together).
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable, Sequence

import numpy as np

PairScoreFn = Callable[[np.ndarray, np.ndarray], Any]

# Value of the entries that were not re-scored (the reference's fill value).
NOT_RERANKED = -100.0

# Similarity elements processed at once during top-k selection (bounds the temporaries).
_CHUNK_ELEMS = 1 << 22


def select_topk(scores: Any, k: int) -> np.ndarray:
  """Column indices of the k largest entries of each row, best first.

  Args:
    scores: [R, M] scores. k: clamped to M.

  Returns:
    [R, min(k, M)] int32. Among equal scores the lower column index comes first (and wins the
    last places), i.e. the first k of a stable sort by descending score, at O(M) per row.
  """
  scores = np.asarray(scores)
  if scores.ndim != 2:
    raise ValueError(f"select_topk: expected [R, M] scores, got shape {scores.shape}")
  if k < 1:
    raise ValueError(f"select_topk: k must be >= 1, got {k}")
  n_rows, n_cols = scores.shape
  k = min(k, n_cols)
  if scores.dtype.kind == "f" and np.isnan(scores).any():
    raise ValueError("select_topk: NaN in scores")
  # Threshold = k-th largest value; take everything above it, then the lowest-index ties.
  kth = np.partition(scores, n_cols - k, axis=1)[:, n_cols - k:n_cols - k + 1]
  above = scores > kth
  tied = scores == kth
  room = k - np.count_nonzero(above, axis=1, keepdims=True)
  chosen = above | (tied & (np.cumsum(tied, axis=1, dtype=np.int32) <= room))
  cols = np.nonzero(chosen)[1].reshape(n_rows, k)  # ascending column order within each row
  vals = np.take_along_axis(scores, cols, axis=1)
  order = np.argsort(-vals, axis=1, kind="stable")
  return np.take_along_axis(cols, order, axis=1).astype(np.int32)


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
  full [n_rows, M] matrix, using `sharded_row_range` to know how many rows each block owns."""
  count = len(shards)
  parts = []
  for p in range(count):
    start, stop = sharded_row_range(n_rows, p, count)
    if len(shards[p]) < stop - start:
      raise ValueError(f"shard {p} has {len(shards[p])} rows; its range [{start}, {stop}) needs "
                       f"{stop - start}")
    parts.append(np.asarray(shards[p][:stop - start]))
  return np.concatenate(parts, axis=0)


def _format_seconds(seconds: float) -> str:
  seconds = int(round(seconds))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def rerank_scores(sims: Any, k: int, pair_score_fn: PairScoreFn, *, batch_size: int,
                  direction: str, row_range: tuple[int, int] | None = None,
                  pad_to_rows: int | None = None, progress_every_s: float | None = 10.0,
                  log_fn: Callable[[str], Any] = logging.info,
                  clock: Callable[[], float] = time.monotonic) -> np.ndarray:
  """Re-scores each row's top-k candidates with `pair_score_fn`; -100 elsewhere.

  Args:
    sims: [N_img, N_txt] ITC similarities (numpy or jax), for both directions.
    k: candidates per row (k_test); clamped to the number of columns.
    pair_score_fn: `(image_idx [batch_size] int32, text_idx [batch_size] int32) -> [batch_size]`
      scores (numpy or jax, converted to float32). Indices are global (into `sims`).
    batch_size: pairs per call; every call gets exactly this many.
    direction: 'i2t' (rows are images, candidates texts) or 't2i' (rows are texts, i.e. the
      columns of `sims`; candidates images).
    row_range: optional [start, stop) of rows to process (see `sharded_row_range`); default all.
    pad_to_rows: optional; issue as many calls as `pad_to_rows` rows would need (padding with
      repeated pairs), so processes with different row counts make the same number of calls.
    progress_every_s: seconds between progress lines (pairs done/total, pairs/s, ETA); None: off.
    log_fn: receives each progress line (a formatted string).
    clock: time source, for tests.

  Returns:
    [stop - start, N_cols] float32: direction 'i2t' -> [rows, N_txt], 't2i' -> [rows, N_img].
  """
  if direction not in ("i2t", "t2i"):
    raise ValueError(f"direction must be 'i2t' or 't2i', got {direction!r}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  sims = np.asarray(sims)
  if sims.ndim != 2:
    raise ValueError(f"sims: expected [N_img, N_txt], got shape {sims.shape}")
  n_rows, n_cols = sims.shape if direction == "i2t" else sims.shape[::-1]
  start, stop = (0, n_rows) if row_range is None else row_range
  if not 0 <= start <= stop <= n_rows:
    raise ValueError(f"row_range {row_range} not within [0, {n_rows}]")
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  k = min(k, n_cols)
  rows = stop - start
  out = np.full((rows, n_cols), NOT_RERANKED, np.float32)
  if n_cols == 0:
    return out

  # Candidates [rows, k], selected in row chunks (t2i: a chunk of columns of sims, transposed).
  candidates = np.empty((rows, k), np.int32)
  step = max(1, _CHUNK_ELEMS // max(n_cols, 1))
  for r0 in range(start, stop, step):
    r1 = min(stop, r0 + step)
    block = sims[r0:r1] if direction == "i2t" else sims[:, r0:r1].T
    if block.dtype.kind != "f" or block.dtype.itemsize < 4:
      block = block.astype(np.float32)  # bf16/f16 from an accelerator: compare in f32
    candidates[r0 - start:r1 - start] = select_topk(block, k)
  flat_candidates = candidates.reshape(-1)

  total = rows * k
  n_calls = math.ceil(max(total, (pad_to_rows or 0) * k) / batch_size)
  if n_calls == 0:
    return out
  if n_rows == 0:
    raise ValueError(f"pad_to_rows={pad_to_rows} asks for calls, but sims {sims.shape} has no "
                     f"{direction} rows to draw a padding pair from")
  # Padding pair: the last real pair (or this direction's pair (0, 0) when the range is empty).
  pad_row, pad_col = (stop - 1, flat_candidates[-1]) if total else (0, 0)
  log_fn(f"rerank {direction}: rows [{start}, {stop}) x top-{k} = {total} pairs in {n_calls} "
         f"calls of {batch_size}")

  t_start = last_log = clock()
  done = 0
  pending = None  # (local rows, columns, result) of the previous call, stored one call late

  def store(item):
    nonlocal done
    local_rows, cols, result = item
    result = np.asarray(result, dtype=np.float32)
    if result.shape != (batch_size,):
      raise ValueError(f"pair_score_fn returned shape {result.shape} for {batch_size} pairs; "
                       f"expected ({batch_size},)")
    out[local_rows, cols] = result[:len(local_rows)]
    done += len(local_rows)

  for call in range(n_calls):
    pair = np.arange(call * batch_size, min(total, (call + 1) * batch_size))
    local_rows = (pair // k).astype(np.int32)
    cols = flat_candidates[pair]
    row_idx, col_idx = local_rows + start, cols
    if len(pair) < batch_size:
      fill = batch_size - len(pair)
      row_idx = np.concatenate([row_idx, np.full(fill, pad_row, np.int32)])
      col_idx = np.concatenate([col_idx, np.full(fill, pad_col, np.int32)])
    image_idx, text_idx = (row_idx, col_idx) if direction == "i2t" else (col_idx, row_idx)
    result = pair_score_fn(image_idx.astype(np.int32), text_idx.astype(np.int32))
    if pending is not None:
      store(pending)
    pending = (local_rows, cols, result)

    now = clock()
    if progress_every_s is not None and now - last_log >= progress_every_s and done:
      last_log = now
      rate = done / max(now - t_start, 1e-9)
      log_fn(f"rerank {direction}: {done}/{total} pairs ({100.0 * done / total:.1f}%), "
             f"{rate:.0f} pairs/s, ETA {_format_seconds((total - done) / rate)}")
  store(pending)

  elapsed = clock() - t_start
  log_fn(f"rerank {direction}: done, {total} pairs in {_format_seconds(elapsed)} "
         f"({total / max(elapsed, 1e-9):.0f} pairs/s)")
  return out
