"""Load a config the way `--config SPEC` does, outside absl flags.

SPEC is a config file `configs/NAME.py[:arg]`, a saved `config.json[:arg]` or a directory holding
one (a training workdir or a converted params dir; `saved_config.py`). `arg` is the one grammar of
every config file: comma-separated flags, options and `field=value` overrides.
"""
from __future__ import annotations

import importlib.util
import os
import sys


def is_saved_config(path: str) -> bool:
  """Whether `path` (the part of a SPEC before ':') names a saved config rather than a .py file."""
  return path.endswith(".json") or os.path.isdir(path)


def load_config(spec: str):
  """SPEC (module docstring) -> the locked ConfigDict.

  Raises:
    FileNotFoundError: the file (or a directory's config.json) does not exist, naming it.
  """
  from x2vlm_jax import saved_config  # pylint: disable=import-outside-toplevel

  path, _, arg = spec.partition(":")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if root not in sys.path:
    sys.path.insert(0, root)  # config files import `configs.common`
  if is_saved_config(path):
    return saved_config.load_json(path, arg or None)
  module_spec = importlib.util.spec_from_file_location("_x2vlm_config", path)
  if module_spec is None or not os.path.exists(path):
    raise FileNotFoundError(f"config file {path} not found")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)
