"""Mesh building, logical → mesh rules, divisibility fallback, global batches (8 CPU devices)."""

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from x2vlm_jax import sharding

P = jax.sharding.PartitionSpec


class _ToyBlock(nn.Module):
  """A transformer-ish block using the project's logical parameter names."""
  width: int = 16
  mlp: int = 32
  vocab: int = 12

  @nn.compact
  def __call__(self, ids):
    emb = self.param("embedding", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), ("vocab", "embed")), (self.vocab, self.width))
    x = emb[ids]
    x = nn.LayerNorm(name="LayerNorm", scale_init=nn.with_logical_partitioning(
        nn.initializers.ones, ("norm",)), bias_init=nn.with_logical_partitioning(
            nn.initializers.zeros, ("norm",)))(x)
    h = nn.Dense(self.mlp, name="intermediate", kernel_init=nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), ("embed", "mlp")), bias_init=nn.with_logical_partitioning(
            nn.initializers.zeros, ("mlp",)))(x)
    x = nn.Dense(self.width, name="output", kernel_init=nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), ("mlp", "embed")))(nn.gelu(h))
    table = self.param("relative_position_bias_table", nn.with_logical_partitioning(
        nn.initializers.zeros, ("rel_pos", "heads")), (7, 4))
    return x + table.sum()


def _mesh(data, fsdp, tensor):
  return sharding.make_mesh(ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor)))


def _boxed_params(vocab=12):
  model = _ToyBlock(vocab=vocab)
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((2, 3), jnp.int32))["params"]


@pytest.mark.parametrize("cfg,shape", [
    (dict(data=-1, fsdp=1, tensor=1), (8, 1, 1)),
    (dict(data=2, fsdp=-1, tensor=1), (2, 4, 1)),
    (dict(data=2, fsdp=2, tensor=2), (2, 2, 2)),
    (dict(data=-1), (8, 1, 1)),
])
def test_make_mesh_shapes(cfg, shape):
  mesh = sharding.make_mesh(cfg)
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert tuple(mesh.shape.values()) == shape
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


@pytest.mark.parametrize("cfg,match", [
    (dict(data=3, fsdp=1, tensor=1), r"data=3, fsdp=1, tensor=1.*3 devices in total but 8"),
    (dict(data=-1, fsdp=3, tensor=1), r"fixed axes \(3 devices\) do not divide the 8"),
    (dict(data=-1, fsdp=-1, tensor=1), r"at most one axis may be -1"),
    (dict(data=8, model=1), r"unknown axes \['model'\]"),
])
def test_make_mesh_errors(cfg, match):
  with pytest.raises(ValueError, match=match):
    sharding.make_mesh(cfg)


def test_logical_rules_from_config_normalises_and_validates():
  config = ml_collections.ConfigDict()
  config.sharding_rules = [["batch", ["data", "fsdp"]], ["embed", "fsdp"], ["norm", None]]
  assert sharding.logical_rules(config) == (
      ("batch", ("data", "fsdp")), ("embed", "fsdp"), ("norm", None))
  assert sharding.logical_rules(ml_collections.ConfigDict()) == tuple(
      (n, a) for n, a in sharding.default_sharding_rules())
  config.sharding_rules = [["embed", "model"]]
  with pytest.raises(ValueError, match=r"sharding_rules\[0\].*unknown mesh axis \['model'\]"):
    sharding.logical_rules(config)


_EXPECTED_SPECS = {  # from default_sharding_rules; size-1 mesh axes are harmless in a spec
    "embedding": P("tensor", "fsdp"),  # (vocab, embed)
    "LayerNorm/scale": P(None), "LayerNorm/bias": P(None),  # (norm,)
    "intermediate/kernel": P("fsdp", "tensor"), "intermediate/bias": P("tensor"),
    "output/kernel": P("tensor", "fsdp"),
    "output/bias": P(),  # declared without logical axes → replicated
    "relative_position_bias_table": P(None, "tensor"),  # (rel_pos, heads)
}


@pytest.mark.parametrize("mesh_shape,shard_shapes", [
    ((8, 1, 1), {"embedding": (12, 16), "intermediate/kernel": (16, 32), "output/kernel": (32, 16),
                 "intermediate/bias": (32,), "relative_position_bias_table": (7, 4)}),
    ((2, 4, 1), {"embedding": (12, 4), "intermediate/kernel": (4, 32), "output/kernel": (32, 4),
                 "intermediate/bias": (32,), "relative_position_bias_table": (7, 4)}),
    ((2, 2, 2), {"embedding": (6, 8), "intermediate/kernel": (8, 16), "output/kernel": (16, 8),
                 "intermediate/bias": (16,), "relative_position_bias_table": (7, 2)}),
])
def test_param_shardings_follow_logical_rules(mesh_shape, shard_shapes):
  mesh = _mesh(*mesh_shape)
  abstract = sharding.abstract_with_shardings(
      _boxed_params(), mesh, tuple(sharding.default_sharding_rules()))
  flat = {jax.tree_util.keystr(k, simple=True, separator="/"): v
          for k, v in jax.tree_util.tree_leaves_with_path(abstract)}
  assert {k: v.sharding.spec for k, v in flat.items()} == _EXPECTED_SPECS
  assert {k: flat[k].sharding.shard_shape(flat[k].shape) for k in shard_shapes} == shard_shapes
  assert flat["LayerNorm/scale"].sharding.is_fully_replicated
  # The abstract tree is directly usable as a jit target: arrays land where the spec says.
  params = jax.jit(lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract),
                   out_shardings=sharding.tree_shardings(abstract))()
  kernel = params["intermediate"]["kernel"]
  assert kernel.sharding.spec == _EXPECTED_SPECS["intermediate/kernel"]
  assert kernel.addressable_shards[0].data.shape == shard_shapes["intermediate/kernel"]


def test_indivisible_dims_fall_back_to_replicated(caplog):
  mesh = _mesh(2, 1, 4)  # tensor=4: vocab=6 and rel-pos heads=4 / mlp=32 behave differently
  specs = nn.get_partition_spec(_boxed_params(vocab=6))
  shapes = nn.meta.unbox(_boxed_params(vocab=6))
  with caplog.at_level(logging.WARNING):
    out = sharding.shardings_from_logical(
        specs, mesh, tuple(sharding.default_sharding_rules()), shapes=shapes)
  assert out["embedding"].spec == P(None, "fsdp")  # 6 % 4 != 0 → vocab dim replicated
  assert out["intermediate"]["kernel"].spec == P("fsdp", "tensor")  # 32 % 4 == 0
  assert out["relative_position_bias_table"].spec == P(None, "tensor")  # 4 % 4 == 0
  fallback_logs = [r.getMessage() for r in caplog.records if "not divisible" in r.getMessage()]
  assert len(fallback_logs) == 1 and "embedding[dim 0: 6 % 4 (tensor)]" in fallback_logs[0]
  # Without shapes there is no check: the rule is applied as written.
  no_check = sharding.shardings_from_logical(specs, mesh, tuple(sharding.default_sharding_rules()))
  assert no_check["embedding"].spec == P("tensor", "fsdp")


def test_optimizer_state_inherits_param_shardings():
  mesh = _mesh(2, 2, 2)
  boxed = _boxed_params()
  opt_abstract = sharding.abstract_with_shardings(
      jax.eval_shape(optax.adamw(1e-3).init, boxed), mesh, tuple(sharding.default_sharding_rules()))
  adam = opt_abstract[0]
  assert adam.mu["intermediate"]["kernel"].sharding.spec == P("fsdp", "tensor")
  assert adam.nu["embedding"].sharding.spec == P("tensor", "fsdp")
  assert adam.count.sharding.spec == P()


def test_make_global_batch_places_batch_and_replicates_scalars():
  mesh = _mesh(2, 2, 2)
  local = {"image": np.arange(8 * 3, dtype=np.float32).reshape(8, 3),
           "text": {"ids": np.arange(16, dtype=np.int32).reshape(8, 2)},
           "num_bad_records": np.int32(5)}
  batch = sharding.make_global_batch(local, mesh)
  image = batch["image"]
  assert image.shape == (8, 3) and image.sharding.spec == P(("data", "fsdp"))
  # 4 batch shards of 2 rows; each shard is replicated on the 2 tensor devices.
  for shard in image.addressable_shards:
    rows = shard.index[0]
    np.testing.assert_array_equal(shard.data, local["image"][rows])
    assert shard.data.shape == (2, 3)
  np.testing.assert_array_equal(batch["text"]["ids"], local["text"]["ids"])
  assert batch["num_bad_records"].sharding.is_fully_replicated
  assert int(batch["num_bad_records"]) == 5
  with pytest.raises(ValueError, match=r"batch\['image'\]: leading dim 6 .* 4 batch shards"):
    sharding.make_global_batch({"image": np.zeros((6, 3))}, mesh)


def test_describe_memory_counts_per_device_bytes():
  mesh = _mesh(2, 4, 1)
  rules = tuple(sharding.default_sharding_rules())
  params = sharding.abstract_with_shardings(_boxed_params(), mesh, rules)
  opt = sharding.abstract_with_shardings(
      jax.eval_shape(optax.adam(1e-3).init, _boxed_params()), mesh, rules)
  line = sharding.describe_memory(params, opt, mesh)
  n = 12 * 16 + 16 + 16 + 16 * 32 + 32 + 32 * 16 + 16 + 7 * 4
  assert f"params {n / 1e6:.1f}M" in line and "mesh data=2 fsdp=4 tensor=1" in line
  per_device, total, count = sharding._per_device_bytes(params)
  assert count == n and total == 4 * n
  # Sharded over fsdp=4: the three (…, embed) matrices; everything else replicated.
  sharded = 12 * 16 + 16 * 32 + 32 * 16
  assert per_device == 4 * (sharded // 4 + (n - sharded))
