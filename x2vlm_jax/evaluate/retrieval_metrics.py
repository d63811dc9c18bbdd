"""Image-text retrieval metrics (TR@k / IR@k), score files and Karpathy-style test annotations.

Formats (all host-side numpy; jax arrays are accepted and copied to host):
  scores_i2t: [N_img, N_txt] float. Row i scores every text for image i; higher is better.
  scores_t2i: [N_txt, N_img] float. Row t scores every image for text t.
  img2txt:    N_img lists of text indices (the ground-truth captions of each image; may be ragged).
  txt2img:    [N_txt] int, the image of each text.

After ITM re-ranking (`rerank.py`) the matrices hold the raw class-1 ITM logit for each row's top-k
candidates and -100 elsewhere (REFERENCE_DETAILED.md §4.1); the metrics below do not care how the
scores were produced. `ranks_from_candidates` gives the ranks of such a matrix from the [rows, k]
candidates and their scores alone (what the evaluation keeps).

Rank: the 0-based position of an item when its row is sorted by descending score. The rank of a
row is that of its best-ranked ground-truth item; R@k = 100 * fraction of rows with rank < k.
`r_mean` is the mean of the six recalls (= mean of `txt_r_mean` and `img_r_mean`).

Ties (deterministic, by design): the order is that of a *stable* sort of -score, so among equal
scores the lower column index ranks first:

  rank(r, j) = #{c : s[r, c] > s[r, j]} + #{c < j : s[r, c] == s[r, j]}.

The reference ranks with `np.argsort(score)[::-1]` (introsort, reversed), whose order among equal
scores depends on the sort's internals; real-valued ITM logits practically never tie, and the many
-100 entries of a re-ranked row only tie with each other at ranks >= k_test (>= 10 in practice), so
R@1/5/10 agree with the reference. NaN scores are rejected; +-inf are ordered normally.
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np

# Elements compared at once when counting ranks: bounds the boolean temporaries (~16 MB each).
_CHUNK_ELEMS = 1 << 24

GroundTruth = Sequence[Sequence[int]] | Sequence[int] | np.ndarray


def _as_score_matrix(scores: Any, name: str) -> np.ndarray:
  scores = np.asarray(scores)
  if scores.ndim != 2:
    raise ValueError(f"{name}: expected a 2-D score matrix, got shape {scores.shape}")
  if not (np.issubdtype(scores.dtype, np.floating) or np.issubdtype(scores.dtype, np.integer)):
    scores = scores.astype(np.float32)  # e.g. bfloat16 from a jax array
  return scores


def ground_truth_csr(gt: GroundTruth, n_rows: int, n_cols: int, name: str
                      ) -> tuple[np.ndarray, np.ndarray]:
  """Ground truth as CSR: row r owns `indices[offsets[r]:offsets[r+1]]` (each row non-empty)."""
  if isinstance(gt, np.ndarray) and gt.ndim == 1 and np.issubdtype(gt.dtype, np.integer):
    lengths = np.ones(len(gt), np.int64)
    indices = gt.astype(np.int64)
  else:
    rows = [[int(g)] if np.isscalar(g) or np.ndim(g) == 0 else [int(x) for x in g] for g in gt]
    lengths = np.fromiter((len(r) for r in rows), np.int64, count=len(rows))
    indices = np.fromiter((x for r in rows for x in r), np.int64, count=int(lengths.sum()))
  if len(lengths) != n_rows:
    raise ValueError(f"{name}: {len(lengths)} ground-truth entries for a score matrix with "
                     f"{n_rows} rows")
  empty = np.flatnonzero(lengths == 0)
  if empty.size:
    raise ValueError(f"{name}: row {int(empty[0])} has no ground-truth item "
                     f"({empty.size} such rows)")
  bad = np.flatnonzero((indices < 0) | (indices >= n_cols))
  if bad.size:
    raise ValueError(f"{name}: ground-truth index {int(indices[bad[0]])} out of range "
                     f"[0, {n_cols})")
  offsets = np.concatenate([[0], np.cumsum(lengths)])
  return offsets, indices


def rank_of_best_gt(scores: Any, gt: GroundTruth) -> np.ndarray:
  """0-based rank of the best-ranked ground-truth column of each row (tie rule: module docstring).

  Args:
    scores: [N, M] scores, higher is better.
    gt: per row, the ground-truth column(s): either a length-N sequence of index lists (ragged
      allowed, e.g. `img2txt`) or an [N] integer array with one column per row (e.g. `txt2img`).

  Returns:
    [N] int64 ranks in [0, M).

  Vectorised: the best ground-truth item of a row is the one with the highest score (lowest
  column among equal scores), found with one lexsort over all (row, gt) pairs; its rank is then
  counted with two comparisons against its row, in row chunks of ~16M elements. 5k x 25k takes
  about a second on one core.
  """
  scores = _as_score_matrix(scores, "scores")
  n_rows, n_cols = scores.shape
  offsets, gt_cols = ground_truth_csr(gt, n_rows, n_cols, "gt")
  gt_rows = np.repeat(np.arange(n_rows), np.diff(offsets))
  gt_vals = scores[gt_rows, gt_cols]
  # Sort pairs by row, then descending score, then ascending column; the first pair of each row
  # (at its CSR offset, since every row is non-empty) is that row's best-ranked ground truth.
  order = np.lexsort((gt_cols, -gt_vals.astype(np.float64), gt_rows))
  best_col = gt_cols[order[offsets[:-1]]]

  ranks = np.empty(n_rows, np.int64)
  cols = np.arange(n_cols)
  step = max(1, _CHUNK_ELEMS // max(n_cols, 1))
  for r0 in range(0, n_rows, step):
    r1 = min(n_rows, r0 + step)
    block = scores[r0:r1]
    nan_rows = np.flatnonzero(np.isnan(block).any(axis=1)) if block.dtype.kind == "f" else []
    if len(nan_rows):
      raise ValueError(f"scores: NaN in row {r0 + int(nan_rows[0])}")
    best = best_col[r0:r1, None]
    best_val = np.take_along_axis(block, best, axis=1)
    above = np.count_nonzero(block > best_val, axis=1)
    tied_before = np.count_nonzero((block == best_val) & (cols[None, :] < best), axis=1)
    ranks[r0:r1] = above + tied_before
  return ranks


def recall_at_k_from_ranks(ranks: Any, k: int) -> float:
  """R@k in percent: 100 * fraction of 0-based `ranks` [N] that are < k."""
  ranks = np.asarray(ranks)
  if ranks.size == 0:
    raise ValueError("recall_at_k_from_ranks: no ranks")
  return float(100.0 * np.count_nonzero(ranks < k) / ranks.size)


def retrieval_metrics(scores_i2t: Any, scores_t2i: Any, img2txt: GroundTruth,
                      txt2img: GroundTruth) -> dict[str, float]:
  """TR@1/5/10 (image -> text), IR@1/5/10 (text -> image) and their means, in percent.

  Args:
    scores_i2t: [N_img, N_txt].
    scores_t2i: [N_txt, N_img].
    img2txt: N_img lists of ground-truth text indices.
    txt2img: [N_txt] image index of each text (or N_txt lists, if a text has several images).

  Returns:
    {'txt_r1', 'txt_r5', 'txt_r10', 'txt_r_mean', 'img_r1', 'img_r5', 'img_r10', 'img_r_mean',
     'r_mean'} as Python floats.
  """
  scores_i2t = _as_score_matrix(scores_i2t, "scores_i2t")
  scores_t2i = _as_score_matrix(scores_t2i, "scores_t2i")
  if scores_t2i.shape != scores_i2t.shape[::-1]:
    raise ValueError(f"scores_i2t is {scores_i2t.shape} [N_img, N_txt] but scores_t2i is "
                     f"{scores_t2i.shape}; expected {scores_i2t.shape[::-1]} [N_txt, N_img]")
  return metrics_from_ranks(rank_of_best_gt(scores_i2t, img2txt),
                            rank_of_best_gt(scores_t2i, txt2img))


def ranks_from_candidates(candidates: Any, scores: Any, gt: GroundTruth, num_columns: int,
                          fill: float = -100.0) -> np.ndarray:
  """`rank_of_best_gt` of the dense matrix that holds `scores` at each row's `candidates` and
  `fill` everywhere else, computed from the [rows, k] candidates alone (no rows x num_columns
  array): for a ground-truth column g of value v (its score, or `fill` off the candidates),
    rank = #{candidates > v} + #{candidates == v, column < g}
           + (#non-candidates if fill > v) + (#non-candidate columns < g if fill == v).

  Args:
    candidates: [R, k] distinct column indices per row. scores: [R, k] their scores.
    gt: as for `rank_of_best_gt`. num_columns: M. fill: the value off the candidates.
  Returns:
    [R] int64 ranks in [0, M).
  """
  candidates = np.asarray(candidates, np.int64)
  scores = np.asarray(scores, np.float64)
  n_rows, k = candidates.shape
  offsets, gt_cols = ground_truth_csr(gt, n_rows, num_columns, "gt")
  if np.isnan(scores).any():
    raise ValueError("scores: NaN")
  gt_rows = np.repeat(np.arange(n_rows), np.diff(offsets))
  ranks = np.empty(len(gt_rows), np.int64)
  step = max(1, _CHUNK_ELEMS // max(k, 1))
  for p0 in range(0, len(gt_rows), step):
    rows, cols = gt_rows[p0:p0 + step], gt_cols[p0:p0 + step, None]
    cand, vals = candidates[rows], scores[rows]
    hit = cand == cols
    is_candidate = hit.any(axis=1)
    value = np.where(is_candidate, np.where(hit, vals, 0.0).sum(axis=1), fill)[:, None]
    rank = (np.count_nonzero(vals > value, axis=1)
            + np.count_nonzero((vals == value) & (cand < cols), axis=1))
    value, cols = value[:, 0], cols[:, 0]
    others_before = cols - np.count_nonzero(cand < cols[:, None], axis=1)  # g itself excluded
    rank += np.where(fill > value, num_columns - k, 0)
    rank += np.where(fill == value, others_before, 0)
    ranks[p0:p0 + step] = rank
  # The best ground truth of a row is its lowest rank.
  best = np.full(n_rows, np.iinfo(np.int64).max)
  np.minimum.at(best, gt_rows, ranks)
  return best


def metrics_from_ranks(txt_ranks: Any, img_ranks: Any) -> dict[str, float]:
  """TR@1/5/10 from the image->text ranks, IR@1/5/10 from the text->image ranks, their means."""
  out = {}
  for prefix, ranks in (("txt", txt_ranks), ("img", img_ranks)):
    recalls = [recall_at_k_from_ranks(ranks, k) for k in (1, 5, 10)]
    out.update({f"{prefix}_r{k}": r for k, r in zip((1, 5, 10), recalls)})
    out[f"{prefix}_r_mean"] = sum(recalls) / 3.0
  out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2.0
  return out


# ---------------------------------------------------------------------------------------------
# Score files and annotations.


def save_scores(path: str | os.PathLike, scores_i2t: Any, scores_t2i: Any) -> None:
  """Writes both matrices to an uncompressed .npz at exactly `path` (keys `scores_i2t` [N_img,
  N_txt] and `scores_t2i` [N_txt, N_img])."""
  scores_i2t = _as_score_matrix(scores_i2t, "scores_i2t")
  scores_t2i = _as_score_matrix(scores_t2i, "scores_t2i")
  if scores_t2i.shape != scores_i2t.shape[::-1]:
    raise ValueError(f"scores_i2t {scores_i2t.shape} and scores_t2i {scores_t2i.shape} are not "
                     "transposed shapes")
  with open(path, "wb") as f:  # a file object keeps np.savez from appending ".npz"
    np.savez(f, scores_i2t=scores_i2t, scores_t2i=scores_t2i)


def load_scores(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
  """Reads a `save_scores` file: (scores_i2t [N_img, N_txt], scores_t2i [N_txt, N_img])."""
  with np.load(path, allow_pickle=False) as data:
    missing = {"scores_i2t", "scores_t2i"} - set(data.files)
    if missing:
      raise KeyError(f"{path}: missing arrays {sorted(missing)}; found {data.files}")
    scores_i2t, scores_t2i = data["scores_i2t"], data["scores_t2i"]
  if scores_i2t.ndim != 2 or scores_t2i.shape != scores_i2t.shape[::-1]:
    raise ValueError(f"{path}: scores_i2t {scores_i2t.shape} and scores_t2i {scores_t2i.shape} "
                     "are not [N_img, N_txt] and [N_txt, N_img]")
  return scores_i2t, scores_t2i


def retrieval_ground_truth(records: Sequence[dict], source: str = "annotations"
                           ) -> tuple[list[list[int]], np.ndarray]:
  """img2txt / txt2img from Karpathy-style test records `[{"image": path, "caption": [str, ...]}]`.

  Images are numbered in record order and texts in (record, caption) order, as the reference's
  retrieval eval dataset does. A bare string caption counts as a one-caption list.

  Returns:
    img2txt: N_img lists of text indices; txt2img: [N_txt] int64.
  """
  img2txt: list[list[int]] = []
  txt2img: list[int] = []
  for i, rec in enumerate(records):
    if not isinstance(rec, dict) or "caption" not in rec:
      raise ValueError(f"{source}: record {i} has no 'caption' key: {rec!r:.200}")
    captions = rec["caption"]
    if isinstance(captions, str):
      captions = [captions]
    if not captions:
      raise ValueError(f"{source}: record {i} ({rec.get('image')!r}) has no captions")
    first = len(txt2img)
    img2txt.append(list(range(first, first + len(captions))))
    txt2img.extend([i] * len(captions))
  return img2txt, np.asarray(txt2img, np.int64)


def load_retrieval_annotations(path: str | os.PathLike) -> tuple[list[list[int]], np.ndarray]:
  """`retrieval_ground_truth` of a Karpathy-style test JSON file (e.g. coco_test.json)."""
  with open(path) as f:
    records = json.load(f)
  if not isinstance(records, list):
    raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
  return retrieval_ground_truth(records, source=str(path))
