"""Load a config file the way `--config configs/NAME.py[:arg]` does, outside absl flags."""
from __future__ import annotations

import importlib.util
import os
import sys


def load_config(spec: str):
  """'configs/x.py[:arg]' -> the locked ConfigDict returned by its `get_config(arg)`."""
  path, _, arg = spec.partition(":")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if root not in sys.path:
    sys.path.insert(0, root)  # config files import `configs.common`
  module_spec = importlib.util.spec_from_file_location("_x2vlm_config", path)
  if module_spec is None or not os.path.exists(path):
    raise FileNotFoundError(f"config file {path} not found")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)
