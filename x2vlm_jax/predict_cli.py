"""One command for every head of a checkpoint: retrieve, ground, answer, caption, nlvr, classify
and embed (x2vlm_jax/inference.py's `Predictor`), run as `x2vlm predict COMMAND` / `x2vlm embed`
(or `python -m x2vlm_jax.predict_cli COMMAND`).

  x2vlm predict answer --checkpoint runs/demo_vqa --image scene.png \
      --question "what colour is the circle" --question "is there a blue square"
  x2vlm predict retrieve --checkpoint runs/demo --images photos/ \
      --query "a red circle" --query "two squares" --top 3 --rerank 10
  x2vlm embed --checkpoint runs/demo --images photos/ --out emb/
  x2vlm predict retrieve --checkpoint runs/demo --embeddings emb/ --query "a red circle"

Every command takes
  --checkpoint DIR    a training workdir, its checkpoints/<step>, or a params dir (required)
  --config SPEC       the model's config (configs/NAME.py[:arg], a config.json, a directory);
                      default: the config saved with the checkpoint
  --vocab FILE        the tokenizer; default: the checkpoint's saved copy, else the config's
  --batch-size N      rows per jitted call (default 8)
  --out FILE.json     also write every result as one JSON list (`embed`: the output folder)
and prints one JSON line per result on stdout.

Pictures (every command but nlvr):
  --image PATH        a picture (repeatable); a missing or unreadable one is an error
  --images SOURCE     a folder (its .jpg .jpeg .png .bmp .gif .webp files, sorted by name, not
                      recursive) or a JSONL file of {"image": path, ...} records; pictures that
                      cannot be read are reported on stderr by name and skipped
  --image-root DIR    prefix of relative paths in JSONL files (default: the current directory)
Pictures are decoded and run in chunks of 64, so a folder of any size fits in memory.

Commands and their result lines:
  retrieve  --query TEXT (repeatable): the pictures ranked by the ITC cosine with each query,
            the pictures embedded once; or, instead of pictures, --embeddings DIR written by
            `embed`. --top N (default 5); --rerank K re-orders each query's best K by the ITM
            match probability (the pictures are read again).
            {"query", "rank", "path", "itc", "itm" (null unless re-ranked)}
  ground    --text TEXT (repeatable): the box of every text in every picture, in the pixels
            of the original (EXIF-rotated) picture; --draw FILE.png (one picture) writes it
            with the boxes and their texts drawn.      {"image", "text", "box_xywh"}
  answer    --question TEXT (repeatable): every question about every picture (JSONL records
            with a "question" bring their own). --mode auto | head | rank | generate (VQA
            classification head; answer decoder ranking the answer list; free-form answers),
            --answers FILE (a JSON answer list replacing the config's), --beam N and --max-len N
            (generate), --k N (rank: candidates re-scored).
            {"image", "question", "answer", "score"}
  caption   --beam N, --max-len N, --min-len N (default: the captioning evaluator's settings).
            {"image", "caption"}
  nlvr      --pair LEFT RIGHT (repeatable) with --sentence TEXT (repeatable): every sentence
            about every pair; or --examples JSONL of {"images": [left, right], "sentence"}.
            {"images": [left, right], "sentence", "label", "prob_true"}
  classify  zero-shot: --label TEXT (repeatable) and/or --labels-file FILE (one label a line),
            --template TEXT (repeatable; "{}" is the label) or --templates-file FILE (one a
            line; default "a photo of a {}." and "{}"), --top-k N (default 5).
            {"image", "top": [{"label", "score"}, ...]}
  embed     (also `embed_main`, the `x2vlm embed` command) --out DIR (required): the ITC
            features, float32 [N, E], of the pictures (DIR/image_embeddings.npy, their paths in
            row order in DIR/images.json) and of the texts --text TEXT (repeatable) / --texts
            JSONL of {"text"} records (DIR/text_embeddings.npy, DIR/texts.json).
            {"images": N, "texts": M, "out": DIR}

A user's mistake (a missing picture, an empty folder, a bad checkpoint path, a head the
checkpoint lacks) ends with one `error: ...` line on stderr and exit status 1.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from x2vlm_jax import errors, inference

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
CHUNK = 64  # pictures decoded and run at a time (bounds memory for large folders)
COLOURS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60))


# ------------------------------------------------------------------------------ pictures
def list_images(folder: str) -> list[str]:
  """Image files directly in `folder` (by extension, any case), sorted by name."""
  names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS))
  return [os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))]


def read_jsonl(path: str, required: str) -> list[dict]:
  """The records of a JSONL file, each an object holding `required` (InputError naming the line
  otherwise)."""
  records = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        raise errors.InputError(f"{path}:{n}: not JSON ({e})") from e
      if not isinstance(rec, dict) or required not in rec:
        raise errors.InputError(f"{path}:{n}: expected a JSON object with {required!r}")
      records.append(rec)
  if not records:
    raise errors.InputError(f"{path}: no records")
  return records


def image_entries(args) -> list[dict]:
  """The pictures of `--image` and `--images` as records {"image": path, ...; "strict": bool}
  (strict: an unreadable picture is an error rather than skipped)."""
  entries = []
  for path in args.image or ():
    if not os.path.isfile(path):
      raise errors.InputError(f"--image {path}: no such file")
    entries.append({"image": path, "strict": True})
  source = args.images
  if source:
    if os.path.isdir(source):
      paths = list_images(source)
      if not paths:
        raise errors.InputError(f"--images {source}: no picture in the folder (extensions "
                                f"{', '.join(IMAGE_EXTENSIONS)})")
      entries += [{"image": p, "strict": False} for p in paths]
    elif os.path.isfile(source):
      for rec in read_jsonl(source, "image"):
        entries.append(dict(rec, image=os.path.join(args.image_root, str(rec["image"])),
                            strict=False))
    else:
      raise errors.InputError(f"--images {source}: no such folder or JSONL file")
  if not entries:
    raise errors.InputError("no pictures: give --image PATH or --images FOLDER_OR_JSONL")
  return entries


def decoded_chunks(entries: Sequence[dict], chunk: int = CHUNK
                   ) -> Iterator[list[tuple[dict, Image.Image]]]:
  """(entry, decoded picture) pairs, `chunk` entries at a time; an unreadable non-strict picture
  is reported on stderr by name and skipped."""
  for start in range(0, len(entries), chunk):
    pairs = []
    for entry in entries[start:start + chunk]:
      try:
        pairs.append((entry, inference.load_image(entry["image"])))
      except ValueError as e:
        if entry["strict"]:
          raise
        print(f"skipping: {e}", file=sys.stderr)  # e names the file
    if pairs:
      yield pairs


def _no_readable(args) -> errors.InputError:
  return errors.InputError(f"no readable picture in {args.images or args.image}")


# ------------------------------------------------------------------------------ drawing
def label_font(image_size: tuple[int, int]) -> ImageFont.ImageFont:
  """The label font for a picture of `image_size` (W, H): 1/32 of its shorter side, >= 8 px."""
  return ImageFont.load_default(size=max(8, round(min(image_size) / 32)))


def _fit_label(draw: ImageDraw.ImageDraw, text: str, font, max_width: int):
  """(text, font) whose label fits `max_width` pixels: a smaller font (down to 6 px), then the
  text cut with an ellipsis."""
  def width(t, f):
    left, _, right, _ = draw.textbbox((0, 0), t, font=f)
    return right - left + 2

  size = getattr(font, "size", None)
  while size and size > 6 and width(text, font) > max_width:
    size -= 1
    font = ImageFont.load_default(size=size)
  while len(text) > 1 and width(text, font) > max_width:
    text = text[:-2] + "…"
  return text, font


def _overlaps(a, b) -> bool:
  return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def place_labels(image: Image.Image, texts: Sequence[str], boxes, line_width: int
                 ) -> list[tuple[str, Any, tuple[int, int, int, int]]]:
  """Where each box's label goes: [(text as drawn, font, (x0, y0, x1, y1))]. A label sits above
  its box (inside its top edge when there is no room above), is shifted left / up to stay inside
  the picture and moved down (then up) past labels already placed."""
  draw = ImageDraw.Draw(image)
  width, height = image.size
  base_font = label_font(image.size)
  placed, out = [], []
  for text, (x, y, _, _) in zip(texts, boxes):
    text, font = _fit_label(draw, text, base_font, width)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    tw, th = min(width, right - left + 2), min(height, bottom - top + 2)
    tx = int(min(max(0.0, x), width - tw))
    ty = int(y - th - line_width if y - th - line_width >= 0 else max(0.0, y) + line_width)
    ty = min(ty, height - th)
    candidates = list(range(ty, height - th + 1, th)) + list(range(ty - th, -1, -th))
    free = [c for c in candidates
            if not any(_overlaps((tx, c, tx + tw, c + th), p) for p in placed)]
    ty = free[0] if free else ty  # a picture too small for every label: the first place
    placed.append((tx, ty, tx + tw, ty + th))
    out.append((text, font, placed[-1]))
  return out


def draw_boxes(image: Image.Image, texts: list[str], boxes) -> Image.Image:
  """A copy of `image` with boxes [T, 4] (x, y, w, h pixels) outlined, each labelled by its text
  in its colour (`place_labels`; the font scales with the picture)."""
  out = image.convert("RGB")
  draw = ImageDraw.Draw(out)
  line_width = max(2, round(min(out.size) / 150))
  for k, (x, y, w, h) in enumerate(boxes):
    draw.rectangle([x, y, x + w, y + h], outline=COLOURS[k % len(COLOURS)], width=line_width)
  for k, (text, font, (x0, y0, x1, y1)) in enumerate(place_labels(out, texts, boxes,
                                                                  line_width)):
    draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=COLOURS[k % len(COLOURS)])
    left, top, _, _ = draw.textbbox((0, 0), text, font=font)
    draw.text((x0 + 1 - left, y0 + 1 - top), text, fill=(255, 255, 255), font=font)
  return out


# ------------------------------------------------------------------------------ commands
def _predictor(args) -> inference.Predictor:
  return inference.Predictor.load(args.checkpoint, args.config, vocab_path=args.vocab,
                                  batch_size=args.batch_size)


def _round(x: float, digits: int = 6) -> float:
  return round(float(x), digits)


def rerank(order: np.ndarray, itm_of_top: np.ndarray) -> np.ndarray:
  """order [N] best first by ITC; itm_of_top [K] the ITM scores of order[:K] -> the order with
  those K re-ordered by ITM (ties keep the ITC order)."""
  k = len(itm_of_top)
  return np.concatenate([order[:k][np.argsort(-itm_of_top, kind="stable")], order[k:]])


def embed_pictures(predictor: inference.Predictor, entries: Sequence[dict]
                   ) -> tuple[list[str], np.ndarray]:
  """(readable paths, their ITC features [N, E] float32), embedded a chunk at a time."""
  paths, feats = [], []
  for pairs in decoded_chunks(entries):
    paths += [entry["image"] for entry, _ in pairs]
    feats.append(predictor.embed_images([image for _, image in pairs]))
  return paths, (np.concatenate(feats) if feats else np.zeros((0, 0), np.float32))


def load_embeddings(folder: str, kind: str) -> tuple[list[str], np.ndarray]:
  """`embed`'s DIR/<kind>_embeddings.npy [N, E] and its index DIR/<kind>s.json (N entries)."""
  array_path = os.path.join(folder, f"{kind}_embeddings.npy")
  index_path = os.path.join(folder, f"{kind}s.json")
  for path in (array_path, index_path):
    if not os.path.isfile(path):
      raise errors.InputError(f"--embeddings {folder}: no {os.path.basename(path)} (write it "
                              "with the embed command)")
  feats = np.load(array_path)
  with open(index_path, encoding="utf-8") as f:
    names = json.load(f)
  if feats.ndim != 2 or len(names) != len(feats):
    raise errors.InputError(f"{array_path} {list(feats.shape)} does not match the "
                            f"{len(names)} entries of {index_path}")
  return names, feats.astype(np.float32)


def run_retrieve(args, emit: Callable[[dict], None]) -> None:
  if args.embeddings and (args.image or args.images):
    raise errors.InputError("give pictures (--image / --images) or --embeddings, not both")
  entries = None if args.embeddings else image_entries(args)
  predictor = _predictor(args)
  if args.embeddings:
    paths, feats = load_embeddings(args.embeddings, "image")
  else:
    paths, feats = embed_pictures(predictor, entries)
  if not paths:
    raise _no_readable(args)
  queries = predictor.embed_texts(args.query)
  if feats.shape[1] != queries.shape[1]:
    raise errors.InputError(f"--embeddings {args.embeddings} holds {feats.shape[1]}-d features; "
                            f"this checkpoint's are {queries.shape[1]}-d")
  itc = feats @ queries.T  # [N, Q]
  for q, query in enumerate(args.query):
    order = np.argsort(-itc[:, q], kind="stable")
    itm = {}
    if args.rerank > 0:
      top = order[:args.rerank]
      probs = predictor.score([paths[i] for i in top], [query])["itm"][:, 0]
      itm = dict(zip(top.tolist(), probs.tolist()))
      order = rerank(order, probs)
    for r, i in enumerate(order[:args.top].tolist(), start=1):
      emit({"query": query, "rank": r, "path": paths[i], "itc": _round(itc[i, q], 5),
            "itm": _round(itm[i], 5) if i in itm else None})


def run_ground(args, emit: Callable[[dict], None]) -> None:
  entries = image_entries(args)
  if args.draw and len(entries) != 1:
    raise errors.InputError(f"--draw writes one picture: give one --image, not {len(entries)}")
  predictor = _predictor(args)
  for pairs in decoded_chunks(entries):
    images = [image for _, image in pairs for _ in args.text]
    boxes = predictor.ground_batch(images, list(args.text) * len(pairs))
    for n, (entry, image) in enumerate(pairs):
      picture_boxes = boxes[n * len(args.text):(n + 1) * len(args.text)]
      for text, box in zip(args.text, picture_boxes):
        emit({"image": entry["image"], "text": text,
              "box_xywh": [_round(v, 2) for v in box]})
      if args.draw:
        draw_boxes(image, args.text, picture_boxes).save(args.draw)


def run_answer(args, emit: Callable[[dict], None]) -> None:
  entries = image_entries(args)
  if not args.question and not all("question" in e for e in entries):
    raise errors.InputError("no questions: give --question TEXT (or JSONL records with "
                            "a 'question')")
  answers = None
  if args.answers:
    from x2vlm_jax.data import examples  # pylint: disable=import-outside-toplevel
    try:
      answers = examples.load_answer_list(args.answers, "--answers")
    except ValueError as e:
      raise errors.InputError(str(e)) from e
  predictor = _predictor(args)
  for pairs in decoded_chunks(entries):
    asked = [(entry, image, q) for entry, image in pairs
             for q in ([entry["question"]] if "question" in entry else args.question)]
    results = predictor.answer([image for _, image, _ in asked], [q for _, _, q in asked],
                               answers=answers, mode=args.mode, beam_size=args.beam,
                               max_len=args.max_len, k=args.k)
    for (entry, _, question), result in zip(asked, results):
      emit({"image": entry["image"], "question": question, "answer": result["answer"],
            "score": _round(result["score"])})


def run_caption(args, emit: Callable[[dict], None]) -> None:
  entries = image_entries(args)
  predictor = _predictor(args)
  for pairs in decoded_chunks(entries):
    captions = predictor.caption([image for _, image in pairs], beam_size=args.beam,
                                 max_len=args.max_len, min_len=args.min_len)
    for (entry, _), caption in zip(pairs, captions):
      emit({"image": entry["image"], "caption": caption})


def nlvr_examples(args) -> list[tuple[list[str], str]]:
  """([left, right] paths, sentence) of --pair x --sentence and of --examples records."""
  if not (args.pair and args.sentence) and not args.examples:
    raise errors.InputError("give --pair LEFT RIGHT with --sentence TEXT, or --examples JSONL")
  if bool(args.pair) != bool(args.sentence):
    raise errors.InputError("--pair and --sentence go together")
  out = [(list(pair), s) for pair in args.pair or () for s in args.sentence]
  if args.examples:
    for rec in read_jsonl(args.examples, "images"):
      images = rec["images"]
      if not isinstance(images, list) or len(images) != 2 or "sentence" not in rec:
        raise errors.InputError(f"{args.examples}: each record needs 'images': [left, right] "
                                "and 'sentence'")
      out.append(([os.path.join(args.image_root, str(p)) for p in images], rec["sentence"]))
  for paths, _ in out:
    for path in paths:
      if not os.path.isfile(path):
        raise errors.InputError(f"picture {path}: no such file")
  return out


def run_nlvr(args, emit: Callable[[dict], None]) -> None:
  cases = nlvr_examples(args)
  predictor = _predictor(args)
  for start in range(0, len(cases), CHUNK):
    chunk = cases[start:start + CHUNK]
    decoded = {p: inference.load_image(p) for paths, _ in chunk for p in paths}
    results = predictor.nlvr([tuple(decoded[p] for p in paths) for paths, _ in chunk],
                             [s for _, s in chunk])
    for (paths, sentence), result in zip(chunk, results):
      emit({"images": paths, "sentence": sentence, "label": result["label"],
            "prob_true": _round(result["prob_true"])})


def read_lines(path: str, what: str) -> list[str]:
  """The non-empty lines of a text file, stripped."""
  if not os.path.isfile(path):
    raise errors.InputError(f"{what} {path}: no such file")
  with open(path, encoding="utf-8") as f:
    return [line.strip() for line in f if line.strip()]


def run_classify(args, emit: Callable[[dict], None]) -> None:
  entries = image_entries(args)
  labels = list(args.label or ()) + (read_lines(args.labels_file, "--labels-file")
                                     if args.labels_file else [])
  if not labels:
    raise errors.InputError("no labels: give --label TEXT or --labels-file FILE")
  templates = list(args.template or ()) + (read_lines(args.templates_file, "--templates-file")
                                           if args.templates_file else [])
  predictor = _predictor(args)
  classifier = predictor.label_features(labels, templates or None)  # [C, E], once
  for pairs in decoded_chunks(entries):
    scores = predictor.embed_images([image for _, image in pairs]) @ classifier.T
    for (entry, _), top in zip(pairs, inference.top_labels(scores, labels, args.top_k)):
      emit({"image": entry["image"],
            "top": [{"label": t["label"], "score": _round(t["score"])} for t in top]})


def run_embed(args, emit: Callable[[dict], None]) -> None:
  texts = list(args.text or ())
  if args.texts:
    texts += [str(rec["text"]) for rec in read_jsonl(args.texts, "text")]
  entries = image_entries(args) if (args.image or args.images) else []
  if not entries and not texts:
    raise errors.InputError("nothing to embed: give pictures (--image / --images) and/or texts "
                            "(--text / --texts)")
  predictor = _predictor(args)
  os.makedirs(args.out, exist_ok=True)
  paths: list[str] = []
  if entries:
    paths, feats = embed_pictures(predictor, entries)
    if not paths:
      raise _no_readable(args)
    _save_embeddings(args.out, "image", paths, feats)
  if texts:
    _save_embeddings(args.out, "text", texts, predictor.embed_texts(texts))
  emit({"images": len(paths), "texts": len(texts), "out": args.out})


def _save_embeddings(folder: str, kind: str, names: list[str], feats: np.ndarray) -> None:
  """DIR/<kind>_embeddings.npy [N, E] float32 and its index DIR/<kind>s.json."""
  np.save(os.path.join(folder, f"{kind}_embeddings.npy"), np.asarray(feats, np.float32))
  with open(os.path.join(folder, f"{kind}s.json"), "w", encoding="utf-8") as f:
    json.dump(names, f, indent=1)
    f.write("\n")


# ------------------------------------------------------------------------------ parsers
def _add_common(p: argparse.ArgumentParser, *, out_help: str, out_required: bool = False
                ) -> None:
  p.add_argument("--checkpoint", required=True,
                 help="training workdir, its checkpoints/<step>, or a params dir")
  p.add_argument("--config", help="configs/NAME.py[:arg], config.json or a directory (default: "
                                  "the checkpoint's saved config)")
  p.add_argument("--vocab", help="tokenizer file (default: the checkpoint's saved tokenizer)")
  p.add_argument("--batch-size", type=int, default=8, help="rows per jitted call")
  p.add_argument("--out", required=out_required, help=out_help)


def _add_images(p: argparse.ArgumentParser) -> None:
  p.add_argument("--image", action="append", help="a picture (repeatable)")
  p.add_argument("--images", help="a folder of pictures or a JSONL of {\"image\": path} records")
  p.add_argument("--image-root", default="", help="prefix of relative paths in JSONL files")


def _add_embed(p: argparse.ArgumentParser) -> None:
  _add_common(p, out_help="DIR for the .npy embeddings and their .json indexes",
              out_required=True)
  _add_images(p)
  p.add_argument("--text", action="append", help="a text to embed (repeatable)")
  p.add_argument("--texts", help="JSONL of {\"text\": ...} records")
  p.set_defaults(run=run_embed)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="x2vlm predict", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  json_out = "FILE.json: every result as one JSON list"

  p = sub.add_parser("retrieve", help="rank pictures for text queries")
  _add_common(p, out_help=json_out)
  _add_images(p)
  p.add_argument("--embeddings", help="DIR written by the embed command, instead of pictures")
  p.add_argument("--query", action="append", required=True,
                 help="text to search for (repeatable)")
  p.add_argument("--top", type=int, default=5, help="results per query")
  p.add_argument("--rerank", type=int, default=0, metavar="K",
                 help="re-rank each query's best K by ITM (0: ITC only)")
  p.set_defaults(run=run_retrieve)

  p = sub.add_parser("ground", help="the box each text refers to")
  _add_common(p, out_help=json_out)
  _add_images(p)
  p.add_argument("--text", action="append", required=True,
                 help="referring expression (repeatable)")
  p.add_argument("--draw", metavar="FILE.png", help="write the picture with the boxes drawn")
  p.set_defaults(run=run_ground)

  p = sub.add_parser("answer", help="visual question answering")
  _add_common(p, out_help=json_out)
  _add_images(p)
  p.add_argument("--question", action="append",
                 help="question about every picture (repeatable)")
  p.add_argument("--mode", default="auto", choices=inference.VQA_MODES)
  p.add_argument("--answers", help="JSON answer list (default: the config's)")
  p.add_argument("--beam", type=int, default=1, help="generate: beams (1: greedy)")
  p.add_argument("--max-len", type=int, help="generate: answer tokens at most")
  p.add_argument("--k", type=int, help="rank: candidates re-scored (default: k_test)")
  p.set_defaults(run=run_answer)

  p = sub.add_parser("caption", help="describe pictures")
  _add_common(p, out_help=json_out)
  _add_images(p)
  p.add_argument("--beam", type=int, help="beams (1: greedy; default: the evaluator's)")
  p.add_argument("--max-len", type=int, help="tokens at most")
  p.add_argument("--min-len", type=int, help="tokens at least")
  p.set_defaults(run=run_caption)

  p = sub.add_parser("nlvr", help="is a sentence true of a pair of pictures")
  _add_common(p, out_help=json_out)
  p.add_argument("--pair", nargs=2, action="append", metavar=("LEFT", "RIGHT"))
  p.add_argument("--sentence", action="append", help="statement about every pair (repeatable)")
  p.add_argument("--examples", help="JSONL of {\"images\": [left, right], \"sentence\"}")
  p.add_argument("--image-root", default="", help="prefix of relative paths in --examples")
  p.set_defaults(run=run_nlvr)

  p = sub.add_parser("classify", help="zero-shot classification")
  _add_common(p, out_help=json_out)
  _add_images(p)
  p.add_argument("--label", action="append", help="class name (repeatable)")
  p.add_argument("--labels-file", help="one class name a line")
  p.add_argument("--template", action="append", help="prompt with {} for the label (repeatable)")
  p.add_argument("--templates-file", help="one template a line")
  p.add_argument("--top-k", type=int, default=5, help="labels per picture")
  p.set_defaults(run=run_classify)

  _add_embed(sub.add_parser("embed", help="write ITC embeddings of pictures and texts"))
  return parser


def _run(args) -> int:
  """Runs the parsed command: result lines on stdout, --out, errors as one line."""
  rows = []

  def emit(row: dict) -> None:
    rows.append(row)
    print(json.dumps(row), flush=True)

  try:
    args.run(args, emit)
  except errors.REPORTED as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if args.out and args.run is not run_embed:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(rows, f, indent=1)
      f.write("\n")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """`python -m x2vlm_jax.predict_cli COMMAND ...` (module docstring) -> exit status."""
  return _run(build_parser().parse_args(argv))


def embed_main(argv: Sequence[str] | None = None) -> int:
  """`x2vlm embed ...`: the embed command (module docstring) -> exit status."""
  parser = argparse.ArgumentParser(prog="x2vlm embed",
                                   description="Writes the ITC embeddings of pictures and texts.")
  _add_embed(parser)
  return _run(parser.parse_args(argv))


if __name__ == "__main__":
  sys.exit(main())
