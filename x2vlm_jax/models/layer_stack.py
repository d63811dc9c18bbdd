"""The two parameter layouts of the layer stacks, and conversion between them.

Unrolled (`model.scan_layers=False`, the layout `convert.py` writes), one subtree per layer::

  vision/blocks_{i}/...            i < vision_depth
  text/layer_{i}/...               i < text_layers + fusion_layers
  answer_decoder/layer_{i}/...     i < answer_decoder_layers

Scanned (`model.scan_layers=True`), one subtree per stack, every array with a leading layer axis::

  vision/blocks/...                [vision_depth, ...]
  text/text_layers/...             [text_layers, ...]     text layer i    = text/layer_{i}
  text/fusion_layers/...           [fusion_layers, ...]   fusion layer i  = text/layer_{text_layers + i}
  answer_decoder/fusion_layers/... [answer_decoder_layers, ...]  (every decoder layer cross-attends)

Everything else is the same in both. The functions work on flat `{'a/b/c': array}` dicts of numpy
arrays (`convert.flatten`). `unstack` needs nothing but the tree itself, so a checkpoint of either
layout can be read into the unrolled one; `stack` needs the model for where the text stack ends.
"""
from __future__ import annotations

from collections.abc import Mapping
import re

import numpy as np

_UNROLLED = re.compile(r"(vision)/blocks_(\d+)/(.+)|(text|answer_decoder)/layer_(\d+)/(.+)")
_STACKED = re.compile(r"(vision)/blocks/(.+)|(text|answer_decoder)/(text_layers|fusion_layers)/(.+)")


_STACKED_ANYWHERE = re.compile(r"(^|/)(vision/blocks|(text|answer_decoder)/(text_layers|fusion_layers))/")


def is_stacked(names) -> bool:
  """Whether '/'-joined parameter names (a flat params dict's keys, or longer paths such as a
  training checkpoint's `params/vision/blocks/...`) have the scanned layout."""
  return any(_STACKED_ANYWHERE.search(name) for name in names)


def _split(model, tower: str, layer: int) -> tuple[str, int]:
  """Unrolled layer `layer` of `tower` -> (its stacked prefix, index in that stack)."""
  if tower == "vision":
    return "vision/blocks", layer
  first_fusion = model.text_layers if tower == "text" else 0
  if layer < first_fusion:
    return f"{tower}/text_layers", layer
  return f"{tower}/fusion_layers", layer - first_fusion


def stack(flat: Mapping[str, np.ndarray], model) -> dict[str, np.ndarray]:
  """Unrolled -> scanned layout for `model` (an `X2VLM`); already-stacked names pass through.

  Raises ValueError when a stack has a hole (e.g. `text/layer_3` missing between 2 and 4).
  """
  out: dict[str, np.ndarray] = {}
  layers: dict[str, dict[int, np.ndarray]] = {}
  for name, value in flat.items():
    match = _UNROLLED.fullmatch(name)
    if match is None:
      out[name] = value
      continue
    tower, index, rest = ((match.group(1), match.group(2), match.group(3)) if match.group(1)
                          else (match.group(4), match.group(5), match.group(6)))
    prefix, position = _split(model, tower, int(index))
    layers.setdefault(f"{prefix}/{rest}", {})[position] = value
  for name, by_index in layers.items():
    if sorted(by_index) != list(range(len(by_index))):
      raise ValueError(f"cannot stack {name}: layers {sorted(by_index)} are not 0..{len(by_index) - 1}")
    out[name] = np.stack([np.asarray(by_index[i]) for i in range(len(by_index))])
  return out


def unstack(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Scanned -> unrolled layout; unrolled names pass through (so either layout may come in).

  The fusion layers of `text` are numbered after its text layers (their count is the leading size
  of any `text/text_layers/...` array, 0 when there are none).
  """
  first_fusion = {"text": 0, "answer_decoder": 0}
  for name, value in flat.items():
    match = _STACKED.fullmatch(name)
    if match and match.group(4) == "text_layers":
      first_fusion[match.group(3)] = int(np.shape(value)[0])
  out: dict[str, np.ndarray] = {}
  for name, value in flat.items():
    match = _STACKED.fullmatch(name)
    if match is None:
      out[name] = value
      continue
    value = np.asarray(value)
    if match.group(1):
      names = [f"vision/blocks_{i}/{match.group(2)}" for i in range(value.shape[0])]
    else:
      tower, stack_name, rest = match.group(3), match.group(4), match.group(5)
      offset = first_fusion[tower] if stack_name == "fusion_layers" else 0
      names = [f"{tower}/layer_{offset + i}/{rest}" for i in range(value.shape[0])]
    out.update({n: value[i] for i, n in enumerate(names)})
  return out


def to_model_layout(flat: Mapping[str, np.ndarray], model) -> dict[str, np.ndarray]:
  """Params of either layout -> the layout `model.scan_layers` asks for."""
  unrolled = unstack(flat)
  return stack(unrolled, model) if model.scan_layers else unrolled
