"""Box arithmetic for the data side (numpy / Python floats). Boxes are [x, y, w, h] in pixels.

  clip_box(box, W, H)          -> box clipped to the image (w, h may become 0)
  visible_fraction(box, ...)   -> clipped area / area
  crop_box / flip_box / scale_box  follow a crop, a horizontal flip and a resize
  box_target(box, R)           -> [cx, cy, w, h] / R, float32 [4] (the bbox-head target)
  box_patch_mask(box, R, p)    -> image_atts [1 + (R/p)^2] int32 (REFERENCE §1 "Patch mask")
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


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
  x, y, w, h = box
  return x * sx, y * sy, w * sx, h * sy


def box_target(box: Sequence[float], image_res: int) -> np.ndarray:
  """[cx, cy, w, h] normalised by the (square) image size, float32 [4]."""
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
  g = image_res // patch_size
  return np.ones((1 + g * g,), np.int32)
