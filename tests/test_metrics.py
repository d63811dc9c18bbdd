"""MetricWriter files, ProgressReporter speed/ETA with a fake clock, clu loss averaging."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from x2vlm_jax import metrics


def test_writer_jsonl_tensorboard_and_config(tmp_path):
  with metrics.MetricWriter(tmp_path) as writer:
    writer.write_hparams(ml_collections.ConfigDict(dict(optim=dict(lr=1e-4), mesh=dict(data=-1))))
    writer.write_scalars(10, {"loss": jnp.asarray(3.5), "itc": np.float32(1.25), "lr": 1e-4})
    # Flushed at once: readable before close.
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == {"step": 10, "loss": 3.5, "itc": 1.25, "lr": 1e-4}
    writer.write_scalars(20, {"loss": jnp.array([2.0]), "grad_norm": float("nan")})
    with pytest.raises(ValueError, match=r"Metric 'loss': expected a scalar, found shape \(2,\)"):
      writer.write_scalars(30, {"loss": jnp.ones(2)})
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [10, 20]
  assert rows[1]["loss"] == 2.0 and np.isnan(rows[1]["grad_norm"])
  assert json.loads((tmp_path / "config.json").read_text())["optim"]["lr"] == 1e-4
  events = os.listdir(tmp_path / "tensorboard")
  assert any(f.startswith("events.out.tfevents") for f in events)
  assert os.path.getsize(tmp_path / "tensorboard" / events[0]) > 0


def test_writer_appends_across_restarts_and_non_chief_is_silent(tmp_path):
  for step in (1, 2):
    with metrics.MetricWriter(tmp_path, tensorboard=False) as w:
      w.write_scalars(step, {"loss": 1.0})
  assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
  quiet = tmp_path / "worker1"
  with metrics.MetricWriter(quiet, is_chief=False) as w:
    w.write_hparams({"a": 1})
    w.write_scalars(1, {"loss": 1.0})
  assert not quiet.exists()


class _Clock:
  def __init__(self):
    self.t = 0.0

  def __call__(self):
    return self.t


def test_progress_speed_and_eta_exclude_pauses():
  clock = _Clock()
  rep = metrics.ProgressReporter(total_steps=100, batch_size=8, every_steps=10, time_fn=clock)
  clock.t = 20.0  # first interval: 10 steps in 20 s (includes compilation)
  assert rep(10, {"loss": 3.41234, "itc": 1.2}) == (
      "step 10/100 | loss 3.412 itc 1.2 | 4.0 ex/s | ETA 00:03:00")
  clock.t = 25.0
  assert rep(15, {"loss": 1.0}) is None  # not a reporting step
  clock.t = 30.0  # 10 steps in 10 s; ETA from steps since the first report: 80 steps at 1/s
  assert rep(20) == "step 20/100 | 8.0 ex/s | ETA 00:01:20"
  with rep.paused():  # a 100 s evaluation is invisible to speed and ETA
    clock.t = 130.0
  clock.t = 135.0  # 10 steps in 5 active s; steady state: 20 steps in 15 s → 70 / (4/3) s
  assert rep(30) == "step 30/100 | 16.0 ex/s | ETA 00:00:52"
  rep.pause()
  clock.t = 1000.0
  rep.resume()
  rep.resume()  # idempotent
  clock.t = 1010.0
  assert rep(40).endswith("| 8.0 ex/s | ETA 00:00:50")  # 30 steps in 25 s → 60 / 1.2


def test_progress_reports_last_step_and_formats_long_runs():
  clock = _Clock()
  rep = metrics.ProgressReporter(total_steps=25, batch_size=1, every_steps=10, start_step=5,
                                 time_fn=clock)
  clock.t = 2.0
  assert rep(10) == "step 10/25 | 2.5 ex/s | ETA 00:00:06"
  clock.t = 4.0
  assert rep(25) == "step 25/25 | 7.5 ex/s | ETA 00:00:00"  # last step, off-interval
  assert metrics.format_duration(100 * 3600 + 61) == "100:01:01"
  assert metrics.format_duration(None) == "--:--:--"


def test_train_metrics_average_over_steps():
  train_metrics = metrics.make_train_metrics(["loss", "itc", "itm"])
  per_step = [dict(loss=3.0, itc=1.0, itm=0.5), dict(loss=2.0, itc=0.5, itm=0.25),
              dict(loss=1.0, itc=0.0, itm=0.75)]

  @jax.jit
  def step_metrics(values):  # built inside jit like a train step would
    return train_metrics.single_from_model_output(**values)

  acc = None
  for values in per_step:
    m = step_metrics({k: jnp.asarray(v) for k, v in values.items()})
    acc = m if acc is None else acc.merge(m)
  got = acc.compute()
  assert set(got) == {"loss", "itc", "itm"}
  for name in got:
    assert float(got[name]) == pytest.approx(np.mean([v[name] for v in per_step]))
  with pytest.raises(ValueError, match="distinct identifier names"):
    metrics.make_train_metrics(["loss", "loss"])


def test_a_resumed_run_logs_each_step_once(tmp_path):
  with metrics.MetricWriter(tmp_path, tensorboard=False) as writer:
    for step in (1, 2, 3, 4):
      writer.write_scalars(step, {"loss": float(step)})
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 5, "lo')  # a line torn by a kill
  with metrics.MetricWriter(tmp_path, tensorboard=False) as writer:  # resumed from step 2
    writer.forget_after(2)
    for step in (3, 4):
      writer.write_scalars(step, {"loss": 10.0 * step})
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
