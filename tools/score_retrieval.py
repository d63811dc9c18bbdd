"""Recomputes retrieval metrics from a saved score file.

  python tools/score_retrieval.py --scores scores.npz --annotations coco_test.json \
      [--out metrics.json]

`scores.npz` is written by `x2vlm_jax.evaluate.save_scores` (scores_i2t [N_img, N_txt],
scores_t2i [N_txt, N_img]); the annotations are the Karpathy-style test JSON the scores were
computed on (`[{"image": path, "caption": [str, ...]}, ...]`, same order). Prints one
`name: value` line per metric, then the metrics as one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from x2vlm_jax.evaluate.retrieval_metrics import (load_retrieval_annotations,  # noqa: E402
                                                  load_scores, retrieval_metrics)

METRIC_ORDER = ("txt_r1", "txt_r5", "txt_r10", "txt_r_mean",
                "img_r1", "img_r5", "img_r10", "img_r_mean", "r_mean")


def main(argv: list[str] | None = None) -> dict[str, float]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--scores", required=True, help=".npz from save_scores")
  parser.add_argument("--annotations", required=True, help="Karpathy-style test JSON")
  parser.add_argument("--out", help="optional path for the metrics as JSON")
  args = parser.parse_args(argv)

  scores_i2t, scores_t2i = load_scores(args.scores)
  img2txt, txt2img = load_retrieval_annotations(args.annotations)
  expected = (len(img2txt), len(txt2img))
  if scores_i2t.shape != expected:
    parser.error(f"{args.scores}: scores_i2t is {scores_i2t.shape} but {args.annotations} has "
                 f"{expected[0]} images and {expected[1]} captions")
  metrics = retrieval_metrics(scores_i2t, scores_t2i, img2txt, txt2img)
  for name in METRIC_ORDER:
    print(f"{name}: {metrics[name]:.2f}")
  print(json.dumps(metrics, sort_keys=True))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(metrics, f, indent=2, sort_keys=True)
  return metrics


if __name__ == "__main__":
  main()
