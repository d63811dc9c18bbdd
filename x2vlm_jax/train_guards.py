"""What can stop a training run early, each in one place: a preemption signal (checkpoint and
exit at the next step boundary) and optimizer steps whose loss or gradient is not finite (skipped;
too many in a row halt the run with the batch saved). The third, too many bad records, is the
data pipeline's `BadRecordBudget`.
"""
from __future__ import annotations

import logging
import os
import signal
import threading

import jax
import numpy as np


class NonFiniteError(RuntimeError):
  """Too many optimizer steps in a row had a non-finite loss or gradient."""


class Preemption:
  """Turns SIGTERM and Ctrl-C (SIGINT) into "checkpoint and stop at the next step boundary".

  One process: a SIGTERM handler (installed for the `with` block, the previous one restored after)
  sets a flag. Several processes: JAX's preemption sync point, so that every process stops at the
  same step (JAX's notifier listens for the same signal); if the distributed runtime has no
  preemption service, the local flag is used.
  """

  def __init__(self):
    self.requested = False
    self._previous: dict | None = None
    self._sync_point = jax.process_count() > 1

  def __enter__(self) -> "Preemption":
    if threading.current_thread() is threading.main_thread():
      self._previous = {sig: signal.signal(sig, self._on_signal)
                        for sig in (signal.SIGTERM, signal.SIGINT)}
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in (self._previous or {}).items():
      signal.signal(sig, handler)

  def _on_signal(self, signum, frame) -> None:
    del frame
    if self.requested and signum == signal.SIGINT:  # a second Ctrl-C: stop now
      raise KeyboardInterrupt
    name = "Ctrl-C" if signum == signal.SIGINT else f"signal {signum}"
    logging.warning("%s: saving a checkpoint at the end of this step, then stopping (Ctrl-C "
                    "again stops at once)", name)
    self.requested = True

  def should_stop(self, step: int) -> bool:
    if self._sync_point:
      from jax.experimental import multihost_utils
      try:
        return bool(multihost_utils.reached_preemption_sync_point(step)) or self.requested
      except RuntimeError as e:  # no preemption service in this distributed runtime
        logging.warning("JAX preemption sync point unavailable (%s); using SIGTERM only", e)
        self._sync_point = False
    return self.requested


class NonFiniteMonitor:
  """Counts steps in a row whose update was skipped for a non-finite loss or gradient.

  Reads each step's `nonfinite` flag one step late, so that checking never stalls the device
  queue. With `halt_after` > 0, `check` raises NonFiniteError after that many in a row, having
  written the last offending batch to `workdir/nonfinite_batch_step{N}.npz`.
  """

  def __init__(self, halt_after: int, workdir: str):
    self.halt_after, self.workdir = int(halt_after), workdir
    self.in_a_row = 0
    self._pending = None  # (step, nonfinite flag [] on device, local batches)

  def push(self, step: int, nonfinite: jax.Array, local_batches) -> None:
    """Records step `step`'s flag; checks the previous step's."""
    previous, self._pending = self._pending, (step, nonfinite, local_batches)
    if previous is not None:
      self._check(*previous)

  def flush(self) -> None:
    if self._pending is not None:
      previous, self._pending = self._pending, None
      self._check(*previous)

  def _check(self, step: int, nonfinite: jax.Array, local_batches) -> None:
    if not int(jax.device_get(nonfinite)):
      self.in_a_row = 0
      return
    self.in_a_row += 1
    logging.warning("Step %d: non-finite loss or gradient, update skipped (%d in a row)", step,
                    self.in_a_row)
    if self.halt_after and self.in_a_row >= self.halt_after:
      path = os.path.join(self.workdir, f"nonfinite_batch_step{step}.npz")
      if jax.process_index() == 0:
        np.savez(path, **{f"{kind}/{k}": np.asarray(v) for kind, batch in local_batches.items()
                          for k, v in batch.items()})
      raise NonFiniteError(
          f"{self.in_a_row} steps in a row up to step {step} had a non-finite loss or gradient "
          f"(config.train.halt_after_nonfinite_steps={self.halt_after}); the last batch is in "
          f"{path}, the parameters of the last finite step are checkpointed in {self.workdir}")
