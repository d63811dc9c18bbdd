"""Shared pieces of the config files: the full default config and the one `:arg` grammar.

Every config file returns `base_config()` with its own fields changed, then `finish(config, arg)`.
The dict is locked, so a misspelt key — in a file, in its `:arg` or on the command line
(`--config.optim.lrr=1`) — fails at start-up. Every file takes `:arg` in the same grammar
(`parse_arg`): `configs/finetune/nlvr2.py:large,model.image_res=448`.
"""
from __future__ import annotations

import ast
import difflib
from typing import Mapping, NamedTuple, Sequence

import ml_collections

from x2vlm_jax import optim, sharding
from x2vlm_jax import tasks as tasks_lib
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
      total_steps=1000,  # optimizer steps (the one step count: the lr schedule ends here)
      seed=0,
      # Which tasks make one step, and their loss weights: one batch of each task per step, the
      # total loss sum(weight x task loss). Reference pre-training: images 1, regions 1.
      tasks=ml_collections.ConfigDict(dict(image_text=1.0, regions=1.0)),
      # Weight of each loss term inside a task (reference: all 1); one entry per term any task
      # reports (x2vlm_jax/tasks: `Task.loss_terms`).
      loss_weights=ml_collections.ConfigDict({term: 1.0 for term in tasks_lib.loss_terms()}),
      log_every_steps=50,
      checkpoint_every_steps=1000,
      keep_checkpoints=3,
      async_checkpoints=True,
      # The reference scales the encoders' ITC gradient by 1/world_size (its AllGather backward);
      # 1.0 = the exact gradient of the global loss. Set 1/W to reproduce the reference.
      itc_feature_grad_scale=1.0,
      max_steps_per_run=0,  # > 0: stop after this many steps in this invocation (tests, preemption)
      # Steps whose loss or gradient is non-finite are always skipped (params and optimizer state
      # kept) and counted; > 0: after this many in a row, checkpoint and stop with NonFiniteError.
      halt_after_nonfinite_steps=20,
  ))


def init_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      # A converted release (tools/convert_checkpoint.py), a params dir or a training workdir to
      # start from (x2vlm_jax/models/loading.py).
      checkpoint="",
      # fnmatch patterns of params that may be absent (fresh init); the heads the trained tasks
      # add are allowed anyway.
      allow_missing=(),
      # fnmatch patterns of stored params this model does not have and that are dropped (e.g. the
      # MLM head when fine-tuning from a pre-training checkpoint, as the reference's non-strict load)
      ignore_unexpected=(),
  ))


def base_config() -> ml_collections.ConfigDict:
  """Every field at its default: X2-VLM-base pre-training on image-text and region batches, no
  evaluation (config files add `config.evals` entries)."""
  config = ml_collections.ConfigDict()
  config.model = x2vlm.model_config()
  config.data = data_config_lib.data_config()
  for name, section in tasks_lib.data_sections().items():
    config.data[name] = section
  config.optim = optim.optim_config()
  config.mesh = sharding.mesh_config()
  config.sharding_rules = tuple(tuple(rule) for rule in sharding.default_sharding_rules())
  config.train = train_config()
  config.init = init_config()
  config.evals = ml_collections.ConfigDict()
  return config


def evaluator(type_name: str, **fields) -> ml_collections.ConfigDict:
  """A `config.evals.<name>` entry of `type_name` (x2vlm_jax/tasks) with `fields` set."""
  return tasks_lib.evaluator_config(type_name, **fields)


def finetune_config(size: str, image_res: int, task: str) -> ml_collections.ConfigDict:
  """Settings shared by the fine-tuning recipes (REFERENCE_DETAILED.md §4): X2-VLM-`size` at
  `image_res` trained on `task` alone; no MLM head (a pre-training checkpoint's is dropped on
  load, and its relative-position tables are interpolated to `image_res`); no gradient clipping;
  every parameter at `optim.lr` except those the task adds (lr x lr_mult); 10% linear warm-up
  then linear decay; weight decay 0.01."""
  config = base_config()
  config.model.image_res = image_res
  set_model_size(config.model, size)
  config.model.mlm_head = False
  config.train.tasks = {task: 1.0}
  config.init.ignore_unexpected = ["text/mlm_*"]
  config.optim.grad_clip_norm = 0.0
  config.optim.new_param_patterns = []
  config.optim.warmup_steps = 0.1
  config.optim.weight_decay = 0.01
  return config


# ---------------------------------------------------------------------------------- `:arg`
class ConfigArg(NamedTuple):
  """A config file's `:arg`, parsed: `file.py:flag,other_flag,key=value,a.b.c=value`."""
  flags: frozenset[str]  # the bare words
  options: dict[str, str]  # key=value items whose key is one of the file's own options
  overrides: tuple[str, ...]  # the other key=value items: config fields, set last


def parse_arg(arg: str | None, *, flags: Sequence[str] = (), options: Mapping[str, str] = (),
              file: str = "the config") -> ConfigArg:
  """One grammar for every config file: comma-separated items, each a flag the file declares
  (`large`, `quick`, ...), an option the file declares (`data_dir=PATH`), or a config field
  override (`model.image_res=384`, typed by the field's default, applied by `finish`). An
  unknown flag fails naming the accepted ones."""
  options = dict(options)
  chosen, values, overrides = set(), dict(options), []
  for item in (arg or "").split(","):
    item = item.strip()
    if not item:
      continue
    key, eq, value = item.partition("=")
    if not eq:
      if key not in flags:
        raise ValueError(f"{file}: unknown arg {key!r}; flags: {', '.join(flags) or 'none'}; "
                         f"options: {', '.join(f'{k}=...' for k in options) or 'none'}; or "
                         "field=value")
      chosen.add(key)
    elif key in options:
      values[key] = value
    else:
      overrides.append(item)
  return ConfigArg(frozenset(chosen), values, tuple(overrides))


def size_of(arg: ConfigArg, default: str = "base") -> str:
  """The model size flag of a parsed arg (`base` or `large`; at most one)."""
  sizes = sorted(arg.flags & set(MODEL_SIZES))
  if len(sizes) > 1:
    raise ValueError(f"config arg names two model sizes: {sizes}")
  return sizes[0] if sizes else default


def finish(config: ml_collections.ConfigDict, arg: ConfigArg | None = None
           ) -> ml_collections.ConfigDict:
  """Applies the arg's field overrides (typed by their defaults, unknown fields refused) and
  locks the config: the last line of every config file."""
  return apply_arg(config, ",".join(arg.overrides) if arg else None)


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
