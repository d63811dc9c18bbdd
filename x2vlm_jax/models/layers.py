"""Small building blocks shared by the vision and text towers.

Every parameter carries logical axis names (`nn.with_logical_partitioning`); the mapping of those
names onto the device mesh lives in `x2vlm_jax/sharding.py` and the config, never here.

Logical parameter axes: `embed` (model width), `mlp` (FFN hidden), `heads` (merged heads x head_dim),
`kv_embed` (vision width entering cross-attention keys/values), `vocab`, `norm` (LayerNorm vectors,
replicated), `rel_pos`, `proj` (ITC embedding), `classes`, `patch`, `frames`.
Logical activation axes: `act_batch`, `act_len`, `act_embed`, `act_heads`, `act_mlp`, `act_vocab`.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

Dtype = Any

# Truncated-normal(0.02) as in BERT/BEiT initialisation (the reference truncates at +-2 std).
default_kernel_init = nn.initializers.truncated_normal(stddev=0.02)


def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU, x * (1 + erf(x / sqrt(2))) / 2: the formula of torch.nn.GELU() / HF BERT "gelu".

  Written with `erf` rather than `jax.nn.gelu(approximate=False)`, which evaluates `erfc`: on the
  CPU, XLA's erfc costs about 5x its erf (in the demo step the fusion layers' GELU took twice as
  long as the matmul before it). Both are within 1e-6 of a float64 GELU.
  """
  return x * 0.5 * (1.0 + jax.lax.erf(x * jnp.asarray(0.7071067811865476, x.dtype)))


def dense(features: int, names: Sequence[str | None], *, use_bias: bool = True, dtype: Dtype,
          param_dtype: Dtype, name: str, kernel_init=default_kernel_init) -> nn.Dense:
  """`nn.Dense` whose kernel [in, out] and bias [out] carry logical axis names `names`."""
  return nn.Dense(
      features,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(kernel_init, tuple(names)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (names[-1],)),
      name=name,
  )


def layer_norm(eps: float, *, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.LayerNorm:
  """LayerNorm with float32 statistics; scale/bias are replicated (`norm` logical axis)."""
  return nn.LayerNorm(
      epsilon=eps,
      dtype=dtype,
      param_dtype=param_dtype,
      use_fast_variance=False,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
      name=name,
  )


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Logical sharding constraint on an activation (a no-op outside a mesh/rules context)."""
  return nn.with_logical_constraint(x, tuple(names))


def attention(query: jax.Array, key: jax.Array, value: jax.Array, *, bias: jax.Array | None = None,
              mask: jax.Array | None = None, dropout_rate: float = 0.0,
              dropout_rng: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
  """Scaled dot-product attention, softmax in float32.

  Args:
    query: [B, T, N, Dh]; key, value: [B, S, N, Dh].
    bias: additive logits bias broadcastable to [B, N, T, S] (e.g. relative position bias).
    mask: boolean, True = attend, broadcastable to [B, N, T, S].
    dropout_rate: attention-probability dropout, only applied when `deterministic` is False.
  Returns:
    [B, T, N, Dh] in the query dtype.

  Without probability dropout this is `jax.nn.dot_product_attention` (cuDNN flash attention on GPU
  where shapes allow). A boolean mask is exactly the reference's additive -1e4 / -1e9 masks: no
  row is ever fully masked here ([CLS] / the region slot is always visible).
  """
  if deterministic or dropout_rate == 0.0:
    return jax.nn.dot_product_attention(query, key, value, bias=bias, mask=mask)
  depth = query.shape[-1]
  logits = jnp.einsum("btnd,bsnd->bnts", query, key,
                      preferred_element_type=jnp.float32) / jnp.sqrt(depth).astype(jnp.float32)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
  probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0).astype(value.dtype)
  return jnp.einsum("bnts,bsnd->btnd", probs, value)


class DropPath(nn.Module):
  """Stochastic depth: zero a residual branch per sample with probability `rate` (training only).

  `rate` may be a traced scalar (a layer's rate inside `nn.scan`); a rate of 0 then keeps every
  sample (Bernoulli(1)) instead of skipping the branch at trace time.
  """
  rate: float | jax.Array

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    if deterministic or (isinstance(self.rate, (int, float)) and self.rate == 0.0):
      return x
    keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.rate,
                                (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x / (1.0 - self.rate), 0.0).astype(x.dtype)


class MlpHead(nn.Module):
  """The reference's `build_mlp`: Dense(D, 2D) -> LayerNorm(eps 1e-5) -> GELU -> Dense(2D, k).

  Used for `itm_head` (k=2, class 1 = match), `bbox_head` (k=4) and task heads.
  """
  num_outputs: int
  hidden_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, D] -> [B, num_outputs]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = dense(self.hidden_dim, ("embed", "mlp"), name="dense_0", **kw)(x)
    x = layer_norm(1e-5, name="norm", **kw)(x)
    x = gelu(x)
    return dense(self.num_outputs, ("mlp", "classes"), name="dense_1", **kw)(x)


# `model.remat_policy`: what a rematerialised layer keeps from the forward pass.
REMAT_POLICIES = {
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,  # recompute all (least memory)
    "dots_saveable": jax.checkpoint_policies.dots_saveable,  # keep matmul outputs
    # keep matmul outputs without batch dims (weights-side products; attention scores recomputed)
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_policy(name: str):
  """The `jax.checkpoint` policy called `name` (one of REMAT_POLICIES)."""
  if name not in REMAT_POLICIES:
    raise ValueError(f"model.remat_policy {name!r}: expected one of {sorted(REMAT_POLICIES)}")
  return REMAT_POLICIES[name]


def scan_stack(layer_cls, length: int, in_axes):
  """`length` layers of `layer_cls` run as one `nn.scan` over a leading layer axis.

  `layer_cls.__call__(carry, *args)` must return `(carry, None)`; `in_axes` says, per extra
  argument, `nn.broadcast` (the same for every layer) or 0 (one slice per layer). Each layer has its
  own parameters, stacked as `[length, ...]` under the logical axis "layers", and its own
  initialisation and dropout randomness.
  """
  return nn.scan(layer_cls, variable_axes={"params": 0},
                 split_rngs={"params": True, "dropout": True}, in_axes=in_axes, length=length,
                 metadata_params={nn.PARTITION_NAME: "layers"})
