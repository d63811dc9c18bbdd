"""The evaluator interface, and the batching helpers every evaluator shares.

An evaluator is built once from its config entry (`config.evals.<name>`), the whole config, the
model and the device mesh, then run as often as the training loop (or `--mode eval`, or your own
code) asks:

    evaluator = SomeEvaluator("val", config.evals.val, config=config, model=model, mesh=mesh)
    metrics = evaluator.run(params, step)                       # {"eval/val/...": float}
    metrics = evaluator.run(params, step, predictions_dir=dir)  # also writes its prediction files

Construction reads and checks the evaluation files (a bad record fails here, naming it, before
anything compiles) and creates the jitted functions; `run` only encodes, scores and writes, so
the second and later runs reuse everything (one trace per jitted function). Each evaluator type
lives with its task (`x2vlm_jax/tasks/<task>.py`); `tasks.make_evaluators(config, model, mesh)`
builds every entry of `config.evals`.

Every entry has the fields of `Evaluator.default_config()` (`type`, `every_steps`, `batch_size`)
plus those of its type. Metrics are named `eval/<name>/<metric>` (`eval/<name>/<split>/<metric>`
for evaluators that take several files, one split per file, named by the file's stem).

Batching: inputs are cut into fixed-size batches (the last one padded by repeating its last row,
the padding dropped from the outputs), so each jitted function compiles once per evaluator. With
a mesh, every batch is split over its ('data', 'fsdp') axes and the batch size is rounded up to a
multiple of their size; each process loads only the rows its own devices hold (in a multi-host
run, a process decodes only its share of the images); params already spread over the mesh
(FSDP-sharded by the trainer) stay where they are, others are replicated once.
"""
from __future__ import annotations

import collections
import functools
import json
import logging
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from x2vlm_jax import sharding as sharding_lib

Mesh = jax.sharding.Mesh

# Python-side trace counters of the jitted evaluation functions (name -> number of traces). Each
# jitted body increments its entry while being traced (never when executed), so tests can assert
# that a function compiled once.
TRACE_COUNTS: collections.Counter = collections.Counter()


class Evaluator:
  """Base class: subclasses set `TYPE`, extend `default_config` and implement `run`."""

  TYPE = ""

  @classmethod
  def default_config(cls) -> ml_collections.ConfigDict:
    """The fields of a `config.evals.<name>` entry of this type, at their defaults."""
    return ml_collections.ConfigDict(dict(
        type=cls.TYPE,
        every_steps=0,  # > 0: also run every this many training steps (metrics only, no files)
        batch_size=32,  # rows per jitted call (rounded up to a multiple of the mesh's batch shards)
        # Images decoded by this many grain worker processes, reading batches ahead (0: by threads
        # in this process, a batch at a time; `eval_data.EvalImages`).
        decode_workers=0,
    ))

  def __init__(self, name: str, cfg, *, config, model, mesh: Mesh | None = None):
    """name: the entry's key in config.evals; cfg: the entry; config: the whole config (data
    fields, task sections); model: the `X2VLM`; mesh: where to run (None: the default device)."""
    self.name, self.cfg, self.config, self.model, self.mesh = name, cfg, config, model, mesh
    self.batch_size = round_batch_size(int(cfg.batch_size), mesh, f"config.evals.{name}.batch_size")

  def run(self, params, step: int = 0, *, predictions_dir: str | None = None
          ) -> dict[str, float]:
    """Metrics of `params` (named `eval/<name>/...`, percent); with `predictions_dir`, also the
    evaluator's prediction files there."""
    raise NotImplementedError

  def metric_name(self, *parts: str) -> str:
    return "/".join(("eval", self.name) + parts)

  def field(self, key: str) -> str:
    """`config.evals.<name>.<key>`, for messages."""
    return f"config.evals.{self.name}.{key}"

  def log(self, line: str) -> None:
    logging.info("eval/%s: %s", self.name, line)


# --------------------------------------------------------------------------------------------
# Batching and placement.


def batch_shards(mesh: Mesh | None) -> int:
  """How many ways a batch is split over the mesh's ('data', 'fsdp') axes (1 without a mesh)."""
  if mesh is None:
    return 1
  return int(np.prod([mesh.shape[a] for a in sharding_lib.BATCH_AXES]))


def round_batch_size(batch_size: int, mesh: Mesh | None, what: str = "batch_size") -> int:
  """`batch_size` rounded up to a multiple of the mesh's batch shards (>= 1 required)."""
  if batch_size < 1:
    raise ValueError(f"{what} must be >= 1, got {batch_size}")
  shards = batch_shards(mesh)
  return -(-batch_size // shards) * shards


def check_batch_size(batch_size: int, mesh: Mesh | None) -> None:
  """`batch_size` must be >= 1 and split evenly over the mesh's batch shards."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  shards = batch_shards(mesh)
  if batch_size % shards:
    raise ValueError(f"batch_size {batch_size} is not divisible by the {shards} batch shards of "
                     f"mesh {dict(mesh.shape)} (axes {sharding_lib.BATCH_AXES})")


def pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  """[n, ...] -> [rows, ...] by repeating the last row (1 <= n <= rows)."""
  if len(x) == rows:
    return x
  return np.concatenate([x, np.repeat(x[-1:], rows - len(x), axis=0)], axis=0)


def put_batch(x: Any, mesh: Mesh | None) -> jax.Array:
  """Host [B, ...] -> device: the default device, or split over the mesh's batch axes (every
  process passes the same full host array; each device takes its slice)."""
  x = np.asarray(x)
  if mesh is None:
    return jax.device_put(x)
  return jax.make_array_from_callback(x.shape, sharding_lib.batch_sharding(mesh),
                                      lambda idx: x[idx])


def put_replicated(x: Any, mesh: Mesh | None) -> jax.Array:
  """Host array -> device: the default device, or a full copy on every device of the mesh."""
  x = np.asarray(x)
  if mesh is None:
    return jax.device_put(x)
  return jax.make_array_from_callback(x.shape, sharding_lib.replicated(mesh), lambda idx: x[idx])


def place_params(params: Any, mesh: Mesh | None) -> Any:
  """Puts the params on device once (instead of re-sending host arrays on every call): host
  leaves -> the default device, or replicated over `mesh`; `jax.Array`s already spread over
  the mesh's devices (e.g. FSDP-sharded by the trainer) are kept as they are."""
  if mesh is None:
    return jax.tree.map(lambda x: x if isinstance(x, jax.Array) else jax.device_put(x), params)
  mesh_devices = set(mesh.devices.flat)

  def put(x):
    if isinstance(x, jax.Array) and x.sharding.device_set == mesh_devices:
      return x
    return put_replicated(x, mesh)

  return jax.tree.map(put, params)


@functools.partial(jax.jit, donate_argnums=0)
def _write_rows(buffers, values, start):
  """`values` (a pytree of [B, ...]) written into `buffers` ([N_pad, ...]) at row `start`."""
  return jax.tree.map(lambda b, v: jax.lax.dynamic_update_slice_in_dim(b, v.astype(b.dtype),
                                                                       start, 0), buffers, values)


def _new_buffers(example, rows: int, mesh: Mesh | None):
  """Zero device buffers [rows, ...] shaped like the leaves of `example` ([B, ...])."""
  def make(x):
    shape, dtype = (rows,) + tuple(x.shape[1:]), x.dtype
    if mesh is None:
      return jnp.zeros(shape, dtype)
    return jax.jit(lambda: jnp.zeros(shape, dtype),
                   out_shardings=sharding_lib.batch_sharding(mesh))()
  return jax.tree.map(make, example)


def local_positions(batch_size: int, mesh: Mesh | None) -> np.ndarray:
  """[p] sorted positions of a [batch_size, ...] batch that this process's devices hold, split
  over the mesh's batch axes (every position without a mesh, or with one process)."""
  if mesh is None:
    return np.arange(batch_size)
  held = set()
  for index in sharding_lib.batch_sharding(mesh).addressable_devices_indices_map(
      (batch_size,)).values():
    held.update(range(*index[0].indices(batch_size)))
  return np.asarray(sorted(held), np.int64)


def _row_feed(source: Any, batches: list[np.ndarray]):
  """The values [len(rows), ...] of each array of input `rows` of `batches`, in order: a row
  loader's `load_batches` (e.g. `eval_data.EvalImages`: decodes only those rows), a numpy
  array's rows, or a sliced sequence's (one slice covering the rows, then the rows of it)."""
  if hasattr(source, "load_batches"):
    return iter(source.load_batches(batches))
  if isinstance(source, np.ndarray):
    return (source[rows] for rows in batches)
  return (np.asarray(source[int(rows.min()):int(rows.max()) + 1])[rows - rows.min()]
          for rows in batches)


def _put_local(values: np.ndarray, positions: np.ndarray, batch_size: int, mesh: Mesh | None
               ) -> jax.Array:
  """This process's rows `values` [p, ...] (at `positions` [p] of the batch) -> the global
  [batch_size, ...] batch, split over the mesh's batch axes."""
  if mesh is None:
    return jax.device_put(values)

  def shard(index):  # a device's rows [lo, hi) are consecutive among this process's positions
    lo, hi, _ = index[0].indices(batch_size)
    at = int(np.searchsorted(positions, lo))
    return values[at:at + hi - lo][(slice(None),) + tuple(index[1:])]

  return jax.make_array_from_callback((batch_size,) + values.shape[1:],
                                      sharding_lib.batch_sharding(mesh), shard)


def _finish(feeds) -> None:
  """Runs each feed past its last batch (a loader's end-of-pass work, e.g. `EvalImages` sharing
  its unreadable rows between processes)."""
  for feed in feeds:
    if next(feed, None) is not None:
      raise RuntimeError("a row loader returned more batches than asked for")


def run_batched(fn: Callable[..., Any], arrays: Sequence[Any], batch_size: int,
                mesh: Mesh | None, *, name: str = "", log_every: int = 0,
                keep_padding: bool = False) -> Any:
  """`fn(*device_batches)` over fixed-size batches of `arrays` (common leading dim N).

  `arrays` are numpy arrays, sequences whose slices load the rows, or row loaders with
  `load_batches(batches) -> iterator` (`eval_data.EvalImages`: images decoded only for the rows
  asked for, maybe read ahead by worker processes). Each process loads only the rows of each
  batch that its devices hold (`local_positions`; the padding of the last batch repeats row
  N - 1) and the batch is assembled over the mesh from the processes' rows. The outputs (a pytree
  of [B, ...] device arrays) are written batch by batch into device buffers of ceil(N / B) * B
  rows (in place: no concatenation, no second copy); returned with their padding rows
  (`keep_padding`: rows >= N repeat the last input's outputs; for large outputs read by index)
  or cut to N. With `log_every`, a progress line every that many batches.
  """
  n = len(arrays[0])
  if n == 0:
    raise ValueError("nothing to evaluate: empty inputs")
  buffers, t0 = None, time.monotonic()
  n_pad = -(-n // batch_size) * batch_size
  positions = local_positions(batch_size, mesh)
  starts = range(0, n, batch_size)
  batches = [np.minimum(start + positions, n - 1) for start in starts]
  feeds = [_row_feed(a, batches) for a in arrays]
  for b, start in enumerate(starts):
    stop = min(n, start + batch_size)
    out = fn(*[_put_local(np.asarray(next(feed)), positions, batch_size, mesh) for feed in feeds])
    if buffers is None:
      if n_pad == batch_size:  # one batch: nothing to write into
        buffers = out
      else:
        buffers = _new_buffers(out, n_pad, mesh)
    if n_pad != batch_size:
      buffers = _write_rows(buffers, out, jnp.int32(start))
    if log_every and (b % log_every == 0 or stop == n):
      logging.info("%s: %d/%d (%.1f/s)", name, stop, n, stop / max(time.monotonic() - t0, 1e-9))
  _finish(feeds)
  if keep_padding or n_pad == n:
    return buffers
  return jax.tree.map(lambda y: y[:n], buffers)


# --------------------------------------------------------------------------------------------
# Splits and files.


def split_name(path: str) -> str:
  """'data/refcoco+_testA.jsonl' -> 'refcoco+_testA'."""
  return os.path.splitext(os.path.basename(path))[0]


def named_splits(paths: Sequence[str], field: str) -> list[tuple[str, str]]:
  """[(path, split name)], refusing an empty list and two files with the same name (their
  metrics would collide). `field` names the config field in messages."""
  paths = list(paths)
  if not paths:
    raise ValueError(f"{field} is empty: list the evaluation files")
  names = [split_name(p) for p in paths]
  if len(set(names)) != len(names):
    raise ValueError(f"{field}: two files share a name: {names}")
  return list(zip(paths, names))


def write_json(predictions_dir: str | None, filename: str, value: Any) -> None:
  """`value` as JSON in `predictions_dir/filename` (nothing without a directory)."""
  if not predictions_dir:
    return
  os.makedirs(predictions_dir, exist_ok=True)
  with open(os.path.join(predictions_dir, filename), "w") as f:
    json.dump(value, f)


def run_all(evaluators: dict[str, Evaluator], params, step: int, *,
            predictions_dir: str | None = None) -> dict[str, float]:
  """Every evaluator's metrics, merged, with one summary line."""
  results: dict[str, float] = {}
  for evaluator in evaluators.values():
    results.update(evaluator.run(params, step, predictions_dir=predictions_dir))
  if results:
    logging.info("Evaluation at step %d: %s", step,
                 " ".join(f"{k}={v:.2f}" for k, v in results.items()))
  return results
