"""Training metrics: writers (JSONL + TensorBoard + console), a progress line, loss averaging.

* `MetricWriter` — process 0 writes `WORKDIR/metrics.jsonl` (one JSON object per call, flushed
  at once, so `tail -f` and a crashed run both show the latest numbers), TensorBoard event files
  under `WORKDIR/tensorboard` through `tensorboardX` (no TensorFlow; `clu.metric_writers` would
  pull TensorFlow in), and one `logging.info` line. Other processes write nothing.
* `ProgressReporter` — `step 120/2000 | loss 3.412 itc 1.2 | 45.1 ex/s | ETA 00:12:31`, with time
  spent in evaluation / checkpointing excluded via `pause()` / `resume()` / `with paused():`.
* `make_train_metrics` — a `clu.metrics.Collection` averaging each named loss over steps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
import contextlib
import json
import logging
import math
import os
import sys
import time
from typing import Any

from clu import metrics as clu_metrics
import numpy as np


def _to_float(name: str, value: Any) -> float:
  array = np.asarray(value)
  if array.size != 1:
    raise ValueError(f"Metric {name!r}: expected a scalar, found shape {array.shape}.")
  return float(array.reshape(()))


class MetricWriter:
  """Writes scalar metrics and the run config on the chief process.

  Files (under `workdir`): `metrics.jsonl` (`{"step": 120, "loss": 3.41, ...}` per line;
  non-finite values are written as JSON `NaN` / `Infinity`, which Python's json reads back),
  `config.json`, `tensorboard/events.out.tfevents.*`.
  """

  def __init__(self, workdir: str | os.PathLike, *, is_chief: bool = True,
               tensorboard: bool = True):
    self.workdir = os.fspath(workdir)
    self.is_chief = is_chief
    self._jsonl = None
    self._tb = None
    if not is_chief:
      return
    os.makedirs(self.workdir, exist_ok=True)
    self._jsonl = open(os.path.join(self.workdir, "metrics.jsonl"), "a", encoding="utf-8")
    if tensorboard:
      tensorboardx = _import_tensorboardx()
      self._tb = tensorboardx.SummaryWriter(logdir=os.path.join(self.workdir, "tensorboard"))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Records `scalars` (name → scalar number / 0-d or 1-element array) at `step`."""
    values = {name: _to_float(name, v) for name, v in scalars.items()}
    if not self.is_chief:
      return
    self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for name, value in values.items():
        self._tb.add_scalar(name, value, global_step=int(step))
      self._tb.flush()

  def forget_after(self, step: int) -> None:
    """Drops the metrics.jsonl rows of steps after `step`: a run resumed from the checkpoint of
    `step` logs the later steps again, each once."""
    if not self.is_chief:
      return
    path = os.path.join(self.workdir, "metrics.jsonl")
    self._jsonl.close()
    with open(path, encoding="utf-8") as f:
      lines = [line for line in f if line.endswith("\n")]  # a torn last line is dropped too
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
      with open(path, "w", encoding="utf-8") as f:
        f.writelines(kept)
    self._jsonl = open(path, "a", encoding="utf-8")

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """Saves the run configuration (dict or `ConfigDict`) as `config.json` (and in TensorBoard)."""
    if not self.is_chief:
      return
    as_dict = hparams.to_dict() if hasattr(hparams, "to_dict") else dict(hparams)
    text = json.dumps(as_dict, indent=2, sort_keys=True, default=str)
    with open(os.path.join(self.workdir, "config.json"), "w", encoding="utf-8") as f:
      f.write(text + "\n")
    if self._tb is not None:
      self._tb.add_text("config", f"```\n{text}\n```", global_step=0)
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _import_tensorboardx():
  """tensorboardX, imported without torch.

  Its writer module imports torch whenever torch is installed, only to accept torch tensors; the
  training path must neither pay for nor depend on torch, so torch is hidden during the import
  (we only pass Python floats). If torch is already loaded (tests, conversion) nothing changes.
  """
  if "torch" in sys.modules:
    import tensorboardX  # pylint: disable=g-import-not-at-top
    return tensorboardX
  sys.modules["torch"] = None  # makes `import torch` raise ImportError, which tensorboardX handles
  try:
    import tensorboardX  # pylint: disable=g-import-not-at-top
  finally:
    del sys.modules["torch"]
  return tensorboardX


def format_duration(seconds: float) -> str:
  """`HH:MM:SS` (hours may exceed 99); `--:--:--` when unknown."""
  if seconds is None or not math.isfinite(seconds):
    return "--:--:--"
  seconds = int(round(max(seconds, 0.0)))
  return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class ProgressReporter:
  """Logs `step 120/2000 | loss 3.412 itc 1.2 | 45.1 ex/s | ETA 00:12:31` every `every_steps`
  (the metrics given; the loop gives the total and per-task losses and the lr, everything else
  goes to metrics.jsonl / TensorBoard only).

  ex/s is measured over the last reporting interval. The ETA uses the mean speed since the
  first report, so the first interval (which includes compilation) does not skew it; until a
  second report exists it uses the first interval's speed. Time between `pause()` and
  `resume()` (evaluation, checkpointing) counts in neither.
  """

  def __init__(self, total_steps: int, batch_size: int, every_steps: int, *, start_step: int = 0,
               time_fn: Callable[[], float] = time.monotonic):
    """Args: total_steps: last step; batch_size: global examples per step; every_steps:
    reporting interval; start_step: step the run (re)starts from; time_fn: clock (tests)."""
    if every_steps < 1:
      raise ValueError(f"ProgressReporter: every_steps must be ≥ 1, found {every_steps}.")
    self.total_steps = total_steps
    self.batch_size = batch_size
    self.every_steps = every_steps
    self._time = time_fn
    self._last_step = start_step
    self._active = 0.0  # un-paused seconds since the last report
    self._since = time_fn()  # start of the current un-paused stretch, None while paused
    self._first_step: int | None = None  # steady-state window: from the first report on
    self._steady_active = 0.0

  def pause(self) -> None:
    """Stops the clock (idempotent)."""
    if self._since is not None:
      self._active += self._time() - self._since
      self._since = None

  def resume(self) -> None:
    """Restarts the clock (idempotent)."""
    if self._since is None:
      self._since = self._time()

  @contextlib.contextmanager
  def paused(self) -> Iterator[None]:
    """`with reporter.paused(): run_eval()` — excludes the block from speed and ETA."""
    self.pause()
    try:
      yield
    finally:
      self.resume()

  def __call__(self, step: int, metrics: Mapping[str, Any] | None = None) -> str | None:
    """Returns (and logs) the progress line at reporting steps and the last step, else None."""
    if step % self.every_steps and step != self.total_steps:
      return None
    running = self._since is not None
    self.pause()
    active, steps = self._active, step - self._last_step
    rate = steps / active if active > 0 and steps > 0 else None  # steps per second
    if self._first_step is None:
      self._first_step = step
      eta_rate = rate
    else:
      self._steady_active += active
      done = step - self._first_step
      eta_rate = done / self._steady_active if self._steady_active > 0 and done > 0 else rate
    self._last_step, self._active = step, 0.0
    if running:
      self.resume()

    parts = [f"step {step}/{self.total_steps}"]
    if metrics:
      parts.append(" ".join(f"{k} {_to_float(k, v):.4g}" for k, v in metrics.items()))
    parts.append(f"{rate * self.batch_size:.1f} ex/s" if rate else "-- ex/s")
    eta = (self.total_steps - step) / eta_rate if eta_rate else None
    parts.append(f"ETA {format_duration(eta)}")
    line = " | ".join(parts)
    logging.info(line)
    return line


def make_train_metrics(names: Sequence[str]) -> type[clu_metrics.Collection]:
  """A `clu.metrics.Collection` class with one `Average` per name, fed by outputs of that name.

  Usage (inside or outside `jit`)::

    TrainMetrics = make_train_metrics(["loss", "itc", "itm", "mlm"])
    m = TrainMetrics.single_from_model_output(loss=loss, itc=itc, itm=itm, mlm=mlm)
    acc = m if acc is None else acc.merge(m)       # every step
    writer.write_scalars(step, acc.compute())      # every log step, then acc = None
  """
  if len(set(names)) != len(names) or not all(n.isidentifier() for n in names):
    raise ValueError(f"make_train_metrics: expected distinct identifier names, found {names}.")
  return clu_metrics.Collection.create(
      **{name: clu_metrics.Average.from_output(name) for name in names})
