"""Self-describing checkpoints: the config and the tokenizer saved beside the parameters.

Every training workdir and every params dir (`tools/convert_checkpoint.py`,
`checkpoint.save_params(..., config=...)`) holds

  DIR/config.json              the whole config (`ConfigDict.to_dict()` as JSON)
  DIR/tokenizer/<file>         a copy of the tokenizer file (BERT vocab.txt or XLM-R .model)
  DIR/tokenizer/source.json    {"source": the path it was copied from, "sha256": ...}

so `Predictor.load(DIR)`, `--checkpoint DIR` and every tool need nothing else, and
`--config DIR` or `--config DIR/config.json[:field=value,...]` reruns or evaluates with that
config.

Paths inside a config (`.py` or `config.json`) are resolved against the current directory,
with one exception: a saved config's tokenizer is the copy saved beside it (its
`data.vocab_path` is replaced by that copy's absolute path when it is loaded), so a checkpoint
works from any directory.

This file is also a config file for `ml_collections.config_flags`: `main.py` turns
`--config DIR` / `--config FILE.json[:arg]` into `--config <this file>:FILE.json[:arg]`.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import ml_collections

CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_SOURCE = "source.json"
# The tokenizer files `data.text.load_tokenizer` looks for inside a directory, in its order.
_TOKENIZER_FILES = ("vocab.txt", "sentencepiece.bpe.model")


def sha256(path: str | os.PathLike) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def tokenizer_file(vocab_path: str, what: str = "config.data.vocab_path") -> str:
  """The file a `config.data.vocab_path` names (a directory is searched as `load_tokenizer`
  searches it). Raises FileNotFoundError naming `what` (the field or flag it came from) and the
  directory a relative path resolves from."""
  path = os.fspath(vocab_path)
  if os.path.isdir(path):
    for name in _TOKENIZER_FILES:
      if os.path.isfile(os.path.join(path, name)):
        return os.path.join(path, name)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"{what} {path!r}: no such tokenizer file (relative paths resolve against "
        f"the current directory, {os.getcwd()}); give a BERT vocab.txt, an XLM-R sentencepiece "
        ".model or a directory holding one")
  return path


def save(directory: str | os.PathLike, config: ml_collections.ConfigDict) -> None:
  """Writes `config.json` and a copy of the config's tokenizer into `directory` (which exists)."""
  with open(os.path.join(os.fspath(directory), CONFIG_FILE), "w", encoding="utf-8") as f:
    json.dump(config.to_dict(), f, indent=2, sort_keys=True, default=str)
    f.write("\n")
  save_tokenizer(directory, config)


def save_tokenizer(directory: str | os.PathLike, config: ml_collections.ConfigDict) -> None:
  """Copies the config's tokenizer file into `directory/tokenizer/` with its source and sha256
  (nothing when `config.data.vocab_path` is empty)."""
  vocab_path = config.data.vocab_path
  if not vocab_path:
    return
  source = os.path.abspath(tokenizer_file(vocab_path))
  tokenizer_dir = os.path.join(os.fspath(directory), TOKENIZER_DIR)
  os.makedirs(tokenizer_dir, exist_ok=True)
  target = os.path.join(tokenizer_dir, os.path.basename(source))
  if os.path.abspath(target) != source:
    shutil.copyfile(source, target)
    with open(os.path.join(tokenizer_dir, TOKENIZER_SOURCE), "w", encoding="utf-8") as f:
      json.dump({"source": source, "sha256": sha256(target)}, f, indent=2)
      f.write("\n")


def saved_tokenizer(directory: str | os.PathLike) -> str | None:
  """The tokenizer file saved in `directory/tokenizer/` (absolute path), or None."""
  tokenizer_dir = os.path.join(os.fspath(directory), TOKENIZER_DIR)
  for name in _TOKENIZER_FILES:
    if os.path.isfile(os.path.join(tokenizer_dir, name)):
      return os.path.abspath(os.path.join(tokenizer_dir, name))
  if os.path.isdir(tokenizer_dir):
    models = sorted(n for n in os.listdir(tokenizer_dir) if n.endswith((".model", ".txt")))
    if models:
      return os.path.abspath(os.path.join(tokenizer_dir, models[0]))
  return None


def checkpoint_home(source: str | os.PathLike) -> str | None:
  """The directory holding the config of a checkpoint `source`: a params dir or workdir itself,
  the workdir of its `checkpoints/` dir or of a step dir `checkpoints/<step>`; None if none has
  a config.json."""
  path = os.path.abspath(os.fspath(source))
  candidates = [path]
  if os.path.basename(path) == "checkpoints":
    candidates.append(os.path.dirname(path))
  elif os.path.basename(os.path.dirname(path)) == "checkpoints":
    candidates.append(os.path.dirname(os.path.dirname(path)))
  for candidate in candidates:
    if os.path.isfile(os.path.join(candidate, CONFIG_FILE)):
      return candidate
  return None


def load_json(path: str | os.PathLike, arg: str | None = None) -> ml_collections.ConfigDict:
  """A saved `config.json` (or a directory holding one) -> the locked config, with `arg`'s
  `field=value` overrides (the `:arg` grammar of every config file) and the tokenizer saved
  beside it as `data.vocab_path`."""
  from configs import common  # pylint: disable=import-outside-toplevel

  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path} not found")
  try:
    with open(path, encoding="utf-8") as f:
      config = ml_collections.ConfigDict(json.load(f))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"config file {path} is not a saved config.json: {e}") from e
  tokenizer = saved_tokenizer(os.path.dirname(os.path.abspath(path)))
  if tokenizer and "data" in config and "vocab_path" in config.data:
    config.data.vocab_path = tokenizer
  parsed = common.parse_arg(arg, file=path)
  return common.finish(config, parsed)


def for_checkpoint(source: str | os.PathLike) -> ml_collections.ConfigDict | None:
  """The config saved with checkpoint `source` (see `checkpoint_home`), or None."""
  home = checkpoint_home(source)
  return None if home is None else load_json(home)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`ml_collections.config_flags` entry: arg = 'PATH.json[:field=value,...]' or 'DIR[:...]'."""
  if not arg:
    raise ValueError("saved_config.py needs the saved config's path: saved_config.py:PATH")
  path, _, overrides = arg.partition(":")
  return load_json(path, overrides or None)
