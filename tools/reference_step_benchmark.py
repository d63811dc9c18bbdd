"""Times one region-batch pre-training step of the PyTorch X2-VLM reference on this machine.

For a same-machine comparison with `tools/benchmark.py --config configs/bench_small.py`
(docs/benchmarks.md). It runs the reference's own code from a checkout of
github.com/zengyan-97/X2-VLM (measured at commit 21ed5a5), which this repository does not ship:

  git clone https://github.com/zengyan-97/X2-VLM /path/X2-VLM
  python tools/reference_step_benchmark.py --reference-dir /path/X2-VLM [--warmup 2] [--steps 8]

Only import shims live here (transformers 5 / timm / torchvision / the reference's `dataset` and
`utils` packages); the model (`models.model_pretrain.XVLM` with its BEiT-2 ViT and xbert BERT),
losses, optimizer construction (`optim.create_optimizer`) and step sequence are the reference's:
  temp.clamp_ ; XVLM.forward(..., ret_bbox_loss=True, ret_match_loss=True) ; sum of ITC + ITM +
  MLM + bbox + GIoU ; backward ; clip_grad_norm_(1.0) ; optimizer.step()   (fp32, no apex)

Workload = configs/bench_small.py: BEiT-2 ViT 384 x 6 blocks x 6 heads (MLP 1536), 224 px, patch 16;
BERT 384 wide, 6 text + 3 fusion layers, 6 heads, FFN 1536, vocab 30522; embed_dim 256; 8 images,
8 region texts x 30 tokens, 6 masked positions. Random weights (seeded). Needs torch and
transformers (the test requirements); never imported by x2vlm_jax.

Prints one JSON line: step_time_median_s, examples_per_s, process_cpu_s_per_step, and
step_other_cpu_s (CPU seconds other processes used during each timed step: ~0 on a quiet machine).
"""
import argparse
import datetime
import json
import os
import resource
import statistics
import sys
import tempfile
import time
import types
from functools import partial

_parser = argparse.ArgumentParser(description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
_parser.add_argument("--reference-dir", required=True,
                     help="checkout of github.com/zengyan-97/X2-VLM (holds models/ and optim.py)")
_parser.add_argument("--warmup", type=int, default=2)
_parser.add_argument("--steps", type=int, default=8)
_parser.add_argument("--threads", type=int, default=0,
                     help="torch.set_num_threads; 0 = leave the default")
ARGS = _parser.parse_args()
if not os.path.exists(os.path.join(ARGS.reference_dir, "models", "model_pretrain.py")):
  _parser.error(f"--reference-dir {ARGS.reference_dir}: no models/model_pretrain.py there")
sys.path.insert(0, os.path.abspath(ARGS.reference_dir))

import numpy as np
import torch
import torch.nn as nn
import transformers  # before the fake torchvision below (transformers probes for it)

# ----------------------------------------------------------------------------- shims
# 1) timm is not installed: the reference only needs drop_path, to_2tuple, trunc_normal_, register_model
#    (same semantics as timm's versions).
def _drop_path(x, drop_prob: float = 0., training: bool = False):
  if drop_prob == 0. or not training:
    return x
  keep_prob = 1 - drop_prob
  shape = (x.shape[0],) + (1,) * (x.ndim - 1)
  random_tensor = x.new_empty(shape).bernoulli_(keep_prob)
  return x * random_tensor / keep_prob


def _to_2tuple(x):
  return tuple(x) if isinstance(x, (tuple, list)) else (x, x)


_timm = types.ModuleType("timm")
_timm_models = types.ModuleType("timm.models")
_timm_layers = types.ModuleType("timm.models.layers")
_timm_registry = types.ModuleType("timm.models.registry")
_timm_layers.drop_path = _drop_path
_timm_layers.to_2tuple = _to_2tuple
_timm_layers.trunc_normal_ = lambda t, mean=0., std=1., a=-2., b=2.: nn.init.trunc_normal_(t, mean, std, a, b)
_timm_registry.register_model = lambda f: f
_timm.models = _timm_models
_timm_models.layers = _timm_layers
_timm_models.registry = _timm_registry
sys.modules.update({"timm": _timm, "timm.models": _timm_models, "timm.models.layers": _timm_layers,
                    "timm.models.registry": _timm_registry})

# 2) the reference's `dataset` package (tokenizer) and `utils` package (needs ruamel/CiderD) are not
#    needed to build the model: only build_tokenizer(...).pad_token_id and read_json are used.
_dataset = types.ModuleType("dataset")
_dataset.build_tokenizer = lambda path: types.SimpleNamespace(pad_token_id=0)  # bert-base-uncased [PAD]
_utils = types.ModuleType("utils")
_utils.read_json = lambda p: json.load(open(p))
sys.modules.update({"dataset": _dataset, "utils": _utils})

# 2b) torchvision is not installed: models/box_ops.py only imports torchvision.ops.boxes.box_area.
_tv, _tv_ops, _tv_boxes = (types.ModuleType(n) for n in ("torchvision", "torchvision.ops", "torchvision.ops.boxes"))
_tv_boxes.box_area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # torchvision's definition
_tv.ops, _tv_ops.boxes = _tv_ops, _tv_boxes
sys.modules.update({"torchvision": _tv, "torchvision.ops": _tv_ops, "torchvision.ops.boxes": _tv_boxes})

# 3) transformers 5 moved / removed a few helpers that models/xbert.py imports or calls.
import transformers  # noqa: E402
import transformers.modeling_utils as _mu  # noqa: E402
import transformers.pytorch_utils as _pu  # noqa: E402
import transformers.optimization as _opt  # noqa: E402

_mu.apply_chunking_to_forward = _pu.apply_chunking_to_forward
_mu.prune_linear_layer = _pu.prune_linear_layer
_mu.find_pruneable_heads_and_indices = getattr(_pu, "find_pruneable_heads_and_indices", None)
_mu.get_parameter_dtype = lambda m: next(m.parameters()).dtype
import transformers.file_utils as _fu  # noqa: E402

# transformers 5's docstring decorators reject the reference's old-style docstrings: make them no-ops.
_fu.add_code_sample_docstrings = lambda *a, **k: (lambda f: f)
_fu.add_start_docstrings_to_model_forward = lambda *a, **k: (lambda f: f)
_fu.replace_return_docstrings = lambda *a, **k: (lambda f: f)
_opt.AdamW = torch.optim.AdamW  # optim.py: transformers.optimization.AdamW was removed (same update rule)


def _get_head_mask(self, head_mask, num_hidden_layers, is_attention_chunked=False):
  assert head_mask is None
  return [None] * num_hidden_layers


def _invert_attention_mask(self, encoder_attention_mask):
  # transformers 4.x ModuleUtilsMixin.invert_attention_mask
  if encoder_attention_mask.dim() == 3:
    ext = encoder_attention_mask[:, None, :, :]
  else:
    ext = encoder_attention_mask[:, None, None, :]
  ext = ext.to(dtype=self.dtype)
  return (1.0 - ext) * torch.finfo(self.dtype).min


from models import xbert  # noqa: E402

def _init_weights_4x(self):
  # transformers 4.x PreTrainedModel.init_weights: apply _init_weights, then tie the output embeddings
  # (BertForMaskedLM's MLM decoder) to the input word embeddings. transformers 5's version needs
  # post_init() bookkeeping that the reference classes never call.
  self.apply(self._init_weights)
  if isinstance(self, xbert.BertForMaskedLM) and getattr(self.config, "tie_word_embeddings", True):
    self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight


xbert.BertPreTrainedModel.init_weights = _init_weights_4x
xbert.BertPreTrainedModel.get_head_mask = _get_head_mask
xbert.BertPreTrainedModel.invert_attention_mask = _invert_attention_mask

# 4) models/beit2.beit_base_patch16 hard-codes the ViT-B width; build the bench_small ViT-S sized one
#    (384 wide, 6 heads, 6 blocks, mlp_ratio 4 -> 1536) with the reference's own VisionTransformer.
from models import beit2  # noqa: E402


def _beit_small_patch16(img_size, **kwargs):
  kwargs.pop("vision_num_hidden_layers", None)
  return beit2.VisionTransformer(img_size=img_size, patch_size=16, embed_dim=384, depth=6, num_heads=6,
                                 mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)


beit2.beit_base_patch16 = _beit_small_patch16

from models.model_pretrain import XVLM  # noqa: E402
import optim as ref_optim  # noqa: E402  (the reference's optim.create_optimizer)

# ----------------------------------------------------------------------------- configs (a temp dir)
CFG_DIR = tempfile.mkdtemp(prefix="x2vlm_reference_cfg_")


def write_configs():
  os.makedirs(os.path.join(CFG_DIR, "bert-small"), exist_ok=True)
  vision = os.path.join(CFG_DIR, "config_beit2_base_small.json")  # 'base' in the name selects beit_base_patch16
  json.dump({"ckpt": "none", "vision_width": 384, "patch_size": 16}, open(vision, "w"))
  bert = {"architectures": ["BertForMaskedLM"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
          "hidden_dropout_prob": 0.1, "hidden_size": 384, "initializer_range": 0.02,
          "intermediate_size": 1536, "layer_norm_eps": 1e-12, "max_position_embeddings": 512,
          "model_type": "bert", "num_attention_heads": 6, "num_hidden_layers": 9, "pad_token_id": 0,
          "type_vocab_size": 2, "vocab_size": 30522}
  json.dump(bert, open(os.path.join(CFG_DIR, "bert-small", "config.json"), "w"), indent=1)
  return {
      "use_beit_v2": True, "vision_config": vision, "image_res": 224, "patch_size": 16,
      "local_attn_depth": -1,
      "text_encoder": os.path.join(CFG_DIR, "bert-small"),
      "text_num_hidden_layers": 9, "text_fusion_start_at": 6,
      "mixed_in_batch": True, "calc_image_bbox_loss": False, "embed_dim": 256, "temp": 0.07,
      "max_words": 30, "max_tokens": 30, "max_masks": 6,
      "optimizer": {"opt": "adamW", "lr": 1e-4, "weight_decay": 0.01, "lr_mult": 2},
      "accelerator": {"FP16_OPT_LEVEL": "O0", "CLIP_GRAD_NORM": 1.0},
  }


# ----------------------------------------------------------------------------- synthetic region batch
def region_batch(rng, n_img=8, rb=8, L=30, M=6, res=224, patch=16, vocab=30522):
  """Same layout as x2vlm_jax tools/benchmark.py synthetic 'regions' batch (BERT ids)."""
  image = torch.from_numpy(rng.standard_normal((n_img, 3, res, res)).astype(np.float32))
  g = res // patch
  text_ids = np.zeros((rb, L), np.int64); text_atts = np.zeros((rb, L), np.int64)
  masked = np.zeros((rb, L), np.int64); masked_pos = np.zeros((rb, M), np.int64)
  masked_ids = np.full((rb, M), -100, np.int64)
  image_atts = np.zeros((rb, 1 + g * g), np.int64); target_bbox = np.zeros((rb, 4), np.float32)
  is_image = np.zeros((rb,), np.float32)
  idx_to_group_img = rng.integers(0, n_img, size=rb)
  for b in range(rb):
    length = int(rng.integers(5, L + 1))
    seq = np.concatenate([[101], rng.integers(999, vocab, size=length - 2), [102]])
    text_ids[b, :length] = seq; text_atts[b, :length] = 1
    n_pred = min(M, max(1, round(length * 0.5)), length - 1)
    pos = np.sort(rng.choice(np.arange(1, length), size=n_pred, replace=False))
    masked[b] = text_ids[b]; masked[b, pos] = 103
    masked_pos[b, :n_pred] = pos; masked_ids[b, :n_pred] = text_ids[b, pos]
    if b % 4 == 0:  # whole-image pair
      image_atts[b] = 1; target_bbox[b] = (0.5, 0.5, 1.0, 1.0); is_image[b] = 1.0
    else:  # boxed region
      w, h = rng.uniform(0.1, 0.7, size=2) * res
      x, y = rng.uniform(0, res - w), rng.uniform(0, res - h)
      m = np.zeros((g, g), np.int64)
      m[int(y // patch):int(np.ceil((y + h) / patch)), int(x // patch):int(np.ceil((x + w) / patch))] = 1
      image_atts[b, 0] = 1; image_atts[b, 1:] = m.reshape(-1)
      target_bbox[b] = ((x + w / 2) / res, (y + h / 2) / res, w / res, h / res)
  t = torch.from_numpy
  # order as Pretrain.run_region_iter unpacks region_batch[1:]
  return image, [t(idx_to_group_img), t(text_ids), t(text_atts), t(masked), t(masked_pos), t(masked_ids),
                 t(image_atts), t(target_bbox), t(is_image)]


# ----------------------------------------------------------------------------- the step
def train_step(model, optimizer, image, batch, clip=1.0):
  """Pretrain.train (temp clamp) + run_mixed_iter with only a region batch + run_region_iter."""
  with torch.no_grad():
    model.temp.clamp_(0.001, 0.5)
  optimizer.zero_grad()
  idx_to_group_img, text_ids, text_atts, text_ids_masked, masked_pos, masked_ids, image_atts, target_bbox, is_image = batch
  loss = model(image, text_ids, text_atts, text_ids_masked=text_ids_masked, masked_pos=masked_pos,
               masked_ids=masked_ids, image_atts=image_atts, idx_to_group_img=idx_to_group_img,
               target_bbox=target_bbox, is_image=is_image, ret_bbox_loss=True, ret_match_loss=True)
  total = loss['loss_itc'] + loss['loss_itm'] + loss['loss_mlm'] + loss['loss_bbox'] + loss['loss_giou']
  total.backward()  # ApexDDPAccelerator.backward_step with O0 / no amp
  gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)  # accelerator.optimizer_step
  optimizer.step()
  return {k: float(v) for k, v in loss.items()}, float(gnorm)


def _system_busy_s():
  """Busy CPU seconds of the whole machine (all processes) from /proc/stat."""
  f = open("/proc/stat").readline().split()[1:]
  v = [int(x) for x in f]
  idle = v[3] + v[4]  # idle + iowait
  return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def main():
  args = ARGS
  load_at_start = os.getloadavg()
  if args.threads:
    torch.set_num_threads(args.threads)

  import torch.distributed as dist  # contrastive loss all-gathers: a 1-process gloo group
  os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
  os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
  dist.init_process_group("gloo", rank=0, world_size=1)

  torch.manual_seed(0)
  config = write_configs()
  model = XVLM(config, load_vision_params=False, load_text_params=False, pretraining=True)
  tm = model.text_encoder
  tied = tm.cls.predictions.decoder.weight is tm.bert.embeddings.word_embeddings.weight
  assert tied, "MLM decoder must be tied to the word embeddings (as under transformers 4.x)"
  model.train()
  n_params = sum(p.numel() for p in model.parameters())
  opt_args = types.SimpleNamespace(**config["optimizer"])
  optimizer = ref_optim.create_optimizer(opt_args, model)

  rng = np.random.default_rng(0)
  image, batch = region_batch(rng)

  t0 = time.perf_counter()
  for _ in range(args.warmup):
    losses, gnorm = train_step(model, optimizer, image, batch)
  warm_s = time.perf_counter() - t0
  times, cpu, other = [], [], []
  for _ in range(args.steps):
    b0 = _system_busy_s(); c0 = time.process_time(); t0 = time.perf_counter()
    losses, gnorm = train_step(model, optimizer, image, batch)
    times.append(time.perf_counter() - t0); cpu.append(time.process_time() - c0)
    other.append(max(0.0, _system_busy_s() - b0 - cpu[-1]))
  med = statistics.median(times)
  print(json.dumps({
      "impl": "X2-VLM reference models.model_pretrain.XVLM, eager PyTorch",
      "reference_dir": os.path.abspath(args.reference_dir),
      "workload": "bench_small region batch: 8 images 224px, 8 texts x 30 tok, 6 masks; ITC+ITM+MLM+bbox",
      "step_time_median_s": round(med, 4),
      "step_time_p90_s": round(float(np.percentile(times, 90)), 4),
      "step_times_s": [round(t, 4) for t in times],
      "examples_per_s": round(8 / med, 3),
      "process_cpu_s_per_step": round(statistics.median(cpu), 4),
      "step_cpu_s": [round(c, 3) for c in cpu],
      # CPU seconds that OTHER processes used during each timed step (contention indicator; ~0 = quiet)
      "step_other_cpu_s": [round(o, 2) for o in other],
      "step_time_min_s": round(min(times), 4),
      "warmup_s": round(warm_s, 3), "warmup_steps": args.warmup, "steps": args.steps,
      "n_params": n_params, "mlm_decoder_tied": tied,
      "last_losses": {k: round(v, 4) for k, v in losses.items()}, "last_grad_norm": round(gnorm, 4),
      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
      "torch_version": torch.__version__, "transformers_version": transformers.__version__,
      "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
      "loadavg_at_start": load_at_start, "loadavg_at_end": os.getloadavg(),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }))
  dist.destroy_process_group()


if __name__ == "__main__":
  main()
