"""Box math. Normalised boxes are (cx, cy, w, h) in [0, 1]; xyxy = (x0, y0, x1, y1)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


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
  """[N, 4] -> [N] True where x1 >= x0 and y1 >= y0 (and positive area)."""
  return (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
