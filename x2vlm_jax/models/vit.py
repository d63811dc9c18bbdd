"""BEiT-2 vision transformer as X2-VLM uses it.

Images are NHWC (`[B, H, W, 3]`, the JAX convention; the PyTorch reference takes NCHW). Output of the
encoder for a batch of images is `[B, 1+N, D]`: position 0 is the mean of the LayerNorm'd patch
tokens (the BEiT cls token's own output is discarded), positions 1..N are the LayerNorm'd patches in
row-major grid order (N = (H/p) * (W/p)).

Each block owns a relative position bias table `[(2G-1)^2 + 3, heads]` (G = image_res / patch); the
three extra rows are cls->token, token->cls and cls->cls.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import jax
import jax.numpy as jnp
import flax.linen as nn

from x2vlm_jax.models import layers

Dtype = Any


def relative_position_index(grid: int) -> np.ndarray:
  """BEiT relative position index `[1+N, 1+N]` (N = grid^2) into a table of (2G-1)^2 + 3 rows.

  Patch pair (i, j) at grid coordinates (r, c): (r_i - r_j + G - 1) * (2G - 1) + (c_i - c_j + G - 1).
  Row 0 (cls as query) = T-3, column 0 (cls as key) = T-2, [0, 0] = T-1 (T = table rows).
  """
  coords = np.stack(np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")).reshape(2, -1)
  rel = coords[:, :, None] - coords[:, None, :] + (grid - 1)  # [2, N, N]
  num_rel = (2 * grid - 1) ** 2 + 3
  index = np.zeros((grid * grid + 1,) * 2, dtype=np.int32)
  index[1:, 1:] = rel[0] * (2 * grid - 1) + rel[1]
  index[0, :] = num_rel - 3
  index[:, 0] = num_rel - 2
  index[0, 0] = num_rel - 1
  return index


class Attention(nn.Module):
  """Multi-head self-attention with q/v biases (no k bias) and a relative position bias."""
  num_heads: int
  grid: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, 1+N, D] -> [B, 1+N, D]."""
    batch, length, width = x.shape
    head_dim = width // self.num_heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    qkv = layers.dense(3 * width, ("embed", "heads"), use_bias=False, name="qkv", **kw)(x)
    zeros = nn.with_logical_partitioning(nn.initializers.zeros, ("heads",))
    q_bias = self.param("q_bias", zeros, (width,), self.param_dtype)
    v_bias = self.param("v_bias", zeros, (width,), self.param_dtype)
    qkv = qkv + jnp.concatenate([q_bias, jnp.zeros_like(q_bias), v_bias]).astype(qkv.dtype)
    qkv = qkv.reshape(batch, length, 3, self.num_heads, head_dim)
    query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]

    num_rel = (2 * self.grid - 1) ** 2 + 3
    table = self.param("relative_position_bias_table",
                       nn.with_logical_partitioning(nn.initializers.zeros, ("rel_pos", None)),
                       (num_rel, self.num_heads), self.param_dtype)
    index = relative_position_index(self.grid)
    if index.shape[0] != length:
      raise ValueError(f"the vision encoder was built for {index.shape[0] - 1} patches "
                       f"(image_res / patch_size = {self.grid}) but got {length - 1}")
    bias = jnp.take(table, index.reshape(-1), axis=0).reshape(length, length, self.num_heads)
    bias = bias.transpose(2, 0, 1)[None].astype(jnp.float32)  # [1, heads, 1+N, 1+N]

    out = layers.attention(query, key, value, bias=bias)
    out = out.reshape(batch, length, width)
    return layers.dense(width, ("heads", "embed"), name="proj", **kw)(out)


class Mlp(nn.Module):
  """fc1 -> exact GELU -> fc2."""
  hidden_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layers.dense(self.hidden_dim, ("embed", "mlp"), name="fc1", **kw)(x)
    h = layers.constrain(layers.gelu(h), ("act_batch", "act_len", "act_mlp"))
    return layers.dense(x.shape[-1], ("mlp", "embed"), name="fc2", **kw)(h)


class Block(nn.Module):
  """Pre-LN block with layer scale: x += g1 * Attn(LN1 x); x += g2 * MLP(LN2 x)."""
  num_heads: int
  mlp_dim: int
  grid: int
  layer_norm_eps: float = 1e-6
  layer_scale_init: float = 0.1
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True,
               drop_path_rate: jax.Array | None = None) -> jax.Array:
    """x: [B, 1+N, D] -> [B, 1+N, D]; `drop_path_rate` (a scalar) overrides the attribute."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    width = x.shape[-1]
    scale_init = nn.with_logical_partitioning(nn.initializers.constant(self.layer_scale_init),
                                              ("norm",))
    gamma_1 = self.param("gamma_1", scale_init, (width,), self.param_dtype)
    gamma_2 = self.param("gamma_2", scale_init, (width,), self.param_dtype)
    drop_path = layers.DropPath(self.drop_path_rate if drop_path_rate is None else drop_path_rate)

    h = layers.layer_norm(self.layer_norm_eps, name="norm1", **kw)(x)
    h = Attention(self.num_heads, self.grid, name="attn", **kw)(h)
    x = x + drop_path(gamma_1.astype(h.dtype) * h, deterministic)
    h = layers.layer_norm(self.layer_norm_eps, name="norm2", **kw)(x)
    h = Mlp(self.mlp_dim, name="mlp", **kw)(h)
    x = x + drop_path(gamma_2.astype(h.dtype) * h, deterministic)
    return layers.constrain(x, ("act_batch", "act_len", "act_embed"))


class ScanBlock(Block):
  """One step of the scanned block stack: (x [B, 1+N, D], this block's drop-path rate) -> (x, None)."""

  def __call__(self, x: jax.Array, drop_path_rate: jax.Array,
               deterministic: bool = True) -> tuple[jax.Array, None]:
    return super().__call__(x, deterministic, drop_path_rate), None


def sincos_2d_pos_embed(grid: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
  """Fixed 2-D sine-cosine position embedding [1+grid*grid, width] (row 0, [CLS]: zeros).

  Patch (row r, column c) gets [sin(c w), cos(c w), sin(r w), cos(r w)], each over the width/4
  frequencies w_k = temperature^(-k / (width/4)), k = 0 .. width/4 - 1 (MAE, big_vision).
  """
  if width % 4:
    raise ValueError(f"sincos2d position embedding needs a width divisible by 4, got {width}")
  freqs = temperature ** (-np.arange(width // 4) / (width // 4))
  rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")  # row-major patches
  col_angles = cols.reshape(-1, 1) * freqs[None]
  row_angles = rows.reshape(-1, 1) * freqs[None]
  table = np.concatenate([np.sin(col_angles), np.cos(col_angles), np.sin(row_angles),
                          np.cos(row_angles)], axis=1)
  return np.concatenate([np.zeros((1, width)), table], axis=0).astype(np.float32)


POS_EMB_KINDS = ("learned", "sincos2d", "learned_from_sincos2d")


def check_pos_emb_kind(kind: str) -> str:
  """`kind` if it is one of POS_EMB_KINDS, else a ValueError naming the config field."""
  if kind not in POS_EMB_KINDS:
    raise ValueError(f"model.vision_pos_emb_kind must be one of {POS_EMB_KINDS}, got {kind!r}")
  return kind


STEMS = ("patch", "conv")


def check_stem(stem: str, patch_size: int) -> str:
  """A clear error for an unknown `model.vision_stem`, or a conv stem with a non-power-of-2 patch."""
  if stem not in STEMS:
    raise ValueError(f"model.vision_stem must be one of {STEMS}, got {stem!r}")
  if stem == "conv" and (patch_size < 2 or patch_size & (patch_size - 1)):
    raise ValueError(f"model.vision_stem='conv' halves the image log2(patch_size) times; "
                     f"patch_size must be a power of 2, got {patch_size}")
  return stem


def conv_stem_channels(width: int, patch_size: int) -> list[int]:
  """Output channels of `ConvStem`'s log2(p) stride-2 convolutions: width/2^(n-1), ..., width/2,
  width, each at least 8 (also counted by `flops.patch_embed_flops`)."""
  num_convs = patch_size.bit_length() - 1  # log2(p): check_stem wants a power of 2
  return [max(width // 2 ** (num_convs - 1 - i), 8) for i in range(num_convs)]


class ConvStem(nn.Module):
  """A convolutional stem in place of the patch embedding (Xiao et al. 2021, "Early Convolutions
  Help Transformers See Better"): log2(p) 3x3 convolutions of stride 2, each followed by a ReLU,
  with `conv_stem_channels` channels (doubling up to `width`), then a 1x1 convolution to `width`. Each patch token then sees its p x p patch through small translation-equivariant
  filters (and a little beyond it: the 3x3 windows overlap) instead of one linear map of its raw
  pixels.

  Not part of BEiT-2 (no released checkpoint has it): an option for models trained from scratch
  on small images, where a linear patch embedding learns object shape slowly (README, demo).

  images [B, H, W, 3] -> [B, H/p, W/p, width].
  """
  width: int
  patch_size: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = images.astype(self.dtype)
    for i, channels in enumerate(conv_stem_channels(self.width, self.patch_size)):
      x = nn.Conv(channels, (3, 3), strides=(2, 2), padding="SAME", name=f"conv_{i}",
                  kernel_init=nn.with_logical_partitioning(nn.initializers.he_normal(),
                                                           (None, None, None, None)),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
                  **kw)(x)
      x = nn.relu(x)
    return nn.Conv(self.width, (1, 1), name="proj",
                   kernel_init=nn.with_logical_partitioning(layers.default_kernel_init,
                                                            (None, None, None, "embed")),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                   **kw)(x)


class VisionTransformer(nn.Module):
  """BEiT-2 ViT: patch embedding (or a conv stem), cls token, blocks, fc_norm + mean pooling.

  Attributes:
    image_res: the resolution the model is built for (the relative position tables depend on it).
    remat: rematerialise each block in the backward pass (`nn.remat`), saving activation memory.
    scan: run the blocks as one `nn.scan` (params `blocks/...` stacked `[depth, ...]`) instead of
      `depth` unrolled blocks (`blocks_0/...`, `blocks_1/...`): one block to compile, not depth.
  """
  image_res: int = 224
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  layer_norm_eps: float = 1e-6
  layer_scale_init: float = 0.1
  drop_path_rate: float = 0.1
  abs_pos_emb: bool = False  # BEiT's optional absolute position embedding (X2-VLM: off)
  # "learned" (a parameter, truncated-normal init with `pos_emb_init_std`), "sincos2d" (fixed
  # 2-D sine-cosine of the patch row and column, as MAE / big_vision's ViT; zero for [CLS]) or
  # "learned_from_sincos2d" (a parameter that starts as that sine-cosine table).
  pos_emb_kind: str = "learned"
  pos_emb_init_std: float = 0.02
  # "patch": BEiT's linear patch embedding (one p x p stride-p convolution, `patch_embed`);
  # "conv": a `ConvStem` (`stem`), for models trained from scratch (no checkpoint has one).
  stem: str = "patch"
  remat: bool = False
  remat_policy: str = "nothing_saveable"  # see layers.REMAT_POLICIES
  scan: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def grid(self) -> int:
    return self.image_res // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid * self.grid

  @nn.compact
  def __call__(self, images: jax.Array, deterministic: bool = True) -> jax.Array:
    """images: [B, H, W, 3] (normalised) -> image_embeds [B, 1+N, D]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    p = self.patch_size
    if check_stem(self.stem, p) == "conv":
      x = ConvStem(self.width, p, name="stem", **kw)(images)
    else:
      x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", name="patch_embed",
                  kernel_init=nn.with_logical_partitioning(layers.default_kernel_init,
                                                           (None, None, "patch", "embed")),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                  **kw)(images.astype(self.dtype))
    batch = x.shape[0]
    x = x.reshape(batch, -1, self.width)  # [B, N, D], row-major over the grid
    cls_token = self.param("cls_token",
                           nn.with_logical_partitioning(layers.default_kernel_init,
                                                        (None, None, "embed")),
                           (1, 1, self.width), self.param_dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls_token.astype(x.dtype), (batch, 1, self.width)), x],
                        axis=1)
    if self.abs_pos_emb:
      if check_pos_emb_kind(self.pos_emb_kind) == "sincos2d":
        pos_embed = jnp.asarray(sincos_2d_pos_embed(self.grid, self.width)[None])
      else:
        if self.pos_emb_kind == "learned":
          init = nn.initializers.truncated_normal(stddev=self.pos_emb_init_std)
        else:  # learned_from_sincos2d
          init = lambda key, shape, dtype: jnp.asarray(  # noqa: E731
              sincos_2d_pos_embed(self.grid, self.width)[None], dtype)
        pos_embed = self.param("pos_embed", nn.with_logical_partitioning(
            init, (None, None, "embed")), (1, x.shape[1], self.width), self.param_dtype)
      x = x + pos_embed.astype(x.dtype)
    x = layers.constrain(x, ("act_batch", "act_len", "act_embed"))

    # Stochastic depth grows linearly from 0 (first block) to drop_path_rate (last block).
    rates = np.linspace(0.0, self.drop_path_rate, self.depth) if self.depth > 1 else [0.0]
    block_args = (self.num_heads, self.mlp_dim, self.grid, self.layer_norm_eps,
                  self.layer_scale_init)
    if self.scan:
      block_cls = (nn.remat(ScanBlock, static_argnums=(3,), prevent_cse=False,
                            policy=layers.remat_policy(self.remat_policy))
                   if self.remat else ScanBlock)
      stack = layers.scan_stack(block_cls, self.depth, in_axes=(0, nn.broadcast))
      x, _ = stack(*block_args, name="blocks", **kw)(
          x, jnp.asarray(rates, jnp.float32), deterministic)
    else:
      block_cls = (nn.remat(Block, static_argnums=(2,),
                            policy=layers.remat_policy(self.remat_policy))
                   if self.remat else Block)
      for i in range(self.depth):
        x = block_cls(*block_args, float(rates[i]), name=f"blocks_{i}", **kw)(x, deterministic)

    patches = layers.layer_norm(self.layer_norm_eps, name="fc_norm", **kw)(x[:, 1:])
    pooled = jnp.mean(patches.astype(jnp.float32), axis=1, keepdims=True).astype(patches.dtype)
    return jnp.concatenate([pooled, patches], axis=1)
