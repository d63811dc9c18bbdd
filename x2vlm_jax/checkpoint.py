"""Orbax checkpoints: the train state plus the data iterators' positions, and params-only files.

Layout of one training checkpoint (`Checkpointer`)::

  WORKDIR/checkpoints/<step>/state/          the train state pytree (OCDBT, sharded arrays)
  WORKDIR/checkpoints/<step>/data_<name>/    one grain iterator per stream ("image", "region",
                                             ...), one JSON file per process

Every iterator is saved under its own item with grain's own Orbax handler, so several streams
are saved and restored together, each process writing its own position.

Restoring is two-phase: the stored tree (names, shapes) is first compared with the target and a
`ValueError` lists every missing / unexpected / mis-shaped array; only then are the arrays read,
straight into the target's shardings (no host gather, no re-sharding afterwards). Read failures
(truncated or corrupt files) surface as `CheckpointError` naming the checkpoint directory.

Params-only checkpoints (`save_params` / `load_params`) are a plain Orbax pytree directory; the
PyTorch → JAX converter writes them and `config.model_init` reads them.
"""

from __future__ import annotations

from collections.abc import Mapping
import os
import re
from typing import Any

from etils import epath
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from x2vlm_jax.models import layer_stack

STATE_ITEM = "state"
_DATA_PREFIX = "data_"
_MAX_LISTED = 20


class CheckpointError(RuntimeError):
  """A checkpoint exists but cannot be read (truncated, corrupt, written by another layout)."""


def _name(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/")


def _shapes_by_name(tree: Any) -> dict[str, tuple[int, ...]]:
  """`{'params/vision/cls_token': (1, 1, 768), ...}` for arrays, ShapeDtypeStructs or metadata."""
  return {_name(path): tuple(getattr(leaf, "shape", np.shape(leaf)))
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _listing(title: str, lines: list[str]) -> str:
  shown = lines[:_MAX_LISTED]
  more = [f"    ... and {len(lines) - _MAX_LISTED} more"] if len(lines) > _MAX_LISTED else []
  return "\n".join([f"  {title} ({len(lines)}):"] + [f"    {x}" for x in shown] + more)


def check_tree_matches(stored: Any, target: Any, where: str) -> None:
  """Raises ValueError if `stored` and `target` differ in leaf names or shapes.

  Args:
    stored: tree read from checkpoint metadata (leaves with `.shape`).
    target: the tree the caller wants to restore into (arrays / ShapeDtypeStructs).
    where: the checkpoint directory, for the message.
  """
  have, want = _shapes_by_name(stored), _shapes_by_name(target)
  missing = [f"{k}: expected {want[k]}" for k in want if k not in have]
  unexpected = [f"{k}: found {have[k]}" for k in have if k not in want]
  mismatched = [f"{k}: expected {want[k]}, found {have[k]}"
                for k in want if k in have and want[k] != have[k]]
  if missing or unexpected or mismatched:
    parts = [f"Checkpoint {where} does not match the target tree "
             f"({len(want)} arrays expected, {len(have)} stored):"]
    if missing:
      parts.append(_listing("missing in checkpoint", missing))
    if unexpected:
      parts.append(_listing("unexpected in checkpoint", unexpected))
    if mismatched:
      parts.append(_listing("shape mismatch", mismatched))
    stored_scanned = layer_stack.is_stacked(have)
    if stored_scanned != layer_stack.is_stacked(want):
      parts.append(f"  The checkpoint has the {'scanned' if stored_scanned else 'unrolled'} "
                   "layer layout and the model the other (model.scan_layers): resume with the "
                   "setting it was written with, or start from it as config.init.checkpoint, "
                   "which converts between the two.")
    raise ValueError("\n".join(parts))


def _data_item(name: str) -> str:
  if not re.fullmatch(r"[A-Za-z0-9_]+", name):
    raise ValueError(f"Data iterator name {name!r}: expected letters, digits and '_' only.")
  return _DATA_PREFIX + name


class Checkpointer:
  """Periodic, asynchronous, keep-last-N checkpoints of a train state and its data iterators.

  Usage::

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=3, every_steps=1000)
    if (step := ckpt.latest_step()) is not None:
      state = ckpt.restore(step, abstract_state, {"image": image_it, "region": region_it})
    for step in ...:
      ckpt.save(step, state, {"image": image_it, "region": region_it})   # no-op off-interval
    ckpt.save(last_step, state, iterators, force=True)
    ckpt.close()   # waits for the last async write

  `state` is any pytree of `jax.Array`s (a dict `{'step', 'params', 'opt_state'}`, a flax
  `struct.dataclass`, ...). Iterators are grain `DatasetIterator`s or `DataLoaderIterator`s;
  their position is captured when `save` is called, even though arrays are written in the
  background.
  """

  def __init__(self, directory: str | os.PathLike, *, keep: int = 3, every_steps: int = 1000,
               async_save: bool = True, data_names: tuple[str, ...] = ()):
    """Args: directory (created if needed); keep: newest checkpoints kept (None = all);
    every_steps: `save` writes only at multiples of it unless forced; async_save: write arrays
    in a background thread (call `wait` / `close` before reading or exiting); data_names: the
    data iterators that will be saved and restored (their handlers registered up front, so that
    reading a step's metadata knows them)."""
    self.directory = os.path.abspath(os.fspath(directory))
    self._saved: set[int] = set()  # steps saved through this object (async: maybe not committed)
    # The state item's handler is registered up front so that a fresh process (resuming) can read
    # its metadata before restoring; the data items' handlers come from their args.
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add(STATE_ITEM, ocp.args.StandardSave, ocp.StandardCheckpointHandler())
    registry.add(STATE_ITEM, ocp.args.StandardRestore, ocp.StandardCheckpointHandler())
    for name in data_names:
      registry.add(_data_item(name), grain.checkpoint.CheckpointSave,
                   grain.checkpoint.CheckpointHandler())
      registry.add(_data_item(name), grain.checkpoint.CheckpointRestore,
                   grain.checkpoint.CheckpointHandler())
    self._manager = ocp.CheckpointManager(
        self.directory,
        handler_registry=registry,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=every_steps,
            enable_async_checkpointing=async_save, create=True))

  def save(self, step: int, state: Any, data_iterators: Mapping[str, Any] | None = None,
           force: bool = False) -> bool:
    """Saves at `step` if it is on the interval (or `force`) and not saved yet; returns whether it
    saved."""
    if int(step) in self._saved or int(step) in self.all_steps():
      return False
    items = {STATE_ITEM: ocp.args.StandardSave(state)}
    for name, iterator in (data_iterators or {}).items():
      items[_data_item(name)] = grain.checkpoint.CheckpointSave(iterator)
    saved = self._manager.save(int(step), args=ocp.args.Composite(**items), force=force)
    if saved:
      self._saved.add(int(step))
    return saved

  def latest_step(self) -> int | None:
    """Newest finished checkpoint step, or None when the directory has none."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def restore(self, step: int | None, abstract_state: Any,
              data_iterators: Mapping[str, Any] | None = None) -> Any:
    """Restores the state saved at `step` (None = latest) into `abstract_state`'s shardings.

    Args:
      step: checkpoint step, or None for the latest one.
      abstract_state: target tree with the saved structure; leaves are `jax.ShapeDtypeStruct`s
        carrying `.sharding` (e.g. from `sharding.abstract_with_shardings`) or `jax.Array`s.
      data_iterators: iterators to reposition, keyed by the names used at save time; their
        state is set in place.

    Returns:
      The restored state, same structure as `abstract_state`.

    Raises:
      FileNotFoundError: no such step in the directory.
      ValueError: the stored tree does not match `abstract_state` (lists the differences), or a
        requested iterator was not saved.
      CheckpointError: the checkpoint cannot be read (truncated / corrupt).
    """
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"No checkpoint to restore in {self.directory}.")
    step = int(step)
    if step not in self.all_steps():
      raise FileNotFoundError(
          f"No checkpoint for step {step} in {self.directory}; found steps {self.all_steps()}.")
    step_dir = os.path.join(self.directory, str(step))
    try:
      stored = self._manager.item_metadata(step)[STATE_ITEM]
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"Cannot read the metadata of checkpoint {step_dir}/{STATE_ITEM} "
                            f"(truncated or corrupt?): {type(e).__name__}: {e}") from e
    if stored is None:
      raise CheckpointError(f"Checkpoint {step_dir} has no readable '{STATE_ITEM}' item "
                            f"(its _METADATA is missing: an interrupted or truncated save?).")
    check_tree_matches(stored, abstract_state, f"{step_dir}/{STATE_ITEM}")

    items = {STATE_ITEM: ocp.args.StandardRestore(abstract_state)}
    for name, iterator in (data_iterators or {}).items():
      item = _data_item(name)
      if not os.path.isdir(os.path.join(step_dir, item)):
        saved = sorted(d[len(_DATA_PREFIX):] for d in os.listdir(step_dir)
                       if d.startswith(_DATA_PREFIX))
        raise ValueError(
            f"Checkpoint {step_dir} has no data iterator {name!r}; saved: {saved}. Its data "
            "streams belong to other tasks (or to a version that named the task otherwise): "
            "start a new workdir from it with --config.init.checkpoint="
            f"{os.path.dirname(os.path.dirname(step_dir))}")
      items[item] = grain.checkpoint.CheckpointRestore(iterator)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"Failed to restore checkpoint {step_dir} (truncated or corrupt, or "
                            f"saved with another process count?): {type(e).__name__}: {e}") from e
    return restored[STATE_ITEM]

  def restore_params(self, step: int | None = None) -> Any:
    """The `params` of the state saved at `step` (None = latest) as host numpy arrays, without
    needing the model or optimizer that wrote them (e.g. to start fine-tuning from them)."""
    step = self.latest_step() if step is None else int(step)
    if step is None or step not in self.all_steps():
      raise FileNotFoundError(f"No checkpoint {'' if step is None else step} in {self.directory}; "
                              f"found steps {self.all_steps()}.")
    item_dir = os.path.join(self.directory, str(step), STATE_ITEM)
    try:
      state = _read_item_as_numpy(item_dir)
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"Failed to read {item_dir} (truncated or corrupt?): "
                            f"{type(e).__name__}: {e}") from e
    if not isinstance(state, dict) or "params" not in state:
      raise CheckpointError(f"{item_dir} holds no 'params' (keys: {list(state)[:5]})")
    return state["params"]

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager's resources."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _restore_as_numpy(directory: str, stored_tree: Any) -> Any:
  """The Orbax pytree in `directory` (structure `stored_tree`, from its metadata) as numpy arrays."""
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), stored_tree)
  with ocp.PyTreeCheckpointer() as reader:
    return reader.restore(directory, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def _read_item_as_numpy(item_dir: str) -> Any:
  """One item of a step (e.g. its `state/`) as numpy arrays, read by Orbax's pytree handler
  itself: the step's `_CHECKPOINT_METADATA` is one level up, and a Checkpointer pointed at the
  item would warn that it is missing."""
  handler = ocp.PyTreeCheckpointHandler()
  try:
    path = epath.Path(os.path.abspath(item_dir))
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                handler.metadata(path).tree)
    return handler.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  finally:
    handler.close()


def save_params(directory: str | os.PathLike, params: Any, *, config=None,
                overwrite: bool = False) -> None:
  """Writes a params-only Orbax checkpoint (blocking). `params`: pytree of arrays; with `config`
  the directory describes itself: its `config.json` and tokenizer (`saved_config.save`), so
  `Predictor.load(directory)` and `--checkpoint directory` need nothing else."""
  from x2vlm_jax import saved_config  # pylint: disable=import-outside-toplevel

  directory = os.path.abspath(os.fspath(directory))
  if os.path.exists(directory) and not overwrite:
    raise FileExistsError(f"{directory} exists; pass overwrite=True to replace it.")
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory, params, force=overwrite)
  checkpointer.wait_until_finished()
  checkpointer.close()
  if config is not None:
    saved_config.save(directory, config)


def training_checkpoints(directory: str | os.PathLike) -> str | None:
  """The `Checkpointer` directory of a training workdir (`DIR/checkpoints`) or of `DIR` itself
  when it holds step directories; None for anything else (e.g. a params dir)."""
  directory = os.path.abspath(os.fspath(directory))
  for ckpt_dir in (os.path.join(directory, "checkpoints"), directory):
    if os.path.isdir(ckpt_dir) and any(d.isdigit() for d in os.listdir(ckpt_dir)):
      return ckpt_dir
  return None


def load_any_params(directory: str | os.PathLike) -> tuple[Any, int]:
  """(host numpy params, step) from a params dir (`save_params`, tools/convert_checkpoint.py;
  step 0), a training workdir (its latest checkpoint), or a training workdir's `checkpoints/`."""
  ckpt_dir = training_checkpoints(directory)
  if ckpt_dir is None:
    return load_params(directory), 0
  with Checkpointer(ckpt_dir, async_save=False) as checkpointer:
    step = checkpointer.latest_step()
    return checkpointer.restore_params(step), int(step)


def load_params(directory: str | os.PathLike, abstract_params: Any = None) -> Any:
  """Reads a params-only checkpoint written by `save_params`.

  Args:
    directory: the checkpoint directory.
    abstract_params: target tree (ShapeDtypeStructs with `.sharding`, or arrays). When given,
      names and shapes are checked first (ValueError listing the differences) and arrays are
      restored directly into its shardings and dtypes. When None, the stored tree is returned
      as host numpy arrays.

  Raises:
    FileNotFoundError, ValueError (mismatch), CheckpointError (unreadable files).
  """
  directory = os.path.abspath(os.fspath(directory))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"No params checkpoint at {directory}.")
  checkpointer = ocp.StandardCheckpointer()
  try:
    try:
      stored = checkpointer.metadata(directory).item_metadata.tree
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"Cannot read the metadata of params checkpoint {directory} "
                            f"(not an Orbax checkpoint, truncated or corrupt?): "
                            f"{type(e).__name__}: {e}") from e
    if abstract_params is not None:
      check_tree_matches(stored, abstract_params, directory)
    try:
      if abstract_params is not None:
        return checkpointer.restore(directory, abstract_params)
      return _restore_as_numpy(directory, stored)
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"Failed to read params checkpoint {directory} (truncated or "
                            f"corrupt?): {type(e).__name__}: {e}") from e
  finally:
    checkpointer.close()
