"""VQA accuracy of a result file, as the official VQA v2 evaluation computes it.

  python tools/score_vqa.py --predictions vqa_result.json \
      --annotations v2_mscoco_val2014_annotations.json \
      [--questions v2_OpenEnded_mscoco_val2014_questions.json] [--out metrics.json]

Predictions are the official result format `[{"question_id", "answer"}, ...]` (what
`main.py --mode eval` writes for VQA). With --questions, every question must have a prediction.
Prints overall and per-answer-type accuracy (percent), then everything as one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from x2vlm_jax.evaluate import vqa_metrics  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--predictions", required=True)
  parser.add_argument("--annotations", required=True)
  parser.add_argument("--questions")
  parser.add_argument("--out", help="optional path for the metrics as JSON")
  args = parser.parse_args(argv)
  try:
    predictions = vqa_metrics.load_json(args.predictions)
    annotations = vqa_metrics.load_json(args.annotations, "annotations")
    questions = vqa_metrics.load_json(args.questions, "questions") if args.questions else None
    metrics = vqa_metrics.vqa_accuracy(predictions, annotations, questions)
  except (OSError, ValueError, KeyError) as e:
    parser.error(str(e))
  print(f"overall: {metrics['overall']:.2f}  ({metrics['num_questions']} questions)")
  for answer_type, acc in metrics["per_answer_type"].items():
    print(f"{answer_type}: {acc:.2f}")
  print(json.dumps(metrics))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(metrics, f, indent=1)
  return metrics


if __name__ == "__main__":
  main()
