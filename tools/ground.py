"""Draws the box a checkpoint predicts for each text on a picture (referring-expression grounding).

  python tools/ground.py --config configs/demo.py --checkpoint runs/demo \
      --image photo.jpg --text "the red circle" --text "the blue square" --out boxed.png

`--checkpoint` is a training workdir (its latest checkpoint) or an Orbax params dir
(tools/convert_checkpoint.py). Prints one JSON line per text,
{"image": path, "text": text, "box_xywh": [x, y, w, h]} in pixels of the original image (after
its EXIF rotation), and with `--out` writes the image at its original size with every box and its
text drawn in its own colour.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from PIL import Image, ImageDraw  # noqa: E402

from x2vlm_jax import inference  # noqa: E402
from x2vlm_jax.configs_loader import load_config  # noqa: E402

COLOURS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60))


def _overlaps(a, b) -> bool:
  return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def draw_boxes(image: Image.Image, texts: list[str], boxes) -> Image.Image:
  """A copy of `image` with boxes [T, 4] (x, y, w, h pixels) outlined, each labelled by its text
  (above the box, or inside it at the top edge; moved down past labels already written)."""
  out = image.convert("RGB")
  draw = ImageDraw.Draw(out)
  width = max(2, round(min(out.size) / 150))
  for k, (x, y, w, h) in enumerate(boxes):
    draw.rectangle([x, y, x + w, y + h], outline=COLOURS[k % len(COLOURS)], width=width)
  placed = []
  for k, (text, (x, y, _, _)) in enumerate(zip(texts, boxes)):
    left, top, right, bottom = draw.textbbox((0, 0), text)
    tw, th = right - left + 2, bottom - top + 2
    tx, ty = max(0.0, x), y - th - width
    ty = ty if ty >= 0 else max(0.0, y) + width
    while any(_overlaps((tx, ty, tx + tw, ty + th), p) for p in placed):
      ty += th
    placed.append((tx, ty, tx + tw, ty + th))
    draw.rectangle([tx, ty, tx + tw, ty + th], fill=COLOURS[k % len(COLOURS)])
    draw.text((tx + 1 - left, ty + 1 - top), text, fill=(255, 255, 255))
  return out


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, help="configs/NAME.py[:arg]")
  parser.add_argument("--checkpoint", required=True, help="training workdir or Orbax params dir")
  parser.add_argument("--image", required=True, help="the picture")
  parser.add_argument("--text", action="append", required=True,
                      help="referring expression (repeat for several boxes)")
  parser.add_argument("--out", help="where to write the picture with the boxes drawn")
  parser.add_argument("--vocab", help="vocab.txt (default: config.data.vocab_path)")
  args = parser.parse_args(argv)

  try:
    image = inference.load_image(args.image)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  predictor = inference.Predictor.load(load_config(args.config), args.checkpoint, args.vocab)
  boxes = predictor.ground_batch([image] * len(args.text), args.text)
  for text, box in zip(args.text, boxes):
    print(json.dumps({"image": args.image, "text": text,
                      "box_xywh": [round(float(v), 2) for v in box]}))
  if args.out:
    draw_boxes(image, args.text, boxes).save(args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
