"""Checkpointer round trips (sharded, re-sharded), keep-last-N, grain iterators, error messages."""

import logging
import os

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from x2vlm_jax import checkpoint
from x2vlm_jax import sharding

P = jax.sharding.PartitionSpec
NS = jax.sharding.NamedSharding


def _mesh(data, fsdp, tensor):
  return sharding.make_mesh(ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor)))


def _state(mesh):
  """{'step', 'params', 'opt_state'} with params sharded FSDP-style over the (2, 4, 1) mesh."""
  params = {
      "vision": {"cls_token": jnp.arange(8.0).reshape(1, 1, 8)},
      "text": {"layer_0": {"kernel": jnp.arange(64.0).reshape(8, 8)}},
      "temp": jnp.asarray(0.07),
  }
  shardings = {
      "vision": {"cls_token": NS(mesh, P(None, None, "fsdp"))},
      "text": {"layer_0": {"kernel": NS(mesh, P("fsdp", None))}},
      "temp": NS(mesh, P()),
  }
  params = jax.device_put(params, shardings)
  opt_state = jax.jit(optax.adamw(1e-3).init)(params)
  return {"step": jnp.asarray(7, jnp.int32), "params": params, "opt_state": opt_state}


def _abstract(tree, sharding_fn):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_fn(x)),
                      tree)


def _iterator():
  return iter(grain.MapDataset.range(100).shuffle(seed=0).batch(4).to_iter_dataset())


def test_round_trip_into_a_different_sharding(tmp_path):
  state = _state(_mesh(2, 4, 1))
  with checkpoint.Checkpointer(tmp_path / "ckpt", keep=2, every_steps=1) as ckpt:
    assert ckpt.save(7, state)
    ckpt.wait()
    assert ckpt.latest_step() == 7
    # Restore onto another mesh layout: everything sharded on tensor where it divides.
    other = _mesh(1, 1, 8)
    target = _abstract(state, lambda x: NS(other, P("tensor") if x.ndim and x.shape[0] % 8 == 0
                                           else P()))
    restored = ckpt.restore(None, target)
  kernel = restored["params"]["text"]["layer_0"]["kernel"]
  assert kernel.sharding == NS(other, P("tensor"))
  assert kernel.addressable_shards[0].data.shape == (1, 8)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))
    assert a.dtype == b.dtype


def test_interval_and_keep_last_n(tmp_path):
  state = {"w": jnp.ones((4,))}
  ckpt = checkpoint.Checkpointer(tmp_path, keep=2, every_steps=10, async_save=False)
  saved = [s for s in range(0, 41, 5) if ckpt.save(s, jax.tree.map(lambda x: x * s, state))]
  assert saved == [0, 10, 20, 30, 40]
  assert ckpt.save(43, state, force=True)
  ckpt.wait()
  assert ckpt.all_steps() == [40, 43]
  assert sorted(int(d) for d in os.listdir(tmp_path) if d.isdigit()) == [40, 43]
  np.testing.assert_array_equal(ckpt.restore(40, state)["w"], 40 * np.ones(4))
  # A step already saved (the last step of a run that is also on the interval) is not rewritten.
  assert not ckpt.save(43, jax.tree.map(lambda x: 2 * x, state), force=True)
  np.testing.assert_array_equal(ckpt.restore(43, state)["w"], np.ones(4))
  ckpt.close()


def test_data_iterators_resume_at_the_right_element(tmp_path, caplog):
  image_it, region_it = _iterator(), iter(grain.MapDataset.range(10, 20).to_iter_dataset())
  for _ in range(3):
    next(image_it)
  next(region_it)
  state = {"w": jnp.zeros((2,))}
  ckpt = checkpoint.Checkpointer(tmp_path, every_steps=1)
  ckpt.save(3, state, {"image": image_it, "region": region_it})
  want_image = [next(image_it) for _ in range(2)]  # advancing after save must not leak into it
  want_region = next(region_it)
  ckpt.wait()

  fresh_image, fresh_region = _iterator(), iter(grain.MapDataset.range(10, 20).to_iter_dataset())
  ckpt.restore(3, state, {"image": fresh_image, "region": fresh_region})
  np.testing.assert_array_equal(next(fresh_image), want_image[0])
  np.testing.assert_array_equal(next(fresh_image), want_image[1])
  assert next(fresh_region) == want_region == 11
  with pytest.raises(ValueError, match=r"no data iterator 'video'; saved: \['image', 'region'\]"):
    ckpt.restore(3, state, {"video": _iterator()})
  ckpt.close()

  # A fresh process that declares its iterators reads the step's items without a warning.
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    with checkpoint.Checkpointer(tmp_path, data_names=("image", "region")) as resumed:
      again = _iterator()
      resumed.restore(3, state, {"image": again})
  np.testing.assert_array_equal(next(again), want_image[0])
  assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_params_of_a_training_step_read_without_warnings(tmp_path, caplog):
  """`load_any_params(workdir)` (evaluation, inference, init from a run) reads the latest step's
  params alone, and without Orbax's 'Metadata file does not exist' warning."""
  params = {"dense": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}}
  with checkpoint.Checkpointer(tmp_path / "checkpoints", every_steps=1) as ckpt:
    ckpt.save(5, {"params": params, "step": jnp.int32(5)})
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    loaded, step = checkpoint.load_any_params(tmp_path)
  assert step == 5
  np.testing.assert_array_equal(loaded["dense"]["kernel"], params["dense"]["kernel"])
  assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_mismatch_lists_missing_unexpected_and_shapes(tmp_path):
  stored = {"params": {"a": {"kernel": np.zeros((4, 8), np.float32)},
                       "old_head": {"bias": np.zeros((3,), np.float32)},
                       "b": np.zeros((5,), np.float32)}}
  ckpt = checkpoint.Checkpointer(tmp_path / "run", async_save=False)
  ckpt.save(1, stored, force=True)
  target = {"params": {"a": {"kernel": jax.ShapeDtypeStruct((8, 4), jnp.float32)},
                       "new_head": {"kernel": jax.ShapeDtypeStruct((2, 2), jnp.float32)},
                       "b": jax.ShapeDtypeStruct((5,), jnp.float32)}}
  with pytest.raises(ValueError) as err:
    ckpt.restore(1, target)
  msg = str(err.value)
  assert str(tmp_path / "run" / "1" / "state") in msg
  assert "missing in checkpoint (1):\n    params/new_head/kernel: expected (2, 2)" in msg
  assert "unexpected in checkpoint (1):\n    params/old_head/bias: found (3,)" in msg
  assert "shape mismatch (1):\n    params/a/kernel: expected (8, 4), found (4, 8)" in msg
  with pytest.raises(FileNotFoundError, match=r"step 2 .*found steps \[1\]"):
    ckpt.restore(2, target)
  ckpt.close()


def test_corrupt_checkpoint_names_the_directory(tmp_path):
  state = {"w": jnp.arange(1000.0)}
  ckpt = checkpoint.Checkpointer(tmp_path, async_save=False)
  ckpt.save(5, state, force=True)
  # Truncate every data file of the state item.
  state_dir = tmp_path / "5" / "state"
  for root, _, files in os.walk(state_dir):
    for f in files:
      if os.path.basename(root) == "d":
        with open(os.path.join(root, f), "r+b") as fh:
          fh.truncate(3)
  with pytest.raises(checkpoint.CheckpointError, match=str(tmp_path / "5")):
    ckpt.restore(5, state)
  ckpt.close()


def test_params_only_round_trip_and_mismatch(tmp_path):
  params = {"vision": {"cls_token": np.ones((1, 1, 4), np.float32)},
            "text": {"bias": np.arange(3, dtype=np.float32)}}
  path = tmp_path / "converted"
  checkpoint.save_params(path, params)
  with pytest.raises(FileExistsError):
    checkpoint.save_params(path, params)
  host = checkpoint.load_params(path)
  assert isinstance(host["text"]["bias"], np.ndarray)
  np.testing.assert_array_equal(host["text"]["bias"], params["text"]["bias"])
  mesh = _mesh(8, 1, 1)
  target = _abstract(params, lambda x: NS(mesh, P()))
  on_device = checkpoint.load_params(path, target)
  assert on_device["vision"]["cls_token"].sharding.is_fully_replicated
  bad = dict(target, text={"bias": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=NS(mesh, P()))})
  with pytest.raises(ValueError, match=r"text/bias: expected \(4,\), found \(3,\)"):
    checkpoint.load_params(path, bad)
  with pytest.raises(FileNotFoundError, match="No params checkpoint"):
    checkpoint.load_params(tmp_path / "nope")
  os.remove(path / "_METADATA")
  with pytest.raises(checkpoint.CheckpointError, match=str(path)):
    checkpoint.load_params(path)
