"""The objective pieces several tasks share; each task's own objective lives in its module
(x2vlm_jax/tasks/<task>.py, `Task.loss`).

Objectives are functions of the bound model (pass them as `method=` to `model.apply`), so one
`apply` runs the whole forward:

    losses = model.apply(variables, batch, rng, method=task_loss, rngs={"dropout": dropout_rng})

  aligning_losses   ITC + ITM with hard negatives + MLM (+ boxes), for any vision rows: images
                    (image_text, retrieval), regions, videos
  fuse_text_with    text layers, then the fusion layers on a vision row
  scale_gradient    the reference's 1/world-size ITC gradient, as an option
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
                    with_mlm: bool = True, box_vision_embeds=None):
  """ITC + ITM (hard negatives) + MLM for vision embeds [B, 1+N, D] (mask [B, 1+N]) and texts.

  With `box_vision_embeds` [B, 1+N, D] (each text's whole image) the box of each text is predicted
  in it too: + 'bbox_l1' / 'bbox_giou' against `target_bbox` [B, 4] (rows with `is_image` set do
  not count).

  The fusion layers run once for the texts fused with their own vision row (ITM positives, ITM
  negative texts, MLM's masked texts: G texts per vision row, whose keys/values `m.fuse` computes
  once) and once for the texts fused with another vision row (ITM negative images, box rows).
  Returns the losses dict.
  """
  text_ids, text_atts = batch["text_ids"], batch["text_atts"]
  batch_size = text_ids.shape[0]
  text_embeds = m.encode_text(text_ids, text_atts, deterministic)
  image_feat = m.image_features(vision_embeds)
  text_feat = m.text_features(text_embeds)
  temp = m.clamped_temp()
  out = {"itc": losses.itc_loss(scale_gradient(image_feat, itc_feature_grad_scale),
                                scale_gradient(text_feat, itc_feature_grad_scale), temp, idx)}

  own = {}  # name -> (text [B, L, H], atts [B, L]) fused with vision_embeds[b]
  other = {}  # name -> (vision [B, 1+N, D], vision atts, text, text atts)
  if with_itm:
    neg_image_idx, neg_text_idx = losses.sample_hard_negatives(rng, image_feat, text_feat, temp, idx)
    own["itm_pos"] = (text_embeds, text_atts)
    own["itm_neg_text"] = (text_embeds[neg_text_idx], text_atts[neg_text_idx])
    other["itm_neg_image"] = (vision_embeds[neg_image_idx], vision_atts[neg_image_idx],
                              text_embeds, text_atts)
  if with_mlm:
    own["mlm"] = (m.encode_text(batch["text_ids_masked"], text_atts, deterministic), text_atts)
  if box_vision_embeds is not None:
    other["box"] = (box_vision_embeds, jnp.ones(box_vision_embeds.shape[:2], jnp.int32),
                    text_embeds, text_atts)

  cross = {}
  if own:  # rows b*G + g: the g-th of the G texts fused with vision row b
    texts = jnp.stack([t for t, _ in own.values()], axis=1)
    atts = jnp.stack([a for _, a in own.values()], axis=1)
    fused = m.fuse(vision_embeds, vision_atts, texts.reshape((-1,) + texts.shape[2:]),
                   atts.reshape((-1,) + atts.shape[2:]), deterministic)
    fused = fused.reshape(texts.shape[:2] + fused.shape[1:])
    cross.update({name: fused[:, g] for g, name in enumerate(own)})
  if other:
    parts = list(zip(*other.values()))
    fused = m.fuse(*(jnp.concatenate(p) for p in parts), deterministic)
    cross.update({name: fused[g * batch_size:(g + 1) * batch_size]
                  for g, name in enumerate(other)})

  if with_itm:
    negatives = jnp.concatenate([cross["itm_neg_image"], cross["itm_neg_text"]])
    out["itm"] = losses.itm_loss(m.itm_logits(cross["itm_pos"]), m.itm_logits(negatives))
  if with_mlm:
    mlm_logits = m.masked_token_logits(cross["mlm"], batch["masked_pos"])
    out["mlm"] = losses.mlm_loss(mlm_logits, batch["masked_ids"])
  if box_vision_embeds is not None:
    out["bbox_l1"], out["bbox_giou"] = losses.box_losses(
        m.predict_box(cross["box"]), batch["target_bbox"], batch["is_image"])
  return out


def fuse_text_with(m, vision_embeds, text_ids, text_atts, deterministic: bool = True):
  """Texts `text_ids/atts [B, L]` through the text layers, then fused with every token of their
  vision row `vision_embeds [B, 1+N, D]` -> fused states [B, L, H] (what the task heads and the
  answer decoder read)."""
  vision_atts = jnp.ones(vision_embeds.shape[:2], jnp.int32)
  text_embeds = m.encode_text(text_ids, text_atts, deterministic)
  return m.fuse(vision_embeds, vision_atts, text_embeds, text_atts, deterministic)
