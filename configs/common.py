"""Shared pieces of the config files: the full default config and `:arg` parsing.

Every config file returns `base_config()` with its own fields changed. The dict is locked, so a
misspelt key — in a file or on the command line (`--config.optim.lrr=1`) — fails at start-up.
"""
from __future__ import annotations

import ast
import difflib

import ml_collections

from x2vlm_jax import optim, sharding
from x2vlm_jax.data import config as data_config_lib
from x2vlm_jax.models import x2vlm


# The released X2-VLM sizes (BEiT-2 ViT-B/16 or ViT-L/16 + BERT-base/large-sized text and fusion).
MODEL_SIZES = {
    "base": dict(patch_size=16, vision_width=768, vision_depth=12, vision_heads=12,
                 vision_mlp_dim=3072, text_width=768, text_heads=12, text_mlp_dim=3072,
                 text_layers=12, fusion_layers=6, vocab_size=30522, embed_dim=256),
    "large": dict(patch_size=16, vision_width=1024, vision_depth=24, vision_heads=16,
                  vision_mlp_dim=4096, text_width=1024, text_heads=16, text_mlp_dim=4096,
                  text_layers=12, fusion_layers=6, vocab_size=30522, embed_dim=256),
}


def set_model_size(model_cfg: ml_collections.ConfigDict, size: str) -> None:
  """Sets the size fields of `config.model` to X2-VLM-base or -large."""
  if size not in MODEL_SIZES:
    raise ValueError(f"model size {size!r}: expected one of {sorted(MODEL_SIZES)}")
  model_cfg.update(MODEL_SIZES[size])


def train_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      total_steps=1000,  # optimizer steps
      seed=0,
      log_every_steps=50,
      checkpoint_every_steps=1000,
      keep_checkpoints=3,
      async_checkpoints=True,
      # > 0: also evaluate (config.eval) every this many steps, metrics only (no prediction files);
      # the evaluation after the last step always runs and writes its files.
      eval_every_steps=0,
      # Which batch kinds make one step, and their loss weights (reference pre-training: images 1,
      # regions 1). Fine-tuning configs set these to 0 and retrieval_weight or grounding_weight to 1.
      image_text_weight=1.0,
      region_weight=1.0,
      retrieval_weight=0.0,  # image-text batches with image ids: ITC (same-image targets) + ITM
      grounding_weight=0.0,  # {"image", "text", "bbox"} batches: box L1 + GIoU
      vqa_weight=0.0,  # {"image", "question", "answer"} batches: soft BCE over model.vqa_num_answers
      nlvr_weight=0.0,  # {"images": [a, b], "sentence", "label"} batches: 2-way cross-entropy
      # data.vqa batches for the answer decoder (model.vqa_decoder_layers): weighted answer NLL
      vqa_generative_weight=0.0,
      # Video (data.video_text / data.video_qa; frames through model.encode_video): video-text
      # ITC + ITM + MLM (stage-2 pre-training, mixed with image and region batches by these
      # weights), video retrieval ITC + ITM (MSR-VTT), video QA cross-entropy over the answer list.
      video_text_weight=0.0,
      video_retrieval_weight=0.0,
      video_qa_weight=0.0,
      # data.captioning batches (COCO captioning as MLM generation, model.mlm_head): the
      # label-smoothed KL loss at the inserted [MASK]s, smoothing caption_label_smoothing.
      captioning_weight=0.0,
      caption_label_smoothing=0.1,
      # Weight of each loss term inside a batch kind (reference: all 1).
      loss_weights=ml_collections.ConfigDict(dict(itc=1.0, itm=1.0, mlm=1.0, bbox_l1=1.0,
                                                  bbox_giou=1.0, vqa=1.0, nlvr=1.0,
                                                  vqa_answer=1.0, video_qa=1.0,
                                                  caption=1.0)),
      # The reference scales the encoders' ITC gradient by 1/world_size (its AllGather backward);
      # 1.0 = the exact gradient of the global loss. Set 1/W to reproduce the reference.
      itc_feature_grad_scale=1.0,
      # The reference treats repeated (padding) pairs of a region batch as each other's negatives.
      dedupe_padded_pairs=True,
      max_steps_per_run=0,  # > 0: stop after this many steps in this invocation (tests, preemption)
      # Steps whose loss or gradient is non-finite are always skipped (params and optimizer state
      # kept) and counted; > 0: after this many in a row, checkpoint and stop with NonFiniteError.
      halt_after_nonfinite_steps=20,
  ))


def init_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      checkpoint="",  # Orbax params dir (from tools/convert_checkpoint.py) to start from
      allow_missing=(),  # fnmatch patterns of params that may be absent (fresh init)
      # fnmatch patterns of stored params this model does not have and that are dropped (e.g. the
      # MLM head when fine-tuning from a pre-training checkpoint, as the reference's non-strict load)
      ignore_unexpected=(),
  ))


def eval_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      retrieval_file="",  # {"image", "caption": [..]} JSONL for zero-shot retrieval
      retrieval_image_root="",
      # {"image", "caption": {lang: [..]}} JSONL (Multi30K / multilingual COCO test): one image set,
      # TR/IR@k per language as eval/retrieval/<lang>/..., and their mean as eval/retrieval/mean/...
      multilingual_retrieval_file="",
      multilingual_retrieval_image_root="",
      multilingual_retrieval_languages=(),  # () = the languages of the first record
      # {"image", "text", "bbox"} JSONL files, one per split (val, testA, ...): Acc@0.5 and mIoU
      # each, as eval/grounding/<file stem>/acc
      grounding_files=(),
      grounding_image_root="",
      grounding_plus_one=False,  # IoU with the "+1 pixel" convention of the RefCOCO evaluation
      # VQA questions, one file per split (answers from data.vqa.answer_list): accuracy when the
      # records carry human answers, and vqa_<split>.json predictions (official result format).
      vqa_files=(),
      vqa_image_root="",
      vqa_k_test=128,  # answer decoder: candidates re-scored per question (by first-token prob.)
      nlvr_files=(),  # NLVR2 examples, one file per split -> accuracy
      nlvr_image_root="",
      # {"video", "caption": [..]} JSONL (MSR-VTT 1k-A): TR/IR@1/5/10 as eval/video_retrieval/...,
      # frames as data.video_text (num_frames; uniform, or fps sampling)
      video_retrieval_file="",
      video_k_test=128,  # its ITM re-ranking depth
      # {"video", "question", "answer"} JSONL, one per split (answers: data.video_qa.answer_list):
      # accuracy as eval/video_qa/<file stem>/acc (answers outside the list count as wrong)
      video_qa_files=(),
      video_root="",  # relative video paths of both are joined to this
      # {"image", optional "image_id", "caption": [references]} JSONL, one per split: captions
      # decoded from "[CLS] " + data.captioning.prompt, written as captions_<split>.json (COCO
      # result format), scored as eval/caption/<split>/bleu_4 and .../cider when references exist
      caption_files=(),
      caption_image_root="",
      caption_beams=3,  # 1: greedy
      caption_max_length=50,  # generated tokens at most
      caption_min_length=5,  # [SEP] is forbidden before this many tokens
      caption_length_penalty=0.0,  # > 0: finished scores / ((5 + length) / 6) ** this
      k_test=16,  # ITM re-ranking depth (reference: 256 COCO, 128 Flickr)
      batch_size=32,
      checkpoint="",  # for --mode eval: Orbax dir (a params-only or a training checkpoint)
  ))


def demo_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      data_dir="",  # non-empty: main.py writes the synthetic demo dataset here if it is missing
      num_train=2000,
      num_val=100,
      image_size=96,
      seed=0,
  ))


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = x2vlm.model_config()
  config.data = data_config_lib.data_config()
  config.data.unlock()
  config.optim = optim.optim_config()
  config.mesh = sharding.mesh_config()
  config.sharding_rules = tuple(tuple(rule) for rule in sharding.default_sharding_rules())
  config.train = train_config()
  config.init = init_config()
  config.eval = eval_config()
  config.demo = demo_config()
  return config


def finetune_config(size: str, image_res: int) -> ml_collections.ConfigDict:
  """Settings shared by the fine-tuning recipes (REFERENCE_DETAILED.md §4), unlocked.

  X2-VLM-`size` at `image_res`; no MLM head (a pre-training checkpoint's is dropped on load, and
  its relative-position tables are interpolated to `image_res`); no pre-training batch kinds; no
  gradient clipping; every parameter at `optim.lr` (nothing is new relative to an X2-VLM
  checkpoint); 10% linear warm-up then linear decay; weight decay 0.01.
  """
  config = base_config()
  config.model.image_res = image_res
  set_model_size(config.model, size)
  config.model.mlm_head = False
  config.train.image_text_weight = config.train.region_weight = 0.0
  config.init.ignore_unexpected = ["text/mlm_*"]
  config.optim.grad_clip_norm = 0.0
  config.optim.new_param_patterns = []
  config.optim.warmup_steps = 0.1
  config.optim.weight_decay = 0.01
  return config


def size_arg(arg: str | None) -> str:
  """`configs/finetune/X.py[:base|large]` -> the model size (default base)."""
  size = arg or "base"
  if size not in MODEL_SIZES:
    raise ValueError(f"config arg {arg!r}: expected one of {sorted(MODEL_SIZES)}")
  return size


def leaf_paths(node: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """Dotted paths of every leaf field of a config ("optim.lr", "model.vision_width", ...)."""
  paths = []
  for key, value in node.items():
    if isinstance(value, ml_collections.ConfigDict):
      paths += leaf_paths(value, f"{prefix}{key}.")
    else:
      paths.append(prefix + key)
  return paths


def unknown_field(config: ml_collections.ConfigDict, path: str) -> str | None:
  """None when the dotted `path` names a field (or sub-config) of `config`; else "no field 'path'"
  with the fields it may mean (same last name, or close spelling)."""
  node = config
  for name in path.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or name not in node:
      leaves = leaf_paths(config)
      last = path.rsplit(".", 1)[-1]
      guesses = sorted({leaf for leaf in leaves if leaf.rsplit(".", 1)[-1] == last}
                       | set(difflib.get_close_matches(path, leaves, n=3)))
      return f"no field '{path}'" + (f"; did you mean {', '.join(guesses)}?" if guesses else "")
    node = node[name]
  return None


def apply_arg(config: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """`--config file.py:a.b=1,c=x` -> set those fields (typed by their defaults), then lock."""
  if arg:
    for item in arg.split(","):
      key, _, value = item.partition("=")
      key = key.strip()
      problem = unknown_field(config, key)
      if problem:
        raise KeyError(f"config arg {key!r}: {problem}")
      *parents, leaf = key.split(".")
      node = config
      for name in parents:
        node = node[name]
      current = node[leaf]
      if isinstance(current, str):
        node[leaf] = value
      else:
        node[leaf] = type(current)(ast.literal_eval(value)) if current is not None else ast.literal_eval(value)
  config.lock()
  return config
