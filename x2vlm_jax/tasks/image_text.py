"""Image-text pre-training: ITC + ITM with hard negatives + MLM on whole images (REFERENCE §2).

Records `{"image": path | "image_b64"/"binary": base64, "caption": str | [str, ...]}` (one
caption drawn per visit; optional "image_id"), JSONL / JSON list / ArrayRecord / tfds:name:split.
Example and batch: `data.examples.ImageTextProcessor`, `data.pipeline.collate_image_text`:
image [B, R, R, 3] f32, text_ids / text_atts / text_ids_masked [B, L] i32, masked_pos /
masked_ids [B, M] i32, image_idx [B] i32. Transform: RandomResizedCrop(scale=(crop_scale_min, 1))
-> flip (captions' "left"/"right" swapped) -> RandAugment with colour and geometric ops.
Objective: `objectives.aligning_losses` on the whole-image embeddings -> {itc, itm, mlm}.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from x2vlm_jax import flops, objectives
from x2vlm_jax.data import config as data_config
from x2vlm_jax.data import examples, pipeline, synthetic
from x2vlm_jax.data import text as text_lib
from x2vlm_jax.tasks import base


def image_text_section(**fields):
  """The section of a task that reads image-caption records (this task, retrieval)."""
  return data_config.image_section(**dict(dict(
      # Pairs with the same image_id are the same image (retrieval fine-tuning: positives of each
      # other, never ITM negatives); without the field the image path is the id.
      image_id_key="image_id",
  ), **fields))


def image_text_loss(m, batch, rng, *, deterministic: bool, config, with_mlm: bool = True):
  """ITC + ITM (+ MLM) of an image-text batch; with `with_mlm=False` captions of the same image
  (equal `image_idx`) share the ITC target mass and are never each other's ITM negatives."""
  image_embeds = m.encode_image(batch["image"], deterministic)
  image_atts = jnp.ones(image_embeds.shape[:2], jnp.int32)
  return objectives.aligning_losses(
      m, image_embeds, image_atts, batch, rng, deterministic=deterministic,
      idx=None if with_mlm else batch["image_idx"],
      itc_feature_grad_scale=config.train.itc_feature_grad_scale, with_mlm=with_mlm)


def image_text_batch(config, batch_size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
  """A synthetic image-text batch (distinct images: random 31-bit image_idx)."""
  ids = rng.choice(2**31 - 1, size=batch_size, replace=False)
  texts = synthetic.synthetic_texts(config, batch_size, rng)
  examples_ = [dict(image=im, image_idx=np.int32(i), **tx) for im, i, tx in zip(
      synthetic.synthetic_images(config, batch_size, rng), ids, texts)]
  batch = pipeline.collate_image_text(examples_)
  batch["num_bad_records"] = np.asarray(0, np.int32)
  batch["num_records"] = np.asarray(batch_size, np.int32)
  return batch


class ImageTextTask(base.Task):
  """See the module docstring."""

  name = "image_text"
  loss_terms = ("itc", "itm", "mlm")

  def config(self):
    return image_text_section(crop_scale_min=0.2)  # the reference's pre-training crop

  def processor(self, config, tokenizer):
    encoder = text_lib.TextEncoder.from_config(config.data, tokenizer)
    return examples.ImageTextProcessor(config.data, self.section(config), config.model.image_res,
                                       config.model.patch_size, encoder)

  def collate(self, config):
    return pipeline.collate_image_text

  def loss(self, m, batch, rng, *, deterministic, config):
    return image_text_loss(m, batch, rng, deterministic=deterministic, config=config)

  def forward_flops(self, config):
    b = self.section(config).batch_size
    sizes = flops.BatchSizes(images=b, texts=b, text_len=config.data.max_tokens,
                             masks=config.data.max_masks)
    return {"vit": flops.vit_flops(config.model, b), **flops.aligning_flops(config.model, sizes)}

  def synthetic_batch(self, config, rng):
    return image_text_batch(config, self.section(config).batch_size, rng)


TASK = ImageTextTask()
