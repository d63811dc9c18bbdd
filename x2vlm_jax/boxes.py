"""Every box convention of the project, and the conversions between them.

Three conventions, named in every function:
  * pixel xywh: (x, y, w, h) in pixels, (x, y) the top-left corner (COCO / REFER records and
    prediction files). Python floats or numpy arrays.
  * normalised cxcywh: (cx, cy, w, h) as fractions of a square R x R model input (the box head's
    sigmoid output and its training target).
  * xyxy: (x0, y0, x1, y1) corners, for GIoU (jnp, inside the losses).

Data side (numpy / Python floats; one box at a time, pixel xywh):
  is_valid_box, clip_box, visible_fraction, crop_box / flip_box / scale_box (follow a crop, a
  horizontal flip, a resize), box_target (pixel xywh in the R x R input -> normalised cxcywh),
  box_patch_mask / full_patch_mask (REFERENCE §1 "Patch mask": which ViT patches a box covers).
Model side (jnp): cxcywh_to_xyxy, box_area, generalized_iou, is_valid_xyxy.
Evaluation side (numpy, [N, 4] arrays): cxcywh_norm_to_xywh_pixels (a prediction on the resized
  input -> pixels of the original image) and box_iou_xywh (continuous, or the reference's RefCOCO
  "+1 pixel" IoU).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np


# ------------------------------------------------------------------------ data side (pixel xywh)
def is_valid_box(box: Sequence[float]) -> bool:
  """Four finite numbers with w > 0 and h > 0."""
  if len(box) != 4:
    return False
  try:
    vals = [float(v) for v in box]
  except (TypeError, ValueError):
    return False
  return all(math.isfinite(v) for v in vals) and vals[2] > 0 and vals[3] > 0


def clip_box(box: Sequence[float], width: float,
             height: float) -> tuple[float, float, float, float]:
  """The box clipped to a width x height image (w, h may become 0)."""
  x, y, w, h = (float(v) for v in box)
  x0, y0 = max(x, 0.0), max(y, 0.0)
  x1, y1 = min(x + w, float(width)), min(y + h, float(height))
  return x0, y0, max(x1 - x0, 0.0), max(y1 - y0, 0.0)


def visible_fraction(box: Sequence[float], x0: float, y0: float, x1: float, y1: float) -> float:
  """Fraction of the box's area inside the window [x0, x1) x [y0, y1)."""
  x, y, w, h = (float(v) for v in box)
  iw = max(min(x + w, x1) - max(x, x0), 0.0)
  ih = max(min(y + h, y1) - max(y, y0), 0.0)
  return (iw * ih) / (w * h)


def crop_box(box: Sequence[float], x0: float, y0: float, x1: float, y1: float):
  """Box clipped to the crop window and expressed in the crop's coordinates."""
  cx, cy, cw, ch = clip_box((box[0] - x0, box[1] - y0, box[2], box[3]), x1 - x0, y1 - y0)
  return cx, cy, cw, ch


def flip_box(box: Sequence[float], width: float):
  """Horizontal mirror in an image of the given width: x -> W - x - w."""
  x, y, w, h = box
  return width - x - w, y, w, h


def scale_box(box: Sequence[float], sx: float, sy: float):
  """The box of an image resized by (sx, sy)."""
  x, y, w, h = box
  return x * sx, y * sy, w * sx, h * sy


def box_target(box: Sequence[float], image_res: int) -> np.ndarray:
  """Pixel xywh in the square R x R input -> normalised [cx, cy, w, h], float32 [4]."""
  x, y, w, h = box
  r = float(image_res)
  return np.array([(x + w / 2) / r, (y + h / 2) / r, w / r, h / r], np.float32)


def box_patch_mask(box: Sequence[float], image_res: int, patch_size: int) -> np.ndarray:
  """Patch attention mask of a box: [1 + G*G] int32 with G = image_res // patch_size.

  x_min = min(floor(x/p), G-1); x_max = max(x_min+1, min(ceil((x+w)/p), G)) (exclusive), same
  for y; mask[0] = 1 (the region's cls slot); mask[1 + G*i + j] = 1 for rows i in [y_min, y_max)
  and columns j in [x_min, x_max).
  """
  g = image_res // patch_size
  x, y, w, h = (float(v) for v in box)
  x_min = min(math.floor(x / patch_size), g - 1)
  x_max = max(x_min + 1, min(math.ceil((x + w) / patch_size), g))
  y_min = min(math.floor(y / patch_size), g - 1)
  y_max = max(y_min + 1, min(math.ceil((y + h) / patch_size), g))
  grid = np.zeros((g, g), np.int32)
  grid[max(y_min, 0):y_max, max(x_min, 0):x_max] = 1
  return np.concatenate([np.ones((1,), np.int32), grid.reshape(-1)])


def full_patch_mask(image_res: int, patch_size: int) -> np.ndarray:
  """The mask of the whole image: [1 + G*G] ones."""
  g = image_res // patch_size
  return np.ones((1 + g * g,), np.int32)


# ------------------------------------------------------------------------ model side (jnp)
def cxcywh_to_xyxy(boxes: jax.Array) -> jax.Array:
  """[..., 4] (cx, cy, w, h) -> [..., 4] (x0, y0, x1, y1)."""
  cx, cy, w, h = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def box_area(boxes: jax.Array) -> jax.Array:
  """[..., 4] xyxy -> [...]."""
  return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def generalized_iou(a: jax.Array, b: jax.Array) -> jax.Array:
  """Elementwise GIoU of matching rows: a, b [N, 4] xyxy -> [N] (DETR definition).

  giou = iou - (area(C) - union) / area(C), C = the smallest box enclosing both.
  """
  top_left = jnp.maximum(a[..., :2], b[..., :2])
  bottom_right = jnp.minimum(a[..., 2:], b[..., 2:])
  inter = jnp.prod(jnp.clip(bottom_right - top_left, 0.0), axis=-1)
  union = box_area(a) + box_area(b) - inter
  iou = inter / union
  enclose = jnp.prod(jnp.clip(jnp.maximum(a[..., 2:], b[..., 2:])
                              - jnp.minimum(a[..., :2], b[..., :2]), 0.0), axis=-1)
  return iou - (enclose - union) / enclose


def is_valid_xyxy(boxes: jax.Array) -> jax.Array:
  """[N, 4] -> [N] True where x1 > x0 and y1 > y0 (positive area)."""
  return (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])


# ------------------------------------------------------------------------ evaluation side
def _as_boxes(boxes: Any, name: str) -> np.ndarray:
  boxes = np.asarray(boxes, dtype=np.float64)
  if boxes.ndim != 2 or boxes.shape[1] != 4:
    raise ValueError(f"{name}: expected [N, 4] boxes, got shape {boxes.shape}")
  return boxes


def cxcywh_norm_to_xywh_pixels(boxes: Any, image_wh: Any) -> np.ndarray:
  """Normalised (cx, cy, w, h) predictions -> (x, y, w, h) pixels of the original image.

  The evaluation transform is a plain resize to R x R, so a fraction of the input is the same
  fraction of the original: x = (cx - w/2) W, y = (cy - h/2) H, w W, h H (no clipping, as the
  reference).

  Args:
    boxes: [N, 4] (cx, cy, w, h) as fractions of the image (the sigmoid output of the box head).
    image_wh: [N, 2] original (width, height) in pixels of each image.
  Returns:
    [N, 4] float64 pixel xywh.
  """
  boxes = _as_boxes(boxes, "boxes")
  image_wh = np.asarray(image_wh, dtype=np.float64)
  if image_wh.shape != (len(boxes), 2):
    raise ValueError(f"image_wh: expected shape ({len(boxes)}, 2), got {image_wh.shape}")
  scale = np.concatenate([image_wh, image_wh], axis=1)  # (W, H, W, H)
  cx, cy, w, h = (boxes * scale).T
  return np.stack([cx - w / 2, cy - h / 2, w, h], axis=1)


def box_iou_xywh(a: Any, b: Any, plus_one: bool = False) -> np.ndarray:
  """Elementwise IoU of pixel boxes a[i] and b[i], [N, 4] xywh each -> [N] float64 in [0, 1].

  plus_one=False: continuous boxes [x, x + w) x [y, y + h); inter = overlap width * height.
  plus_one=True: the reference's RefCOCO `computeIoU` ("+1 pixel"): inclusive corners
    x2 = x + w - 1; inter = (x2 - x1 + 1) * (y2 - y1 + 1) over the intersection corners, counted
    only when x1 < x2 and y1 < y2 **strictly**; union = w_a * h_a + w_b * h_b - inter. Since
    (x2 - x1 + 1) equals the continuous overlap width, the two agree except when the continuous
    overlap is positive but at most one pixel wide or high: plus_one then counts no intersection.
  A zero-area union gives IoU 0 (never NaN).
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
