"""Preemption and numerics: SIGTERM checkpoints and exits cleanly, kill -9 loses nothing committed,
a resumed run continues with the losses of an uninterrupted one, and a run whose steps keep going
non-finite stops with a checkpoint and the offending batch."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import xla_env

from configs import demo
from x2vlm_jax import checkpoint, cli, train_guards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_STEPS = 40


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("demo_data"))
  demo.get_config(f"quick,data_dir={path}")  # loading the demo config writes its data
  return path


def _main(demo_dir, workdir):
  """A main.py pre-training command: the quick demo, 40 steps, a checkpoint every 2."""
  return [sys.executable, "main.py", "--config",
          f"configs/demo.py:quick,no_eval,data_dir={demo_dir}", "--workdir", workdir,
          f"--config.train.total_steps={TOTAL_STEPS}", "--config.train.log_every_steps=1",
          "--config.train.checkpoint_every_steps=2"]


def _env():
  # One device, and the compilation cache shared by the four runs (they compile the same step).
  return xla_env.subprocess_env(1)


def _losses(workdir):
  """{step: loss}, the last logged value winning (steps after the last checkpoint of a killed run
  are trained, and logged, again by the next one)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    lines = [line for line in f if line.endswith("\n")]
  return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def _start(demo_dir, workdir, log_path):
  log = open(log_path, "ab")
  return subprocess.Popen(_main(demo_dir, workdir), cwd=ROOT, env=_env(), stdout=log,
                          stderr=subprocess.STDOUT)


def _wait_for_step(proc, workdir, step, timeout=300):
  deadline = time.time() + timeout
  while max(_losses(workdir), default=0) < step:
    assert proc.poll() is None, f"the run ended before step {step}"
    assert time.time() < deadline, f"no step {step} after {timeout}s"
    time.sleep(0.02)


def _committed_steps(workdir):
  return checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")).all_steps()


def test_sigterm_and_kill_9_resume_with_the_losses_of_an_uninterrupted_run(demo_dir, tmp_path):
  straight, interrupted = str(tmp_path / "straight"), str(tmp_path / "interrupted")
  log_path = str(tmp_path / "log.txt")
  proc = subprocess.run(_main(demo_dir, straight), cwd=ROOT, env=_env(), capture_output=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  expected = _losses(straight)
  assert sorted(expected) == list(range(1, TOTAL_STEPS + 1))

  # 1. SIGTERM: a checkpoint at the step where it stopped, exit status 0.
  run = _start(demo_dir, interrupted, log_path)
  _wait_for_step(run, interrupted, 3)
  run.send_signal(signal.SIGTERM)
  assert run.wait(timeout=120) == 0, open(log_path).read()[-3000:]
  stopped_at = max(_losses(interrupted))
  assert stopped_at < TOTAL_STEPS, "the run finished before the signal arrived"
  assert max(_committed_steps(interrupted)) == stopped_at
  assert f"Stopped at step {stopped_at} (preempted)" in open(log_path).read()

  # 2. kill -9 mid-run (checkpoints every 2 steps, saved asynchronously): the last committed
  # checkpoint survives and the next run resumes from it.
  run = _start(demo_dir, interrupted, log_path)
  _wait_for_step(run, interrupted, stopped_at + 5)
  run.kill()
  assert run.wait(timeout=60) == -signal.SIGKILL
  committed = max(_committed_steps(interrupted))
  assert stopped_at < committed < TOTAL_STEPS
  log_before = open(log_path).read()

  # 3. Run to the end.
  run = _start(demo_dir, interrupted, log_path)
  assert run.wait(timeout=600) == 0, open(log_path).read()[-3000:]
  resumed_log = open(log_path).read()[len(log_before):]
  assert f"Resuming from step {committed}" in resumed_log
  got = _losses(interrupted)
  assert sorted(got) == sorted(expected)
  for step in expected:
    assert abs(got[step] - expected[step]) <= 1e-6, (step, got[step], expected[step])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_preemption_flag_is_set_by_sigterm_or_ctrl_c_and_the_handlers_restored(sig):
  before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  with train_guards.Preemption() as preemption:
    assert not preemption.should_stop(1)
    os.kill(os.getpid(), sig)
    time.sleep(0.01)
    assert preemption.should_stop(2)
    if sig == signal.SIGINT:  # a second Ctrl-C does not wait for the step to end
      with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), sig)
        time.sleep(0.01)
  assert {s: signal.getsignal(s) for s in before} == before


def test_ctrl_c_checkpoints_the_current_step_and_exits_cleanly(demo_dir, tmp_path):
  workdir, log_path = str(tmp_path / "run"), str(tmp_path / "log.txt")
  run = _start(demo_dir, workdir, log_path)
  _wait_for_step(run, workdir, 3)
  run.send_signal(signal.SIGINT)
  assert run.wait(timeout=120) == 0, open(log_path).read()[-3000:]
  log = open(log_path).read()
  stopped_at = max(_losses(workdir))
  assert max(_committed_steps(workdir)) == stopped_at < TOTAL_STEPS
  assert f"Stopped at step {stopped_at} (preempted)" in log and "Ctrl-C: saving" in log
  assert "Traceback" not in log and "KeyboardInterrupt" not in log


def test_nonfinite_monitor_counts_in_a_row_and_halts_with_the_batch(tmp_path):
  monitor = train_guards.NonFiniteMonitor(halt_after=3, workdir=str(tmp_path))
  batch = {"image_text": {"text_ids": np.arange(6).reshape(2, 3)}}
  for step, flag in enumerate([1, 1, 0, 1, 1], start=1):  # a finite step resets the count
    monitor.push(step, np.int32(flag), batch)
  monitor.flush()
  assert monitor.in_a_row == 2
  monitor.push(6, np.int32(1), batch)
  with pytest.raises(train_guards.NonFiniteError, match="3 steps in a row up to step 6"):
    monitor.flush()
  saved = np.load(tmp_path / "nonfinite_batch_step6.npz")
  np.testing.assert_array_equal(saved["image_text/text_ids"], batch["image_text"]["text_ids"])


def test_a_run_that_stays_non_finite_halts_with_a_checkpoint(demo_dir, tmp_path):
  config = demo.get_config(f"quick,no_eval,data_dir={demo_dir}")
  config.unlock()
  config.train.total_steps = 10
  config.train.halt_after_nonfinite_steps = 3
  config.train.loss_weights.mlm = float("nan")  # every step's loss is NaN
  workdir = str(tmp_path / "run")
  with pytest.raises(train_guards.NonFiniteError, match="3 steps in a row up to step 3"):
    cli.train(config, workdir)
  assert os.path.exists(os.path.join(workdir, "nonfinite_batch_step3.npz"))
  # The checkpoint holds the initial parameters: every update was skipped.
  steps = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")).all_steps()
  assert max(steps) >= 3
