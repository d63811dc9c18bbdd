"""Draws the box a checkpoint predicts for each text on a picture (referring-expression grounding).

  python tools/ground.py --checkpoint runs/demo \
      --image photo.jpg --text "the red circle" --text "the blue square" --out boxed.png

`--checkpoint` is a training workdir (its latest checkpoint) or a params dir
(tools/convert_checkpoint.py); its saved config is used unless `--config configs/NAME.py[:arg]`
is given. Prints one JSON line per text,
{"image": path, "text": text, "box_xywh": [x, y, w, h]} in pixels of the original image (after
its EXIF rotation), and with `--out` writes the image at its original size with every box and its
text drawn in its own colour (labels scaled with the picture and kept inside it). A thin wrapper
over `python -m x2vlm_jax.predict_cli ground` (`--draw`).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from x2vlm_jax import predict_cli  # noqa: E402
from x2vlm_jax.predict_cli import COLOURS, draw_boxes  # noqa: E402,F401  (the tool's API)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", help="configs/NAME.py[:arg] (default: the checkpoint's config)")
  parser.add_argument("--checkpoint", required=True, help="training workdir or params dir")
  parser.add_argument("--image", required=True, help="the picture")
  parser.add_argument("--text", action="append", required=True,
                      help="referring expression (repeat for several boxes)")
  parser.add_argument("--out", help="where to write the picture with the boxes drawn")
  parser.add_argument("--vocab", help="vocab.txt (default: the checkpoint's tokenizer)")
  args = parser.parse_args(argv)
  forwarded = ["ground", "--checkpoint", args.checkpoint, "--image", args.image]
  for text in args.text:
    forwarded += ["--text", text]
  for flag, value in (("--config", args.config), ("--vocab", args.vocab), ("--draw", args.out)):
    if value:
      forwarded += [flag, value]
  return predict_cli.main(forwarded)


if __name__ == "__main__":
  sys.exit(main())
