"""Ranks the pictures of a folder against a text query (ITC similarity, optional ITM re-ranking).

  python tools/retrieve.py --config configs/demo.py --checkpoint runs/demo \
      --images demo_data/images --query "a red circle left of a blue square" --top 5 --rerank 20

Every image file of the folder (jpg, jpeg, png, bmp, gif, webp; sorted by name; not recursive) is
ranked by the cosine similarity of its ITC feature to the query's; with `--rerank K` the best K
are re-ordered by the ITM match probability. Prints one JSON line per result,
{"rank": 1, "path": ..., "itc": ..., "itm": ... (null when not re-ranked)}. Files that cannot be
read are reported on stderr by name and skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from x2vlm_jax import inference  # noqa: E402
from x2vlm_jax.configs_loader import load_config  # noqa: E402

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
CHUNK = 64  # images decoded and embedded at a time (bounds memory for large folders)


def list_images(folder: str) -> list[str]:
  """Image files directly in `folder` (by extension, any case), sorted."""
  names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS))
  return [os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))]


def embed_folder(predictor: inference.Predictor, paths: list[str]
                 ) -> tuple[list[str], np.ndarray]:
  """(readable paths, their features [N, E]); unreadable files are reported and skipped."""
  kept, feats = [], []
  for start in range(0, len(paths), CHUNK):
    images = []
    for path in paths[start:start + CHUNK]:
      try:
        images.append(inference.load_image(path))
        kept.append(path)
      except ValueError as e:
        print(f"skipping: {e}", file=sys.stderr)  # e names the file
    if images:
      feats.append(predictor.embed_images(images))
  return kept, (np.concatenate(feats) if feats else np.zeros((0, 0), np.float32))


def rerank(order: np.ndarray, itm_of_top: np.ndarray) -> np.ndarray:
  """order [N] best first by ITC; itm_of_top [K] the ITM scores of order[:K] -> the order with
  those K re-ordered by ITM (ties keep the ITC order)."""
  k = len(itm_of_top)
  return np.concatenate([order[:k][np.argsort(-itm_of_top, kind="stable")], order[k:]])


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, help="configs/NAME.py[:arg]")
  parser.add_argument("--checkpoint", required=True, help="training workdir or Orbax params dir")
  parser.add_argument("--images", required=True, help="folder of pictures")
  parser.add_argument("--query", required=True, help="text to search for")
  parser.add_argument("--top", type=int, default=5, help="results to print")
  parser.add_argument("--rerank", type=int, default=0, metavar="K",
                      help="re-rank the best K by ITM (0: ITC only)")
  parser.add_argument("--vocab", help="vocab.txt (default: config.data.vocab_path)")
  args = parser.parse_args(argv)
  if not os.path.isdir(args.images):
    parser.error(f"--images {args.images} is not a folder")

  predictor = inference.Predictor.load(load_config(args.config), args.checkpoint, args.vocab)
  paths, feats = embed_folder(predictor, list_images(args.images))
  if not paths:
    print(f"error: no readable image in {args.images}", file=sys.stderr)
    return 1
  itc = feats @ predictor.embed_texts([args.query])[0]
  order = np.argsort(-itc, kind="stable")
  itm = {}
  if args.rerank > 0:
    top = order[:args.rerank]
    probs = predictor.score([paths[i] for i in top], [args.query])["itm"][:, 0]
    itm = dict(zip(top.tolist(), probs.tolist()))
    order = rerank(order, probs)
  for r, i in enumerate(order[:args.top].tolist(), start=1):
    print(json.dumps({"rank": r, "path": paths[i], "itc": round(float(itc[i]), 5),
                      "itm": round(itm[i], 5) if i in itm else None}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
