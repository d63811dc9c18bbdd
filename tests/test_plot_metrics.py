"""tools/plot_metrics.py: reads metrics.jsonl series and draws one panel per metric."""
import json

import numpy as np
import pytest
from PIL import Image

from tools import plot_metrics


def _write(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_series_skip_rows_without_the_key_and_non_finite_values(tmp_path):
  f = tmp_path / "metrics.jsonl"
  _write(f, [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0, "eval/acc": 10.0},
             {"step": 3, "loss": float("nan")}, {"step": 4, "loss": 1.0}])
  series = plot_metrics.read_series(str(f), ["loss", "eval/acc", "absent"])
  np.testing.assert_array_equal(series["loss"][0], [1, 2, 4])
  np.testing.assert_array_equal(series["loss"][1], [3.0, 2.0, 1.0])
  np.testing.assert_array_equal(series["eval/acc"][0], [2])
  assert "absent" not in series


def test_malformed_line_is_named(tmp_path):
  f = tmp_path / "metrics.jsonl"
  f.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss"\n')
  with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
    plot_metrics.read_series(str(f), ["loss"])


def test_moving_average_is_centred_and_shrinks_at_the_ends():
  np.testing.assert_allclose(plot_metrics.moving_average(np.array([0., 3., 6., 9.]), 3),
                             [1.5, 3.0, 6.0, 7.5])


def test_cli_writes_one_panel_per_metric(tmp_path):
  f = tmp_path / "metrics.jsonl"
  _write(f, [{"step": s, "a": 1.0 / s, "b": float(s), "c": 2.0} for s in range(1, 20)])
  out = tmp_path / "plots" / "curves.png"
  plot_metrics.main(["--metrics", str(f), "--out", str(out), "--keys", "a,b,c", "--columns", "2"])
  img = Image.open(out)
  assert img.size == (2 * plot_metrics.PANEL_W, 2 * plot_metrics.PANEL_H)
  # The falling curve of "a" starts high-left and ends low-right inside its panel (blue pixels).
  panel = np.asarray(img)[:plot_metrics.PANEL_H, :plot_metrics.PANEL_W]
  blue = np.argwhere((panel[..., 2] > 150) & (panel[..., 0] < 80))
  left, right = blue[blue[:, 1] < 60], blue[blue[:, 1] > plot_metrics.PANEL_W - 40]
  assert left[:, 0].mean() < right[:, 0].mean()  # rows grow downwards


def test_a_fine_tuning_run_plots_its_own_metrics_and_missing_ones_are_listed(tmp_path, capsys):
  f = tmp_path / "metrics.jsonl"
  _write(f, [{"step": s, "vqa/loss": 3.0 / s, "lr": 1e-4} for s in range(1, 6)]
         + [{"step": 5, "eval/vqa/accuracy": 40.0}])
  out = tmp_path / "curves.png"
  assert plot_metrics.main(["--metrics", str(f), "--out", str(out), "--columns", "3"]) == 0
  assert Image.open(out).size == (3 * plot_metrics.PANEL_W, plot_metrics.PANEL_H)  # 3 panels
  assert plot_metrics.main(["--metrics", str(f), "--out", str(out), "--keys", "regions/itc"]) == 2
  err = capsys.readouterr().err
  assert "not in" in err and "regions/itc" in err
  assert "it has: eval/vqa/accuracy, lr, vqa/loss" in err
  assert plot_metrics.main(["--metrics", str(tmp_path / "none.jsonl"), "--out", str(out)]) == 2
  assert "no such file" in capsys.readouterr().err
