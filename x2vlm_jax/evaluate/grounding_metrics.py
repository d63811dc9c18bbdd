"""Referring-expression grounding metrics: box IoU and Acc@IoU>=0.5 (REFERENCE_DETAILED.md §4.4).

Boxes are [N, 4] arrays in original-image pixels, (x, y, w, h) with (x, y) the top-left corner
(the COCO / REFER convention). The model predicts normalised (cx, cy, w, h) in (0, 1) relative to
the resized input; since the eval resize is a plain R x R resize, multiplying by the original
(W, H) maps it back to pixels: `cxcywh_norm_to_xywh_pixels`.

Two IoU conventions:
  plus_one=False: continuous boxes [x, x + w) x [y, y + h); inter = overlap width * height.
  plus_one=True:  the reference's RefCOCO `computeIoU` ("+1 pixel"): inclusive corners
    x2 = x + w - 1; inter = (x2 - x1 + 1) * (y2 - y1 + 1) over the intersection corners, counted only
    when x1 < x2 and y1 < y2 **strictly**; union = w_a * h_a + w_b * h_b - inter.
  Since (x2 - x1 + 1) equals the continuous overlap width, the two conventions agree except when
  the continuous overlap is positive but at most one pixel in width or height: plus_one then
  counts no intersection at all (IoU 0).
A zero-area union gives IoU 0 (never NaN).
"""
from __future__ import annotations

from typing import Any

import numpy as np


def _as_boxes(boxes: Any, name: str) -> np.ndarray:
  boxes = np.asarray(boxes, dtype=np.float64)
  if boxes.ndim != 2 or boxes.shape[1] != 4:
    raise ValueError(f"{name}: expected [N, 4] boxes, got shape {boxes.shape}")
  return boxes


def box_iou_xywh(a: Any, b: Any, plus_one: bool = False) -> np.ndarray:
  """Elementwise IoU of pixel boxes a[i] and b[i].

  Args:
    a, b: [N, 4] (x, y, w, h) in pixels.
    plus_one: use the reference's RefCOCO "+1 pixel" convention (module docstring).

  Returns:
    [N] float64 IoU in [0, 1].
  """
  a = _as_boxes(a, "a")
  b = _as_boxes(b, "b")
  if a.shape != b.shape:
    raise ValueError(f"box_iou_xywh: shapes differ, {a.shape} vs {b.shape}")
  left = np.maximum(a[:, 0], b[:, 0])
  top = np.maximum(a[:, 1], b[:, 1])
  if plus_one:
    right = np.minimum(a[:, 0] + a[:, 2] - 1, b[:, 0] + b[:, 2] - 1)
    bottom = np.minimum(a[:, 1] + a[:, 3] - 1, b[:, 1] + b[:, 3] - 1)
    overlaps = (left < right) & (top < bottom)
    inter = np.where(overlaps, (right - left + 1) * (bottom - top + 1), 0.0)
  else:
    right = np.minimum(a[:, 0] + a[:, 2], b[:, 0] + b[:, 2])
    bottom = np.minimum(a[:, 1] + a[:, 3], b[:, 1] + b[:, 3])
    inter = np.clip(right - left, 0, None) * np.clip(bottom - top, 0, None)
  union = a[:, 2] * a[:, 3] + b[:, 2] * b[:, 3] - inter
  safe = np.where(union > 0, union, 1.0)
  return np.where(union > 0, inter / safe, 0.0)


def grounding_accuracy(pred_xywh: Any, gt_xywh: Any, threshold: float = 0.5,
                       plus_one: bool = False) -> float:
  """Fraction (in [0, 1]) of predictions whose IoU with their ground truth is >= threshold.

  Args:
    pred_xywh, gt_xywh: [N, 4] pixel boxes (x, y, w, h), N >= 1.
    threshold: IoU threshold (0.5 for RefCOCO+ Acc@0.5).
    plus_one: IoU convention; True reproduces the reference's reported numbers.
  """
  iou = box_iou_xywh(pred_xywh, gt_xywh, plus_one=plus_one)
  if iou.size == 0:
    raise ValueError("grounding_accuracy: no boxes")
  return float(np.count_nonzero(iou >= threshold) / iou.size)


def cxcywh_norm_to_xywh_pixels(boxes: Any, image_wh: Any) -> np.ndarray:
  """Normalised (cx, cy, w, h) predictions -> (x, y, w, h) pixels of the original image.

  Args:
    boxes: [N, 4] (cx, cy, w, h) as fractions of the image (the sigmoid output of the box head).
    image_wh: [N, 2] original (width, height) in pixels of each image.

  Returns:
    [N, 4] float64: x = (cx - w/2) W, y = (cy - h/2) H, w W, h H (as the reference; no clipping).
  """
  boxes = _as_boxes(boxes, "boxes")
  image_wh = np.asarray(image_wh, dtype=np.float64)
  if image_wh.shape != (len(boxes), 2):
    raise ValueError(f"image_wh: expected shape ({len(boxes)}, 2), got {image_wh.shape}")
  scale = np.concatenate([image_wh, image_wh], axis=1)  # (W, H, W, H)
  cx, cy, w, h = (boxes * scale).T
  return np.stack([cx - w / 2, cy - h / 2, w, h], axis=1)
