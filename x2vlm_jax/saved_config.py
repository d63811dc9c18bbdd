"""Self-describing checkpoints: the config and the files the model needs saved beside its params.

Every training workdir and every params dir (`tools/convert_checkpoint.py`,
`checkpoint.save_params(..., config=...)`) holds

  DIR/config.json          the whole config (`ConfigDict.to_dict()` as JSON)
  DIR/assets/<file>        a copy of each file that is part of the trained model: the tokenizer
                           (`config.data.vocab_path`: a BERT vocab.txt or an XLM-R .model) and
                           each task's `model_files` (the answer list a head answers from, ...)
  DIR/assets/index.json    {config field: {"file", "source" (the path it was copied from),
                           "sha256"}}

so `Predictor.load(DIR)`, `--checkpoint DIR` and every tool need nothing else, and
`--config DIR` or `--config DIR/config.json[:field=value,...]` reruns or evaluates with that
config.

Paths inside a config (`.py` or `config.json`) are resolved against the current directory,
with one exception: the files a checkpoint carries are used from its copy (each field of the
index is replaced by the copy's absolute path when the saved config is loaded, and by
`Predictor.load` whatever config it is given), so a checkpoint works from any directory.

This file is also a config file for `ml_collections.config_flags`: `main.py` turns
`--config DIR` / `--config FILE.json[:arg]` into `--config <this file>:FILE.json[:arg]`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil

import ml_collections

CONFIG_FILE = "config.json"
ASSETS_DIR = "assets"
ASSETS_INDEX = "index.json"
TOKENIZER_FIELD = "data.vocab_path"


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
  from x2vlm_jax.data import text  # pylint: disable=import-outside-toplevel

  path = os.fspath(vocab_path)
  if os.path.isdir(path):
    path = text.tokenizer_in_directory(path) or path
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"{what} {path!r}: no such tokenizer file (relative paths resolve against "
        f"the current directory, {os.getcwd()}); give a BERT vocab.txt, an XLM-R sentencepiece "
        ".model or a directory holding one")
  return path


def _get(config, field: str):
  node = config
  for key in field.split("."):
    node = node[key]
  return node


def _set(config, field: str, value) -> None:
  *parents, last = field.split(".")
  node = config
  for key in parents:
    node = node[key]
  node[last] = value


def model_file_fields(config: ml_collections.ConfigDict) -> list[str]:
  """The config fields naming files that are part of the model: the tokenizer and the
  `model_files` of every task whose data section the config has (set ones only)."""
  from x2vlm_jax import tasks  # pylint: disable=import-outside-toplevel

  fields = [TOKENIZER_FIELD] if config.data.get("vocab_path") else []
  for name in tasks.names():
    section = config.data.get(name)
    for key in tasks.get(name).model_files if section is not None else ():
      if section.get(key):
        fields.append(f"data.{name}.{key}")
  return fields


def save(directory: str | os.PathLike, config: ml_collections.ConfigDict) -> None:
  """Writes `config.json` and copies of the model's files (`save_assets`) into `directory`."""
  with open(os.path.join(os.fspath(directory), CONFIG_FILE), "w", encoding="utf-8") as f:
    json.dump(config.to_dict(), f, indent=2, sort_keys=True, default=str)
    f.write("\n")
  save_assets(directory, config)


def save_assets(directory: str | os.PathLike, config: ml_collections.ConfigDict) -> None:
  """Copies each file of `model_file_fields` into `directory/assets/` with its index entry.

  Raises:
    FileNotFoundError: a tokenizer that does not exist (naming the field). Another model file
      that does not exist is left out with a warning (a data section the run does not use).
  """
  assets = os.path.join(os.fspath(directory), ASSETS_DIR)
  index = {}
  for field in model_file_fields(config):
    value = _get(config, field)
    if field == TOKENIZER_FIELD:
      source, name = tokenizer_file(value), None
    elif os.path.isfile(value):
      source, name = value, f"{field[len('data.'):]}{os.path.splitext(value)[1]}"
    else:
      logging.warning("Not saved with the checkpoint: config.%s %r is not a file", field, value)
      continue
    source = os.path.abspath(source)
    name = name or os.path.basename(source)
    os.makedirs(assets, exist_ok=True)
    target = os.path.join(assets, name)
    if os.path.abspath(target) != source:
      shutil.copyfile(source, target)
    index[field] = {"file": name, "source": source, "sha256": sha256(target)}
  if index:
    with open(os.path.join(assets, ASSETS_INDEX), "w", encoding="utf-8") as f:
      json.dump(index, f, indent=2, sort_keys=True)
      f.write("\n")


def saved_assets(directory: str | os.PathLike) -> dict[str, str]:
  """{config field: absolute path of its copy} of the files saved in `directory` (empty if
  none)."""
  assets = os.path.abspath(os.path.join(os.fspath(directory), ASSETS_DIR))
  index_path = os.path.join(assets, ASSETS_INDEX)
  if not os.path.isfile(index_path):
    return {}
  with open(index_path, encoding="utf-8") as f:
    index = json.load(f)
  return {field: os.path.join(assets, entry["file"]) for field, entry in index.items()
          if os.path.isfile(os.path.join(assets, entry["file"]))}


def use_assets(config: ml_collections.ConfigDict, directory: str | os.PathLike
               ) -> ml_collections.ConfigDict:
  """A copy of `config` whose model-file fields name the copies saved in `directory` (fields the
  config lacks are skipped)."""
  config = config.copy_and_resolve_references()
  for field, path in saved_assets(directory).items():
    try:
      _get(config, field)
    except (KeyError, AttributeError):
      continue
    _set(config, field, path)
  return config


def with_checkpoint_tokenizer(config: ml_collections.ConfigDict, source: str | os.PathLike
                              ) -> ml_collections.ConfigDict:
  """`config`, or a copy naming the tokenizer checkpoint `source` carries when the config names
  none (`data.vocab_path` empty): a converted release or a pre-training run brings its own."""
  home = None if config.data.vocab_path or not source else checkpoint_home(source)
  tokenizer = saved_assets(home).get(TOKENIZER_FIELD) if home else None
  if tokenizer is None:
    return config
  config = config.copy_and_resolve_references()
  config.data.vocab_path = tokenizer
  return config


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
  config = use_assets(config, os.path.dirname(os.path.abspath(path)))
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
