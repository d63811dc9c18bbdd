"""ITM re-ranking of both directions' distinct pairs grouped by image: equal to brute force,
fixed call shapes, padding dropped, candidates -> dense matrices / rankings, the device top-k's
tie rule, multi-host row blocks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from x2vlm_jax.evaluate import rerank


def brute_force(sims, k, table, direction):
  """Loop version: stable descending sort of each row, first k re-scored, -100 elsewhere."""
  rows = sims if direction == "i2t" else sims.T
  out = np.full(rows.shape, -100.0, np.float32)
  for r, row in enumerate(rows):
    for c in np.argsort(-row, kind="stable")[:k]:
      out[r, c] = table[r, c] if direction == "i2t" else table[c, r]
  return out


def topk(rows, k):
  """Stable descending top-k columns (the device top-k's tie rule)."""
  return np.argsort(-rows, axis=1, kind="stable")[:, :k].astype(np.int32)


@pytest.mark.parametrize("sims_kind", ["float", "int_ties"])
@pytest.mark.parametrize("sizes", [(4,), (4, 1), (3, 2)])
def test_both_directions_match_brute_force(sims_kind, sizes):
  rng = np.random.default_rng(0)
  n_img, n_txt, k = 7, 23, 4
  sims = (rng.normal(size=(n_img, n_txt)) if sims_kind == "float"
          else rng.integers(0, 3, size=(n_img, n_txt)).astype(np.float32))
  table = rng.normal(size=(n_img, n_txt)).astype(np.float32)
  calls = []

  def score(rows, texts):
    assert rows.dtype == np.int32 and texts.dtype == np.int32
    group = len(texts) // len(rows)
    calls.append((len(rows), group))
    return jnp.asarray(table[np.repeat(rows, group), texts])

  cand_i2t, cand_t2i = topk(sims, k), topk(sims.T, k)
  got_i2t, got_t2i = rerank.rerank(cand_i2t, cand_t2i, score, group_sizes=sizes,
                                   rows_per_call=lambda g: 12 // g, log_fn=lambda s: None)
  np.testing.assert_array_equal(rerank.dense_scores(cand_i2t, got_i2t, n_txt),
                                brute_force(sims, k, table, "i2t"))
  np.testing.assert_array_equal(rerank.dense_scores(cand_t2i, got_t2i, n_img),
                                brute_force(sims, k, table, "t2i"))
  # One call shape per group size: (12 // G) vision rows of G texts.
  assert set(calls) <= {(12 // g, g) for g in sizes}


def test_each_distinct_pair_is_scored_once_grouped_by_image():
  cand_i2t = np.array([[0, 1], [2, 0]], np.int32)  # image 0: texts 0, 1; image 1: texts 2, 0
  cand_t2i = np.array([[0, 1], [1, 0], [1, 0]], np.int32)  # text t: its two images
  pairs = rerank.union_pairs(cand_i2t, cand_t2i)
  assert list(zip(pairs.images.tolist(), pairs.texts.tolist())) == [
      (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
  # (0, 0) is image 0's first candidate and text 0's first; (0, 2) only text 2's second.
  assert pairs.slot_i2t.tolist() == [0, 1, -1, 3, -1, 2]
  assert pairs.slot_t2i.tolist() == [0, 3, 5, 1, 2, 4]
  big, small = rerank.group_pairs(pairs, (2, 1))
  assert big.rows.tolist() == [0, 1] and big.pairs.tolist() == [[0, 1], [3, 4]]
  assert small.rows.tolist() == [0, 1] and small.pairs.tolist() == [[2], [5]]
  assert big.valid.all() and small.valid.all()
  (padded,) = rerank.group_pairs(pairs, (4,))
  assert padded.rows.tolist() == [0, 1]
  assert padded.pairs.tolist() == [[0, 1, 2, 0], [3, 4, 5, 3]]
  assert padded.valid.tolist() == [[True, True, True, False], [True, True, True, False]]
  calls = []
  table = np.arange(6, dtype=np.float32).reshape(2, 3)

  def score(rows, texts):
    calls.append((rows.tolist(), texts.tolist()))
    return table[np.repeat(rows, len(texts) // len(rows)), texts]

  s_i2t, s_t2i = rerank.rerank(cand_i2t, cand_t2i, score, group_sizes=(2, 1),
                               rows_per_call=lambda g: 2, log_fn=lambda s: None)
  assert calls == [([0, 1], [0, 1, 0, 1]), ([0, 1], [2, 2])]  # 6 distinct pairs of 10 asked
  np.testing.assert_array_equal(s_i2t, table[[[0], [1]], cand_i2t])
  np.testing.assert_array_equal(s_t2i, table[cand_t2i, [[0], [1], [2]]])


def test_device_top_k_takes_the_lower_index_among_ties():
  row = jnp.array([[0.0, 2.0, 2.0, 1.0, 2.0, 1.0]])
  _, cols = jax.lax.top_k(row, 4)
  assert cols.tolist() == [[1, 2, 4, 3]] == topk(np.asarray(row), 4).tolist()


def test_top_columns_equal_the_dense_matrix_order():
  rng = np.random.default_rng(1)
  for _ in range(50):
    n_cols = int(rng.integers(2, 12))
    k = int(rng.integers(1, n_cols + 1))
    cand = np.stack([rng.permutation(n_cols)[:k] for _ in range(4)])
    scores = rng.choice([-101.0, -100.0, 0.0, 1.0], size=cand.shape)
    dense = rerank.dense_scores(cand, scores, n_cols)
    assert rerank.top_columns(cand, scores, n_cols, 5) == topk(dense, 5).tolist()


def test_progress_lines_and_bad_output_shape():
  pairs = rerank.union_pairs(np.zeros((4, 2), np.int32) + [0, 1], np.zeros((2, 1), np.int32))
  (groups,) = rerank.group_pairs(pairs, (1,))
  out = np.zeros(len(pairs.images), np.float32)
  lines, clock = [], iter(range(0, 1000, 20)).__next__
  rerank.score_groups(groups, pairs.texts, lambda r, t: np.ones(len(t)), rows_per_call=1,
                      out=out, log_fn=lines.append, clock=lambda: float(clock()))
  assert "8 pairs in 8 groups of 1 texts" in lines[0] and "pairs/s, ETA" in lines[1]
  assert "done, 8 pairs" in lines[-1] and (out == 1).all()
  with pytest.raises(ValueError, match="score_fn returned shape"):
    rerank.score_groups(groups, pairs.texts, lambda r, t: np.zeros(len(t) - 1), rows_per_call=2,
                        out=out, log_fn=lambda s: None)
  with pytest.raises(ValueError, match="rows_per_call"):
    rerank.score_groups(groups, pairs.texts, lambda r, t: t, rows_per_call=0, out=out)


def test_sharded_row_range_covers_rows():
  for n in (0, 1, 7, 10):
    for count in (1, 2, 3, 4):
      ranges = [rerank.sharded_row_range(n, p, count) for p in range(count)]
      assert ranges[0][0] == 0 and ranges[-1][1] == n
      assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
      sizes = [b - a for a, b in ranges]
      assert max(sizes) - min(sizes) <= 1 and max(sizes) == rerank.max_rows_per_shard(n, count)
  with pytest.raises(ValueError):
    rerank.sharded_row_range(10, 3, 3)
  blocks = [np.arange(4), np.array([4, 5, 6, -1])]  # the second block padded to 4 rows
  np.testing.assert_array_equal(rerank.assemble_row_shards(blocks, 7), np.arange(7))
