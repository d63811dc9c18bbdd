"""x2vlm_jax/boxes.py (evaluation side) and the grounding accuracy: hand-computed IoUs in both
conventions, accuracy counts, box conversion."""
import numpy as np
import pytest

from x2vlm_jax import boxes as gm
from x2vlm_jax.tasks.grounding import grounding_accuracy


def iou_plus_one_loop(a, b):
  """Scalar transcription of the reference's "+1 pixel" rule, written independently."""
  ax2, ay2 = a[0] + a[2] - 1, a[1] + a[3] - 1
  bx2, by2 = b[0] + b[2] - 1, b[1] + b[3] - 1
  ix1, iy1, ix2, iy2 = max(a[0], b[0]), max(a[1], b[1]), min(ax2, bx2), min(ay2, by2)
  inter = (ix2 - ix1 + 1) * (iy2 - iy1 + 1) if (ix1 < ix2 and iy1 < iy2) else 0
  return inter / (a[2] * a[3] + b[2] * b[3] - inter)


@pytest.mark.parametrize("plus_one", [False, True])
def test_hand_computed_ious_same_in_both_conventions(plus_one):
  a = [[10, 20, 30, 40],   # identical
       [0, 0, 10, 10],     # disjoint
       [0, 0, 10, 10],     # touching edge (continuous overlap 0)
       [0, 0, 10, 10],     # shifted by half: inter 50, union 150
       [0, 0, 10, 10],     # b is the top half of a: inter 50, union 100
       [2, 2, 4, 4]]       # b inside a 8x8: 16 / 64
  b = [[10, 20, 30, 40],
       [20, 20, 5, 5],
       [10, 0, 10, 10],
       [5, 0, 10, 10],
       [0, 0, 10, 5],
       [0, 0, 8, 8]]
  np.testing.assert_allclose(gm.box_iou_xywh(a, b, plus_one=plus_one),
                             [1.0, 0.0, 0.0, 1 / 3, 0.5, 0.25])


def test_plus_one_differs_on_one_pixel_overlaps():
  a = [[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]]
  b = [[9, 0, 10, 10],     # overlap one pixel column: continuous 10 / 190, "+1 pixel" rule 0
       [9.5, 0, 10, 10],   # half a pixel: 5 / 195 vs 0
       [8, 8, 10, 10]]     # 2x2 overlap: 4 / 196 in both
  np.testing.assert_allclose(gm.box_iou_xywh(a, b), [10 / 190, 5 / 195, 4 / 196])
  np.testing.assert_allclose(gm.box_iou_xywh(a, b, plus_one=True), [0.0, 0.0, 4 / 196])


def test_plus_one_matches_scalar_rule_on_random_boxes():
  rng = np.random.default_rng(0)
  a = np.concatenate([rng.uniform(0, 50, (300, 2)), rng.uniform(1, 60, (300, 2))], axis=1)
  b = a + rng.normal(0, 8, a.shape) * [1, 1, 0.5, 0.5]
  b[:, 2:] = np.abs(b[:, 2:]) + 1
  b[:100] = np.round(b[:100])  # integer pixel boxes too
  a[:100] = np.round(a[:100])
  want = [iou_plus_one_loop(x, y) for x, y in zip(a, b)]
  np.testing.assert_allclose(gm.box_iou_xywh(a, b, plus_one=True), want, rtol=1e-12)
  ious = gm.box_iou_xywh(a, b)
  assert ((ious >= 0) & (ious <= 1)).all() and 0.1 < ious.mean() < 0.9


def test_zero_area_is_zero_not_nan():
  np.testing.assert_array_equal(gm.box_iou_xywh([[0, 0, 0, 0]], [[0, 0, 0, 0]]), [0.0])
  np.testing.assert_array_equal(gm.box_iou_xywh([[0, 0, 0, 0]], [[0, 0, 0, 0]], plus_one=True),
                                [0.0])


def test_grounding_accuracy_counts():
  gt = [[0, 0, 10, 10]] * 5
  pred = [[0, 0, 10, 10],    # IoU 1
          [0, 0, 10, 5],     # 0.5: counts (>=)
          [5, 0, 10, 10],    # 1/3
          [50, 50, 10, 10],  # 0
          [0, 0, 10, 6]]     # 0.6
  assert grounding_accuracy(pred, gt) == pytest.approx(3 / 5)
  assert grounding_accuracy(pred, gt, threshold=0.3) == pytest.approx(4 / 5)
  assert grounding_accuracy(pred, gt, threshold=1.0) == pytest.approx(1 / 5)
  # A thin-overlap case decides between conventions: 2x1-pixel boxes sharing one pixel column
  # have continuous IoU 1/3, "+1 pixel" IoU 0.
  assert grounding_accuracy([[0, 0, 2, 1]], [[1, 0, 2, 1]], threshold=0.3) == 1.0
  assert grounding_accuracy([[0, 0, 2, 1]], [[1, 0, 2, 1]], threshold=0.3, plus_one=True) == 0.0
  with pytest.raises(ValueError):
    grounding_accuracy(np.zeros((0, 4)), np.zeros((0, 4)))


def test_cxcywh_norm_to_xywh_pixels():
  boxes = [[0.5, 0.5, 0.2, 0.4], [0.1, 0.9, 0.2, 0.2]]
  wh = [[640, 480], [100, 50]]
  np.testing.assert_allclose(gm.cxcywh_norm_to_xywh_pixels(boxes, wh),
                             [[256, 144, 128, 192], [0, 40, 20, 10]])
  # Round trip: normalise pixel GT boxes, map back, IoU 1.
  gt = np.array([[13.0, 7.0, 40.0, 22.0], [0.0, 0.0, 640.0, 480.0]])
  size = np.array([[320, 240], [640, 480]])
  norm = np.concatenate([(gt[:, :2] + gt[:, 2:] / 2) / size, gt[:, 2:] / size], axis=1)
  back = gm.cxcywh_norm_to_xywh_pixels(norm, size)
  np.testing.assert_allclose(back, gt)
  assert grounding_accuracy(back, gt, plus_one=True) == 1.0
  with pytest.raises(ValueError):
    gm.cxcywh_norm_to_xywh_pixels(boxes, [[640, 480]])
