"""Ranks the pictures of a folder against text queries (ITC similarity, optional ITM re-ranking).

  python tools/retrieve.py --checkpoint runs/demo --images demo_data/images \
      --query "a red circle left of a blue square" --top 5 --rerank 20

`--checkpoint` is a training workdir (its latest checkpoint) or a params dir; its saved config is
used unless `--config configs/NAME.py[:arg]` is given. Every image file of the folder (jpg, jpeg,
png, bmp, gif, webp; sorted by name; not recursive) is embedded once and ranked by the cosine
similarity of its ITC feature to each query's (`--query` repeats); with `--rerank K` each query's
best K are re-ordered by the ITM match probability. Prints one JSON line per result,
{"query": ..., "rank": 1, "path": ..., "itc": ..., "itm": ... (null when not re-ranked)}. Files
that cannot be read are reported on stderr by name and skipped. A thin wrapper over
`python -m x2vlm_jax.predict_cli retrieve` (which also reads saved embeddings: --embeddings DIR).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from x2vlm_jax import predict_cli  # noqa: E402


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", help="configs/NAME.py[:arg] (default: the checkpoint's config)")
  parser.add_argument("--checkpoint", required=True, help="training workdir or params dir")
  parser.add_argument("--images", required=True, help="folder of pictures")
  parser.add_argument("--query", action="append", required=True,
                      help="text to search for (repeatable)")
  parser.add_argument("--top", type=int, default=5, help="results per query")
  parser.add_argument("--rerank", type=int, default=0, metavar="K",
                      help="re-rank the best K by ITM (0: ITC only)")
  parser.add_argument("--vocab", help="vocab.txt (default: the checkpoint's tokenizer)")
  args = parser.parse_args(argv)
  forwarded = ["retrieve", "--checkpoint", args.checkpoint, "--images", args.images,
               "--top", str(args.top), "--rerank", str(args.rerank)]
  for query in args.query:
    forwarded += ["--query", query]
  for flag, value in (("--config", args.config), ("--vocab", args.vocab)):
    if value:
      forwarded += [flag, value]
  return predict_cli.main(forwarded)


if __name__ == "__main__":
  sys.exit(main())
