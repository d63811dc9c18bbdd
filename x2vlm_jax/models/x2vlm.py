"""The composed X2-VLM model: vision tower, text/fusion stack, projections and heads.

Call any of the methods through `model.apply(variables, ..., method=X2VLM.encode_image)` etc.
Shapes: images `[B, H, W, 3]` NHWC, text ids/atts `[B, L]`, vision embeds `[B, 1+N, D]`,
text embeds `[B, L, H]`, features `[B, E]` (L2-normalised).

Parameter tree (top level): `vision`, `text`, `vision_proj`, `text_proj`, `temp`, `itm_head`,
`bbox_head`, and when configured `frame_pos_embed` (`num_frames > 0`), one MLP per task head
(`heads`: the parameters fine-tuning tasks add, named by the task, see `TaskHead`) and
`answer_decoder` (`answer_decoder_layers > 0`: a causal BERT stack with cross-attention to fused
text states, its own embeddings and tied LM head, which generates answers).
With `scan_layers` the layer subtrees are stacked (`vision/blocks`, `text/text_layers`,
`text/fusion_layers`, `answer_decoder/fusion_layers`; see `models/layer_stack.py`).
"""
from __future__ import annotations

import logging
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import flax.linen as nn

from x2vlm_jax.data import image_ops
from x2vlm_jax.models import layers
from x2vlm_jax.models.bert import BertModel
from x2vlm_jax.models.vit import VisionTransformer, check_pos_emb_kind, check_stem

Dtype = Any


class TaskHead(NamedTuple):
  """A head a task adds: `name` (its parameter subtree), `outputs` logits, read
  from `inputs` fused [CLS] vectors concatenated, [B, inputs * H], through an `MlpHead` with a
  hidden layer twice as wide as its input (the reference's `build_mlp(inputs * H, outputs)`)."""
  name: str
  outputs: int
  inputs: int = 1


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps) along the last axis (torch F.normalize), in float32."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def normalize_pixels(images: jax.Array) -> jax.Array:
  """uint8 pixels [..., 3] -> float32 (x / 255 - CLIP mean) / CLIP std: `image_ops.normalize` on
  the device (its constants), so that evaluation images travel as uint8 (4x fewer bytes)."""
  x = images.astype(jnp.float32) * jnp.float32(1.0 / 255.0)
  return (x - jnp.asarray(image_ops.CLIP_MEAN)) / jnp.asarray(image_ops.CLIP_STD)


class X2VLM(nn.Module):
  """X2-VLM. Every size is a plain attribute so `X2VLM(**config.model)` builds it."""
  # Vision (BEiT-2).
  image_res: int = 224
  patch_size: int = 16
  vision_width: int = 768
  vision_depth: int = 12
  vision_heads: int = 12
  vision_mlp_dim: int = 3072
  vision_layer_norm_eps: float = 1e-6
  layer_scale_init: float = 0.1
  drop_path_rate: float = 0.1
  vision_abs_pos_emb: bool = False  # learned absolute position embedding (not in X2-VLM's BEiT-2)
  # Its init std. BEiT's 0.02 leaves positions ~4% of a patch's signal; a from-scratch model that
  # must regress boxes learns far faster with O(1) positions (std 0.5; the demo instead starts
  # the table as sine-cosine codes, vision_pos_emb_kind='learned_from_sincos2d').
  vision_pos_emb_init_std: float = 0.02
  # "learned", "sincos2d" (fixed 2-D sine-cosine of the patch row / column, no parameter) or
  # "learned_from_sincos2d" (a learned table initialised to the sine-cosine one).
  vision_pos_emb_kind: str = "learned"
  # "patch" (BEiT-2's linear patch embedding) or "conv" (a convolutional stem, `vit.ConvStem`: not
  # in any release; for small models trained from scratch, where it lets the ViT see shapes).
  vision_stem: str = "patch"
  num_frames: int = 0  # > 0: learned frame position embedding for `num_frames` video frames
  # Text + fusion (BERT).
  vocab_size: int = 30522
  text_width: int = 768
  text_layers: int = 12
  fusion_layers: int = 6
  text_heads: int = 12
  text_mlp_dim: int = 3072
  max_position: int = 512
  type_vocab_size: int = 2
  text_layer_norm_eps: float = 1e-12
  # The fusion layers are BERT layers in every release (CCLM too, under XLM-R text layers of 1e-5).
  fusion_layer_norm_eps: float = 1e-12
  # "absolute" (BERT) or "roberta" (XLM-R / CCLM: positions pad_id+1, pad_id+2, ... over the real
  # tokens, pads at pad_id; max_position 514 holds 512 tokens); `text_pad_id` = the tokenizer's.
  text_position_ids: str = "absolute"
  text_pad_id: int = 0
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  mlm_head: bool = True
  mlm_decoder_tied: bool = True  # False: the MLM decoder is its own matrix (CCLM's `mlm_head`)
  # Heads.
  embed_dim: int = 256
  # Heads that tasks add (x2vlm_jax/tasks: each task says which; not a config field): an MLP per
  # `TaskHead` on `inputs` fused [CLS] vectors concatenated.
  heads: tuple[TaskHead, ...] = ()
  # > 0: an answer decoder of this many causal BERT layers cross-attending to fused text states
  # (`answer_decoder`, the reference's `text_decoder`), set by the task that generates answers.
  answer_decoder_layers: int = 0
  temp_init: float = 0.07
  # Execution.
  remat: bool = False  # rematerialise each ViT block and BERT layer in the backward pass
  remat_policy: str = "nothing_saveable"  # what they keep: layers.REMAT_POLICIES
  # Run each stack of identical layers (ViT blocks, text layers, fusion layers, answer decoder) as
  # one `nn.scan`, parameters stacked on a leading "layers" axis: one layer to compile per stack.
  # Checkpoints of either layout load into either (`models.layer_stack`).
  scan_layers: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.vision = VisionTransformer(
        image_res=self.image_res, patch_size=self.patch_size, width=self.vision_width,
        depth=self.vision_depth, num_heads=self.vision_heads, mlp_dim=self.vision_mlp_dim,
        layer_norm_eps=self.vision_layer_norm_eps, layer_scale_init=self.layer_scale_init,
        drop_path_rate=self.drop_path_rate, abs_pos_emb=self.vision_abs_pos_emb,
        pos_emb_init_std=self.vision_pos_emb_init_std, pos_emb_kind=self.vision_pos_emb_kind,
        stem=self.vision_stem, remat=self.remat, remat_policy=self.remat_policy,
        scan=self.scan_layers, **kw)
    self.text = BertModel(
        vocab_size=self.vocab_size, width=self.text_width,
        num_layers=self.text_layers + self.fusion_layers, fusion_start=self.text_layers,
        num_heads=self.text_heads, mlp_dim=self.text_mlp_dim, max_position=self.max_position,
        type_vocab_size=self.type_vocab_size, layer_norm_eps=self.text_layer_norm_eps,
        hidden_dropout=self.hidden_dropout, attention_dropout=self.attention_dropout,
        mlm_head=self.mlm_head, position_rule=self.text_position_ids, pad_id=self.text_pad_id,
        fusion_layer_norm_eps=self.fusion_layer_norm_eps,
        tie_mlm_decoder=self.mlm_decoder_tied, remat=self.remat, remat_policy=self.remat_policy,
        scan=self.scan_layers, **kw)
    self.vision_proj = layers.dense(self.embed_dim, ("embed", "proj"), name=None, **kw)
    self.text_proj = layers.dense(self.embed_dim, ("embed", "proj"), name=None, **kw)
    self.temp = self.param("temp", nn.with_logical_partitioning(
        nn.initializers.constant(self.temp_init), ()), (), jnp.float32)
    self.itm_head = layers.MlpHead(2, 2 * self.text_width, **kw)
    self.bbox_head = layers.MlpHead(4, 2 * self.text_width, **kw)
    for head in self.heads:  # named by the task (setattr registers the submodule under it)
      setattr(self, head.name, layers.MlpHead(head.outputs, 2 * head.inputs * self.text_width,
                                              **kw))
    if self.answer_decoder_layers > 0:
      self.answer_decoder = BertModel(
          vocab_size=self.vocab_size, width=self.text_width, num_layers=self.answer_decoder_layers,
          fusion_start=0, num_heads=self.text_heads, mlp_dim=self.text_mlp_dim,
          max_position=self.max_position, type_vocab_size=self.type_vocab_size,
          layer_norm_eps=self.text_layer_norm_eps, hidden_dropout=self.hidden_dropout,
          attention_dropout=self.attention_dropout, mlm_head=True, causal=True,
          # Same embeddings / layer / head rules as the text stack it is initialised from.
          position_rule=self.text_position_ids, pad_id=self.text_pad_id,
          fusion_layer_norm_eps=self.fusion_layer_norm_eps,
          tie_mlm_decoder=self.mlm_decoder_tied,
          remat=self.remat, remat_policy=self.remat_policy, scan=self.scan_layers, **kw)
    if self.num_frames > 0:
      self.frame_pos_embed = self.param(
          "frame_pos_embed",
          nn.with_logical_partitioning(layers.default_kernel_init, ("frames", None, "embed")),
          (self.num_frames, 1, self.vision_width), self.param_dtype)

  # ------------------------------------------------------------------ vision
  def encode_image(self, images: jax.Array, deterministic: bool = True) -> jax.Array:
    """images [B, H, W, 3] -> image_embeds [B, 1+N, D] (position 0: mean of normed patches).

    `images` are CLIP-normalised floats, or uint8 pixels (resized, not normalised: what
    `eval_data.EvalImages` reads), normalised here in float32 (`normalize_pixels`)."""
    if images.dtype == jnp.uint8:
      images = normalize_pixels(images)
    return self.vision(images, deterministic)

  def encode_regions(self, images: jax.Array, image_atts: jax.Array, idx_to_group_img: jax.Array,
                     deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
    """Regions of images, one ViT forward per image.

    Args:
      images: [N_img, H, W, 3].
      image_atts: [R, 1+N] 0/1 patch mask per region (slot 0 always 1).
      idx_to_group_img: [R] index of each region's image.
    Returns:
      region_embeds [R, 1+N, D]: slot 0 = mean of the patches inside the box, then all patches;
      full_embeds [R, 1+N, D]: the whole-image embeddings of each region's image (box prediction).
    """
    image_embeds = self.vision(images, deterministic)
    full_embeds = jnp.take(image_embeds, idx_to_group_img, axis=0)
    patches = full_embeds[:, 1:]
    weights = image_atts[:, 1:, None].astype(jnp.float32)
    region_cls = (jnp.sum(weights * patches.astype(jnp.float32), axis=1)
                  / jnp.sum(weights, axis=1)).astype(patches.dtype)
    region_embeds = jnp.concatenate([region_cls[:, None], patches], axis=1)
    return region_embeds, full_embeds

  def encode_video(self, frames: jax.Array, deterministic: bool = True) -> jax.Array:
    """frames [B, F, H, W, 3] -> [B, 1+N, D]: per-frame ViT, + frame embedding, mean over F.
    Frames are CLIP-normalised floats or uint8 pixels (normalised here, as in `encode_image`)."""
    if frames.dtype == jnp.uint8:
      frames = normalize_pixels(frames)
    batch, num_frames = frames.shape[:2]
    embeds = self.vision(frames.reshape((batch * num_frames,) + frames.shape[2:]), deterministic)
    embeds = embeds.reshape((batch, num_frames) + embeds.shape[1:])
    if self.num_frames > 0:
      if num_frames > self.num_frames:
        raise ValueError(f"{num_frames} frames given; the model has embeddings for "
                         f"{self.num_frames} (config model.num_frames)")
      embeds = embeds + self.frame_pos_embed[None, :num_frames].astype(embeds.dtype)
    return jnp.mean(embeds.astype(jnp.float32), axis=1).astype(embeds.dtype)

  def image_features(self, vision_embeds: jax.Array) -> jax.Array:
    """[B, 1+N, D] -> L2-normalised vision_proj(cls) [B, E] (float32)."""
    return l2_normalize(self.vision_proj(vision_embeds[:, 0]))

  # ------------------------------------------------------------------ text
  def encode_text(self, text_ids: jax.Array, text_atts: jax.Array,
                  deterministic: bool = True) -> jax.Array:
    """[B, L] ids/atts -> text_embeds [B, L, H] (text layers only)."""
    return self.text.encode_text(text_ids, text_atts, deterministic)

  def text_features(self, text_embeds: jax.Array) -> jax.Array:
    """[B, L, H] -> L2-normalised text_proj([CLS]) [B, E] (float32)."""
    return l2_normalize(self.text_proj(text_embeds[:, 0]))

  # ------------------------------------------------------------------ fusion + heads
  def fuse(self, vision_embeds: jax.Array, vision_atts: jax.Array, text_embeds: jax.Array,
           text_atts: jax.Array, deterministic: bool = True) -> jax.Array:
    """Fusion layers: text [B*G, L, H] attends to vision [B, 1+N, D] (mask [B, 1+N]) ->
    [B*G, L, H]. Text row b*G + g is fused with vision row b: G texts sharing an image share the
    keys/values computed from it (G = 1: one text per image)."""
    return self.text.fuse(text_embeds, text_atts, vision_embeds, vision_atts, deterministic)

  def itm_logits(self, cross_embeds: jax.Array) -> jax.Array:
    """[B, L, H] -> [B, 2] logits from the fused [CLS]; class 1 = match."""
    return self.itm_head(cross_embeds[:, 0]).astype(jnp.float32)

  def predict_box(self, cross_embeds: jax.Array) -> jax.Array:
    """[B, L, H] -> normalised (cx, cy, w, h) in (0, 1), [B, 4]."""
    return jax.nn.sigmoid(self.bbox_head(cross_embeds[:, 0]).astype(jnp.float32))

  def predict_box_in_image(self, image_embeds: jax.Array, text_embeds: jax.Array,
                           text_atts: jax.Array, deterministic: bool = True) -> jax.Array:
    """Box of each text in its whole image: fusion with every vision token visible, bbox head.
    image_embeds [B, 1+N, D], text_embeds [B, L, H], text_atts [B, L] -> [B, 4] (cx, cy, w, h)."""
    image_atts = jnp.ones(image_embeds.shape[:2], jnp.int32)
    return self.predict_box(self.fuse(image_embeds, image_atts, text_embeds, text_atts,
                                      deterministic))

  def head_logits(self, name: str, *cross_embeds: jax.Array) -> jax.Array:
    """The task head `name` on the fused [CLS] of each of its `inputs` fused sequences [B, L, H]
    (concatenated in the order given) -> [B, outputs] float32 logits."""
    spec = self.head(name)
    if len(cross_embeds) != spec.inputs:
      raise ValueError(f"head {name!r} reads {spec.inputs} fused sequences, got {len(cross_embeds)}")
    features = jnp.concatenate([c[:, 0] for c in cross_embeds], axis=-1)
    return getattr(self, name)(features).astype(jnp.float32)

  def head(self, name: str) -> TaskHead:
    """The `TaskHead` called `name` (a ValueError listing the model's heads if there is none)."""
    for spec in self.heads:
      if spec.name == name:
        return spec
    raise ValueError(f"the model has no head {name!r} (its heads: {[h.name for h in self.heads]}); "
                     "the task that adds it must be in config.train.tasks or config.evals")

  def answer_logits(self, answer_ids: jax.Array, answer_atts: jax.Array,
                    question_states: jax.Array, question_atts: jax.Array,
                    deterministic: bool = True) -> jax.Array:
    """Answer decoder, teacher-forced: answer ids/atts [B*G, La] (`[CLS] answer [SEP]`, causal),
    attending to the fused question [B, Lq, H] (mask [B, Lq]; answer row b*G + g reads question
    b, G >= 1 answers per question) -> next-token logits [B*G, La, V] (position t predicts token
    t + 1), float32."""
    hidden = self.answer_decoder.encode_multimodal(answer_ids, answer_atts, question_states,
                                                   question_atts, deterministic)
    return self.answer_decoder.mlm_logits(hidden)

  def mlm_logits(self, text_ids_masked: jax.Array, text_atts: jax.Array, vision_embeds: jax.Array,
                 vision_atts: jax.Array, masked_pos: jax.Array,
                 deterministic: bool = True) -> jax.Array:
    """All layers on masked ids with vision, logits at `masked_pos` [B, M] -> [B, M, V]."""
    hidden = self.text.encode_multimodal(text_ids_masked, text_atts, vision_embeds, vision_atts,
                                         deterministic)
    return self.masked_token_logits(hidden, masked_pos)

  def masked_token_logits(self, hidden: jax.Array, masked_pos: jax.Array) -> jax.Array:
    """MLM head at `masked_pos` [B, M] of fused hidden states [B, L, H] -> [B, M, V] float32."""
    at_masks = jnp.take_along_axis(hidden, masked_pos[:, :, None], axis=1)
    return self.text.mlm_logits(at_masks)

  def clamped_temp(self) -> jax.Array:
    """The ITC temperature clamped to [0.001, 0.5] as the reference clamps it before each step."""
    return jnp.clip(self.temp, 0.001, 0.5)

  def __call__(self, images: jax.Array, text_ids: jax.Array, text_atts: jax.Array,
               deterministic: bool = True) -> dict[str, jax.Array]:
    """Touches every parameter (used by `init`): image-text features, ITM, box and MLM logits."""
    image_embeds = self.encode_image(images, deterministic)
    text_embeds = self.encode_text(text_ids, text_atts, deterministic)
    image_atts = jnp.ones(image_embeds.shape[:2], jnp.int32)
    cross = self.fuse(image_embeds, image_atts, text_embeds, text_atts, deterministic)
    out = dict(image_feat=self.image_features(image_embeds),
               text_feat=self.text_features(text_embeds), itm_logits=self.itm_logits(cross),
               box=self.predict_box(cross), temp=self.clamped_temp())
    for head in self.heads:
      out[head.name] = self.head_logits(head.name, *[cross] * head.inputs)
    if self.answer_decoder_layers > 0:
      out["answer_logits"] = self.answer_logits(text_ids, text_atts, cross, text_atts,
                                                deterministic)
    if self.mlm_head:
      out["mlm_logits"] = self.mlm_logits(text_ids, text_atts, image_embeds, image_atts,
                                          jnp.zeros((text_ids.shape[0], 1), jnp.int32),
                                          deterministic)
    if self.num_frames > 0:
      frames = jnp.broadcast_to(images[:, None], (images.shape[0], self.num_frames) + images.shape[1:])
      out["video_feat"] = self.image_features(self.encode_video(frames[:1], deterministic))
    return out


def init_inputs(model: X2VLM, batch: int = 1, text_len: int = 8):
  """Dummy inputs for `model.init` (shapes only matter)."""
  images = jnp.zeros((batch, model.image_res, model.image_res, 3), jnp.float32)
  ids = jnp.zeros((batch, text_len), jnp.int32)
  return images, ids, jnp.ones_like(ids)


def abstract_variables(model: X2VLM):
  """`jax.eval_shape` of `model.init`: boxed (logically partitioned) ShapeDtypeStructs, no FLOPs."""
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *init_inputs(model)))


def count_params(params) -> int:
  """Number of scalars in a params tree (boxed or not)."""
  leaves = jax.tree_util.tree_leaves(nn.meta.unbox(params))
  return int(sum(x.size for x in leaves))


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Not config fields: module plumbing, and what the tasks add (`tasks.build_model`).
_NOT_CONFIG = ("parent", "name", "heads", "answer_decoder_layers")


def model_config():
  """ConfigDict of every `X2VLM` attribute at its default (X2-VLM-base); dtypes as strings."""
  import dataclasses
  import ml_collections

  fields = {f.name: f.default for f in dataclasses.fields(X2VLM) if f.name not in _NOT_CONFIG}
  fields["dtype"] = fields["param_dtype"] = "float32"
  return ml_collections.ConfigDict(fields)


def build_model(model_cfg, *, heads: tuple[TaskHead, ...] = (),
                answer_decoder_layers: int = 0) -> X2VLM:
  """`X2VLM` from a config made by `model_config()` (unknown keys raise a TypeError naming them)
  and what the tasks add (`x2vlm_jax.tasks.build_model` passes them)."""
  kwargs = dict(model_cfg, heads=tuple(TaskHead(*h) for h in heads),
                answer_decoder_layers=int(answer_decoder_layers))
  for key in ("dtype", "param_dtype"):
    if kwargs.get(key) not in _DTYPES:
      raise ValueError(f"model.{key} must be one of {sorted(_DTYPES)}, got {kwargs.get(key)!r}")
    kwargs[key] = _DTYPES[kwargs[key]]
  layers.remat_policy(kwargs.get("remat_policy", "nothing_saveable"))  # a typo fails here
  if kwargs.get("remat") and not kwargs.get("scan_layers"):
    logging.warning(
        "model.remat=True with unrolled layers (model.scan_layers=False): XLA's CPU compiler "
        "schedules the recomputation as early as the forward pass, so it saves no memory there "
        "(docs/benchmarks.md, 'Rematerialisation'); with model.scan_layers=True the backward "
        "loop recomputes each layer when it needs it")
  check_pos_emb_kind(kwargs.get("vision_pos_emb_kind", "learned"))
  check_stem(kwargs.get("vision_stem", "patch"), kwargs.get("patch_size", 16))
  return X2VLM(**kwargs)
