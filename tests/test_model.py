"""Model structure: the reference's exact parameter counts, dtypes, regions and video paths."""
import jax
import ml_collections
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest

from configs import x2vlm_base, x2vlm_large
from x2vlm_jax.models import layers, x2vlm
from x2vlm_jax.models.vit import relative_position_index, sincos_2d_pos_embed

TINY = dict(image_res=32, patch_size=16, vision_width=32, vision_depth=2, vision_heads=2,
            vision_mlp_dim=64, vocab_size=64, text_width=32, text_layers=1, fusion_layers=1,
            text_heads=2, text_mlp_dim=64, max_position=16, embed_dim=8, drop_path_rate=0.0,
            hidden_dropout=0.0, attention_dropout=0.0)


@pytest.mark.parametrize("module,expected", [(x2vlm_base, 254_758_401), (x2vlm_large, 592_949_057)])
def test_pretraining_parameter_count_matches_reference(module, expected):
  model = x2vlm.build_model(module.get_config().model)
  count = x2vlm.count_params(x2vlm.abstract_variables(model)["params"])
  print(f"{module.__name__}: {count:,} parameters")
  assert count == expected


def test_relative_position_index_layout():
  index = relative_position_index(2)  # 2x2 grid, table rows (3*3)+3 = 12
  assert index.shape == (5, 5)
  assert index[0, 0] == 11 and (index[0, 1:] == 9).all() and (index[1:, 0] == 10).all()
  # patch 0 at (0,0) vs patch 3 at (1,1): (0-1+1)*3 + (0-1+1) = 0; reversed: (1+1)*3 + (1+1) = 8
  assert index[1, 4] == 0 and index[4, 1] == 8 and index[1, 1] == 4


@pytest.fixture(scope="module")
def tiny():
  model = x2vlm.X2VLM(num_frames=3, **TINY)
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
  ids = jnp.array([[2, 5, 6, 3], [2, 7, 3, 0]])
  atts = (ids > 0).astype(jnp.int32)
  variables = nn.meta.unbox(model.init(jax.random.PRNGKey(0), images, ids, atts))
  return model, variables, images, ids, atts


def test_bfloat16_compute_is_close_to_float32(tiny):
  model, variables, images, ids, atts = tiny
  f32 = model.apply(variables, images, ids, atts)
  bf16 = x2vlm.X2VLM(num_frames=3, dtype=jnp.bfloat16, **TINY).apply(variables, images, ids, atts)
  for name in ("image_feat", "text_feat", "itm_logits", "box"):
    assert np.isfinite(np.asarray(bf16[name], np.float32)).all()
    np.testing.assert_allclose(np.asarray(bf16[name], np.float32), f32[name], atol=0.08)
  assert bf16["mlm_logits"].dtype == jnp.float32  # logits and losses stay float32


def test_regions_pool_the_patches_inside_the_box(tiny):
  model, variables, images, _, _ = tiny
  image_embeds = model.apply(variables, images, method=x2vlm.X2VLM.encode_image)
  atts = jnp.array([[1, 1, 0, 0, 1], [1, 1, 1, 1, 1]])  # 2x2 patches; region 0 = patches 0 and 3
  regions, full = model.apply(variables, images, atts, jnp.array([1, 0]),
                              method=x2vlm.X2VLM.encode_regions)
  np.testing.assert_allclose(regions[0, 0], (image_embeds[1, 1] + image_embeds[1, 4]) / 2, atol=1e-6)
  np.testing.assert_allclose(regions[1], image_embeds[0], atol=1e-6)  # whole box == image
  np.testing.assert_allclose(full[0], image_embeds[1], atol=0)


def test_video_is_the_mean_over_frames_plus_frame_embedding(tiny):
  model, variables, images, _, _ = tiny
  frames = jnp.stack([images, images[::-1], images], axis=1)  # [2, 3, H, W, 3]
  video = model.apply(variables, frames, method=x2vlm.X2VLM.encode_video)
  per_frame = [model.apply(variables, frames[:, f], method=x2vlm.X2VLM.encode_image) for f in range(3)]
  pos = variables["params"]["frame_pos_embed"]
  expected = sum(per_frame[f] + pos[f] for f in range(3)) / 3
  np.testing.assert_allclose(video, expected, atol=1e-5)
  assert video.shape == (2, 1 + 4, 32)


def test_gelu_is_torch_exact_gelu_and_its_derivative():
  """layers.gelu (written with erf, the cheap one on CPU) is torch's exact GELU in value and slope."""
  torch = pytest.importorskip("torch")
  x = np.linspace(-12.0, 12.0, 20001, dtype=np.float32)
  xt = torch.tensor(x.astype(np.float64), requires_grad=True)
  yt = torch.nn.functional.gelu(xt)
  (dyt,) = torch.autograd.grad(yt.sum(), xt)
  y = np.asarray(jax.jit(layers.gelu)(x), np.float64)
  dy = np.asarray(jax.jit(jax.grad(lambda v: jnp.sum(layers.gelu(v))))(x), np.float64)
  np.testing.assert_allclose(y, yt.detach().numpy(), rtol=0, atol=2e-6)
  np.testing.assert_allclose(dy, dyt.numpy(), rtol=0, atol=2e-6)
  assert layers.gelu(jnp.ones(3, jnp.bfloat16)).dtype == jnp.bfloat16


def test_unknown_model_field_fails_before_anything_runs():
  cfg = x2vlm_base.get_config().model
  with pytest.raises(AttributeError):
    cfg.vison_width = 3  # locked config: typo rejected
  bad = dict(TINY, vison_width=3)
  with pytest.raises(TypeError, match="vison_width"):
    x2vlm.X2VLM(**bad)


def test_optional_absolute_position_embedding_adds_one_table():
  base = x2vlm.count_params(x2vlm.abstract_variables(x2vlm.X2VLM(**TINY))["params"])
  with_pos = x2vlm.abstract_variables(x2vlm.X2VLM(vision_abs_pos_emb=True, **TINY))["params"]
  assert x2vlm.count_params(with_pos) - base == (1 + 4) * 32
  assert nn.meta.unbox(with_pos)["vision"]["pos_embed"].shape == (1, 5, 32)


def test_sincos_position_table_by_hand():
  """width 4 = one frequency (1.0): patch (row r, col c) -> [sin c, cos c, sin r, cos r]."""
  table = sincos_2d_pos_embed(grid=2, width=4)
  s, c = np.sin(1.0), np.cos(1.0)
  np.testing.assert_allclose(table, [[0, 0, 0, 0],  # [CLS]
                                     [0, 1, 0, 1], [s, c, 0, 1],  # row 0: columns 0, 1
                                     [0, 1, s, c], [s, c, s, c]], atol=1e-7)  # row 1
  assert sincos_2d_pos_embed(grid=3, width=8).shape == (10, 8)
  with pytest.raises(ValueError, match="divisible by 4"):
    sincos_2d_pos_embed(grid=2, width=6)


def test_sincos_position_embedding_is_fixed_and_added_to_every_patch():
  """No parameter; the ViT output is the learned-table model's with that table = the sin-cos one."""
  sincos = x2vlm.X2VLM(vision_abs_pos_emb=True, vision_pos_emb_kind="sincos2d", **TINY)
  learned = x2vlm.X2VLM(vision_abs_pos_emb=True, **TINY)
  params = nn.meta.unbox(sincos.init(jax.random.PRNGKey(0), *x2vlm.init_inputs(sincos)))["params"]
  assert "pos_embed" not in params["vision"]
  assert x2vlm.count_params(params) == x2vlm.count_params(
      x2vlm.abstract_variables(x2vlm.X2VLM(**TINY))["params"])
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
  with_table = dict(params, vision=dict(params["vision"],
                                        pos_embed=sincos_2d_pos_embed(2, 32)[None]))
  np.testing.assert_allclose(
      sincos.apply({"params": params}, images, method=sincos.encode_image),
      learned.apply({"params": with_table}, images, method=learned.encode_image), atol=1e-6)
  bad = x2vlm.X2VLM(vision_abs_pos_emb=True, vision_pos_emb_kind="sincos", **TINY)
  with pytest.raises(ValueError, match="sincos"):
    bad.init(jax.random.PRNGKey(0), *x2vlm.init_inputs(bad))
  from_sincos = x2vlm.X2VLM(vision_abs_pos_emb=True, vision_pos_emb_kind="learned_from_sincos2d",
                            **TINY)  # a parameter that starts as the table: the same outputs
  start = nn.meta.unbox(from_sincos.init(jax.random.PRNGKey(0),
                                         *x2vlm.init_inputs(from_sincos)))["params"]
  np.testing.assert_array_equal(start["vision"]["pos_embed"], sincos_2d_pos_embed(2, 32)[None])
  np.testing.assert_allclose(
      from_sincos.apply({"params": start}, images, method=from_sincos.encode_image),
      learned.apply({"params": with_table}, images, method=learned.encode_image), atol=1e-6)
  with pytest.raises(ValueError, match="vision_pos_emb_kind must be"):  # from a config: no compile
    x2vlm.build_model(ml_collections.ConfigDict(dict(x2vlm.model_config(),
                                                     vision_pos_emb_kind="sincos")))


def test_conv_stem_replaces_the_patch_embedding():
  """`vision_stem='conv'`: 4 stride-2 3x3 convs (8, 8, 16, 32 channels for width 32, at least 8)
  + a 1x1 conv to the width, in place of the 16x16 patch embedding; the same [B, 1+N, D] output,
  and a token now sees pixels of the neighbouring patch (the 3x3 windows overlap; with SAME
  padding of even sizes they reach right / down: patch (0, 0) sees the first column of (0, 1))."""
  conv = x2vlm.X2VLM(vision_stem="conv", **TINY)
  patch = x2vlm.X2VLM(**TINY)
  params = nn.meta.unbox(conv.init(jax.random.PRNGKey(0), *x2vlm.init_inputs(conv)))["params"]
  stem = params["vision"]["stem"]
  assert "patch_embed" not in params["vision"]
  assert {k: v["kernel"].shape for k, v in stem.items()} == {
      "conv_0": (3, 3, 3, 8), "conv_1": (3, 3, 8, 8), "conv_2": (3, 3, 8, 16),
      "conv_3": (3, 3, 16, 32), "proj": (1, 1, 32, 32)}
  stem_params = (27 * 8 + 8) + (72 * 8 + 8) + (72 * 16 + 16) + (144 * 32 + 32) + (32 * 32 + 32)
  patch_embed_params = 16 * 16 * 3 * 32 + 32
  assert x2vlm.count_params(params) - x2vlm.count_params(
      x2vlm.abstract_variables(patch)["params"]) == stem_params - patch_embed_params

  def patch_tokens(stem):  # the ViT without blocks: each token is its stem output, LayerNorm'd
    model = x2vlm.X2VLM(vision_stem=stem, **dict(TINY, vision_depth=0))
    variables = model.init(jax.random.PRNGKey(0), *x2vlm.init_inputs(model))
    return lambda images: model.apply(variables, images, method=model.encode_image)[:, 1:]

  images = jax.random.normal(jax.random.PRNGKey(1), (1, 32, 32, 3))
  nudged = images.at[0, 0, 16].add(1.0)  # the first pixel column of patch (0, 1)
  for stem, neighbour_sees_it in (("conv", True), ("patch", False)):
    tokens = patch_tokens(stem)
    assert tokens(images).shape == (1, 4, 32)
    changed = np.abs(np.asarray(tokens(nudged) - tokens(images))).max(-1)[0]  # per token [4]
    assert changed[1] > 1e-3 and (changed[0] > 1e-3) == neighbour_sees_it, (stem, changed)
    assert changed[2] == changed[3] == 0  # the row below: out of reach of a pixel in row 0


@pytest.mark.parametrize("fields,message", [
    (dict(vision_stem="cnn"), "vision_stem must be one of"),
    (dict(vision_stem="conv", patch_size=12, image_res=36), "power of 2")])
def test_bad_stem_fails_from_the_config(fields, message):
  with pytest.raises(ValueError, match=message):
    x2vlm.build_model(ml_collections.ConfigDict(dict(x2vlm.model_config(), **fields)))


def test_remat_policies_give_the_same_gradients(tiny):
  """Rematerialisation trades memory for compute; it must not change a single gradient."""
  _, variables, images, ids, atts = tiny

  def grads(**remat):
    model = x2vlm.X2VLM(num_frames=3, **TINY, **remat)

    def loss(params):
      out = model.apply({"params": params}, images, ids, atts)
      return (jnp.sum(out["itm_logits"]) + jnp.sum(out["box"]) + jnp.sum(out["mlm_logits"] ** 2)
              + jnp.sum(out["image_feat"] * out["text_feat"]))

    return jax.tree.leaves(jax.jit(jax.grad(loss))(variables["params"]))

  reference = grads()
  for policy in sorted(layers.REMAT_POLICIES):
    for got, want in zip(grads(remat=True, remat_policy=policy), reference):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=policy)
  with pytest.raises(ValueError, match="remat_policy 'dots'"):
    x2vlm.build_model(ml_collections.ConfigDict(dict(x2vlm.model_config(), remat_policy="dots")))


def test_texts_sharing_a_vision_row_fuse_as_if_it_were_repeated(tiny):
  """fuse(vision [B], texts [B*G]) == fuse(vision repeated G times, texts): keys/values shared."""
  model, variables, images, ids, atts = tiny
  vision = model.apply(variables, images, method=x2vlm.X2VLM.encode_image)
  vision_atts = jnp.array([[1, 1, 0, 1, 1], [1, 1, 1, 1, 1]])
  texts = model.apply(variables, ids[jnp.array([0, 1, 1, 0, 1, 0])],
                      atts[jnp.array([0, 1, 1, 0, 1, 0])], method=x2vlm.X2VLM.encode_text)
  text_atts = atts[jnp.array([0, 1, 1, 0, 1, 0])]
  fuse = lambda v, va: model.apply(variables, v, va, texts, text_atts, method=x2vlm.X2VLM.fuse)
  shared = fuse(vision, vision_atts)  # rows 0-2 with image 0, rows 3-5 with image 1
  repeated = fuse(jnp.repeat(vision, 3, axis=0), jnp.repeat(vision_atts, 3, axis=0))
  np.testing.assert_allclose(shared, repeated, atol=2e-6)
  assert np.abs(np.asarray(shared[0] - shared[3])).max() > 1e-3  # the images do differ
  with pytest.raises(ValueError, match="whole multiple"):
    model.apply(variables, vision, vision_atts, texts[:5], text_atts[:5],
                method=x2vlm.X2VLM.fuse)


def test_region_objective_equals_its_per_loss_composition(tiny):
  """The regions task's objective (two batched fusion passes) gives the losses of one fusion pass
  per loss."""
  from configs import tiny as tiny_config
  from x2vlm_jax import losses, tasks
  model, variables, images, _, _ = tiny
  config, task = tiny_config.get_config(), tasks.get("regions")
  rng = np.random.default_rng(0)
  ids = jnp.asarray(np.concatenate([np.full((3, 1), 2), rng.integers(5, 64, (3, 5))], 1))
  text_atts = jnp.asarray([[1] * 6, [1] * 4 + [0] * 2, [1] * 5 + [0]])
  batch = dict(image=images, text_ids=ids, text_atts=text_atts,
               text_ids_masked=ids.at[:, 2].set(4), masked_pos=jnp.full((3, 1), 2),
               masked_ids=ids[:, 2:3], idx_to_group_img=jnp.array([0, 1, 1]),
               image_atts=jnp.array([[1, 1, 1, 0, 0], [1, 0, 1, 0, 1], [1, 1, 1, 1, 1]]),
               target_bbox=jnp.array([[.3, .3, .2, .2], [.5, .6, .4, .3], [.5, .5, 1., 1.]]),
               is_image=jnp.array([0, 0, 1]), pair_id=jnp.arange(3))
  key = jax.random.PRNGKey(3)
  got = model.apply(variables, batch, key,
                    method=lambda m, b, r: task.loss(m, b, r, deterministic=True, config=config))

  def composed(m):
    region, full = m.encode_regions(images, batch["image_atts"], batch["idx_to_group_img"])
    text = m.encode_text(ids, text_atts)
    image_feat, text_feat = m.image_features(region), m.text_features(text)
    neg_image, neg_text = losses.sample_hard_negatives(key, image_feat, text_feat,
                                                       m.clamped_temp(), batch["pair_id"])
    itm = lambda v, va, t, ta: m.itm_logits(m.fuse(v, va, t, ta))
    atts = batch["image_atts"]
    negatives = jnp.concatenate([itm(region[neg_image], atts[neg_image], text, text_atts),
                                 itm(region, atts, text[neg_text], text_atts[neg_text])])
    mlm = m.mlm_logits(batch["text_ids_masked"], text_atts, region, atts, batch["masked_pos"])
    box = m.predict_box_in_image(full, text, text_atts)
    l1, giou = losses.box_losses(box, batch["target_bbox"], batch["is_image"])
    return {"itc": losses.itc_loss(image_feat, text_feat, m.clamped_temp(), batch["pair_id"]),
            "itm": losses.itm_loss(itm(region, atts, text, text_atts), negatives),
            "mlm": losses.mlm_loss(mlm, batch["masked_ids"]), "bbox_l1": l1, "bbox_giou": giou}

  want = model.apply(variables, method=composed)
  assert sorted(got) == sorted(want)
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert float(want[name]) > 0.01, name
