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
vqa_generative = `image, text_ids/atts, answer_ids/answer_atts [B,K,La], answer_weights [B,K]`;
nlvr = `image0, image1 [B,H,W,3], text_ids/atts, label [B]`. Video batches carry
`frames [B,F,H,W,3]` instead of `image`: video_text / video_retrieval = the image-text fields +
`video_idx [B]`; video_qa = `frames, text_ids/atts (question), answer_label [B]` (-100 = ignored).
captioning = `image, text_ids/position_ids [B,L], text_atts [B,L,L], masked_pos/ids/weight [B,M]`.
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


def image_text_objective(m, batch, rng, deterministic: bool = True,
                         itc_feature_grad_scale: float = 1.0, with_itm: bool = True):
  """Image-text batch -> {'itc', 'itm', 'mlm'}."""
  image_embeds = m.encode_image(batch["image"], deterministic)
  image_atts = jnp.ones(image_embeds.shape[:2], jnp.int32)
  return aligning_losses(m, image_embeds, image_atts, batch, rng, deterministic=deterministic,
                         itc_feature_grad_scale=itc_feature_grad_scale, with_itm=with_itm)


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
  return aligning_losses(m, region_embeds, batch["image_atts"], batch, rng,
                         deterministic=deterministic, idx=idx,
                         itc_feature_grad_scale=itc_feature_grad_scale, with_itm=with_itm,
                         box_vision_embeds=full_embeds)


def retrieval_objective(m, batch, rng, deterministic: bool = True,
                        itc_feature_grad_scale: float = 1.0, with_itm: bool = True):
  """Retrieval fine-tuning batch -> {'itc', 'itm'} (reference `XVLMForRetrieval`).

  Captions of the same image (equal `image_idx`) share the ITC target mass and are never
  sampled as each other's ITM negatives. No MLM.
  """
  image_embeds = m.encode_image(batch["image"], deterministic)
  image_atts = jnp.ones(image_embeds.shape[:2], jnp.int32)
  return aligning_losses(m, image_embeds, image_atts, batch, rng, deterministic=deterministic,
                         idx=batch["image_idx"], itc_feature_grad_scale=itc_feature_grad_scale,
                         with_itm=with_itm, with_mlm=False)


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


def question_states(m, batch, deterministic: bool = True) -> jax.Array:
  """The question fused with its image, `image [B, H, W, 3]`, `text_ids/atts [B, L]` ->
  [B, L, H]: what the answer decoder attends to (the reference runs all 18 layers on the question
  with the image)."""
  image_embeds = m.encode_image(batch["image"], deterministic)
  image_atts = jnp.ones(image_embeds.shape[:2], jnp.int32)
  text_embeds = m.encode_text(batch["text_ids"], batch["text_atts"], deterministic)
  return m.fuse(image_embeds, image_atts, text_embeds, batch["text_atts"], deterministic)


def vqa_generative_objective(m, batch, rng, deterministic: bool = True):
  """Generative VQA (the reference's `XVLMForVQA`): question as `question_states`, every answer
  `answer_ids/atts [B, K, La]` decoded against its question, weighted by `answer_weights [B, K]`
  -> {'vqa_answer'} = sum(weight * answer NLL) / B."""
  del rng
  states = question_states(m, batch, deterministic)
  batch_size, num_answers, answer_len = batch["answer_ids"].shape
  # Rows b*K + k: the K answers of question b share its keys/values in cross-attention.
  ids = batch["answer_ids"].reshape(batch_size * num_answers, answer_len)
  atts = batch["answer_atts"].reshape(batch_size * num_answers, answer_len)
  logits = m.answer_logits(ids, atts, states, batch["text_atts"], deterministic)
  nll = losses.sequence_nll(logits, ids, atts).reshape(batch_size, num_answers)
  return {"vqa_answer": losses.weighted_answer_loss(nll, batch["answer_weights"])}


def rank_answers(m, batch, answer_ids: jax.Array, answer_atts: jax.Array, k: int):
  """Generative VQA inference (reference `rank_answer`): rank a fixed answer list.

  1. The decoder reads `[CLS]` alone: probability of each candidate's first token -> the k best.
  2. Those k answers are decoded teacher-forced: score = log p(first token) - NLL(answer).
     The NLL counts the first token again, as the reference does.
  Args:
    batch: `image [B, H, W, 3]`, question `text_ids/atts [B, L]`.
    answer_ids, answer_atts: the tokenized answer list [A, La] (`[CLS] answer [SEP]`).
    k: candidates re-scored per question (k_test; clipped to A).
  Returns:
    (candidates [B, k] answer indices best first, probs [B, k] softmax of the scores).
  """
  states = question_states(m, batch, True)
  question_atts = batch["text_atts"]
  batch_size = states.shape[0]
  num_answers, answer_len = answer_ids.shape
  k = min(k, num_answers)
  start = jnp.broadcast_to(answer_ids[:1, :1], (batch_size, 1))
  first_logits = m.answer_logits(start, jnp.ones_like(start), states, question_atts, True)[:, 0]
  first_log_probs = jax.nn.log_softmax(first_logits, axis=-1)  # [B, V]
  candidate_log_probs = jnp.take(first_log_probs, answer_ids[:, 1], axis=1)  # [B, A]
  top_log_probs, top_idx = jax.lax.top_k(candidate_log_probs, k)  # [B, k]
  ids = jnp.take(answer_ids, top_idx.reshape(-1), axis=0)  # [B * k, La], rows b*k + j
  atts = jnp.take(answer_atts, top_idx.reshape(-1), axis=0)
  logits = m.answer_logits(ids, atts, states, question_atts, True)  # k answers per question
  nll = losses.sequence_nll(logits, ids, atts).reshape(batch_size, k)
  probs = jax.nn.softmax(top_log_probs - nll, axis=-1)
  order = jnp.argsort(-probs, axis=-1, stable=True)
  return (jnp.take_along_axis(top_idx, order, axis=-1),
          jnp.take_along_axis(probs, order, axis=-1))


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


def video_text_objective(m, batch, rng, deterministic: bool = True,
                         itc_feature_grad_scale: float = 1.0, with_itm: bool = True):
  """Video-text batch (pre-training, REFERENCE_DETAILED §2.6): `frames [B, F, H, W, 3]` + the
  image-text text fields -> {'itc', 'itm', 'mlm'}, exactly as for images with `m.encode_video`."""
  video_embeds = m.encode_video(batch["frames"], deterministic)
  video_atts = jnp.ones(video_embeds.shape[:2], jnp.int32)
  return aligning_losses(m, video_embeds, video_atts, batch, rng, deterministic=deterministic,
                         itc_feature_grad_scale=itc_feature_grad_scale, with_itm=with_itm)


def video_retrieval_objective(m, batch, rng, deterministic: bool = True,
                              itc_feature_grad_scale: float = 1.0, with_itm: bool = True):
  """Video retrieval fine-tuning (MSR-VTT; the reference's `Retrieval.py` with `is_video`): a
  video-text batch -> {'itc', 'itm'}; captions of the same video (equal `video_idx`) are
  positives of each other, never ITM negatives. No MLM."""
  video_embeds = m.encode_video(batch["frames"], deterministic)
  video_atts = jnp.ones(video_embeds.shape[:2], jnp.int32)
  return aligning_losses(m, video_embeds, video_atts, batch, rng, deterministic=deterministic,
                         idx=batch["video_idx"], itc_feature_grad_scale=itc_feature_grad_scale,
                         with_itm=with_itm, with_mlm=False)


def video_qa_logits(m, batch, deterministic: bool = True) -> jax.Array:
  """Video QA as classification (the reference's `XVLMForClassification` on MSRVTT-QA / MSVD-QA):
  `frames [B, F, H, W, 3]`, question `text_ids/atts [B, L]` -> answer logits [B, A] from the
  fused [CLS] through the VQA classification head (`model.vqa_num_answers`)."""
  video_embeds = m.encode_video(batch["frames"], deterministic)
  video_atts = jnp.ones(video_embeds.shape[:2], jnp.int32)
  text_embeds = m.encode_text(batch["text_ids"], batch["text_atts"], deterministic)
  cross = m.fuse(video_embeds, video_atts, text_embeds, batch["text_atts"], deterministic)
  return m.vqa_logits(cross)


def video_qa_objective(m, batch, rng, deterministic: bool = True):
  """Video QA: batch as `video_qa_logits` + `answer_label [B]` -> {'video_qa'}: softmax
  cross-entropy averaged over the questions whose answer is in the list (label -100 = ignored,
  as the reference's CrossEntropyLoss(ignore_index=-100)); 0 when there are none."""
  del rng
  logits = video_qa_logits(m, batch, deterministic)
  return {"video_qa": losses.mlm_loss(logits[:, None], batch["answer_label"][:, None])}


def captioning_objective(m, batch, rng, deterministic: bool = True,
                         label_smoothing: float = 0.1):
  """COCO captioning as MLM generation (the reference's `XVLMForMLMCaptioning`,
  REFERENCE_DETAILED §4.5) -> {'caption'}.

  Batch (x2vlm_jax/data/captioning.py): `image [B, H, W, 3]`, the sequence with inserted [MASK]s
  `text_ids [B, L]`, its visibility mask `text_atts [B, L, L]` and `position_ids [B, L]`,
  `masked_pos / masked_ids / masked_weight [B, M]`. All text layers run on the sequence,
  cross-attending to the whole image in the fusion layers; the MLM head scores the [MASK] slots
  with the label-smoothed KL loss, whose ignored token is [CLS] (each sequence's first token).
  """
  del rng
  image_embeds = m.encode_image(batch["image"], deterministic)
  image_atts = jnp.ones(image_embeds.shape[:2], jnp.int32)
  hidden = m.text.encode_multimodal(batch["text_ids"], batch["text_atts"], image_embeds,
                                    image_atts, deterministic, batch["position_ids"])
  at_masks = jnp.take_along_axis(hidden, batch["masked_pos"][:, :, None], axis=1)
  logits = m.text.mlm_logits(at_masks)
  return {"caption": losses.label_smoothing_loss(
      logits, batch["masked_ids"], batch["masked_weight"], smoothing=label_smoothing,
      ignore_id=batch["text_ids"][:, :1])}
