"""Model-driven referring-expression grounding evaluation (box regression, REFERENCE §4.4).

For each record: whole-image ViT embeddings (all-ones mask) are fused with the text encoder's
output for the expression; the box head on the fused [CLS] gives normalised (cx, cy, w, h) of the
R x R input, which (the eval transform being a plain resize) maps to original pixels by
multiplying with the original (W, H): x = (cx - w/2) W, y = (cy - h/2) H, w W, h H. Acc@0.5 =
percentage of records whose IoU with the ground-truth box is >= 0.5.

Usage:
  data = eval_data.load_grounding_eval(jsonl, image_root, image_res, tokenizer, max_tokens)
  metrics, pred_xywh = evaluate_grounding(model, params, data, batch_size=64)

Records are processed in fixed-size batches (last one padded, padding dropped), so the jitted
function compiles once; an image shared by several records is simply encoded once per record.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from x2vlm_jax import sharding as sharding_lib
from x2vlm_jax.evaluate import grounding_metrics
from x2vlm_jax.evaluate import retrieval as retrieval_lib

TRACE_COUNTS = retrieval_lib.TRACE_COUNTS  # shared trace counters (key "grounding_boxes")


def make_grounding_fn(model, mesh: jax.sharding.Mesh | None = None) -> Callable[..., jax.Array]:
  """Jitted `(params, images [B, R, R, 3], ids [B, L], atts [B, L]) -> boxes [B, 4]` float32,
  normalised (cx, cy, w, h) in (0, 1) of the resized input."""
  out = {} if mesh is None else dict(out_shardings=sharding_lib.replicated(mesh))

  def boxes(params, images, ids, atts):
    TRACE_COUNTS["grounding_boxes"] += 1

    def f(m, x, i, a):
      return m.predict_box_in_image(m.encode_image(x), m.encode_text(i, a), a)

    return model.apply({"params": params}, images, ids, atts, method=f).astype(jnp.float32)

  return jax.jit(boxes, **out)


def evaluate_grounding(model, params, data: dict, *, batch_size: int, plus_one: bool = False,
                       threshold: float = 0.5, mesh: jax.sharding.Mesh | None = None,
                       log_fn: Callable[[str], Any] = logging.info
                       ) -> tuple[dict[str, float], np.ndarray]:
  """Grounding accuracy of `model` on `data`.

  Args:
    model: `X2VLM` (deterministic apply). params: its params (unboxed; host or device).
    data: `eval_data.load_grounding_eval` output: images [N, R, R, 3] f32, text_ids [N, L],
      text_atts [N, L], bbox_xywh [N, 4] original pixels, image_size [N, 2] original (W, H).
    batch_size: records per call (divisible by the mesh's batch shards when `mesh` is given).
    plus_one: IoU with the reference's RefCOCO "+1 pixel" convention (`grounding_metrics`).
    threshold: IoU threshold of the accuracy.
    mesh: optional device mesh; batches are split over ('data', 'fsdp').
    log_fn: receives a summary line.

  Returns:
    ({'grounding_acc': % of IoU >= threshold, 'grounding_miou': mean IoU in %},
     pred_xywh [N, 4] float64 predicted boxes in original-image pixels).
  """
  retrieval_lib._check_batch_size(batch_size, mesh)  # pylint: disable=protected-access
  t0 = time.monotonic()
  params = retrieval_lib._place_params(params, mesh)  # pylint: disable=protected-access
  fn = make_grounding_fn(model, mesh)
  boxes = retrieval_lib._run_batched(  # pylint: disable=protected-access
      lambda x, i, a: fn(params, x, i, a),
      (data["images"], data["text_ids"], data["text_atts"]), batch_size, mesh)
  boxes = np.asarray(jax.device_get(boxes), np.float64)
  pred = grounding_metrics.cxcywh_norm_to_xywh_pixels(boxes, data["image_size"])
  iou = grounding_metrics.box_iou_xywh(pred, data["bbox_xywh"], plus_one=plus_one)
  metrics = {"grounding_acc": float(100.0 * np.mean(iou >= threshold)),
             "grounding_miou": float(100.0 * np.mean(iou))}
  log_fn(f"grounding: {len(pred)} records in {time.monotonic() - t0:.1f}s, "
         f"Acc@{threshold} {metrics['grounding_acc']:.2f}, mIoU {metrics['grounding_miou']:.2f}")
  return metrics, pred
