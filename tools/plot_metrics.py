"""Draws training curves from a run's metrics.jsonl into a PNG (PIL only, no matplotlib).

  python tools/plot_metrics.py --metrics runs/demo/metrics.jsonl --out docs/demo_losses.png \
      [--keys image_text/itc,regions/bbox_giou,...] [--smooth 3]

Asked for metrics the file lacks, it names them and lists the ones it has.

One panel per metric (the step on x, the value on y, min/max labelled), laid out in a grid.
Rows of metrics.jsonl without a key (e.g. evaluation rows) are skipped for that key.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEFAULT_KEYS = ("image_text/itc", "image_text/itm", "image_text/mlm", "regions/itc",
                "regions/itm", "regions/mlm", "regions/bbox_l1", "regions/bbox_giou")
PANEL_W, PANEL_H, MARGIN = 300, 170, 34


def read_series(path: str, keys) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """metrics.jsonl -> {key: (steps [T], values [T])} for the keys present in any row."""
  series: dict[str, list[tuple[int, float]]] = {k: [] for k in keys}
  with open(path) as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{line_no}: not JSON ({e})") from None
      for k in keys:
        if k in row and isinstance(row[k], (int, float)) and math.isfinite(row[k]):
          series[k].append((int(row["step"]), float(row[k])))
  return {k: (np.array([s for s, _ in v]), np.array([x for _, x in v]))
          for k, v in series.items() if v}


def available_metrics(path: str) -> list[str]:
  """The names of the numeric metrics in metrics.jsonl (any row), sorted; 'step' excluded."""
  names = set()
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      names.update(k for k, v in row.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool))
  return sorted(names)


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
  """Centred moving average [T] -> [T] (window shrinks at the ends); window <= 1: unchanged."""
  if window <= 1 or len(values) < 2:
    return values
  half = window // 2
  return np.array([values[max(0, i - half):i + half + 1].mean() for i in range(len(values))])


def draw_panel(title: str, steps: np.ndarray, values: np.ndarray) -> Image.Image:
  """One curve on a white panel with its title and the y range written at the axis ends."""
  img = Image.new("RGB", (PANEL_W, PANEL_H), "white")
  d = ImageDraw.Draw(img)
  x0, y0, x1, y1 = MARGIN, 18, PANEL_W - 8, PANEL_H - 18
  d.rectangle([x0, y0, x1, y1], outline=(160, 160, 160))
  lo, hi = float(values.min()), float(values.max())
  span = hi - lo or 1.0
  s_lo, s_hi = float(steps.min()), float(steps.max())
  s_span = s_hi - s_lo or 1.0
  pts = [(x0 + (s - s_lo) / s_span * (x1 - x0), y1 - (v - lo) / span * (y1 - y0))
         for s, v in zip(steps, values)]
  if len(pts) > 1:
    d.line(pts, fill=(30, 90, 200), width=2)
  else:
    d.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=(30, 90, 200))
  d.text((x0, 3), title, fill="black")
  d.text((2, y0), f"{hi:.3g}", fill=(90, 90, 90))
  d.text((2, y1 - 10), f"{lo:.3g}", fill=(90, 90, 90))
  d.text((x0, y1 + 3), str(int(s_lo)), fill=(90, 90, 90))
  d.text((x1 - 36, y1 + 3), str(int(s_hi)), fill=(90, 90, 90))
  return img


def plot(series: dict[str, tuple[np.ndarray, np.ndarray]], out: str, columns: int = 4,
         smooth: int = 1) -> None:
  if not series:
    raise ValueError("none of the requested metrics is in the file")
  rows = math.ceil(len(series) / columns)
  sheet = Image.new("RGB", (columns * PANEL_W, rows * PANEL_H), "white")
  for i, (key, (steps, values)) in enumerate(series.items()):
    panel = draw_panel(key, steps, moving_average(values, smooth))
    sheet.paste(panel, ((i % columns) * PANEL_W, (i // columns) * PANEL_H))
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  sheet.save(out)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--metrics", required=True, help="WORKDIR/metrics.jsonl")
  parser.add_argument("--out", required=True, help="PNG to write")
  parser.add_argument("--keys", default=None,
                      help="comma-separated metrics (default: the pre-training losses, or every "
                           "metric of the file when it has none of them)")
  parser.add_argument("--smooth", type=int, default=1, help="moving-average window (points)")
  parser.add_argument("--columns", type=int, default=4)
  args = parser.parse_args(argv)
  if not os.path.isfile(args.metrics):
    print(f"error: --metrics {args.metrics}: no such file (a run writes WORKDIR/metrics.jsonl)",
          file=sys.stderr)
    return 2
  available = available_metrics(args.metrics)
  if args.keys is None:
    keys = [k for k in DEFAULT_KEYS if k in available] or available
  else:
    keys = [k for k in args.keys.split(",") if k]
  series = read_series(args.metrics, keys)
  missing = [k for k in keys if k not in series]
  if missing:
    print(f"not in {args.metrics}: {', '.join(missing)}; it has: {', '.join(available)}",
          file=sys.stderr)
  if not series:
    print("error: nothing to plot", file=sys.stderr)
    return 2
  plot(series, args.out, columns=args.columns, smooth=args.smooth)
  print(f"wrote {args.out}: {len(series)} panels")
  return 0

if __name__ == "__main__":
  sys.exit(main())
