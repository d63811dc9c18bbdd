"""The sharded train step: identical results on every mesh, and losses that fall."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import tiny
from x2vlm_jax import sharding, train


def synthetic_batches(config, seed=0):
  """Random image-text and region batches with the pipeline's shapes (numpy)."""
  rng = np.random.default_rng(seed)
  m, d = config.model, config.data
  res, grid = m.image_res, m.image_res // m.patch_size
  b, r, n_img, L, M = d.image_text.batch_size, d.regions.batch_size, d.regions.max_images, d.max_tokens, d.max_masks

  def text(n):
    ids = rng.integers(5, m.vocab_size, size=(n, L)).astype(np.int32)
    lengths = rng.integers(4, L + 1, size=n)
    atts = (np.arange(L)[None] < lengths[:, None]).astype(np.int32)
    ids = ids * atts
    ids[:, 0] = 2
    pos = np.stack([rng.choice(np.arange(1, l), size=M, replace=False) for l in lengths]).astype(np.int32)
    masked_ids = np.take_along_axis(ids, pos, 1)
    masked_ids[:, -1] = -100
    masked = ids.copy()
    np.put_along_axis(masked, pos, 4, 1)
    return dict(text_ids=ids, text_atts=atts, text_ids_masked=masked, masked_pos=pos, masked_ids=masked_ids)

  image_text = dict(image=rng.normal(size=(b, res, res, 3)).astype(np.float32), **text(b))
  atts = (rng.random((r, 1 + grid * grid)) < 0.6).astype(np.int32)
  atts[:, 0] = 1
  atts[:, 1] = 1
  atts[-1] = 1
  regions = dict(image=rng.normal(size=(n_img, res, res, 3)).astype(np.float32),
                 idx_to_group_img=rng.integers(0, n_img, size=r).astype(np.int32),
                 image_atts=atts, target_bbox=rng.uniform(0.2, 0.6, size=(r, 4)).astype(np.float32),
                 is_image=np.eye(r, dtype=np.float32)[-1],
                 pair_id=np.array(list(range(r - 1)) + [0], np.int32), **text(r))
  return dict(image_text=image_text, regions=regions)


def run_steps(config, mesh, steps=2):
  trainer = train.Trainer.create(config, mesh)
  state = trainer.init_state(seed=0)
  local = synthetic_batches(config)
  losses = []
  for i in range(steps):
    state, metrics = trainer.train_step(state, trainer.global_batches(local), jax.random.PRNGKey(i))
    losses.append(float(metrics["loss"]))
  return losses, jax.tree.map(np.asarray, state["params"]), trainer


@pytest.fixture(scope="module")
def single_device():
  config = tiny.get_config()
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
  return run_steps(config, mesh)


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_every_mesh_matches_one_device(single_device, shape):
  config = tiny.get_config()
  mesh = sharding.make_mesh(dict(zip(("data", "fsdp", "tensor"), shape)))
  losses, params, trainer = run_steps(config, mesh)
  ref_losses, ref_params, _ = single_device
  np.testing.assert_allclose(losses, ref_losses, atol=1e-5, rtol=0)
  diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), params, ref_params)
  assert max(jax.tree.leaves(diffs)) < 1e-5, diffs
  if shape != (8, 1, 1):  # the weights really are sharded on this mesh
    spec = trainer.state_shardings["params"]["vision"]["blocks_0"]["mlp"]["fc1"]["kernel"].spec
    assert tuple(spec) == ("fsdp", "tensor")


def test_loss_falls_on_a_fixed_batch():
  config = tiny.get_config()
  config.unlock()
  config.optim.lr = 1e-3
  config.train.total_steps = 30
  config.optim.warmup_steps = 2.0
  mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
  losses, _, _ = run_steps(config, mesh, steps=25)
  assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:3]), losses
