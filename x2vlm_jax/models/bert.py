"""BERT text encoder and fusion (cross-attention) layers, post-LN as in HF BERT.

One stack of `num_layers` layers: layers `[0, fusion_start)` are text-only, layers
`[fusion_start, num_layers)` add cross-attention to vision tokens between self-attention and the FFN.
Three ways to run it, as in the reference's `BertEncoder(mode=...)`:
  `encode_text`  ids -> embeddings -> text layers                 ("text")
  `fuse`         text hidden states + vision -> fusion layers     ("fusion")
  `encode_multimodal` ids + vision -> all layers                  ("multi_modal"; MLM, task heads)
Shapes: ids/atts `[B, L]`, hidden `[B, L, H]`, vision `[B, S, Dv]` with mask `[B, S]`.
Several texts may share one vision row: with hidden `[B*G, L, H]` and vision `[B, S, Dv]`, text row
`b*G + g` cross-attends to vision row `b`, whose keys/values are then projected once (ITM
positives, ITM negative texts and MLM texts of one image share them in pre-training).
`atts` may also be a per-query mask `[B, L, L]` (query i may attend to key j) for sequences with
their own visibility pattern (the captioner's inserted [MASK]s); `causal=True` additionally keeps
each token from attending to later ones (the answer decoder). `position_ids [B, L]` override
0..L-1 where tokens share positions.
XLM-R text layers (CCLM, the multilingual X2-VLM) are this stack with `position_rule="roberta"`
(positions counted from the padding id), their own LayerNorm eps (`fusion_layer_norm_eps` keeps the
BERT fusion layers' 1e-12) and, for CCLM's MLM head, an untied decoder (`tie_mlm_decoder=False`).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from x2vlm_jax.models import layers

Dtype = Any


def _key_mask(atts: jax.Array) -> jax.Array:
  """[B, S] 0/1 -> boolean [B, 1, 1, S] (True = attend)."""
  return (atts > 0)[:, None, None, :]


def self_attention_mask(atts: jax.Array, causal: bool = False) -> jax.Array:
  """Boolean self-attention mask, True = attend.

  atts: [B, L] key padding (0/1) -> [B, 1, 1, L] (or [B, 1, L, L] when `causal`), or
  [B, L, L] per-query visibility -> [B, 1, L, L].
  """
  if atts.ndim == 3:
    mask = (atts > 0)[:, None]
  else:
    mask = _key_mask(atts)
  if causal:
    length = atts.shape[-1]
    mask = mask & jnp.tril(jnp.ones((length, length), bool))[None, None]
  return mask


class SelfAttention(nn.Module):
  """query/key/value projections and multi-head attention (HF `BertSelfAttention`)."""
  num_heads: int
  kv_logical: str = "embed"
  attention_dropout: float = 0.1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, hidden: jax.Array, context: jax.Array, context_mask: jax.Array,
               deterministic: bool) -> jax.Array:
    """hidden [B*G, L, H] attends to context [B, S, Dc] (mask [B, 1, 1, S]) -> [B*G, L, H].

    G = 1 except in cross-attention, where G texts may share one vision row: hidden row b*G + g
    attends to context row b. The keys/values of each context row are then projected once, and
    the G texts' queries are one [G*L]-long query sequence (queries never attend to each other).
    """
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    rows, length, width = hidden.shape
    head_dim = width // self.num_heads
    groups = rows // context.shape[0]
    if groups * context.shape[0] != rows:
      raise ValueError(f"{rows} query rows cannot share {context.shape[0]} key/value rows: "
                       "the text rows must be a whole multiple G of the vision rows")

    def project(x, name, logical):
      y = layers.dense(width, (logical, "heads"), name=name, **kw)(x)
      return y.reshape(x.shape[0], -1, self.num_heads, head_dim)

    query = project(hidden.reshape(rows // groups, groups * length, width), "query", "embed")
    key = project(context, "key", self.kv_logical)
    value = project(context, "value", self.kv_logical)
    dropout_rng = None
    if not deterministic and self.attention_dropout > 0:
      dropout_rng = self.make_rng("dropout")
    out = layers.attention(query, key, value, mask=context_mask,
                           dropout_rate=self.attention_dropout, dropout_rng=dropout_rng,
                           deterministic=deterministic)
    return out.reshape(rows, length, width)


class ResidualOutput(nn.Module):
  """dense -> dropout -> LayerNorm(residual + .) (HF `BertSelfOutput` / `BertOutput`)."""
  width: int
  layer_norm_eps: float = 1e-12
  hidden_dropout: float = 0.1
  in_logical: str = "heads"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, residual: jax.Array, deterministic: bool) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = layers.dense(self.width, (self.in_logical, "embed"), name="dense", **kw)(x)
    x = nn.Dropout(self.hidden_dropout)(x, deterministic=deterministic)
    return layers.layer_norm(self.layer_norm_eps, name="LayerNorm", **kw)(x + residual)


class AttentionBlock(nn.Module):
  """Self- or cross-attention followed by its residual output (HF `BertAttention`)."""
  num_heads: int
  kv_logical: str = "embed"
  layer_norm_eps: float = 1e-12
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, hidden, context, context_mask, deterministic):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attended = SelfAttention(self.num_heads, self.kv_logical, self.attention_dropout,
                             name="self", **kw)(hidden, context, context_mask, deterministic)
    return ResidualOutput(hidden.shape[-1], self.layer_norm_eps, self.hidden_dropout,
                          name="output", **kw)(attended, hidden, deterministic)


class BertLayer(nn.Module):
  """self-attention -> [cross-attention to vision] -> FFN, each post-LN."""
  num_heads: int
  mlp_dim: int
  has_cross_attention: bool = False
  layer_norm_eps: float = 1e-12
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, hidden: jax.Array, mask: jax.Array, vision: jax.Array | None,
               vision_mask: jax.Array | None, deterministic: bool) -> jax.Array:
    """hidden [B, L, H], mask [B, 1, 1, L]; vision [B, S, Dv], vision_mask [B, 1, 1, S]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn_kw = dict(layer_norm_eps=self.layer_norm_eps, hidden_dropout=self.hidden_dropout,
                   attention_dropout=self.attention_dropout, **kw)
    hidden = AttentionBlock(self.num_heads, name="attention", **attn_kw)(
        hidden, hidden, mask, deterministic)
    if self.has_cross_attention and vision is not None:
      hidden = AttentionBlock(self.num_heads, kv_logical="kv_embed", name="crossattention",
                              **attn_kw)(hidden, vision, vision_mask, deterministic)
    inter = layers.dense(self.mlp_dim, ("embed", "mlp"), name="intermediate", **kw)(hidden)
    inter = layers.constrain(layers.gelu(inter), ("act_batch", "act_len", "act_mlp"))
    hidden = ResidualOutput(hidden.shape[-1], self.layer_norm_eps, self.hidden_dropout,
                            in_logical="mlp", name="output", **kw)(inter, hidden, deterministic)
    return layers.constrain(hidden, ("act_batch", "act_len", "act_embed"))


class ScanBertLayer(BertLayer):
  """One step of a scanned layer stack: the same arguments, returns (hidden, None)."""

  def __call__(self, hidden: jax.Array, mask: jax.Array, vision: jax.Array | None,
               vision_mask: jax.Array | None, deterministic: bool) -> tuple[jax.Array, None]:
    return super().__call__(hidden, mask, vision, vision_mask, deterministic), None


POSITION_RULES = ("absolute", "roberta")


def roberta_position_ids(ids: jax.Array, pad_id: int) -> jax.Array:
  """RoBERTa / XLM-R positions (HF `create_position_ids_from_input_ids`): ids [B, L] -> [B, L].

  Real tokens count up from pad_id + 1 in order, skipping padding; every pad token gets pad_id.
  """
  real = (ids != pad_id).astype(jnp.int32)
  return jnp.cumsum(real, axis=1) * real + pad_id


class Embeddings(nn.Module):
  """word + position + token_type(0) embeddings -> LayerNorm -> dropout.

  `position_rule`: "absolute" (BERT: token i at position i) or "roberta" (RoBERTa / XLM-R:
  `roberta_position_ids`, positions offset by `pad_id + 1` and padding at `pad_id`).
  """
  vocab_size: int
  width: int
  max_position: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_dropout: float = 0.1
  position_rule: str = "absolute"
  pad_id: int = 0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    init = lambda names: nn.with_logical_partitioning(layers.default_kernel_init, names)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.word_embeddings = nn.Embed(self.vocab_size, self.width,
                                    embedding_init=init(("vocab", "embed")), **kw)
    self.position_embeddings = nn.Embed(self.max_position, self.width,
                                        embedding_init=init((None, "embed")), **kw)
    self.token_type_embeddings = nn.Embed(self.type_vocab_size, self.width,
                                          embedding_init=init((None, "embed")), **kw)
    self.LayerNorm = layers.layer_norm(self.layer_norm_eps, name=None, **kw)
    self.dropout = nn.Dropout(self.hidden_dropout)

  def __call__(self, ids: jax.Array, deterministic: bool,
               position_ids: jax.Array | None = None) -> jax.Array:
    """ids [B, L] (positions [B, L], default 0..L-1) -> [B, L, H].

    Explicit `position_ids` count from 0 under either rule ("roberta" shifts them by pad_id + 1).
    """
    if self.position_rule not in POSITION_RULES:
      raise ValueError(f"position rule {self.position_rule!r}: expected one of {POSITION_RULES}")
    length = ids.shape[1]
    offset = 0 if self.position_rule == "absolute" else self.pad_id + 1
    if position_ids is None:
      if length + offset > self.max_position:
        raise ValueError(f"text length {length} exceeds max_position {self.max_position}"
                         + (f" less the {offset} reserved positions" if offset else ""))
      if self.position_rule == "absolute":
        positions = self.position_embeddings(jnp.arange(length))[None]
      else:
        positions = self.position_embeddings(roberta_position_ids(ids, self.pad_id))
    else:
      positions = self.position_embeddings(position_ids + offset)
    x = (self.word_embeddings(ids) + positions
         + self.token_type_embeddings(jnp.zeros_like(ids)))
    return self.dropout(self.LayerNorm(x), deterministic=deterministic)

  def attend(self, hidden: jax.Array) -> jax.Array:
    """Tied decoder: hidden [..., H] -> logits [..., V] against the word embeddings."""
    return self.word_embeddings.attend(hidden)


class BertModel(nn.Module):
  """Embeddings + `num_layers` BERT layers (cross-attention from `fusion_start`) + MLM head."""
  vocab_size: int = 30522
  width: int = 768
  num_layers: int = 18
  fusion_start: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  max_position: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  mlm_head: bool = True
  causal: bool = False  # each token attends only to itself and earlier ones (a decoder)
  position_rule: str = "absolute"  # or "roberta" (XLM-R): see `Embeddings`
  pad_id: int = 0  # the padding id ("roberta" positions)
  fusion_layer_norm_eps: float | None = None  # the fusion layers' eps (None: layer_norm_eps)
  tie_mlm_decoder: bool = True  # False: the MLM decoder is its own [H, V] matrix (`mlm_decoder`)
  remat: bool = False
  remat_policy: str = "nothing_saveable"  # see layers.REMAT_POLICIES
  # Run the text layers and the fusion layers as two `nn.scan`s: params `text_layers/...` and
  # `fusion_layers/...` stacked [layers, ...] instead of `layer_0/...` ... `layer_{n-1}/...`.
  scan: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.embeddings = Embeddings(self.vocab_size, self.width, self.max_position,
                                 self.type_vocab_size, self.layer_norm_eps, self.hidden_dropout,
                                 self.position_rule, self.pad_id, **kw)
    fusion_eps = (self.layer_norm_eps if self.fusion_layer_norm_eps is None
                  else self.fusion_layer_norm_eps)
    base_cls = ScanBertLayer if self.scan else BertLayer
    layer_cls = (nn.remat(base_cls, static_argnums=(5,), prevent_cse=not self.scan,
                          policy=layers.remat_policy(self.remat_policy))
                 if self.remat else base_cls)

    def make(cross: bool, cls=layer_cls):  # one layer, or a scanned stack of them (`cls`)
      eps = fusion_eps if cross else self.layer_norm_eps
      return cls(self.num_heads, self.mlp_dim, cross, eps, self.hidden_dropout,
                 self.attention_dropout, **kw)

    if self.scan:
      # mask, vision, vision_mask and deterministic are the same for every layer of a stack.
      stack = lambda length: layers.scan_stack(layer_cls, length, in_axes=(nn.broadcast,) * 4)
      if self.fusion_start > 0:
        self.text_layers = make(False, stack(self.fusion_start))
      if self.num_layers > self.fusion_start:
        self.fusion_layers = make(True, stack(self.num_layers - self.fusion_start))
    else:
      self.layer = [make(i >= self.fusion_start) for i in range(self.num_layers)]
    if self.mlm_head:
      self.mlm_transform = MlmTransform(self.layer_norm_eps, **kw)
      if not self.tie_mlm_decoder:
        self.mlm_decoder = layers.dense(self.vocab_size, ("embed", "vocab"), use_bias=False,
                                        name=None, **kw)
      self.mlm_bias = self.param("mlm_bias",
                                 nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
                                 (self.vocab_size,), self.param_dtype)

  def _run(self, hidden, atts, start, stop, vision, vision_atts, deterministic):
    mask = self_attention_mask(atts, self.causal)
    vision_mask = None if vision_atts is None else _key_mask(vision_atts)
    if not self.scan:
      for i in range(start, stop):
        hidden = self.layer[i](hidden, mask, vision, vision_mask, deterministic)
      return hidden
    # Scanned: [start, stop) is the text stack, the fusion stack, or both.
    if start < self.fusion_start:
      hidden, _ = self.text_layers(hidden, mask, None, None, deterministic)
    if stop > self.fusion_start:
      hidden, _ = self.fusion_layers(hidden, mask, vision, vision_mask, deterministic)
    return hidden

  def encode_text(self, ids: jax.Array, atts: jax.Array, deterministic: bool = True,
                  position_ids: jax.Array | None = None) -> jax.Array:
    """Text layers only: ids/atts [B, L] -> text_embeds [B, L, H]."""
    hidden = self.embeddings(ids, deterministic, position_ids)
    return self._run(hidden, atts, 0, self.fusion_start, None, None, deterministic)

  def fuse(self, text_embeds: jax.Array, text_atts: jax.Array, vision: jax.Array,
           vision_atts: jax.Array, deterministic: bool = True) -> jax.Array:
    """Fusion layers on encoded text: [B*G, L, H] + vision [B, S, Dv] (mask [B, S]) ->
    [B*G, L, H]; text row b*G + g attends to vision row b (G = 1: one text per vision row)."""
    return self._run(text_embeds, text_atts, self.fusion_start, self.num_layers, vision,
                     vision_atts, deterministic)

  def encode_multimodal(self, ids: jax.Array, atts: jax.Array, vision: jax.Array,
                        vision_atts: jax.Array, deterministic: bool = True,
                        position_ids: jax.Array | None = None) -> jax.Array:
    """All layers from token ids, cross-attending to vision in the fusion layers -> [B, L, H].
    atts [B, L] or [B, L, L] (see the module docstring)."""
    hidden = self.embeddings(ids, deterministic, position_ids)
    return self._run(hidden, atts, 0, self.num_layers, vision, vision_atts, deterministic)

  def mlm_logits(self, hidden: jax.Array) -> jax.Array:
    """MLM head, its decoder tied to the word embeddings unless `tie_mlm_decoder` is False:
    [B, M, H] -> [B, M, V] float32."""
    h = self.mlm_transform(hidden)
    logits = self.embeddings.attend(h) if self.tie_mlm_decoder else self.mlm_decoder(h)
    return logits.astype(jnp.float32) + self.mlm_bias.astype(jnp.float32)


class MlmTransform(nn.Module):
  """The MLM head's transform: dense -> exact GELU -> LayerNorm."""
  layer_norm_eps: float = 1e-12
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, hidden: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layers.dense(hidden.shape[-1], ("embed", "mlp"), name="dense", **kw)(hidden)
    return layers.layer_norm(self.layer_norm_eps, name="LayerNorm", **kw)(layers.gelu(h))
