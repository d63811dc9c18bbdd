"""Optimizer: AdamW with per-group learning-rate multipliers and a weight-decay rule table.

X2-VLM pre-training (REFERENCE_DETAILED.md §2.8) uses AdamW(β=(0.9, 0.98), ε=1e-8, wd=0.01) with
four PyTorch parameter groups: {decay, no decay} × {lr, lr·lr_mult}. Here the groups are two
readable tables keyed by regexes on '/'-joined Flax parameter paths
(`text/layer_14/crossattention/self/query/kernel`):

* `new_param_patterns` — parameters that are new relative to the initialising checkpoints
  (cross-attention, ITC projections, temperature, ITM/box heads, frame position embedding) and
  train at `lr · lr_mult`.
* `DECAY_RULES[no_decay_rule]` — (regex, decay?) rows, first match wins.

The update of one parameter p with lr multiplier s is PyTorch param-group AdamW::

  p ← p − s · lr_t · (m̂ / (√v̂ + ε) + wd · mask · p)

i.e. the multiplier scales the decoupled decay term too (`optax.adamw` followed by a per-leaf
scale). The step counter counts optimizer updates: with `accumulate_steps = k` the schedule
advances once every k micro-batches.

Two small, knowing differences from the reference's `transformers.AdamW` (both O(ε) or O(lr²)):
it adds ε to √v before bias correction (ε_eff = ε·√(1−β₂ᵗ)), and it applies the decay to the
already-updated weight. We follow `torch.optim.AdamW`, which is what `optax.adamw` computes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import logging
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

# Parameters absent from the BEiT-2 / BERT checkpoints that initialise pre-training; they get
# lr × lr_mult (REFERENCE_DETAILED.md §2.8, `init_params`). Stage 2 (resuming from an X2-VLM
# checkpoint) should set this to just the parameters missing from that checkpoint, e.g.
# [r"(^|/)frame_pos_embed$"].
PRETRAIN_NEW_PARAM_PATTERNS = (
    r"(^|/)crossattention/",
    r"^vision_proj/",
    r"^text_proj/",
    r"^temp$",
    r"^itm_head/",
    r"^bbox_head/",
    r"(^|/)frame_pos_embed$",
)

# (regex searched in the '/'-joined path, decay?) — the first matching row decides.
DECAY_RULES: dict[str, tuple[tuple[str, bool], ...]] = {
    # The reference excludes from decay every parameter whose PyTorch name contains `bias`,
    # `LayerNorm.*`, `norm.*`, `norm1.*` or `norm2.*` (substring match). Hence q_bias/v_bias,
    # relative_position_bias_table and all LayerNorms (BERT `LayerNorm`, ViT `norm1/2`,
    # `fc_norm`) are not decayed, while kernels, embeddings, cls_token, gamma_1/2, temp and
    # frame_pos_embed are. Quirk kept for fidelity: the LayerNorm inside the ITM / box MLP heads
    # is `nn.Sequential(Linear, LayerNorm, ...)`, named `itm_head.1.weight` in PyTorch — no
    # "norm" in the name — so its scale IS decayed (its bias is not: it contains "bias").
    "reference": (
        (r"(^|/)(itm_head|bbox_head)/\w*norm\w*/scale$", True),
        (r"bias", False),
        (r"(?i)(^|/)\w*norm\w*/[^/]+$", False),
        (r".*", True),
    ),
    # Same, minus the quirk: no LayerNorm parameter anywhere is decayed.
    "all_norms": (
        (r"bias", False),
        (r"(?i)(^|/)\w*norm\w*/[^/]+$", False),
        (r".*", True),
    ),
}


def optim_config() -> ml_collections.ConfigDict:
  """Defaults of `config.optim` (X2-VLM base pre-training); every field is typed by its default."""
  return ml_collections.ConfigDict(dict(
      lr=1e-4,
      lr_mult=2.0,  # learning-rate multiplier for `new_param_patterns`
      new_param_patterns=tuple(PRETRAIN_NEW_PARAM_PATTERNS),
      weight_decay=0.01,
      b1=0.9,
      b2=0.98,
      eps=1e-8,
      # Linear warm-up length: optimizer steps if ≥ 1, a fraction of the run's steps
      # (config.train.total_steps, where the lr reaches 0) if in (0, 1). A float so that both 2500
      # and 0.1 can be assigned.
      warmup_steps=2500.0,
      grad_clip_norm=1.0,  # global-norm clipping of the (accumulated) gradient; 0 = off
      accumulate_steps=1,  # > 1: optax.MultiSteps, average k micro-batch gradients per update
      no_decay_rule="reference",  # a key of DECAY_RULES
  ))


def _is_box(x: Any) -> bool:
  return isinstance(x, nn.meta.AxisMetadata)


def _named_map(fn: Callable[[str, Any], Any], tree: Any) -> Any:
  """Maps `fn(path, leaf)` over a params-like tree; flax `Partitioned` boxes count as leaves.

  Treating boxes as leaves makes the optimizer work on boxed abstract params too, so that
  `jax.eval_shape(tx.init, boxed_params)` yields Adam moments carrying the logical axes.
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, x: fn(jax.tree_util.keystr(path, simple=True, separator="/"), x),
      tree, is_leaf=_is_box)


def _check_fields(optim_cfg: Mapping[str, Any]) -> None:
  unknown = set(optim_cfg) - set(optim_config())
  if unknown:
    raise ValueError(f"config.optim has unknown fields {sorted(unknown)}; "
                     f"expected a subset of {sorted(optim_config())}.")
  if optim_cfg.get("no_decay_rule", "reference") not in DECAY_RULES:
    raise ValueError(f"config.optim.no_decay_rule={optim_cfg['no_decay_rule']!r}; expected one of "
                     f"{sorted(DECAY_RULES)}.")


def _cfg(optim_cfg: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Defaults overlaid with `optim_cfg` (which may be partial), after validating field names."""
  _check_fields(optim_cfg)
  cfg = optim_config()
  cfg.update(dict(optim_cfg))
  return cfg


def lr_scale_fn(optim_cfg: Mapping[str, Any]) -> Callable[[str], float]:
  """`path -> lr multiplier`: `lr_mult` if any `new_param_patterns` regex matches, else 1."""
  cfg = _cfg(optim_cfg)
  patterns = [re.compile(p) for p in cfg.new_param_patterns]
  return lambda name: float(cfg.lr_mult) if any(p.search(name) for p in patterns) else 1.0


def decay_fn(optim_cfg: Mapping[str, Any]) -> Callable[[str], bool]:
  """`path -> whether weight decay applies`, from `DECAY_RULES[no_decay_rule]`."""
  rules = [(re.compile(r), d) for r, d in DECAY_RULES[_cfg(optim_cfg).no_decay_rule]]

  def decay(name: str) -> bool:
    for regex, decayed in rules:
      if regex.search(name):
        return decayed
    return True

  return decay


def param_groups(params: Any, optim_cfg: Mapping[str, Any]) -> dict[str, tuple[float, bool]]:
  """`{'/'-joined path: (lr multiplier, decayed?)}` for every leaf of `params` (boxed or not)."""
  scale, decay = lr_scale_fn(optim_cfg), decay_fn(optim_cfg)
  names = jax.tree.leaves(_named_map(lambda name, _: name, params))
  return {name: (scale(name), decay(name)) for name in names}


def format_param_groups(params: Any, optim_cfg: Mapping[str, Any]) -> str:
  """Multi-line summary for start-up logs: one line per group with its size and a few names."""
  sizes_by_name = {jax.tree_util.keystr(path, simple=True, separator="/"): math.prod(x.shape)
                   for path, x in jax.tree_util.tree_leaves_with_path(nn.meta.unbox(params))}
  groups: dict[tuple[float, bool], list[str]] = {}
  sizes: dict[tuple[float, bool], int] = {}
  for name, group in param_groups(params, optim_cfg).items():
    groups.setdefault(group, []).append(name)
    sizes[group] = sizes.get(group, 0) + sizes_by_name[name]
  lines = []
  for (scale, decayed), names in sorted(groups.items()):
    sample = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    lines.append(f"lr x{scale:g} {'decay' if decayed else 'no decay':8s} "
                 f"{len(names):4d} tensors {sizes[(scale, decayed)] / 1e6:8.2f}M  [{sample}]")
  return "\n".join(lines)


def resolve_warmup_steps(warmup_steps: float, total_steps: int) -> int:
  """Warm-up length in steps: `warmup_steps` itself if ≥ 1, else a fraction of `total_steps`."""
  if 0 < warmup_steps < 1:
    return int(warmup_steps * total_steps)
  return int(warmup_steps)


def warmup_linear_decay(peak_lr: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
  """lr(step): 0 → peak linearly over `warmup_steps`, then linearly → 0 at `total_steps`.

  Same values as `transformers.get_linear_schedule_with_warmup` with LambdaLR stepped after
  each optimizer step: update number t (0-based) uses lr(t), so the very first update uses 0.
  """

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warmup = step / max(warmup_steps, 1)
    decay = (total_steps - step) / max(total_steps - warmup_steps, 1)
    return peak_lr * jnp.clip(jnp.where(step < warmup_steps, warmup, decay), 0.0, 1.0)

  return schedule


def scale_by_param_group(scale_for: Callable[[str], float]) -> optax.GradientTransformation:
  """Multiplies each leaf's update by `scale_for(path)` (PyTorch param-group lr)."""

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params

    def scale(name, u):
      s = scale_for(name)
      return u if s == 1.0 else u * jnp.asarray(s, u.dtype)

    return _named_map(scale, updates), state

  return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(optim_cfg: Mapping[str, Any], params: Any, *, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Builds the AdamW chain and its (base) learning-rate schedule.

  Args:
    optim_cfg: `config.optim` (see `optim_config`); missing fields take the defaults.
    params: the parameter tree (arrays, abstract or `nn.Partitioned`-boxed); only used to
      validate the tables against real names — the transformation itself works on any tree
      whose paths follow the same naming.
    total_steps: optimizer steps of the run (config.train.total_steps): the lr reaches 0 there.

  Returns:
    `(tx, schedule)`: `tx.update(grads, opt_state, params)` needs `params` (weight decay);
    `schedule(count)` is the base lr of update number `count` (multiply by the group's
    multiplier from `param_groups` for new parameters).
  """
  cfg = _cfg(optim_cfg)
  total = int(total_steps)
  if total <= 0:
    raise ValueError(f"config.train.total_steps must be > 0 (optimizer steps); found {total}.")
  warmup = resolve_warmup_steps(cfg.warmup_steps, total)
  if not 0 <= warmup <= total:
    raise ValueError(f"config.optim.warmup_steps={cfg.warmup_steps} resolves to {warmup} steps, "
                     f"expected within [0, total_steps={total}].")
  if cfg.accumulate_steps < 1:
    raise ValueError(f"config.optim.accumulate_steps must be ≥ 1; found {cfg.accumulate_steps}.")
  groups = param_groups(params, cfg)
  if not groups:
    raise ValueError("make_optimizer: `params` has no leaves.")
  if cfg.lr_mult != 1.0 and cfg.new_param_patterns and all(s == 1.0 for s, _ in groups.values()):
    logging.warning("config.optim.new_param_patterns %s match no parameter (first names: %s).",
                    list(cfg.new_param_patterns), list(groups)[:5])

  schedule = warmup_linear_decay(cfg.lr, warmup, total)
  decay = decay_fn(cfg)
  tx = optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip_norm) if cfg.grad_clip_norm > 0
      else optax.identity(),
      optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                  mask=lambda tree: _named_map(lambda name, _: decay(name), tree)),
      scale_by_param_group(lr_scale_fn(cfg)),
  )
  if cfg.accumulate_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=cfg.accumulate_steps).gradient_transformation()
  return tx, schedule
