"""Loading parameters into an `X2VLM`: one function for training, evaluation and inference.

  params, step = load_params(model, "runs/demo")                       # a training workdir
  params, step = load_params(model, "ckpt/x2vlm_base_4m",              # a converted release
                             allow_missing=("my_head/*",), ignore_unexpected=("text/mlm_*",))

`source` is an Orbax params directory (`tools/convert_checkpoint.py`, `checkpoint.save_params`;
step 0), a training workdir (its latest checkpoint) or a workdir's `checkpoints/` directory. The
stored arrays are matched to the model by name and shape before anything is placed on a device:

  * names matched by `ignore_unexpected` (fnmatch) that the model lacks are dropped (e.g. the MLM
    head when fine-tuning from a pre-training checkpoint, the reference's non-strict load);
  * names matched by `allow_missing` may be absent and start from a fresh init with `seed`
    (the heads a fine-tuning task adds);
  * relative-position tables stored for another image_res are interpolated to the model's (as the
    reference does when fine-tuning at 384 from a 224 checkpoint); a frame embedding stored for
    another number of frames keeps its first frames (the others start at 0);
  * an answer decoder absent from the checkpoint starts as the text stack's fusion layers,
    embeddings and MLM head (the reference initialises its `text_decoder` that way);
  * either layer layout (`model.scan_layers`) loads into either: everything above happens in the
    unrolled layout (the names in messages and patterns), the result has the model's.
Anything else that differs fails with `CheckpointMismatchError` (an `errors.InputError`: command
lines print it without a traceback): one summary line, each differing name once (missing,
unexpected or mis-shaped), the config.model fields the checkpoint's shapes imply
(`convert.implied_model_fields`) and the config fields that would allow the rest. A `source`
that does not exist, or is neither a params dir nor a workdir with checkpoints, is an InputError
naming it.
"""
from __future__ import annotations

import fnmatch
import logging
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np

from x2vlm_jax import errors
from x2vlm_jax.models import layer_stack, x2vlm

# Files an Orbax params directory holds at its top (`checkpoint.save_params`, older Orbax too).
_PARAMS_DIR_MARKERS = ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt", "checkpoint")
_TORCH_SUFFIXES = (".th", ".pth", ".pt", ".bin", ".tar")
_EXPECTED = ("a params dir (tools/convert_checkpoint.py, checkpoint.save_params) or a training "
             "workdir with checkpoints/<step>")


class CheckpointMismatchError(errors.InputError):
  """A stored checkpoint does not fit the model; the message is the whole report."""


def _matches(name: str, patterns: Sequence[str]) -> bool:
  return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _resize_frames(stored: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
  """Frame embeddings [F_stored, 1, D] -> [F, 1, D]: the first frames kept, the rest 0."""
  keep = min(stored.shape[0], target_shape[0])
  resized = np.zeros(target_shape, np.asarray(stored).dtype)
  resized[:keep] = np.asarray(stored)[:keep]
  return resized


def match_to_model(stored: dict[str, Any], model: x2vlm.X2VLM, *, where: str,
                   allow_missing: Sequence[str] = (), ignore_unexpected: Sequence[str] = (),
                   seed: int = 0) -> dict:
  """Flat unrolled-layout arrays {name: array} -> the model's params tree (numpy, the model's
  layout); see the module docstring for what is adapted. `where` names the source in messages."""
  from x2vlm_jax import convert  # the checkpoint's table surgery lives with the converter

  unrolled = model.clone(scan_layers=False)  # the names below are the unrolled layout's
  target = convert.flatten(nn.meta.unbox(x2vlm.abstract_variables(unrolled)["params"]))
  stored = dict(stored)
  if unrolled.answer_decoder_layers > 0 and not any(p.startswith("answer_decoder/")
                                                    for p in stored):
    decoder = convert.answer_decoder_from_fusion(
        stored, text_layers=unrolled.text_layers, fusion_layers=unrolled.fusion_layers,
        decoder_layers=unrolled.answer_decoder_layers)
    decoder = {p: v for p, v in decoder.items()
               if p in target and tuple(v.shape) == tuple(target[p].shape)}
    stored.update(decoder)
    logging.info("Answer decoder initialised from the text stack's fusion layers, embeddings and "
                 "MLM head (%d arrays)", len(decoder))
  dropped = [p for p in stored if p not in target and _matches(p, ignore_unexpected)]
  for p in dropped:
    del stored[p]
  implied = convert.implied_model_fields(stored)  # before tables are resized to the model's
  for p, want in target.items():
    have = stored.get(p)
    if have is None or tuple(have.shape) == tuple(want.shape):
      continue
    if convert.is_rel_pos_table(p) and tuple(have.shape[1:]) == tuple(want.shape[1:]):
      stored[p] = convert.resize_rel_pos_table(np.asarray(have), want.shape[0])
    elif p == "frame_pos_embed" and tuple(have.shape[1:]) == tuple(want.shape[1:]):
      stored[p] = _resize_frames(have, tuple(want.shape))
  missing = [p for p in target if p not in stored]
  not_allowed = [p for p in missing if not _matches(p, allow_missing)]
  unexpected = [p for p in stored if p not in target]
  mismatched = [p for p in target
                if p in stored and tuple(stored[p].shape) != tuple(target[p].shape)]
  if not_allowed or unexpected or mismatched:
    raise CheckpointMismatchError(_mismatch_report(where, stored, target, implied, not_allowed,
                                                   unexpected, mismatched))
  if dropped:
    logging.info("Dropped %d stored params the model does not use: %s", len(dropped), dropped)
  if missing:
    fresh = convert.flatten(jax.device_get(nn.meta.unbox(unrolled.init(
        jax.random.PRNGKey(seed), *x2vlm.init_inputs(unrolled))["params"])))
    stored.update({p: fresh[p] for p in missing})
    logging.info("Fresh init for %d params absent from %s: %s", len(missing), where, missing)
  return convert.unflatten(layer_stack.to_model_layout(
      {p: np.asarray(v, target[p].dtype) for p, v in stored.items()}, model))


def _mismatch_report(where: str, stored: dict[str, Any], target: dict[str, Any],
                     implied: dict[str, int], missing: list[str], unexpected: list[str],
                     mismatched: list[str]) -> str:
  """`convert.mismatch_report` for stored arrays vs the model's abstract params (flat names;
  `implied`: the stored arrays' `convert.implied_model_fields`), with the config fields that let
  the differences through."""
  from x2vlm_jax import convert

  allow = (["config.init.allow_missing lists patterns of parameters that may start fresh"]
           if missing else [])
  ignore = (["config.init.ignore_unexpected lists patterns of stored parameters that may be "
             "dropped"]
            if unexpected else [])
  hints = ["; ".join(allow + ignore)] if allow or ignore else []
  return convert.mismatch_report(
      where, missing=[f"{p} {list(target[p].shape)}" for p in missing],
      unexpected=[f"{p} {list(np.shape(stored[p]))}" for p in unexpected],
      mismatched=[f"{p}: expected {list(target[p].shape)}, found {list(np.shape(stored[p]))}"
                  for p in mismatched],
      implied=implied,
      configured=convert.implied_model_fields({p: tuple(v.shape) for p, v in target.items()}),
      hints=hints)


def check_source(source: str) -> None:
  """Raises InputError (one line naming `source` and what is expected) unless `source` is a
  params dir, a training workdir with checkpoints, its `checkpoints/` dir or a step dir."""
  from x2vlm_jax import checkpoint

  path = os.fspath(source)
  if not os.path.exists(path):
    raise errors.InputError(f"checkpoint {path}: no such file or directory; expected {_EXPECTED}")
  if os.path.isfile(path):
    convert_hint = (f" (a PyTorch file? convert it first: python tools/convert_checkpoint.py "
                    f"--checkpoint {path} --config SPEC --output DIR)"
                    if path.endswith(_TORCH_SUFFIXES) else "")
    raise errors.InputError(f"checkpoint {path} is a file; expected {_EXPECTED}{convert_hint}")
  if checkpoint.training_checkpoints(path) is None and not any(
      os.path.exists(os.path.join(path, marker)) for marker in _PARAMS_DIR_MARKERS):
    raise errors.InputError(f"checkpoint {path} is neither a params dir (no Orbax _METADATA) nor "
                            f"a training workdir (no checkpoints/<step>); expected {_EXPECTED}")


def load_params(model: x2vlm.X2VLM, source: str, *, allow_missing: Sequence[str] = (),
                ignore_unexpected: Sequence[str] = (), seed: int = 0) -> tuple[dict, int]:
  """(host numpy params of `model`, the checkpoint's step; 0 for a params dir) from `source`
  (module docstring)."""
  from x2vlm_jax import checkpoint, convert

  check_source(source)
  stored, step = checkpoint.load_any_params(source)
  stored = layer_stack.unstack(convert.flatten(stored))
  params = match_to_model(stored, model, where=str(source), allow_missing=allow_missing,
                          ignore_unexpected=ignore_unexpected, seed=seed)
  return params, step
