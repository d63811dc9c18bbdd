"""`model.scan_layers`: the layer stacks as `nn.scan`s compute what the unrolled layers compute,
train the same on a sharded mesh, and checkpoints of either layout load into either."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from x2vlm_jax import checkpoint, convert, sharding, tasks, train
from x2vlm_jax.models import layer_stack, loading, x2vlm

# Two text + two fusion layers (so fusion layer i is text/layer_{2+i}), three ViT blocks, and a
# generative answer decoder: every stack kind with more than one layer.
SIZES = dict(image_res=32, patch_size=16, vision_width=32, vision_depth=3, vision_heads=2,
             vision_mlp_dim=64, vocab_size=64, text_width=32, text_layers=2, fusion_layers=2,
             text_heads=2, text_mlp_dim=64, max_position=16, embed_dim=8, answer_decoder_layers=2,
             num_frames=2)


def _flat_init(model):
  return convert.flatten(jax.device_get(nn.meta.unbox(
      model.init(jax.random.PRNGKey(0), *x2vlm.init_inputs(model))["params"])))


@pytest.fixture(scope="module")
def models():
  unrolled = x2vlm.X2VLM(**SIZES)
  scanned = unrolled.clone(scan_layers=True)
  return unrolled, scanned, _flat_init(unrolled)


def test_layouts_convert_both_ways(models):
  unrolled, scanned, params = models
  stacked = layer_stack.stack(params, scanned)
  want = {k: v.shape for k, v in _flat_init(scanned).items()}
  assert {k: v.shape for k, v in stacked.items()} == want
  assert want["vision/blocks/attn/qkv/kernel"] == (3, 32, 96)
  assert want["text/text_layers/attention/self/query/kernel"] == (2, 32, 32)
  assert want["answer_decoder/fusion_layers/crossattention/self/key/kernel"] == (2, 32, 32)
  # Fusion layer 1 is unrolled text layer 3; answer-decoder layer 0 its own layer 0.
  np.testing.assert_array_equal(stacked["text/fusion_layers/output/dense/kernel"][1],
                                params["text/layer_3/output/dense/kernel"])
  np.testing.assert_array_equal(stacked["answer_decoder/fusion_layers/intermediate/bias"][0],
                                params["answer_decoder/layer_0/intermediate/bias"])
  assert layer_stack.is_stacked(stacked) and not layer_stack.is_stacked(params)
  back = layer_stack.unstack(stacked)
  assert sorted(back) == sorted(params)
  for name, value in params.items():
    np.testing.assert_array_equal(back[name], value, err_msg=name)
  assert sorted(layer_stack.to_model_layout(stacked, unrolled)) == sorted(params)
  assert sorted(layer_stack.to_model_layout(params, scanned)) == sorted(stacked)
  holed = {k: v for k, v in params.items() if not k.startswith("vision/blocks_1/")}
  with pytest.raises(ValueError, match=r"vision/blocks/.*layers \[0, 2\]"):
    layer_stack.stack(holed, scanned)


@pytest.mark.parametrize("remat", [False, True])
def test_scanned_stacks_compute_the_unrolled_outputs_and_gradients(models, remat):
  unrolled, scanned, params = models
  unrolled = unrolled.clone(remat=remat, hidden_dropout=0.0, attention_dropout=0.0)
  scanned = scanned.clone(remat=remat, hidden_dropout=0.0, attention_dropout=0.0)
  stacked = convert.unflatten(layer_stack.stack(params, scanned))
  params = convert.unflatten(params)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(2, 32, 32, 3)), jnp.float32)
  ids = jnp.asarray(rng.integers(5, 64, size=(2, 6)), jnp.int32)
  atts = jnp.array([[1] * 6, [1] * 4 + [0] * 2])

  def outputs(model, p):
    out = model.apply({"params": p}, images, ids, atts)
    return out, (jnp.sum(out["itm_logits"]) + jnp.sum(out["box"]) + jnp.sum(out["mlm_logits"] ** 2)
                 + jnp.sum(out["answer_logits"] ** 2) + jnp.sum(out["image_feat"] * out["text_feat"]))

  def grads(model, p):
    return jax.jit(jax.grad(lambda q: outputs(model, q)[1]))(p)

  want, got = outputs(unrolled, params)[0], outputs(scanned, stacked)[0]
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)
  want_grads = convert.flatten(grads(unrolled, params))
  got_grads = layer_stack.unstack(convert.flatten(grads(scanned, stacked)))
  assert sorted(got_grads) == sorted(want_grads)
  for name in want_grads:
    np.testing.assert_allclose(got_grads[name], want_grads[name], rtol=1e-4, atol=1e-6,
                               err_msg=name)
  assert float(np.abs(want_grads["vision/blocks_0/attn/qkv/kernel"]).max()) > 1e-4


def test_dropout_and_drop_path_differ_between_scanned_layers(models):
  """Each scanned layer draws its own masks: with all-equal layers, training-mode outputs of
  the stack still vary with the dropout key, and evaluation mode ignores it."""
  _, scanned, params = models
  scanned = scanned.clone(drop_path_rate=0.5)
  variables = {"params": convert.unflatten(layer_stack.stack(params, scanned))}
  images = jnp.asarray(np.random.default_rng(1).normal(size=(4, 32, 32, 3)), jnp.float32)
  run = lambda key, det: scanned.apply(variables, images, det, method=x2vlm.X2VLM.encode_image,
                                       rngs={"dropout": key})
  a, b = run(jax.random.PRNGKey(0), False), run(jax.random.PRNGKey(1), False)
  assert float(jnp.abs(a - b).max()) > 1e-3
  np.testing.assert_array_equal(run(jax.random.PRNGKey(0), True), run(jax.random.PRNGKey(1), True))


def _no_dropout_config(scan):
  config = tiny.get_config()
  config.unlock()
  config.model.hidden_dropout = config.model.attention_dropout = 0.0
  config.model.drop_path_rate = 0.0
  config.model.scan_layers = scan
  return config


def test_scanned_train_step_on_a_sharded_mesh_matches_unrolled_on_one_device():
  from tools import benchmark

  def run(config, mesh, params):
    trainer = train.Trainer.create(config, mesh)
    state = trainer.init_state(seed=0, params=params)
    local = benchmark.synthetic_batches(config)
    losses = []
    for i in range(2):
      state, metrics = trainer.train_step(state, trainer.global_batches(local),
                                          jax.random.PRNGKey(i))
      losses.append(float(metrics["loss"]))
    return losses, convert.flatten(jax.device_get(state["params"])), trainer

  unrolled_cfg, scanned_cfg = _no_dropout_config(False), _no_dropout_config(True)
  one = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
  start = _flat_init(x2vlm.build_model(unrolled_cfg.model))
  want_losses, want_params, _ = run(unrolled_cfg, one, convert.unflatten(start))
  scanned_model = x2vlm.build_model(scanned_cfg.model)
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  losses, params, trainer = run(scanned_cfg, mesh,
                                convert.unflatten(layer_stack.stack(start, scanned_model)))
  np.testing.assert_allclose(losses, want_losses, atol=1e-5, rtol=0)
  params = layer_stack.unstack(params)
  assert max(float(np.abs(params[k] - want_params[k]).max()) for k in want_params) < 1e-5
  spec = trainer.state_shardings["params"]["vision"]["blocks"]["mlp"]["fc1"]["kernel"].spec
  assert tuple(spec) == (None, "fsdp", "tensor")  # layers replicated, weights sharded


@pytest.mark.parametrize("save_scanned", [False, True])
def test_a_checkpoint_of_either_layout_initialises_either_model(tmp_path, save_scanned):
  configs = {False: _no_dropout_config(False), True: _no_dropout_config(True)}
  params = _flat_init(x2vlm.build_model(configs[False].model))
  saved = layer_stack.to_model_layout(params, x2vlm.build_model(configs[save_scanned].model))
  checkpoint.save_params(tmp_path / "params", convert.unflatten(saved))
  for load_scanned in (False, True):
    loaded, _ = loading.load_params(tasks.build_model(configs[load_scanned]),
                                    str(tmp_path / "params"))
    loaded = convert.flatten(loaded)
    assert layer_stack.is_stacked(loaded) == load_scanned
    loaded = layer_stack.unstack(loaded)
    assert sorted(loaded) == sorted(params)
    for name, value in params.items():
      np.testing.assert_array_equal(loaded[name], value, err_msg=name)


def test_resuming_with_the_other_layout_says_so():
  unrolled = nn.meta.unbox(x2vlm.abstract_variables(x2vlm.X2VLM(**SIZES))["params"])
  scanned = nn.meta.unbox(x2vlm.abstract_variables(
      x2vlm.X2VLM(scan_layers=True, **SIZES))["params"])
  with pytest.raises(ValueError, match=r"(?s)unexpected in checkpoint.*/layer_0/.*"
                                       r"unrolled layer layout.*model.scan_layers"):
    checkpoint.check_tree_matches(unrolled, scanned, "/ckpt/7")
