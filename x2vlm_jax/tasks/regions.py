"""Region pre-training: the aligning losses on boxed regions, and the box of each region text
regressed in its whole image (L1 + GIoU) (REFERENCE §2.3-2.5).

Records `{"image": ..., "caption": optional image-level str | [str], "elems": [{"bbox" | "bb":
[x, y, w, h] pixels, "caption": str | [str], "attributes": optional str | [str]}, ...]}`.
Examples: `data.examples.RegionProcessor` (one image and up to `max_regions` region-text pairs).
Batch (`data.pipeline.RegionCollate`): `max_images` images and `batch_size` region-text pairs,
sampled from the images' pairs (padded by repeating pairs, which share `pair_id`):
image [N, R, R, 3], idx_to_group_img [Rb], image_atts [Rb, 1+P], text fields [Rb, ...],
target_bbox [Rb, 4], is_image [Rb], pair_id [Rb].
Objective: regions pooled from the patches inside their box (`X2VLM.encode_regions`), then
{itc, itm, mlm} against the region texts and {bbox_l1, bbox_giou} of each text in its whole image
(whole-image caption rows, `is_image`, get no box loss).
"""
from __future__ import annotations

import numpy as np

from x2vlm_jax import boxes, flops, objectives
from x2vlm_jax.data import config as data_config
from x2vlm_jax.data import examples, pipeline, synthetic
from x2vlm_jax.data import text as text_lib
from x2vlm_jax.tasks import base

PAIR_ID_STRIDE = 1 << 20  # pair ids of process p are offset by p * this (one batch: < 2**20 pairs)


class RegionsTask(base.Task):
  """See the module docstring."""

  name = "regions"
  loss_terms = ("itc", "itm", "mlm", "bbox_l1", "bbox_giou")

  def config(self):
    cfg = data_config.image_section(
        max_images=4,  # N_img: images per batch (static).
        batch_size=8,  # Rb: region-text pairs per batch (static).
        max_regions=5,  # pairs per image, including the whole-image caption pair.
        min_perc_in_image=0.5,  # keep a region if clipped_area / area > this.
        # Random crop containing a chosen box (reference). False: the whole image, so boxes keep
        # the scale they have at evaluation (small synthetic scenes).
        random_crop=True,
        # The reference treats repeated (padding) pairs of a batch as each other's negatives.
        dedupe_padded_pairs=True,
    )
    del cfg["crop_scale_min"]  # the crop is the box-keeping one
    return cfg  # RandAugment here is colour-only (boxes must stay where they are)

  def processor(self, config, tokenizer):
    encoder = text_lib.TextEncoder.from_config(config.data, tokenizer)
    return examples.RegionProcessor(config.data, self.section(config), config.model.image_res,
                                    config.model.patch_size, encoder)

  def collate(self, config):
    return pipeline.RegionCollate(self.section(config).batch_size)

  def examples_per_batch(self, config):
    return int(self.section(config).max_images)  # images; their pairs are sampled to batch_size

  def to_global(self, batch, process_index):
    """`idx_to_group_img [Rb]` (into this process's `image [N, ...]`) offset by
    `process_index * N`, and `pair_id [Rb]` by `process_index * PAIR_ID_STRIDE` (equal ids mean
    "the same pair", which must never match a pair of another process)."""
    if process_index == 0:
      return batch
    if int(np.max(batch["pair_id"], initial=0)) >= PAIR_ID_STRIDE:
      raise ValueError(f"pair_id {int(np.max(batch['pair_id']))} >= {PAIR_ID_STRIDE}")
    out = dict(batch)
    out["idx_to_group_img"] = batch["idx_to_group_img"] + process_index * batch["image"].shape[0]
    out["pair_id"] = batch["pair_id"] + process_index * PAIR_ID_STRIDE
    return out

  def loss(self, m, batch, rng, *, deterministic, config):
    region_embeds, full_embeds = m.encode_regions(batch["image"], batch["image_atts"],
                                                  batch["idx_to_group_img"], deterministic)
    idx = batch["pair_id"] if self.section(config).dedupe_padded_pairs else None
    return objectives.aligning_losses(
        m, region_embeds, batch["image_atts"], batch, rng, deterministic=deterministic, idx=idx,
        itc_feature_grad_scale=config.train.itc_feature_grad_scale, box_vision_embeds=full_embeds)

  def forward_flops(self, config):
    sec = self.section(config)
    sizes = flops.BatchSizes(images=sec.max_images, texts=sec.batch_size,
                             text_len=config.data.max_tokens, masks=config.data.max_masks)
    return {"vit": flops.vit_flops(config.model, sec.max_images),
            **flops.aligning_flops(config.model, sizes), **flops.box_flops(config.model, sizes)}

  def synthetic_batch(self, config, rng):
    """`max_images` images, each with its whole-image pair and up to `max_regions - 1` boxed
    ones, sampled to `batch_size` pairs by the pipeline's own `RegionCollate`."""
    sec, res, patch = self.section(config), config.model.image_res, config.model.patch_size
    per_image = max(int(sec.max_regions), 1)
    examples_ = []
    for key, image in enumerate(synthetic.synthetic_images(config, sec.max_images, rng)):
      texts = synthetic.synthetic_texts(config, int(rng.integers(1, per_image + 1)), rng)
      pairs = [dict(texts[0], image_atts=boxes.full_patch_mask(res, patch),
                    target_bbox=np.array([0.5, 0.5, 1.0, 1.0], np.float32),
                    is_image=np.float32(1.0))]
      for text in texts[1:]:
        box = synthetic.random_box(rng, res)
        pairs.append(dict(text, image_atts=boxes.box_patch_mask(box, res, patch),
                          target_bbox=boxes.box_target(box, res), is_image=np.float32(0.0)))
      examples_.append(dict(image=image, pairs=pairs, key=key))
    batch = pipeline.RegionCollate(sec.batch_size)(examples_, rng)
    batch["num_bad_records"] = np.asarray(0, np.int32)
    batch["num_records"] = np.asarray(sec.max_images, np.int32)
    return batch


TASK = RegionsTask()
