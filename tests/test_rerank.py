"""ITM re-ranking driver: brute-force equality, fixed batch size, padding, clamping, sharding."""
import math

import numpy as np
import pytest

from x2vlm_jax.evaluate import rerank


class RecordingScorer:
  """pair_score_fn that looks pairs up in a table [N_img, N_txt] and records every call."""

  def __init__(self, table, as_jax=False):
    self.table = np.asarray(table, np.float32)
    self.calls = []
    self.as_jax = as_jax

  def __call__(self, image_idx, text_idx):
    assert image_idx.dtype == np.int32 and text_idx.dtype == np.int32
    self.calls.append((image_idx.copy(), text_idx.copy()))
    out = self.table[image_idx, text_idx]
    if self.as_jax:
      import jax.numpy as jnp
      return jnp.asarray(out)
    return out


def brute_force(sims, k, table, direction):
  """Loop version: stable descending sort of each row, first k re-scored, -100 elsewhere."""
  rows = sims if direction == "i2t" else sims.T
  out = np.full(rows.shape, -100.0, np.float32)
  for r, row in enumerate(rows):
    for c in np.argsort(-row, kind="stable")[:k]:
      out[r, c] = table[r, c] if direction == "i2t" else table[c, r]
  return out


@pytest.mark.parametrize("direction", ["i2t", "t2i"])
@pytest.mark.parametrize("sims_kind", ["float", "int_ties"])
def test_matches_brute_force_with_fixed_batch(direction, sims_kind):
  rng = np.random.default_rng(0)
  n_img, n_txt, k, batch = 9, 23, 5, 7
  sims = (rng.normal(size=(n_img, n_txt)) if sims_kind == "float"
          else rng.integers(0, 3, size=(n_img, n_txt)).astype(np.float32))
  table = rng.normal(size=(n_img, n_txt))
  fn = RecordingScorer(table)
  got = rerank.rerank_scores(sims, k, fn, batch_size=batch, direction=direction,
                             log_fn=lambda s: None)
  np.testing.assert_array_equal(got, brute_force(sims, k, table, direction))
  n_rows = n_img if direction == "i2t" else n_txt
  total = n_rows * k
  assert len(fn.calls) == math.ceil(total / batch)
  assert all(len(i) == batch and len(t) == batch for i, t in fn.calls)
  # Padding: the tail of the last call repeats the last real pair.
  img_last, txt_last = fn.calls[-1]
  n_real = total - batch * (len(fn.calls) - 1)
  assert n_real < batch
  assert (img_last[n_real:] == img_last[n_real - 1]).all()
  assert (txt_last[n_real:] == txt_last[n_real - 1]).all()
  # Every real pair is scored exactly once.
  pairs = np.concatenate([np.stack(c, 1) for c in fn.calls])[:total]
  assert len({tuple(p) for p in pairs}) == total


def test_known_function_and_jax_inputs():
  import jax.numpy as jnp
  n_img, n_txt, k = 6, 10, 3
  i, j = np.meshgrid(np.arange(n_img), np.arange(n_txt), indexing="ij")
  table = -np.abs(i - j).astype(np.float32)
  sims = jnp.asarray(np.random.default_rng(1).normal(size=(n_img, n_txt)), jnp.bfloat16)
  fn = RecordingScorer(table, as_jax=True)  # results come back as jax arrays, stored one call late
  got = rerank.rerank_scores(sims, k, fn, batch_size=4, direction="i2t", log_fn=lambda s: None)
  want = brute_force(np.asarray(sims, np.float32), k, table, "i2t")
  np.testing.assert_array_equal(got, want)
  assert ((got == -100).sum(axis=1) == n_txt - k).all()
  assert got.dtype == np.float32


def test_k_larger_than_row_clamps():
  sims = np.random.default_rng(2).normal(size=(4, 7))
  table = np.arange(28, dtype=np.float32).reshape(4, 7)
  fn = RecordingScorer(table)
  got = rerank.rerank_scores(sims, 1000, fn, batch_size=5, direction="i2t", log_fn=lambda s: None)
  np.testing.assert_array_equal(got, table)  # every entry re-scored
  got_t2i = rerank.rerank_scores(sims, 1000, fn, batch_size=5, direction="t2i",
                                 log_fn=lambda s: None)
  np.testing.assert_array_equal(got_t2i, table.T)


def test_select_topk_tie_rule():
  row = np.array([[1.0, 3.0, 3.0, 2.0, 3.0]])
  np.testing.assert_array_equal(rerank.select_topk(row, 2), [[1, 2]])
  np.testing.assert_array_equal(rerank.select_topk(row, 4), [[1, 2, 4, 3]])
  np.testing.assert_array_equal(rerank.select_topk(row, 9), [[1, 2, 4, 3, 0]])
  rng = np.random.default_rng(3)
  block = rng.integers(0, 4, size=(50, 40))
  np.testing.assert_array_equal(rerank.select_topk(block, 11),
                                np.argsort(-block, axis=1, kind="stable")[:, :11])


def test_sharded_row_range_covers_rows():
  for n in (0, 1, 5, 17, 100):
    for count in (1, 2, 3, 8):
      ranges = [rerank.sharded_row_range(n, p, count) for p in range(count)]
      assert ranges[0][0] == 0 and ranges[-1][1] == n
      assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
      sizes = [b - a for a, b in ranges]
      assert max(sizes) - min(sizes) <= 1 and max(sizes) == rerank.max_rows_per_shard(n, count)
  with pytest.raises(ValueError):
    rerank.sharded_row_range(10, 3, 3)


@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_row_shards_assemble_to_full_result_in_lockstep(direction):
  rng = np.random.default_rng(4)
  sims = rng.normal(size=(7, 11))
  table = rng.normal(size=(7, 11))
  k, batch, count = 3, 4, 3
  n_rows = 7 if direction == "i2t" else 11
  full = rerank.rerank_scores(sims, k, RecordingScorer(table), batch_size=batch,
                              direction=direction, log_fn=lambda s: None)
  pad_rows = rerank.max_rows_per_shard(n_rows, count)
  gathered, n_calls = [], []
  for p in range(count):
    fn = RecordingScorer(table)
    part = rerank.rerank_scores(sims, k, fn, batch_size=batch, direction=direction,
                                row_range=rerank.sharded_row_range(n_rows, p, count),
                                pad_to_rows=pad_rows, log_fn=lambda s: None)
    padded = np.full((pad_rows, part.shape[1]), -100.0, np.float32)
    padded[:len(part)] = part
    gathered.append(padded)
    n_calls.append(len(fn.calls))
  np.testing.assert_array_equal(rerank.assemble_row_shards(np.stack(gathered), n_rows), full)
  assert n_calls == [math.ceil(pad_rows * k / batch)] * count


def test_progress_lines_and_bad_output_shape():
  sims = np.random.default_rng(5).normal(size=(10, 8))
  table = np.zeros((10, 8))
  ticks = iter(range(1000))
  lines = []
  rerank.rerank_scores(sims, 4, RecordingScorer(table), batch_size=4, direction="i2t",
                       progress_every_s=3.0, log_fn=lines.append, clock=lambda: next(ticks))
  progress = [line for line in lines if "pairs/s, ETA" in line]
  # 10 calls, one clock tick per call: a line roughly every 3 ticks, plus a start and a done line.
  assert 2 <= len(progress) <= 4, lines
  assert "/40 pairs" in progress[0] and lines[-1].startswith("rerank i2t: done, 40 pairs")

  with pytest.raises(ValueError, match="returned shape"):
    rerank.rerank_scores(sims, 2, lambda i, t: np.zeros(len(i) - 1), batch_size=3,
                         direction="i2t", log_fn=lambda s: None)
  with pytest.raises(ValueError, match="direction"):
    rerank.rerank_scores(sims, 2, lambda i, t: i, batch_size=3, direction="x")
