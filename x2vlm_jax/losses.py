"""Pure loss functions of X2-VLM pre-training and fine-tuning (float32 math).

They operate on global arrays: under `jax.jit` with sharded inputs, the ITC similarity matrix spans
the whole global batch (the reference all-gathers features across devices for the same result).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from x2vlm_jax import boxes as box_ops


def _positive_mask(batch: int, idx: jax.Array | None) -> jax.Array:
  """[B, B] True for positives: the diagonal, or all pairs with equal `idx` when given."""
  if idx is None:
    return jnp.eye(batch, dtype=bool)
  return idx[:, None] == idx[None, :]


def itc_loss(image_feat: jax.Array, text_feat: jax.Array, temp: jax.Array,
             idx: jax.Array | None = None) -> jax.Array:
  """Symmetric image-text contrastive loss.

  Args:
    image_feat, text_feat: [B, E] L2-normalised features (global batch).
    temp: scalar temperature (already clamped).
    idx: optional [B] ids; pairs with equal ids are all positives (soft targets = the row-normalised
      equality matrix), as in retrieval fine-tuning. None: the diagonal only.
  Returns:
    (CE(i2t) + CE(t2i)) / 2, scalar.
  """
  logits = (image_feat.astype(jnp.float32) @ text_feat.astype(jnp.float32).T) / temp
  positives = _positive_mask(logits.shape[0], idx).astype(jnp.float32)
  targets = positives / jnp.sum(positives, axis=1, keepdims=True)
  loss_i2t = -jnp.mean(jnp.sum(jax.nn.log_softmax(logits, axis=1) * targets, axis=1))
  loss_t2i = -jnp.mean(jnp.sum(jax.nn.log_softmax(logits.T, axis=1) * targets, axis=1))
  return 0.5 * (loss_i2t + loss_t2i)


def sample_hard_negatives(rng: jax.Array, image_feat: jax.Array, text_feat: jax.Array,
                          temp: jax.Array, idx: jax.Array | None = None
                          ) -> tuple[jax.Array, jax.Array]:
  """ITM hard negatives, sampled in proportion to softmax(similarity) + 1e-5, positives excluded.

  Args:
    rng: PRNG key.
    image_feat, text_feat: [B, E]; idx: optional [B] ids (equal ids are never negatives).
  Returns:
    neg_image_idx [B]: for each text, the index of a negative image;
    neg_text_idx [B]: for each image, the index of a negative text. No gradient flows.
  """
  image_feat = jax.lax.stop_gradient(image_feat.astype(jnp.float32))
  text_feat = jax.lax.stop_gradient(text_feat.astype(jnp.float32))
  temp = jax.lax.stop_gradient(temp)
  sim_i2t = image_feat @ text_feat.T / temp
  positives = _positive_mask(sim_i2t.shape[0], idx)
  weights_i2t = jnp.where(positives, 0.0, jax.nn.softmax(sim_i2t, axis=1) + 1e-5)
  weights_t2i = jnp.where(positives.T, 0.0, jax.nn.softmax(sim_i2t.T, axis=1) + 1e-5)
  key_image, key_text = jax.random.split(rng)
  neg_image_idx = jax.random.categorical(key_image, jnp.log(weights_t2i), axis=1)
  neg_text_idx = jax.random.categorical(key_text, jnp.log(weights_i2t), axis=1)
  return neg_image_idx, neg_text_idx


def itm_loss(logits_pos: jax.Array, logits_neg: jax.Array) -> jax.Array:
  """Matching cross-entropy: logits_pos [B, 2] (label 1), logits_neg [K, 2] (label 0) -> scalar."""
  logits = jnp.concatenate([logits_pos, logits_neg], axis=0).astype(jnp.float32)
  labels = jnp.concatenate([jnp.ones(logits_pos.shape[0], jnp.int32),
                            jnp.zeros(logits_neg.shape[0], jnp.int32)])
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))


def mlm_loss(logits: jax.Array, labels: jax.Array, ignore_index: int = -100) -> jax.Array:
  """Cross-entropy at masked positions: logits [B, M, V], labels [B, M] (ignore_index = padding).

  Mean over the valid positions of the whole batch; 0 if there are none.
  """
  valid = labels != ignore_index
  safe = jnp.where(valid, labels, 0)
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_probs, safe[..., None], axis=-1)[..., 0]
  count = jnp.sum(valid)
  return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(count, 1)


def box_losses(pred: jax.Array, target: jax.Array, is_image: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array]:
  """L1 and (1 - GIoU) box losses averaged over the rows that are real regions.

  Args:
    pred, target: [B, 4] normalised (cx, cy, w, h).
    is_image: optional [B]; rows with 1 (whole-image captions) are excluded from both losses.
  Returns:
    (l1, giou): L1 summed over the 4 coordinates and GIoU loss, each divided by the number of
    region rows (at least 1, so a batch of whole-image rows gives 0, not NaN). Rows whose predicted
    or target box is degenerate get no GIoU term (the reference zeroes the whole batch's GIoU).
  """
  pred = pred.astype(jnp.float32)
  target = target.astype(jnp.float32)
  weight = jnp.ones(pred.shape[0]) if is_image is None else 1.0 - is_image.astype(jnp.float32)
  num_boxes = jnp.maximum(jnp.sum(weight), 1.0)
  l1 = jnp.sum(jnp.abs(pred - target) * weight[:, None]) / num_boxes

  pred_xyxy = box_ops.cxcywh_to_xyxy(pred)
  target_xyxy = box_ops.cxcywh_to_xyxy(target)
  valid = box_ops.is_valid_xyxy(pred_xyxy) & box_ops.is_valid_xyxy(target_xyxy)
  unit = jnp.array([0.0, 0.0, 1.0, 1.0])
  giou = box_ops.generalized_iou(jnp.where(valid[:, None], pred_xyxy, unit),
                                 jnp.where(valid[:, None], target_xyxy, unit))
  giou_loss = jnp.sum((1.0 - giou) * weight * valid) / num_boxes
  return l1, giou_loss


def soft_bce_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Binary cross-entropy with soft targets, summed over classes, averaged over the batch.

  logits, targets: [B, A] (targets in [0, 1], e.g. soft answer scores). Returns a scalar.
  """
  logits = logits.astype(jnp.float32)
  targets = targets.astype(jnp.float32)
  per_class = optax.sigmoid_binary_cross_entropy(logits, targets)
  return jnp.mean(jnp.sum(per_class, axis=-1))


def sequence_nll(logits: jax.Array, ids: jax.Array, atts: jax.Array) -> jax.Array:
  """Teacher-forced negative log-likelihood of each sequence, summed over its tokens.

  logits [N, T, V] (position t predicts token t + 1), ids / atts [N, T] (`[CLS] ... [SEP]` + pad).
  Tokens 1..T-1 with atts = 1 are scored (the reference's shifted LM loss with pad -> -100,
  reduction 'none' then summed per sequence). Returns [N] float32.
  """
  log_probs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  targets = ids[:, 1:]
  token_ll = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  return -jnp.sum(jnp.where(atts[:, 1:] > 0, token_ll, 0.0), axis=-1)


def weighted_answer_loss(answer_nll: jax.Array, weights: jax.Array) -> jax.Array:
  """The reference's answer-decoder loss: answer NLLs [B, K] weighted by the answers' weights
  [B, K] (0 for padding), summed, divided by the number of questions B."""
  return jnp.sum(weights.astype(jnp.float32) * answer_nll) / answer_nll.shape[0]


def classification_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Softmax cross-entropy, logits [B, C], integer labels [B] -> mean over the batch."""
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                                  labels))


def label_smoothing_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                         smoothing: float = 0.1, ignore_id: int | jax.Array = 0) -> jax.Array:
  """The reference captioner's `LabelSmoothingLoss` (REFERENCE_DETAILED §4.5).

  Target distribution per position: 1 - smoothing on the gold token, smoothing / (V - 2) on every
  other token except `ignore_id` (the [CLS] id, with which padded targets are filled), which gets
  0; a position whose target is `ignore_id` gets no target at all. Loss per position =
  KL(target || softmax(logits)) summed over the vocabulary; result = sum(loss * weights) /
  (sum(weights) + 1e-5).

  Args:
    logits: [B, M, V]; targets: [B, M] int; weights: [B, M] (1 for real targets, 0 for padding).
    ignore_id: an int, or an int array broadcastable to targets (per-row ids).
  Returns:
    scalar float32.
  """
  vocab = logits.shape[-1]
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  ignore = jnp.broadcast_to(jnp.asarray(ignore_id), targets.shape)[..., None]
  columns = jnp.arange(vocab)
  off_value = smoothing / (vocab - 2)
  target = jnp.where(columns == targets[..., None], 1.0 - smoothing, off_value)
  target = jnp.where((columns == ignore) | (targets[..., None] == ignore), 0.0, target)
  # KL(target || p) = sum target * (log target - log p), with 0 log 0 = 0 (torch's kl_div).
  log_target = jnp.log(jnp.where(target > 0, target, 1.0))
  per_position = jnp.sum(target * (log_target - log_probs), axis=-1)
  weights = weights.astype(jnp.float32)
  return jnp.sum(per_position * weights) / (jnp.sum(weights) + 1e-5)
