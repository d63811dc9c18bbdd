"""BLEU-1..4 and CIDEr-D of a caption result file, as pycocoevalcap computes them (no Java).

  python tools/score_captions.py --predictions caption_result.json \
      --annotations coco_karpathy_test_gt.json [--only-predicted] [--out metrics.json]

Predictions are the COCO result format `[{"image_id", "caption"}, ...]`. Annotations are COCO
caption annotations `{"annotations": [{"image_id", "caption"}, ...]}` or a Karpathy-style list /
JSONL of `{"image", "caption": [...]}` (ids from the file names' trailing digits). Every annotated
image must have a prediction unless --only-predicted, which scores the annotated images that have
one (what COCOEvalCap does with `params["image_id"] = result ids`; CIDEr's document frequencies
then come from those images only). Prints the metrics (BLEU and CIDEr x100) as one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from x2vlm_jax.evaluate import caption_metrics  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--predictions", required=True)
  parser.add_argument("--annotations", required=True)
  parser.add_argument("--only-predicted", action="store_true",
                      help="score only the annotated images that have a prediction")
  parser.add_argument("--out", help="optional path for the metrics as JSON")
  args = parser.parse_args(argv)
  try:
    predictions = caption_metrics.load_predictions(args.predictions)
    references = caption_metrics.load_references(args.annotations)
    if args.only_predicted:
      references = {k: v for k, v in references.items() if k in predictions}
    metrics = caption_metrics.score_captions(references, predictions)
  except (OSError, ValueError) as e:
    parser.error(str(e))
  metrics["num_images"] = len(predictions)
  print(json.dumps(metrics))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(metrics, f, indent=1)
  return metrics


if __name__ == "__main__":
  main()
