"""tools/benchmark.py and x2vlm_jax/flops.py: hand-counted FLOPs, XLA's count, the CLI's JSON line,
and synthetic batches shaped exactly like the pipeline's."""
import importlib.util
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xla_env

from configs import tiny
from x2vlm_jax import flops, tasks
from x2vlm_jax.configs_loader import load_config
from x2vlm_jax.data import demo
from x2vlm_jax.models import x2vlm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _benchmark_module():
  spec = importlib.util.spec_from_file_location("benchmark_tool",
                                                os.path.join(ROOT, "tools", "benchmark.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _xla_flops(fn, *args):
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost["flops"])


def _abstract_params(model):
  return jax.eval_shape(lambda: nn.meta.unbox(
      model.init(jax.random.PRNGKey(0), *x2vlm.init_inputs(model))["params"]))


def test_vit_flops_match_a_hand_count_and_xla():
  config = tiny.get_config("model.vision_depth=1")
  m = config.model
  assert (m.image_res, m.patch_size, m.vision_width, m.vision_mlp_dim) == (32, 16, 32, 64)
  images = 2
  # 2 images of (32/16)^2 = 4 patches + cls = 5 tokens, width D = 32, MLP F = 64, patch 16x16x3.
  patch_embed = 2 * (2 * 4) * 32 * (16 * 16 * 3)  # 393,216
  qkv = 2 * (2 * 5) * (3 * 32) * 32  # 61,440
  scores_and_weighted_sum = 2 * (2 * 2 * 5 * 5 * 32)  # 6,400 (all heads together)
  proj = 2 * (2 * 5) * 32 * 32  # 20,480
  mlp = 2 * (2 * (2 * 5) * 64 * 32)  # 81,920
  hand = patch_embed + qkv + scores_and_weighted_sum + proj + mlp
  assert hand == 563_456
  assert flops.vit_flops(m, images) == hand
  assert flops.vit_block_flops(m, images) == qkv + scores_and_weighted_sum + proj + mlp

  model = x2vlm.build_model(m)
  params = _abstract_params(model)
  image_spec = jax.ShapeDtypeStruct((images, m.image_res, m.image_res, 3), jnp.float32)
  xla = _xla_flops(lambda p, x: model.apply({"params": p}, x, method=x2vlm.X2VLM.encode_image),
                   params, image_spec)
  assert 0.5 < xla / hand < 2.0, (xla, hand)


def test_conv_stem_flops_match_a_hand_count_and_xla():
  """`vision_stem='conv'` on 2 images of 32x32, width 32: 3x3 stride-2 convs to 16², 8², 4², 2²
  positions with 3->8->8->16->32 channels, then the 1x1 conv 32->32 over the 4 patches."""
  m = tiny.get_config("model.vision_depth=1,model.vision_stem=conv").model
  images = 2
  convs = [2 * images * 16 * 16 * 8 * (9 * 3), 2 * images * 8 * 8 * 8 * (9 * 8),
           2 * images * 4 * 4 * 16 * (9 * 8), 2 * images * 2 * 2 * 32 * (9 * 16)]
  proj = 2 * (images * 4) * 32 * 32
  hand = sum(convs) + proj
  assert hand == 532_480
  assert flops.patch_embed_flops(m, images) == hand
  assert flops.vit_flops(m, images) == hand + flops.vit_block_flops(m, images)

  model = x2vlm.build_model(m)
  image_spec = jax.ShapeDtypeStruct((images, m.image_res, m.image_res, 3), jnp.float32)
  xla = _xla_flops(lambda p, x: model.apply({"params": p}, x, method=x2vlm.X2VLM.encode_image),
                   _abstract_params(model), image_spec)
  assert 0.5 < xla / flops.vit_flops(m, images) < 2.0, (xla, hand)


def test_objective_forward_flops_are_near_xla_and_training_is_three_forwards():
  config = tiny.get_config("train.tasks.image_text=0.0")
  parts = tasks.forward_flops(config)["regions"]
  analytic = sum(parts.values())
  assert tasks.train_step_flops(config) == 3 * analytic
  # The fusion stack runs on 3R rows for ITM (positives, negative images, negative texts) and on
  # R rows for the box head; MLM re-runs the text stack. The cross-attention keys/values of the
  # region rows are computed once for the positive, negative-text and MLM texts.
  m, r, length = config.model, config.data.regions.batch_size, config.data.max_tokens
  s = flops.vision_tokens(m)
  kv_per_row = m.fusion_layers * 2 * flops.matmul_flops(s, m.text_width, m.vision_width)
  assert parts["box_fusion"] == flops.fusion_flops(m, r, length, s)
  assert parts["itm_fusion"] == 3 * parts["box_fusion"] - r * kv_per_row
  assert parts["mlm_encoder"] == parts["text_encoder"] + parts["box_fusion"] - r * kv_per_row

  task = tasks.get("regions")
  batch = task.synthetic_batch(config, np.random.default_rng(0))
  batch = {k: v for k, v in batch.items() if k not in ("num_bad_records", "num_records")}
  model = x2vlm.build_model(config.model)
  loss = lambda m, b, r: task.loss(m, b, r, deterministic=True, config=config)
  xla = _xla_flops(lambda p, b: model.apply({"params": p}, b, jax.random.PRNGKey(0),
                                            method=loss),
                   _abstract_params(model), batch)
  assert 0.5 < xla / analytic < 2.0, (xla, analytic)


def test_benchmark_cli_prints_one_json_line(tmp_path):
  # Regions only (like configs/bench_small.py) keeps the compile short; the persistent cache the
  # other tests use makes a re-run cheaper still.
  env = xla_env.subprocess_env(1)
  proc = subprocess.run(
      [sys.executable, "tools/benchmark.py", "--config",
       "configs/tiny.py:train.tasks.image_text=0.0", "--steps", "2", "--warmup", "1",
       "--profile", str(tmp_path / "trace"), "--set", "data.max_tokens=10"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [line for line in proc.stdout.splitlines() if line.strip()]
  assert len(lines) == 1, proc.stdout
  result = json.loads(lines[0])
  for key in ("config", "batch", "steps", "examples_per_s", "step_time_median_s",
              "step_time_p90_s", "compile_time_s", "flops_per_step", "tflops_per_s", "mfu",
              "peak_memory_bytes", "device_kind", "jax_version", "date"):
    assert key in result, key
  assert result["examples_per_s"] > 0 and result["tflops_per_s"] > 0
  assert result["batch"] == 8 and result["steps"] == 2
  assert result["step_time_p90_s"] >= result["step_time_median_s"] > 0
  assert result["mfu"] is None  # no peak is known for a CPU
  assert result["peak_memory_bytes"] > 0
  assert np.isfinite(result["loss"])
  # --profile: the trace exists and every part of the step shows up in the op time.
  profile = result["profile"]
  assert os.path.exists(profile["trace"])
  for part in ("vision/fwd", "vision/bwd", "text_layers/fwd", "fusion_layers/fwd",
               "fusion_layers/bwd", "optimizer/fwd", "heads_losses_other/fwd"):
    assert profile["by_part"].get(part, 0) > 0, (part, profile["by_part"])
  assert abs(sum(profile["by_part"].values()) - profile["op_thread_ms_per_step"]) < 1.5
  kind_ms = [ms for _, ms in profile["by_kind"]]
  assert kind_ms == sorted(kind_ms, reverse=True)
  assert abs(sum(kind_ms) - profile["op_thread_ms_per_step"]) < 0.1 * len(kind_ms)
  config = tiny.get_config("train.tasks.image_text=0.0,data.max_tokens=10")  # as --set made it
  assert result["flops_per_step"] == tasks.train_step_flops(config)


def test_peak_table():
  bench = _benchmark_module()
  assert bench.peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.0
  assert bench.peak_tflops("TPU v5 lite", "bfloat16") == 197.0
  assert bench.peak_tflops("TPU v5", "bfloat16") == 459.0
  assert bench.peak_tflops("cpu", "float32") is None


def test_fine_tuning_tasks_count_what_their_objectives_run():
  config = tiny.get_config("data.retrieval.batch_size=8,data.grounding.batch_size=8")
  assert config.data.image_text.batch_size == 8 and config.data.max_masks == 3
  m = config.model
  pre = tasks.get("image_text").forward_flops(config)
  retrieval = tasks.get("retrieval").forward_flops(config)
  assert retrieval == {k: v for k, v in pre.items() if not k.startswith("mlm")}
  grounding = tasks.get("grounding").forward_flops(config)
  assert sorted(grounding) == ["box_fusion", "box_head", "text_encoder", "vit"]
  kv_per_row = m.fusion_layers * 2 * flops.matmul_flops(flops.vision_tokens(m), m.text_width,
                                                        m.vision_width)
  assert grounding["box_fusion"] * 3 == pre["itm_fusion"] + 8 * kv_per_row  # 8 shared K/V rows
  with pytest.raises(NotImplementedError, match="vqa"):
    tasks.get("vqa").forward_flops(config)


@pytest.fixture(scope="module")
def demo_config(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("bench_demo"))
  paths = demo.make_demo_data(out, num_train=16, num_val=2, image_size=96, seed=0)
  config = load_config(f"configs/demo.py:quick,data_dir={out}")
  config.unlock()
  config.data.retrieval.files = (paths["train_image_text"],)
  config.data.retrieval.image_root = out
  config.data.grounding.files = (paths["train_grounding"],)
  config.data.grounding.image_root = out
  config.data.grounding.batch_size = 4
  config.lock()
  return config


@pytest.mark.parametrize("kind", ["image_text", "regions", "retrieval", "grounding"])
def test_synthetic_batch_is_shaped_like_a_pipeline_batch(demo_config, kind):
  config = demo_config
  task = tasks.get(kind)
  real = next(task.make_iterator(config, seed=0))
  synthetic = task.synthetic_batch(config, np.random.default_rng(0))
  assert sorted(synthetic) == sorted(real)
  for key in real:
    assert (synthetic[key].shape, synthetic[key].dtype) == (real[key].shape, real[key].dtype), key

  # And the values follow the pipeline's conventions.
  atts, ids = synthetic["text_atts"], synthetic["text_ids"]
  lengths = atts.sum(1)
  assert np.array_equal(atts, (np.arange(atts.shape[1]) < lengths[:, None]).astype(np.int32))
  assert np.all(ids[atts == 0] == 0) and np.all(ids[:, 0] == 2)
  assert np.all(ids < config.model.vocab_size)
  if kind == "grounding":
    box = synthetic["target_bbox"]
    assert np.all((box > 0) & (box <= 1))
    return
  padded = synthetic["masked_ids"] == -100
  assert np.all(synthetic["masked_pos"][padded] == 0) and not padded[:, 0].any()
  assert np.all(synthetic["masked_pos"] < lengths[:, None])
  if kind == "regions":
    assert np.all(synthetic["image_atts"][:, 0] == 1)
    assert np.all(synthetic["idx_to_group_img"] < synthetic["image"].shape[0])
    box = synthetic["target_bbox"]
    assert np.all((box > 0) & (box <= 1)) and np.all(box[:, :2] + box[:, 2:] / 2 <= 1 + 1e-6)


def test_reference_step_benchmark_names_a_missing_reference_checkout(tmp_path):
  """The reference's code is not shipped: without a checkout the tool says what it needs."""
  proc = subprocess.run([sys.executable, "tools/reference_step_benchmark.py", "--reference-dir",
                         str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 2
  assert f"--reference-dir {tmp_path}: no models/model_pretrain.py there" in proc.stderr


def test_temp_memory_mode_reports_the_growth_per_example(capsys):
  """`--temp-memory B1,B2`: the compiled step's temp bytes at both batch sizes (the first device
  only, as --config's mesh of one) and their difference per example."""
  result = _benchmark_module().main([
      "--config", "configs/tiny.py:train.tasks.image_text=0.0,mesh.data=1",
      "--temp-memory", "2,6", "--scan-layers", "--remat"])
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
  temp = result["temp_bytes"]
  assert result["mode"] == "temp_memory" and result["remat"] and result["scan_layers"]
  assert temp["6"] > temp["2"] > 0 and result["num_devices"] == 1
  assert result["temp_bytes_per_example"] == (temp["6"] - temp["2"]) / 4
  with pytest.raises(SystemExit, match="two batch sizes"):
    _benchmark_module().main(["--config", "configs/tiny.py", "--temp-memory", "6,2"])
