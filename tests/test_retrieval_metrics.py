"""Retrieval metrics: vectorised ranks vs a loop implementation, a hand-computed case, files, CLI."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from x2vlm_jax.evaluate import retrieval_metrics as rm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- independent loop implementation (stable sort of -score: ties -> lower index first) -------

def loop_ranks(scores, gt):
  ranks = []
  for row, g in zip(scores, gt):
    order = list(np.argsort(-np.asarray(row, np.float64), kind="stable"))
    g = [g] if np.ndim(g) == 0 else g
    ranks.append(min(order.index(c) for c in g))
  return np.array(ranks)


def loop_metrics(scores_i2t, scores_t2i, img2txt, txt2img):
  out = {}
  for prefix, ranks in (("txt", loop_ranks(scores_i2t, img2txt)),
                        ("img", loop_ranks(scores_t2i, txt2img))):
    for k in (1, 5, 10):
      out[f"{prefix}_r{k}"] = 100.0 * sum(1 for r in ranks if r < k) / len(ranks)
    out[f"{prefix}_r_mean"] = (out[f"{prefix}_r1"] + out[f"{prefix}_r5"] + out[f"{prefix}_r10"]) / 3
  out["r_mean"] = (out["txt_r1"] + out["txt_r5"] + out["txt_r10"] + out["img_r1"]
                   + out["img_r5"] + out["img_r10"]) / 6
  return out


def make_gt(caption_counts):
  img2txt, txt2img, t = [], [], 0
  for i, n in enumerate(caption_counts):
    img2txt.append(list(range(t, t + n)))
    txt2img += [i] * n
    t += n
  return img2txt, np.array(txt2img)


def assert_metrics_close(got, want):
  assert set(got) == set(want)
  for key in want:
    assert got[key] == pytest.approx(want[key], abs=1e-9), key


@pytest.mark.parametrize("counts_kind", ["five", "ragged"])
@pytest.mark.parametrize("score_kind", ["float", "int_ties"])
def test_vectorised_matches_loop(counts_kind, score_kind):
  rng = np.random.default_rng(0 if counts_kind == "five" else 1)
  n_img = 40
  counts = [5] * n_img if counts_kind == "five" else list(rng.integers(1, 8, n_img))
  img2txt, txt2img = make_gt(counts)
  n_txt = len(txt2img)
  if score_kind == "float":
    s_i2t = rng.normal(size=(n_img, n_txt)).astype(np.float32)
    s_t2i = rng.normal(size=(n_txt, n_img)).astype(np.float32)
  else:  # few distinct values: many ties, including between ground-truth items
    s_i2t = rng.integers(0, 4, size=(n_img, n_txt)).astype(np.float32)
    s_t2i = rng.integers(0, 3, size=(n_txt, n_img)).astype(np.float32)
  # Make the correct answers likelier so every recall level is exercised.
  for i, texts in enumerate(img2txt):
    s_i2t[i, texts] += rng.integers(0, 3, len(texts))
  s_t2i[np.arange(n_txt), txt2img] += rng.integers(0, 2, n_txt)

  np.testing.assert_array_equal(rm.rank_of_best_gt(s_i2t, img2txt), loop_ranks(s_i2t, img2txt))
  np.testing.assert_array_equal(rm.rank_of_best_gt(s_t2i, txt2img), loop_ranks(s_t2i, txt2img))
  got = rm.retrieval_metrics(s_i2t, s_t2i, img2txt, txt2img)
  assert_metrics_close(got, loop_metrics(s_i2t, s_t2i, img2txt, txt2img))
  assert all(isinstance(v, float) for v in got.values())


def test_without_ties_matches_reference_style_reversed_argsort():
  # With distinct scores every tie rule agrees with the reference's np.argsort(score)[::-1].
  rng = np.random.default_rng(2)
  img2txt, txt2img = make_gt([5] * 30)
  s = rng.normal(size=(30, 150))
  ref = [min(int(np.where(np.argsort(row)[::-1] == g)[0][0]) for g in gts)
         for row, gts in zip(s, img2txt)]
  np.testing.assert_array_equal(rm.rank_of_best_gt(s, img2txt), ref)


def test_hand_computed_three_images_six_captions():
  img2txt = [[0], [1, 2], [3, 4, 5]]
  txt2img = np.array([0, 1, 1, 2, 2, 2])
  s_i2t = np.array([
      [0.1, 0.9, 0.8, 0.7, 0.6, 0.5],  # gt 0 is last: rank 5
      [0.9, 0.5, 0.8, 0.1, 0.2, 0.3],  # gt 1 rank 2, gt 2 rank 1 -> 1
      [0.0, 0.0, 0.0, 0.7, 0.7, 0.2],  # gt 3 and 4 tie on top; lower index first -> 0
  ])
  s_t2i = np.array([
      [0.2, 0.5, 0.1],        # gt 0: rank 1
      [0.3, 0.9, 0.0],        # gt 1: rank 0
      [0.5, 0.5, 0.5],        # gt 1, all tied: image 0 first -> rank 1
      [0.1, 0.2, 0.3],        # gt 2: rank 0
      [0.9, 0.8, 0.7],        # gt 2: rank 2
      [-100., -100., 4.0],    # gt 2: rank 0
  ])
  np.testing.assert_array_equal(rm.rank_of_best_gt(s_i2t, img2txt), [5, 1, 0])
  np.testing.assert_array_equal(rm.rank_of_best_gt(s_t2i, txt2img), [1, 0, 1, 0, 2, 0])
  got = rm.retrieval_metrics(s_i2t, s_t2i, img2txt, txt2img)
  want = {"txt_r1": 100 / 3, "txt_r5": 200 / 3, "txt_r10": 100.0, "txt_r_mean": 200 / 3,
          "img_r1": 50.0, "img_r5": 100.0, "img_r10": 100.0, "img_r_mean": 250 / 3,
          "r_mean": 75.0}
  assert_metrics_close(got, want)


def test_tie_rule_lower_index_first():
  row = np.array([[1.0, 1.0, 1.0, 0.0]])
  assert [int(rm.rank_of_best_gt(row, [[c]])[0]) for c in range(4)] == [0, 1, 2, 3]
  # Among tied ground-truth items, the lowest index is the best-ranked one.
  assert rm.rank_of_best_gt(np.array([[2.0, 1.0, 2.0, 1.0]]), [[3, 1]])[0] == 2


def test_recall_at_k_from_ranks():
  ranks = np.array([0, 1, 4, 5, 9, 10, 100, 3])
  assert rm.recall_at_k_from_ranks(ranks, 1) == 12.5
  assert rm.recall_at_k_from_ranks(ranks, 5) == 50.0
  assert rm.recall_at_k_from_ranks(ranks, 10) == 75.0


def test_large_matrix_is_fast_and_correct():
  import time
  rng = np.random.default_rng(3)
  img2txt, txt2img = make_gt([5] * 1000)
  s = rng.normal(size=(1000, 5000)).astype(np.float32)
  t0 = time.perf_counter()
  ranks = rm.rank_of_best_gt(s, img2txt)
  assert time.perf_counter() - t0 < 5.0
  rows = rng.choice(1000, 25, replace=False)
  np.testing.assert_array_equal(ranks[rows], loop_ranks(s[rows], [img2txt[r] for r in rows]))


def test_errors():
  with pytest.raises(ValueError, match="NaN in row 1"):
    rm.rank_of_best_gt(np.array([[1.0, 0.0], [np.nan, 0.0]]), [0, 1])
  with pytest.raises(ValueError, match="row 1 has no ground-truth"):
    rm.rank_of_best_gt(np.zeros((2, 3)), [[0], []])
  with pytest.raises(ValueError, match="out of range"):
    rm.rank_of_best_gt(np.zeros((1, 3)), [[3]])
  with pytest.raises(ValueError, match="2 ground-truth entries"):
    rm.rank_of_best_gt(np.zeros((3, 3)), [0, 1])
  with pytest.raises(ValueError, match="N_txt, N_img"):
    rm.retrieval_metrics(np.zeros((2, 4)), np.zeros((2, 4)), [[0], [1]], [0, 1, 0, 1])


def test_scores_round_trip_and_annotations(tmp_path):
  rng = np.random.default_rng(4)
  s_i2t = rng.normal(size=(3, 7)).astype(np.float32)
  s_t2i = rng.normal(size=(7, 3)).astype(np.float32)
  path = tmp_path / "scores.bin"  # written at exactly this path (np.savez would add .npz)
  rm.save_scores(path, s_i2t, s_t2i)
  a, b = rm.load_scores(path)
  np.testing.assert_array_equal(a, s_i2t)
  np.testing.assert_array_equal(b, s_t2i)
  with pytest.raises(ValueError):
    rm.save_scores(tmp_path / "bad.npz", s_i2t, s_i2t)

  ann = [{"image": "a.jpg", "caption": ["x", "y"]},
         {"image": "b.jpg", "caption": "single"},
         {"image": "c.jpg", "caption": ["p", "q", "r", "s"]}]
  (tmp_path / "test.json").write_text(json.dumps(ann))
  img2txt, txt2img = rm.load_retrieval_annotations(tmp_path / "test.json")
  assert img2txt == [[0, 1], [2], [3, 4, 5, 6]]
  np.testing.assert_array_equal(txt2img, [0, 0, 1, 2, 2, 2, 2])
  with pytest.raises(ValueError, match="record 1"):
    rm.retrieval_ground_truth([{"caption": ["a"]}, {"image": "x"}])


def _write_case(tmp_path):
  img2txt, txt2img = make_gt([2, 1, 3])
  rng = np.random.default_rng(5)
  s_i2t = rng.normal(size=(3, 6))
  s_t2i = rng.normal(size=(6, 3))
  rm.save_scores(tmp_path / "s.npz", s_i2t, s_t2i)
  ann = [{"image": f"{i}.jpg", "caption": [f"c{t}" for t in texts]}
         for i, texts in enumerate(img2txt)]
  (tmp_path / "ann.json").write_text(json.dumps(ann))
  return loop_metrics(s_i2t, s_t2i, img2txt, txt2img)


def test_score_retrieval_tool_in_process(tmp_path, capsys):
  want = _write_case(tmp_path)
  sys.path.insert(0, os.path.join(REPO, "tools"))
  try:
    import score_retrieval
  finally:
    sys.path.pop(0)
  got = score_retrieval.main(["--scores", str(tmp_path / "s.npz"), "--annotations",
                              str(tmp_path / "ann.json"), "--out", str(tmp_path / "m.json")])
  assert_metrics_close(got, want)
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 10 and lines[0].startswith("txt_r1: ")
  assert_metrics_close(json.loads(lines[-1]), want)
  assert_metrics_close(json.loads((tmp_path / "m.json").read_text()), want)


def test_score_retrieval_tool_subprocess_and_shape_check(tmp_path):
  want = _write_case(tmp_path)
  cmd = [sys.executable, os.path.join(REPO, "tools", "score_retrieval.py"),
         "--scores", str(tmp_path / "s.npz"), "--annotations", str(tmp_path / "ann.json")]
  res = subprocess.run(cmd, capture_output=True, text=True, check=True)
  assert_metrics_close(json.loads(res.stdout.strip().splitlines()[-1]), want)
  (tmp_path / "ann.json").write_text(json.dumps([{"image": "a", "caption": ["x"]}]))
  res = subprocess.run(cmd, capture_output=True, text=True)
  assert res.returncode != 0 and "1 images and 1 captions" in res.stderr


@pytest.mark.parametrize("values", ["normal", "ties_and_fill"])
def test_ranks_from_candidates_equal_the_ranks_of_the_dense_matrix(values):
  """What the evaluation keeps ([rows, k] candidates and scores) ranks like the reference's
  matrix with -100 off the candidates, ties and scores at or below -100 included."""
  from x2vlm_jax.evaluate import rerank

  rng = np.random.default_rng(0)
  for _ in range(300):
    n_rows, n_cols = int(rng.integers(1, 8)), int(rng.integers(2, 12))
    k = int(rng.integers(1, n_cols + 1))
    cand = np.stack([rng.permutation(n_cols)[:k] for _ in range(n_rows)])
    scores = (rng.normal(size=(n_rows, k)) if values == "normal"
              else rng.choice([-101.0, -100.0, 0.0, 1.0, 2.0], size=(n_rows, k)))
    gt = [list(rng.choice(n_cols, size=int(rng.integers(1, 3)), replace=False))
          for _ in range(n_rows)]
    dense = rerank.dense_scores(cand, scores, n_cols)
    np.testing.assert_array_equal(rm.ranks_from_candidates(cand, scores, gt, n_cols),
                                  rm.rank_of_best_gt(dense, gt))
