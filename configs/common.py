"""Shared pieces of the config files: the full default config and `:arg` parsing.

Every config file returns `base_config()` with its own fields changed. The dict is locked, so a
misspelt key — in a file or on the command line (`--config.optim.lrr=1`) — fails at start-up.
"""
from __future__ import annotations

import ast

import ml_collections

from x2vlm_jax import optim, sharding
from x2vlm_jax.data import config as data_config_lib
from x2vlm_jax.models import x2vlm


def train_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      total_steps=1000,  # optimizer steps
      seed=0,
      log_every_steps=50,
      checkpoint_every_steps=1000,
      keep_checkpoints=3,
      async_checkpoints=True,
      eval_every_steps=0,  # 0: evaluate only at the end
      # Which batch kinds make one step, and their loss weights (reference: images 1, regions 1).
      image_text_weight=1.0,
      region_weight=1.0,
      # Weight of each loss term inside a batch kind (reference: all 1).
      loss_weights=ml_collections.ConfigDict(dict(itc=1.0, itm=1.0, mlm=1.0, bbox_l1=1.0,
                                                  bbox_giou=1.0)),
      # The reference scales the encoders' ITC gradient by 1/world_size (its AllGather backward);
      # 1.0 = the exact gradient of the global loss. Set 1/W to reproduce the reference.
      itc_feature_grad_scale=1.0,
      # The reference treats repeated (padding) pairs of a region batch as each other's negatives.
      dedupe_padded_pairs=True,
      max_steps_per_run=0,  # > 0: stop after this many steps in this invocation (tests, preemption)
  ))


def init_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      checkpoint="",  # Orbax params dir (from tools/convert_checkpoint.py) to start from
      allow_missing=[],  # fnmatch patterns of params that may be absent (fresh init)
  ))


def eval_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      retrieval_file="",  # {"image", "caption": [..]} JSONL for zero-shot retrieval
      retrieval_image_root="",
      grounding_file="",  # {"image", "text", "bbox"} JSONL for grounding accuracy
      grounding_image_root="",
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
  config.sharding_rules = [list(rule) for rule in sharding.default_sharding_rules()]
  config.train = train_config()
  config.init = init_config()
  config.eval = eval_config()
  config.demo = demo_config()
  return config


def apply_arg(config: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """`--config file.py:a.b=1,c=x` -> set those fields (typed by their defaults), then lock."""
  if arg:
    for item in arg.split(","):
      key, _, value = item.partition("=")
      *parents, leaf = key.strip().split(".")
      node = config
      for name in parents:
        node = node[name]
      if leaf not in node:
        raise KeyError(f"config arg {key!r}: no such field")
      current = node[leaf]
      if isinstance(current, str):
        node[leaf] = value
      else:
        node[leaf] = type(current)(ast.literal_eval(value)) if current is not None else ast.literal_eval(value)
  config.lock()
  return config
