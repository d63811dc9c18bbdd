"""Analytic FLOP count of X2-VLM pre-training steps, from the model config and the batch sizes.

Conventions:
  * Only matrix multiplications are counted, at 2·m·n·k FLOPs for an [m, k] x [k, n] product
    (convolutions likewise: the patch embedding is a matmul of the flattened patches, each conv
    of a convolutional stem one of the flattened 3x3 windows).
    LayerNorm, softmax, GELU, biases, residuals, dropout, embedding gathers, losses and the
    optimizer update are not counted (they are O(activations) or O(params), a few per cent for
    these model sizes).
  * Attention is counted densely over the padded lengths (masks do not remove work): scores
    Q·Kᵀ = 2·T·S·D and the weighted sum P·V = 2·T·S·D per sequence (D = heads · head_dim).
  * One training step = 3 x the forward FLOPs (the backward pass costs about twice the forward:
    one matmul for the input gradient and one for the weight gradient per forward matmul). This is
    the usual "model FLOPs" convention for MFU; it does NOT add the extra forward of
    rematerialisation (`model.remat`), nor remove the work the backward skips (no gradient for
    the input images, none through the hard-negative sampling).

Each task counts what its objective runs (`Task.forward_flops`, x2vlm_jax/tasks/) from the
pieces here; with B = texts, L = text length, S = 1 + (image_res / patch)^2 vision tokens,
M = masked positions, the shared aligning losses (`aligning_flops`) are: text layers on B texts;
vision_proj + text_proj on B rows; ITC logits [B, B] and the hard-negative similarity [B, B]; the
fusion layers on 3B rows (positives, negative image, negative text) + the ITM head on 3B [CLS]
rows; MLM = embeddings + text layers + fusion layers on the B masked texts, then the MLM head on
the B·M masked positions only (`X2VLM.masked_token_logits` gathers them before the transform and
the tied decoder). Cross-attention keys/values are projected once per vision row: B rows shared by
the positive, negative-text and MLM texts of each image, B rows of negative images. A box
objective (`box_flops`) adds the fusion layers once more on B rows (whole image vs. the text) and
the box head on B [CLS] rows.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from x2vlm_jax.models.vit import conv_stem_channels


@dataclasses.dataclass(frozen=True)
class BatchSizes:
  """Sizes of one task's batch.

  images: images through the ViT (B; a region batch: its N_img images).
  texts: texts / rows of the losses (B; a region batch: its R region texts).
  text_len: L (data.max_tokens). masks: M (data.max_masks; 0 without MLM).
  """
  images: int
  texts: int
  text_len: int
  masks: int


def _get(cfg: Any, name: str) -> Any:
  """A field of a ConfigDict / X2VLM module (attributes) or a plain dict."""
  return cfg[name] if isinstance(cfg, Mapping) else getattr(cfg, name)


def matmul_flops(m: int, n: int, k: int) -> int:
  """[m, k] @ [k, n]: 2·m·n·k."""
  return 2 * m * n * k


def vision_tokens(model_cfg) -> int:
  """S = 1 + (image_res / patch_size)^2: the cls slot plus one token per patch."""
  grid = _get(model_cfg, "image_res") // _get(model_cfg, "patch_size")
  return 1 + grid * grid


# ------------------------------------------------------------------------------------ vision
def patch_embed_flops(model_cfg, images: int) -> int:
  """Patch embedding conv (p x p x 3 -> D, stride p) on `images` images: 2·N·P·(3p²)·D; or, with
  `vision_stem='conv'` (`vit.ConvStem`), each 3x3 stride-2 conv (C_in -> C_out over its output
  positions: 2·N·(H/2^(i+1))²·(9·C_in)·C_out) plus the 1x1 conv to D over the P patches."""
  p, width = _get(model_cfg, "patch_size"), _get(model_cfg, "vision_width")
  patches = vision_tokens(model_cfg) - 1
  if _get(model_cfg, "vision_stem") != "conv":
    return matmul_flops(images * patches, width, 3 * p * p)
  total, side, channels_in = 0, _get(model_cfg, "image_res"), 3
  for channels_out in conv_stem_channels(width, p):
    side = -(-side // 2)  # SAME padding, stride 2
    total += matmul_flops(images * side * side, channels_out, 9 * channels_in)
    channels_in = channels_out
  return total + matmul_flops(images * patches, width, channels_in)


def attention_core_flops(batch: int, query_len: int, key_len: int, width: int) -> int:
  """Scores Q·Kᵀ plus the weighted sum P·V over all heads: 2 x 2·B·T·S·D."""
  return 2 * matmul_flops(batch * query_len, key_len, width)


def vit_block_flops(model_cfg, images: int) -> int:
  """One BEiT block on `images` images of S tokens: qkv (D -> 3D), attention scores + weighted
  sum, output projection (D -> D), MLP (D -> F -> D)."""
  d, f = _get(model_cfg, "vision_width"), _get(model_cfg, "vision_mlp_dim")
  rows = images * vision_tokens(model_cfg)
  return (matmul_flops(rows, 3 * d, d)
          + attention_core_flops(images, vision_tokens(model_cfg), vision_tokens(model_cfg), d)
          + matmul_flops(rows, d, d)
          + 2 * matmul_flops(rows, f, d))


def vit_flops(model_cfg, images: int) -> int:
  """The vision encoder on `images` images: patch embedding + `vision_depth` blocks."""
  return (patch_embed_flops(model_cfg, images)
          + _get(model_cfg, "vision_depth") * vit_block_flops(model_cfg, images))


# ------------------------------------------------------------------------------------ text
def _ffn_flops(model_cfg, rows: int) -> int:
  h, f = _get(model_cfg, "text_width"), _get(model_cfg, "text_mlp_dim")
  return 2 * matmul_flops(rows, f, h)


def self_attention_flops(model_cfg, texts: int, text_len: int) -> int:
  """BERT self-attention on `texts` sequences of L tokens: q, k, v (H -> H each), scores +
  weighted sum, output dense (H -> H)."""
  h = _get(model_cfg, "text_width")
  rows = texts * text_len
  return (3 * matmul_flops(rows, h, h) + attention_core_flops(texts, text_len, text_len, h)
          + matmul_flops(rows, h, h))


def cross_attention_flops(model_cfg, texts: int, text_len: int, vision_len: int,
                          vision_rows: int | None = None) -> int:
  """Cross-attention of L text tokens to S vision tokens, per sequence: query (H -> H),
  key/value on the vision tokens (Dv -> H each) of `vision_rows` vision sequences (default one
  per text; texts sharing a vision row share its keys/values), scores + weighted sum (L x S),
  output dense."""
  h, dv = _get(model_cfg, "text_width"), _get(model_cfg, "vision_width")
  rows = texts * text_len
  vision_rows = texts if vision_rows is None else vision_rows
  return (matmul_flops(rows, h, h) + 2 * matmul_flops(vision_rows * vision_len, h, dv)
          + attention_core_flops(texts, text_len, vision_len, h) + matmul_flops(rows, h, h))


def text_layer_flops(model_cfg, texts: int, text_len: int) -> int:
  """One text-only BERT layer: self-attention + FFN (H -> F -> H)."""
  return self_attention_flops(model_cfg, texts, text_len) + _ffn_flops(model_cfg, texts * text_len)


def fusion_layer_flops(model_cfg, texts: int, text_len: int, vision_len: int,
                       vision_rows: int | None = None) -> int:
  """One fusion layer: self-attention + cross-attention to the vision tokens + FFN."""
  return (self_attention_flops(model_cfg, texts, text_len)
          + cross_attention_flops(model_cfg, texts, text_len, vision_len, vision_rows)
          + _ffn_flops(model_cfg, texts * text_len))


def text_encoder_flops(model_cfg, texts: int, text_len: int) -> int:
  """`encode_text`: the `text_layers` text-only layers (embedding lookups are gathers: 0)."""
  return _get(model_cfg, "text_layers") * text_layer_flops(model_cfg, texts, text_len)


def fusion_flops(model_cfg, texts: int, text_len: int, vision_len: int,
                 vision_rows: int | None = None) -> int:
  """`fuse`: the `fusion_layers` fusion layers on `texts` texts, the keys/values projected from
  `vision_rows` vision sequences (default: one per text)."""
  return _get(model_cfg, "fusion_layers") * fusion_layer_flops(model_cfg, texts, text_len,
                                                               vision_len, vision_rows)


# ------------------------------------------------------------------------------------ heads
def projection_flops(model_cfg, rows: int) -> int:
  """ITC features: vision_proj (Dv -> E) and text_proj (H -> E) on `rows` [CLS] rows each."""
  e = _get(model_cfg, "embed_dim")
  return (matmul_flops(rows, e, _get(model_cfg, "vision_width"))
          + matmul_flops(rows, e, _get(model_cfg, "text_width")))


def contrastive_flops(model_cfg, rows: int) -> int:
  """ITC logits [B, B] and the hard-negative similarity [B, B] (computed again, no gradient)."""
  return 2 * matmul_flops(rows, rows, _get(model_cfg, "embed_dim"))


def mlp_head_flops(model_cfg, rows: int, outputs: int) -> int:
  """`MlpHead` (ITM: 2 outputs, box: 4) on `rows` fused [CLS] rows: H -> 2H -> outputs."""
  h = _get(model_cfg, "text_width")
  return matmul_flops(rows, 2 * h, h) + matmul_flops(rows, outputs, 2 * h)


def mlm_head_flops(model_cfg, texts: int, masks: int) -> int:
  """MLM head on the gathered masked positions only (texts x M rows): transform (H -> H) and
  the tied decoder (H -> vocab)."""
  h, v = _get(model_cfg, "text_width"), _get(model_cfg, "vocab_size")
  rows = texts * masks
  return matmul_flops(rows, h, h) + matmul_flops(rows, v, h)


# ------------------------------------------------------------------------------------ objectives
def aligning_flops(model_cfg, sizes: BatchSizes, *, with_mlm: bool = True) -> dict[str, int]:
  """`objectives.aligning_losses` on `sizes.texts` texts, per component (the vision encoder is
  the caller's): text encoder, ITC, ITM fusion on 3B rows + head, and with MLM the masked texts
  through every layer + the MLM head on the masked positions."""
  b, length, s = sizes.texts, sizes.text_len, vision_tokens(model_cfg)
  out = {
      "text_encoder": text_encoder_flops(model_cfg, b, length),
      "itc": projection_flops(model_cfg, b) + contrastive_flops(model_cfg, b),
      # 3B rows; keys/values of 2B vision rows: each text's own (shared by its positive,
      # negative-text and MLM rows) and the negative images.
      "itm_fusion": fusion_flops(model_cfg, 3 * b, length, s, vision_rows=2 * b),
      "itm_head": mlp_head_flops(model_cfg, 3 * b, 2),
  }
  if with_mlm:
    # MLM re-runs the text layers on the masked ids, then the fusion layers, cross-attending to
    # the keys/values the ITM positives computed.
    out["mlm_encoder"] = (text_encoder_flops(model_cfg, b, length)
                          + fusion_flops(model_cfg, b, length, s, vision_rows=0))
    out["mlm_head"] = mlm_head_flops(model_cfg, b, sizes.masks) if _mlm_head(model_cfg) else 0
  return out


def box_flops(model_cfg, sizes: BatchSizes) -> dict[str, int]:
  """Each text fused with its whole image (every vision token visible) and the box head."""
  b, length = sizes.texts, sizes.text_len
  return {"box_fusion": fusion_flops(model_cfg, b, length, vision_tokens(model_cfg)),
          "box_head": mlp_head_flops(model_cfg, b, 4)}


def _mlm_head(model_cfg) -> bool:
  try:
    return bool(_get(model_cfg, "mlm_head"))
  except (AttributeError, KeyError):
    return True


# ------------------------------------------------------------------------------------ evaluation
def retrieval_eval_flops(model_cfg, *, images: int, texts: int, text_len: int, k: int,
                         distinct_pairs: int | None = None, grouped: bool = True
                         ) -> dict[str, int]:
  """Forward FLOPs of a retrieval evaluation (`evaluate/retrieval.py`) of `images` images and
  `texts` texts of `text_len` tokens, re-ranking the top `k` both ways, per phase.

  grouped=True (today's engine, `rerank.py`): the `distinct_pairs` of both directions (default
  images x k + texts x k: no pair in both, the most there can be) are fused grouped by image, in
  groups of k texts and the rest of each image in groups of k / 8, keys / values projected once per
  group; the padding of each image's last group counted, the pairs spread evenly over the images.
  grouped=False: every pair of each direction projects its own image's keys / values (the
  reference). Similarities: the top-k of both directions and the ITC-only ranks of both (4
  products of [images x texts x E]); the ITM head on every fused [CLS].
  """
  s = vision_tokens(model_cfg)
  e = _get(model_cfg, "embed_dim")
  k_i2t, k_t2i = min(k, texts), min(k, images)
  out = {
      "encode_images": vit_flops(model_cfg, images)
                       + matmul_flops(images, e, _get(model_cfg, "vision_width")),
      "encode_texts": text_encoder_flops(model_cfg, texts, text_len)
                      + matmul_flops(texts, e, _get(model_cfg, "text_width")),
      "similarities": 4 * matmul_flops(images, texts, e),
  }
  if not grouped:
    pairs = images * k_i2t + texts * k_t2i
    out["rerank_fusion"] = fusion_flops(model_cfg, pairs, text_len, s)
    out["itm_head"] = mlp_head_flops(model_cfg, pairs, 2)
    return out
  pairs = images * k_i2t + texts * k_t2i if distinct_pairs is None else distinct_pairs
  big, small = k_i2t, max(1, k_i2t // 8)
  per_image = pairs / images
  big_groups = int(per_image // big)
  small_groups = -(-int(round(per_image - big_groups * big)) // small)
  fused = images * (big_groups * big + small_groups * small)  # padding included
  out["rerank_fusion"] = fusion_flops(model_cfg, fused, text_len, s,
                                      vision_rows=images * (big_groups + small_groups))
  out["itm_head"] = mlp_head_flops(model_cfg, fused, 2)
  return out
