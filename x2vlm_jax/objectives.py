"""Training objectives: the forward passes that turn a batch into the X2-VLM losses.

Each objective is a function of the bound model (pass it as `method=` to `model.apply`), so one
`apply` runs the whole forward:

    losses = model.apply(variables, batch, itm_rng, method=image_text_objective,
                         rngs={"dropout": dropout_rng}, deterministic=False)

Batches (see x2vlm_jax/data): image-text `image [B,H,W,3], text_ids/text_atts/text_ids_masked [B,L],
masked_pos/masked_ids [B,M]`; region batches add `idx_to_group_img [R], image_atts [R,1+N],
target_bbox [R,4], is_image [R], pair_id [R]` with `image [N_img,H,W,3]`. Fine-tuning batches:
retrieval = an image-text batch with `image_idx [B]`; grounding = `image [B,H,W,3], text_ids/atts
[B,L], target_bbox [B,4]`; vqa = `image, text_ids/atts (question), answer_targets [B,A]`;
nlvr = `image0, image1 [B,H,W,3], text_ids/atts, label [B]`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from x2vlm_jax import losses


def scale_gradient(x: jax.Array, scale: float) -> jax.Array:
  """Identity forward; gradient multiplied by `scale` in the backward pass."""
  if scale == 1.0:
    return x
  return scale * x + (1.0 - scale) * jax.lax.stop_gradient(x)


def aligning_losses(m, vision_embeds, vision_atts, batch, rng, *, deterministic: bool,
                    idx=None, itc_feature_grad_scale: float = 1.0, with_itm: bool = True,
                    with_mlm: bool = True):
  """ITC + ITM (hard negatives) + MLM for vision embeds [B, 1+N, D] (mask [B, 1+N]) and texts.

  Returns (losses dict, text_embeds [B, L, H]).
  """
  text_ids, text_atts = batch["text_ids"], batch["text_atts"]
  text_embeds = m.encode_text(text_ids, text_atts, deterministic)
  image_feat = m.image_features(vision_embeds)
  text_feat = m.text_features(text_embeds)
  temp = m.clamped_temp()
  out = {"itc": losses.itc_loss(scale_gradient(image_feat, itc_feature_grad_scale),
                                scale_gradient(text_feat, itc_feature_grad_scale), temp, idx)}

  if with_itm:
    neg_image_idx, neg_text_idx = losses.sample_hard_negatives(rng, image_feat, text_feat, temp, idx)
    # Rows: positives (text_b, image_b); (text_b, negative image); (negative text, image_b).
    vision_all = jnp.concatenate([vision_embeds, vision_embeds[neg_image_idx], vision_embeds])
    vision_atts_all = jnp.concatenate([vision_atts, vision_atts[neg_image_idx], vision_atts])
    text_all = jnp.concatenate([text_embeds, text_embeds, text_embeds[neg_text_idx]])
    text_atts_all = jnp.concatenate([text_atts, text_atts, text_atts[neg_text_idx]])
    cross = m.fuse(vision_all, vision_atts_all, text_all, text_atts_all, deterministic)
    logits = m.itm_logits(cross)
    batch_size = text_ids.shape[0]
    out["itm"] = losses.itm_loss(logits[:batch_size], logits[batch_size:])

  if with_mlm:
    mlm_logits = m.mlm_logits(batch["text_ids_masked"], text_atts, vision_embeds, vision_atts,
                              batch["masked_pos"], deterministic)
    out["mlm"] = losses.mlm_loss(mlm_logits, batch["masked_ids"])
  return out, text_embeds


def image_text_objective(m, batch, rng, deterministic: bool = True,
                         itc_feature_grad_scale: float = 1.0, with_itm: bool = True):
  """Image-text batch -> {'itc', 'itm', 'mlm'}."""
  image_embeds = m.encode_image(batch["image"], deterministic)
  image_atts = jnp.ones(image_embeds.shape[:2], jnp.int32)
  out, _ = aligning_losses(m, image_embeds, image_atts, batch, rng, deterministic=deterministic,
                           itc_feature_grad_scale=itc_feature_grad_scale, with_itm=with_itm)
  return out


def region_objective(m, batch, rng, deterministic: bool = True,
                     itc_feature_grad_scale: float = 1.0, with_itm: bool = True,
                     dedupe_padded_pairs: bool = True):
  """Region batch -> {'itc', 'itm', 'mlm', 'bbox_l1', 'bbox_giou'}.

  `dedupe_padded_pairs`: pairs repeated to pad the batch share `pair_id` and are not used as each
  other's negatives (the reference treats them as negatives).
  """
  region_embeds, full_embeds = m.encode_regions(batch["image"], batch["image_atts"],
                                                batch["idx_to_group_img"], deterministic)
  idx = batch["pair_id"] if dedupe_padded_pairs else None
  out, text_embeds = aligning_losses(m, region_embeds, batch["image_atts"], batch, rng,
                                     deterministic=deterministic, idx=idx,
                                     itc_feature_grad_scale=itc_feature_grad_scale,
                                     with_itm=with_itm)
  box = m.predict_box_in_image(full_embeds, text_embeds, batch["text_atts"], deterministic)
  out["bbox_l1"], out["bbox_giou"] = losses.box_losses(box, batch["target_bbox"],
                                                       batch["is_image"])
  return out


def retrieval_objective(m, batch, rng, deterministic: bool = True,
                        itc_feature_grad_scale: float = 1.0, with_itm: bool = True):
  """Retrieval fine-tuning batch -> {'itc', 'itm'} (reference `XVLMForRetrieval`).

  Captions of the same image (equal `image_idx`) share the ITC target mass and are never
  sampled as each other's ITM negatives. No MLM.
  """
  image_embeds = m.encode_image(batch["image"], deterministic)
  image_atts = jnp.ones(image_embeds.shape[:2], jnp.int32)
  out, _ = aligning_losses(m, image_embeds, image_atts, batch, rng, deterministic=deterministic,
                           idx=batch["image_idx"], itc_feature_grad_scale=itc_feature_grad_scale,
                           with_itm=with_itm, with_mlm=False)
  return out


def grounding_objective(m, batch, rng, deterministic: bool = True):
  """Grounding fine-tuning batch -> {'bbox_l1', 'bbox_giou'} (reference `XVLMForGrounding`):
  the whole image, the text encoder and the fusion layers, bbox head on the fused [CLS]."""
  del rng  # no sampling
  image_embeds = m.encode_image(batch["image"], deterministic)
  text_embeds = m.encode_text(batch["text_ids"], batch["text_atts"], deterministic)
  box = m.predict_box_in_image(image_embeds, text_embeds, batch["text_atts"], deterministic)
  l1, giou = losses.box_losses(box, batch["target_bbox"])
  return {"bbox_l1": l1, "bbox_giou": giou}


def vqa_logits(m, batch, deterministic: bool = True) -> jax.Array:
  """VQA-as-classification forward: `image [B, H, W, 3]`, question `text_ids/atts [B, L]` ->
  answer logits [B, A] from the fused [CLS]."""
  image_embeds = m.encode_image(batch["image"], deterministic)
  image_atts = jnp.ones(image_embeds.shape[:2], jnp.int32)
  text_embeds = m.encode_text(batch["text_ids"], batch["text_atts"], deterministic)
  cross = m.fuse(image_embeds, image_atts, text_embeds, batch["text_atts"], deterministic)
  return m.vqa_logits(cross)


def vqa_classification_objective(m, batch, rng, deterministic: bool = True):
  """VQA as classification (the reference's `XVLMForVQAClassification`): batch as `vqa_logits`
  + answer scores `answer_targets [B, A]` -> {'vqa'} (soft BCE)."""
  del rng
  return {"vqa": losses.soft_bce_loss(vqa_logits(m, batch, deterministic),
                                      batch["answer_targets"])}


def nlvr_logits(m, batch, deterministic: bool = True) -> jax.Array:
  """NLVR2 forward: `image0, image1 [B, H, W, 3]`, sentence `text_ids/atts [B, L]` -> [B, 2].
  Both images go through the ViT in one batch; the sentence is fused with each."""
  batch_size = batch["image0"].shape[0]
  images = jnp.concatenate([batch["image0"], batch["image1"]])
  image_embeds = m.encode_image(images, deterministic)
  image_atts = jnp.ones(image_embeds.shape[:2], jnp.int32)
  text_embeds = m.encode_text(batch["text_ids"], batch["text_atts"], deterministic)
  text_both = jnp.concatenate([text_embeds, text_embeds])
  atts_both = jnp.concatenate([batch["text_atts"], batch["text_atts"]])
  cross = m.fuse(image_embeds, image_atts, text_both, atts_both, deterministic)
  return m.nlvr_logits(cross[:batch_size], cross[batch_size:])


def nlvr_objective(m, batch, rng, deterministic: bool = True):
  """NLVR2 (the reference's `XVLMForNLVR`): batch as `nlvr_logits` + `label [B]` -> {'nlvr'}."""
  del rng
  return {"nlvr": losses.classification_loss(nlvr_logits(m, batch, deterministic),
                                             batch["label"])}
