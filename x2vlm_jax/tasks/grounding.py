"""Referring-expression grounding (RefCOCO / RefCOCO+ / RefCOCOg): the box of a text in its image.

Records `{"image", "text": str, "bbox": [x, y, w, h] pixels}` (the reference reads the box from
the REFER annotations by ref_id: write it into the record once).

Fine-tuning (the reference's `XVLMForGrounding`): each record is processed as a region record
with one element and no image caption (`data.examples.RegionProcessor`): a random crop that keeps
the box (or the whole image), flip ("left"/"right" rewritten in the text), resize, colour-only
RandAugment. Batch: image [B, R, R, 3] f32, text_ids / text_atts [B, L] i32, target_bbox [B, 4]
f32 (normalised cx, cy, w, h). Objective: the whole image fused with the text, the box head on the
fused [CLS] -> {bbox_l1, bbox_giou}.

Evaluator type "grounding" (REFERENCE §4.4), one split per file: the predicted box (normalised
cx, cy, w, h of the R x R input) mapped to original pixels (`boxes.cxcywh_norm_to_xywh_pixels`:
the evaluation transform is a plain resize), IoU with the ground truth (`plus_one`: the
reference's RefCOCO "+1 pixel" IoU) -> eval/<name>/<split>/acc (% with IoU >= `threshold`) and
.../miou; <name>_<split>.jsonl holds every record's predicted box [x, y, w, h] in pixels.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from x2vlm_jax import boxes, flops, losses
from x2vlm_jax.data import config as data_config
from x2vlm_jax.data import eval_data, examples, pipeline, synthetic
from x2vlm_jax.data import text as text_lib
from x2vlm_jax.evaluate import common
from x2vlm_jax.tasks import base

BadDataError = eval_data.BadDataError
BadRecordError = examples.BadRecordError


# ------------------------------------------------------------------------------ training data
class GroundingProcessor(examples.RegionProcessor):
  """`{"image", "text", "bbox"}` record -> example: image, text fields, target_bbox."""

  def process(self, where: str, rec: dict, rng: np.random.Generator) -> dict:
    text, box = rec.get(self.caption_key), rec.get("bbox")
    if not isinstance(text, str):
      raise BadRecordError(f"{self.caption_key!r} must be a string, found {text!r:.80}")
    if not isinstance(box, list) or len(box) != 4:
      raise BadRecordError(f"'bbox' must be [x, y, w, h], found {box!r:.80}")
    # One element and no image-level caption: the region path crops, flips and scales the box.
    region_rec = {k: v for k, v in rec.items() if k not in (self.caption_key, "bbox")}
    region_rec["elems"] = [{"bbox": box, "caption": text}]
    region = super().process(where, region_rec, rng)
    pair = region["pairs"][0]
    keys = ("text_ids", "text_atts", "target_bbox")
    return {"image": region["image"], **{k: pair[k] for k in keys}}


BATCH_FIELDS = dict(image=np.float32, text_ids=np.int32, text_atts=np.int32,
                    target_bbox=np.float32)


def collate(examples_, rng=None) -> dict:
  """Examples -> {image [B,R,R,3] f32, text_ids/atts [B,L] i32, target_bbox [B,4] f32}."""
  del rng
  return pipeline.stack_fields(examples_, BATCH_FIELDS)


# ------------------------------------------------------------------------------ evaluation
def load_grounding_eval(path: str, image_root: str, image_res: int, tokenizer, max_tokens: int,
                        *, max_words: int | None = None, exif_transpose: bool = True,
                        decode_workers: int = 0) -> dict:
  """`{"image", "text", "bbox"}` records -> dict(images: `EvalImages` [N] (uint8, decoded batch
  by batch, by `decode_workers` grain processes if > 0; their original (W, H) in `images.sizes`
  once decoded), text_ids / text_atts [N, L] i32, bbox_xywh [N, 4] f32 (original pixels), where
  [N]). A bad record fails naming it."""
  recs = eval_data.read_split(path, "expressions")
  paths, texts, gt = [], [], []
  for where, rec in recs:
    paths.append(eval_data.image_path(rec, where, image_root))
    text = rec.get("text")
    if not isinstance(text, str):
      raise BadDataError(f"{where}: 'text' must be a string")
    texts.append(text)
    box = rec.get("bbox")
    if not isinstance(box, list) or len(box) != 4:
      raise BadDataError(f"{where}: 'bbox' must be [x, y, w, h], got {box!r}")
    gt.append([float(v) for v in box])
  where = [w for w, _ in recs]
  eval_data.check_files_exist(paths, where)
  text_ids, text_atts = eval_data.encode_texts(
      texts, where, eval_data.as_tokenizer(tokenizer), max_tokens,
      max_tokens if max_words is None else max_words)
  images = eval_data.EvalImages(paths, where, image_res, exif_transpose=exif_transpose,
                                decode_workers=decode_workers)
  return dict(images=images, text_ids=text_ids, text_atts=text_atts,
              bbox_xywh=np.asarray(gt, np.float32).reshape(-1, 4), where=where)


def grounding_accuracy(pred_xywh: Any, gt_xywh: Any, threshold: float = 0.5,
                       plus_one: bool = False) -> float:
  """Fraction (in [0, 1]) of predictions whose IoU with their ground truth is >= threshold.

  pred_xywh, gt_xywh: [N, 4] pixel boxes, N >= 1; plus_one: the reference's RefCOCO IoU
  (`boxes.box_iou_xywh`), which reproduces its reported numbers.
  """
  iou = boxes.box_iou_xywh(pred_xywh, gt_xywh, plus_one=plus_one)
  if iou.size == 0:
    raise ValueError("grounding_accuracy: no boxes")
  return float(np.count_nonzero(iou >= threshold) / iou.size)


def make_grounding_fn(model, mesh: jax.sharding.Mesh | None = None) -> Callable[..., jax.Array]:
  """Jitted `(params, images [B, R, R, 3], ids [B, L], atts [B, L]) -> boxes [B, 4]` float32,
  normalised (cx, cy, w, h) in (0, 1) of the resized input."""
  from x2vlm_jax import sharding as sharding_lib

  out = {} if mesh is None else dict(out_shardings=sharding_lib.replicated(mesh))

  def predict(params, images, ids, atts):
    common.TRACE_COUNTS["grounding_boxes"] += 1

    def f(m, x, i, a):
      return m.predict_box_in_image(m.encode_image(x), m.encode_text(i, a), a)

    return model.apply({"params": params}, images, ids, atts, method=f).astype(jnp.float32)

  return jax.jit(predict, **out)


def evaluate_grounding(model, params, data: dict, *, batch_size: int, plus_one: bool = False,
                       threshold: float = 0.5, mesh: jax.sharding.Mesh | None = None,
                       log_fn: Callable[[str], Any] = logging.info, fn: Callable | None = None
                       ) -> tuple[dict[str, float], np.ndarray]:
  """Grounding accuracy of `model` on `data` (`load_grounding_eval`, or `images` an array
  [N, R, R, 3] with `image_size` [N, 2] the originals' (W, H)).

  Returns ({'grounding_acc': % of IoU >= threshold, 'grounding_miou': mean IoU in %},
  pred_xywh [N, 4] float64 predicted boxes in original-image pixels). `fn`: `make_grounding_fn`
  made once by the caller (default: made here).
  """
  common.check_batch_size(batch_size, mesh)
  t0 = time.monotonic()
  params = common.place_params(params, mesh)
  fn = fn or make_grounding_fn(model, mesh)
  images = data["images"]
  predicted = common.run_batched(lambda x, i, a: fn(params, x, i, a),
                                 (images, data["text_ids"], data["text_atts"]), batch_size, mesh)
  predicted = np.asarray(jax.device_get(predicted), np.float64)
  sizes = data["image_size"] if "image_size" in data else images.sizes
  pred = boxes.cxcywh_norm_to_xywh_pixels(predicted, sizes)
  iou = boxes.box_iou_xywh(pred, data["bbox_xywh"], plus_one=plus_one)
  bad = images.bad_mask() if hasattr(images, "bad_mask") else np.zeros(len(iou), bool)
  iou = np.where(bad, 0.0, iou)  # an unreadable image's expressions are misses
  metrics = {"grounding_acc": float(100.0 * np.mean(iou >= threshold)),
             "grounding_miou": float(100.0 * np.mean(iou))}
  if bad.any():
    metrics["bad_images"] = float(bad.sum())
  log_fn(f"{len(pred)} records in {time.monotonic() - t0:.1f}s, Acc@{threshold} "
         f"{metrics['grounding_acc']:.2f}, mIoU {metrics['grounding_miou']:.2f}")
  return metrics, pred


def write_predictions(path: str, records_file: str, pred_xywh: np.ndarray) -> None:
  """One JSON line per record: {"source": "file:line", "pred_bbox": [x, y, w, h] pixels}."""
  with open(path, "w") as out:
    for n, box in enumerate(pred_xywh):
      out.write(json.dumps({"source": f"{records_file}:{n + 1}",
                            "pred_bbox": [round(float(v), 2) for v in box]}) + "\n")


class GroundingEvaluator(common.Evaluator):
  """Acc@IoU and mIoU per split (module docstring)."""

  TYPE = "grounding"

  @classmethod
  def default_config(cls):
    cfg = super().default_config()
    cfg.update(dict(
        files=(),  # {"image", "text", "bbox"} records, one file per split (val, testA, ...)
        image_root="",
        plus_one=False,  # the RefCOCO "+1 pixel" IoU of the reference's evaluation
        threshold=0.5,  # IoU of a correct box
    ))
    return cfg

  def __init__(self, name, cfg, *, config, model, mesh=None):
    super().__init__(name, cfg, config=config, model=model, mesh=mesh)
    d = config.data
    tokenizer = text_lib.load_tokenizer(d.vocab_path)
    self.splits = [(path, split, load_grounding_eval(
        path, cfg.image_root, config.model.image_res, tokenizer, d.max_tokens,
        max_words=d.max_words, exif_transpose=d.exif_transpose,
        decode_workers=cfg.decode_workers))
                   for path, split in common.named_splits(cfg.files, self.field("files"))]
    self.fn = make_grounding_fn(model, mesh)

  def run(self, params, step=0, *, predictions_dir=None):
    results = {}
    for path, split, data in self.splits:
      metrics, pred = evaluate_grounding(
          self.model, params, data, batch_size=self.batch_size, plus_one=self.cfg.plus_one,
          threshold=self.cfg.threshold, mesh=self.mesh, fn=self.fn,
          log_fn=lambda line, split=split: self.log(f"{split}: {line}"))
      results[self.metric_name(split, "acc")] = metrics["grounding_acc"]
      results[self.metric_name(split, "miou")] = metrics["grounding_miou"]
      if "bad_images" in metrics:
        results[self.metric_name(split, "bad_images")] = metrics["bad_images"]
      if predictions_dir:
        os.makedirs(predictions_dir, exist_ok=True)
        write_predictions(os.path.join(predictions_dir, f"{self.name}_{split}.jsonl"), path, pred)
    return results


# ------------------------------------------------------------------------------ the task
class GroundingTask(base.Task):
  """See the module docstring."""

  name = "grounding"
  loss_terms = ("bbox_l1", "bbox_giou")
  evaluators = {GroundingEvaluator.TYPE: GroundingEvaluator}

  def config(self):
    cfg = data_config.image_section(
        caption_key="text",
        min_perc_in_image=0.5,
        random_crop=True,  # a random crop that keeps the box (reference), else the whole image
    )  # flips swap "left"/"right" in the text (data.swap_left_right_on_flip); RandAugment is
    del cfg["crop_scale_min"]  # colour-only, as for regions
    return cfg

  def processor(self, config, tokenizer):
    encoder = text_lib.TextEncoder.from_config(config.data, tokenizer)
    return GroundingProcessor(config.data, self.section(config), config.model.image_res,
                              config.model.patch_size, encoder)

  def collate(self, config):
    return collate

  def loss(self, m, batch, rng, *, deterministic, config):
    del rng  # no sampling
    image_embeds = m.encode_image(batch["image"], deterministic)
    text_embeds = m.encode_text(batch["text_ids"], batch["text_atts"], deterministic)
    box = m.predict_box_in_image(image_embeds, text_embeds, batch["text_atts"], deterministic)
    l1, giou = losses.box_losses(box, batch["target_bbox"])
    return {"bbox_l1": l1, "bbox_giou": giou}

  def forward_flops(self, config):
    b = self.section(config).batch_size
    sizes = flops.BatchSizes(images=b, texts=b, text_len=config.data.max_tokens, masks=0)
    return {"vit": flops.vit_flops(config.model, b),
            "text_encoder": flops.text_encoder_flops(config.model, b, config.data.max_tokens),
            **flops.box_flops(config.model, sizes)}

  def synthetic_batch(self, config, rng):
    b, res = self.section(config).batch_size, config.model.image_res
    examples_ = [dict(image=image, text_ids=text["text_ids"], text_atts=text["text_atts"],
                      target_bbox=boxes.box_target(synthetic.random_box(rng, res), res))
                 for image, text in zip(synthetic.synthetic_images(config, b, rng),
                                        synthetic.synthetic_texts(config, b, rng))]
    batch = collate(examples_)
    batch["num_bad_records"] = np.asarray(0, np.int32)
    batch["num_records"] = np.asarray(b, np.int32)
    return batch


TASK = GroundingTask()
