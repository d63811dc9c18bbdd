"""Deterministic evaluation data (test transform: bicubic resize to R x R + CLIP normalisation).

Files are JSONL or JSON lists (the reference's `coco_test.json` format); records:
Retrieval: {"image": path, "caption": str | [str, ...]}
  load_retrieval_eval(...) -> dict(
      images [N, R, R, 3] f32, text_ids [T, L] i32, text_atts [T, L] i32,
      txt2img [T] i32 (image of each text), img2txt: list of N lists of text indices)
Multilingual retrieval (Multi30K / multilingual COCO): {"image": path, "caption": {lang: str | [str]}}
  load_multilingual_retrieval_eval(...) -> dict(images [N, R, R, 3] f32, languages: {lang: dict(
      text_ids, text_atts, txt2img, img2txt) as above})
Grounding: {"image": path, "text": str, "bbox": [x, y, w, h] original pixels}
  load_grounding_eval(...) -> dict(
      images [N, R, R, 3] f32, text_ids [N, L] i32, text_atts [N, L] i32,
      bbox_xywh [N, 4] f32 (original pixels), image_size [N, 2] i32 ((W, H) of the original image))

Text: pre_caption(text, max_words) -> [CLS] WordPiece [SEP] truncated to L = max_tokens, padded.
Any unusable record raises BadDataError naming file:line (evaluation data must be complete).
`iter_eval_images` streams images in batches for evaluation sets too large for memory.
"""
from __future__ import annotations

import concurrent.futures
import os
from typing import Iterator, Sequence

import numpy as np

from x2vlm_jax.data import examples as examples_lib
from x2vlm_jax.data import image_ops
from x2vlm_jax.data import records
from x2vlm_jax.data import text as text_lib

BadDataError = records.BadDataError


def _read_records(path: str) -> list[tuple[str, dict]]:
  """Every record of a JSONL or JSON-list file, in order; any bad record is an error."""
  src = records.make_source([path])
  out = []
  for i in range(len(src)):
    raw = src[i]
    try:
      out.append((raw.where, records.parse_record(raw)))
    except records.BadRecordError as e:
      raise BadDataError(f"{raw.where}: {e}") from e
  return out


def _as_tokenizer(tokenizer) -> text_lib.Tokenizer:
  if isinstance(tokenizer, (str, os.PathLike)):
    return text_lib.load_tokenizer(tokenizer)
  return tokenizer


def _image_path(rec: dict, where: str, image_root: str) -> str:
  value = rec.get("image")
  if not isinstance(value, str) or not value:
    raise BadDataError(f"{where}: record has no 'image' path")
  return value if os.path.isabs(value) or not image_root else os.path.join(image_root, value)


def _load_test_image(path: str, image_res: int, exif_transpose: bool):
  img = image_ops.decode_image(path, exif_transpose=exif_transpose)
  size = img.size
  return image_ops.normalize(image_ops.resize_square(img, image_res)), size


def load_eval_images(
    paths: Sequence[str],
    image_res: int,
    *,
    where: Sequence[str] | None = None,
    exif_transpose: bool = True,
    num_threads: int = 4,
) -> tuple[np.ndarray, np.ndarray]:
  """Test-transformed images [N, R, R, 3] f32 and their original sizes [N, 2] (W, H) i32."""
  where = list(where) if where is not None else list(paths)
  images = np.zeros((len(paths), image_res, image_res, 3), np.float32)
  sizes = np.zeros((len(paths), 2), np.int32)

  def load(k):
    try:
      images[k], sizes[k] = _load_test_image(paths[k], image_res, exif_transpose)
    except image_ops.ImageDecodeError as e:
      raise BadDataError(f"{where[k]}: {e}") from e

  with concurrent.futures.ThreadPoolExecutor(max(num_threads, 1)) as pool:
    list(pool.map(load, range(len(paths))))
  return images, sizes


def iter_eval_images(
    paths: Sequence[str], image_res: int, batch_size: int, *, exif_transpose: bool = True
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields (images [b, R, R, 3] f32, valid [b] bool), b = batch_size (last batch padded)."""
  for start in range(0, len(paths), batch_size):
    chunk = list(paths[start:start + batch_size])
    images, _ = load_eval_images(chunk, image_res, exif_transpose=exif_transpose)
    valid = np.zeros((batch_size,), bool)
    valid[: len(chunk)] = True
    if len(chunk) < batch_size:
      images = np.concatenate(
          [images, np.zeros((batch_size - len(chunk),) + images.shape[1:], np.float32)])
    yield images, valid


def encode_texts(texts: Sequence[str], where: Sequence[str], tokenizer: text_lib.Tokenizer,
                 max_tokens: int, max_words: int) -> tuple[np.ndarray, np.ndarray]:
  """Texts -> (ids [M, L] i32, atts [M, L] i32): pre_caption, [CLS] WordPiece [SEP], padded.

  Raises BadDataError naming `where[k]` for a text that is empty after cleaning."""
  ids = np.full((len(texts), max_tokens), tokenizer.pad_id, np.int32)
  atts = np.zeros((len(texts), max_tokens), np.int32)
  cleaned = []
  for t, w in zip(texts, where):
    try:
      cleaned.append(text_lib.pre_caption(t, max_words))
    except text_lib.EmptyCaptionError as e:
      raise BadDataError(f"{w}: {e}") from e
  for k, toks in enumerate(tokenizer.encode_batch(cleaned)):
    full = text_lib.add_specials(toks, tokenizer, max_tokens)
    ids[k, : len(full)] = full
    atts[k, : len(full)] = 1
  return ids, atts


def load_retrieval_eval(
    jsonl: str,
    image_root: str,
    image_res: int,
    tokenizer: text_lib.Tokenizer | str,
    max_tokens: int,
    *,
    max_words: int | None = None,
    exif_transpose: bool = True,
) -> dict:
  """In-memory retrieval evaluation set (see the module docstring)."""
  tokenizer = _as_tokenizer(tokenizer)
  max_words = max_tokens if max_words is None else max_words
  recs = _read_records(jsonl)
  texts, text_where, txt2img, img2txt, paths = [], [], [], [], []
  for n, (where, rec) in enumerate(recs):
    paths.append(_image_path(rec, where, image_root))
    caps = rec.get("caption")
    caps = [caps] if isinstance(caps, str) else caps
    if not isinstance(caps, list) or not caps or not all(isinstance(c, str) for c in caps):
      raise BadDataError(f"{where}: 'caption' must be a string or a non-empty list of strings")
    img2txt.append([])
    for c in caps:
      img2txt[-1].append(len(texts))
      texts.append(c)
      text_where.append(where)
      txt2img.append(n)
  text_ids, text_atts = encode_texts(texts, text_where, tokenizer, max_tokens, max_words)
  images, _ = load_eval_images(paths, image_res, where=[w for w, _ in recs],
                               exif_transpose=exif_transpose)
  return dict(images=images, text_ids=text_ids, text_atts=text_atts,
              txt2img=np.asarray(txt2img, np.int32), img2txt=img2txt)


def load_multilingual_retrieval_eval(
    jsonl: str,
    image_root: str,
    image_res: int,
    tokenizer: text_lib.Tokenizer | str,
    max_tokens: int,
    *,
    languages: Sequence[str] = (),
    max_words: int | None = None,
    exif_transpose: bool = True,
) -> dict:
  """In-memory multilingual retrieval set: one image set, captions per language (module docstring).

  `languages` selects and orders the languages (default: those of the first record, sorted); every
  record must have at least one caption in each of them, or BadDataError names the record.
  """
  tokenizer = _as_tokenizer(tokenizer)
  max_words = max_tokens if max_words is None else max_words
  recs = _read_records(jsonl)
  if not recs:
    raise BadDataError(f"{jsonl}: no records")
  for where, rec in recs:
    if not isinstance(rec.get("caption"), dict):
      raise BadDataError(f"{where}: 'caption' must map each language to its captions, "
                         f"e.g. {{\"en\": [...], \"de\": [...]}}")
  langs = list(languages) or sorted(recs[0][1]["caption"])
  texts = {lang: dict(texts=[], where=[], txt2img=[], img2txt=[]) for lang in langs}
  paths = []
  for n, (where, rec) in enumerate(recs):
    paths.append(_image_path(rec, where, image_root))
    for lang in langs:
      caps = rec["caption"].get(lang)
      caps = [caps] if isinstance(caps, str) else caps
      if not isinstance(caps, list) or not caps or not all(isinstance(c, str) for c in caps):
        raise BadDataError(f"{where}: no '{lang}' captions (a string or a non-empty list of "
                           f"strings); languages evaluated: {langs}")
      t = texts[lang]
      t["img2txt"].append(list(range(len(t["texts"]), len(t["texts"]) + len(caps))))
      t["texts"].extend(caps)
      t["where"].extend([where] * len(caps))
      t["txt2img"].extend([n] * len(caps))
  per_lang = {}
  for lang, t in texts.items():
    text_ids, text_atts = encode_texts(t["texts"], t["where"], tokenizer, max_tokens, max_words)
    per_lang[lang] = dict(text_ids=text_ids, text_atts=text_atts,
                          txt2img=np.asarray(t["txt2img"], np.int32), img2txt=t["img2txt"])
  images, _ = load_eval_images(paths, image_res, where=[w for w, _ in recs],
                               exif_transpose=exif_transpose)
  return dict(images=images, languages=per_lang)


def load_grounding_eval(
    jsonl: str,
    image_root: str,
    image_res: int,
    tokenizer: text_lib.Tokenizer | str,
    max_tokens: int,
    *,
    max_words: int | None = None,
    exif_transpose: bool = True,
) -> dict:
  """In-memory grounding (referring-expression box) evaluation set (see the module docstring)."""
  tokenizer = _as_tokenizer(tokenizer)
  max_words = max_tokens if max_words is None else max_words
  recs = _read_records(jsonl)
  paths, texts, boxes = [], [], []
  for where, rec in recs:
    paths.append(_image_path(rec, where, image_root))
    text = rec.get("text")
    if not isinstance(text, str):
      raise BadDataError(f"{where}: 'text' must be a string")
    texts.append(text)
    box = rec.get("bbox")
    if not isinstance(box, list) or len(box) != 4:
      raise BadDataError(f"{where}: 'bbox' must be [x, y, w, h], got {box!r}")
    boxes.append([float(v) for v in box])
  where = [w for w, _ in recs]
  text_ids, text_atts = encode_texts(texts, where, tokenizer, max_tokens, max_words)
  images, sizes = load_eval_images(paths, image_res, where=where, exif_transpose=exif_transpose)
  return dict(images=images, text_ids=text_ids, text_atts=text_atts,
              bbox_xywh=np.asarray(boxes, np.float32).reshape(-1, 4), image_size=sizes)


def _read_split(jsonl: str, what: str) -> list[tuple[str, dict]]:
  """Every record of an evaluation split, refusing an empty one."""
  recs = _read_records(jsonl)
  if not recs:
    raise BadDataError(f"{jsonl}: no {what}")
  return recs


def load_vqa_eval(
    jsonl: str,
    image_root: str,
    tokenizer: text_lib.Tokenizer | str,
    max_tokens: int,
    *,
    max_words: int | None = None,
) -> dict:
  """VQA questions `{"question_id", "image", "question", optional "answer": [str, ...]}`, with the
  images left on disk (read batch by batch by the evaluation): dict(question_id [list],
  image_paths [Q], where [Q], text_ids [Q, L] i32, text_atts [Q, L] i32, answers: list of lists
  of human answers, or None when any record has none (a test split))."""
  recs = _read_split(jsonl, "questions")
  qids, paths, questions, answers = [], [], [], []
  for where, rec in recs:
    if "question_id" not in rec:
      raise BadDataError(f"{where}: record has no 'question_id'")
    question = rec.get("question")
    if not isinstance(question, str):
      raise BadDataError(f"{where}: 'question' must be a string")
    qids.append(rec["question_id"])
    paths.append(_image_path(rec, where, image_root))
    questions.append(question)
    ans = rec.get("answer")
    answers.append([ans] if isinstance(ans, str) else ans if isinstance(ans, list) else None)
  where = [w for w, _ in recs]
  if len(set(map(str, qids))) != len(qids):
    raise BadDataError(f"{jsonl}: question_id values repeat")
  text_ids, text_atts = encode_texts(questions, where, _as_tokenizer(tokenizer), max_tokens,
                                     max_tokens if max_words is None else max_words)
  return dict(question_id=qids, image_paths=paths, where=where, text_ids=text_ids,
              text_atts=text_atts,
              answers=None if any(a is None for a in answers) else answers)


def load_nlvr_eval(
    jsonl: str,
    image_root: str,
    tokenizer: text_lib.Tokenizer | str,
    max_tokens: int,
    *,
    max_words: int | None = None,
) -> dict:
  """NLVR2 examples `{"images": [a, b], "sentence", "label"}`, images left on disk:
  dict(image_paths0 [N], image_paths1 [N], where [N], text_ids/atts [N, L] i32, label [N] i32)."""
  recs = _read_split(jsonl, "examples")
  paths0, paths1, sentences, labels = [], [], [], []
  for where, rec in recs:
    images, sentence = rec.get("images"), rec.get("sentence")
    if not isinstance(images, list) or len(images) != 2:
      raise BadDataError(f"{where}: 'images' must list two image paths")
    if not isinstance(sentence, str):
      raise BadDataError(f"{where}: 'sentence' must be a string")
    paths0.append(_image_path({"image": images[0]}, where, image_root))
    paths1.append(_image_path({"image": images[1]}, where, image_root))
    sentences.append(sentence)
    try:
      labels.append(examples_lib.nlvr_label(rec.get("label")))
    except records.BadRecordError as e:
      raise BadDataError(f"{where}: {e}") from e
  where = [w for w, _ in recs]
  text_ids, text_atts = encode_texts(sentences, where, _as_tokenizer(tokenizer), max_tokens,
                                     max_tokens if max_words is None else max_words)
  return dict(image_paths0=paths0, image_paths1=paths1, where=where, text_ids=text_ids,
              text_atts=text_atts, label=np.asarray(labels, np.int32))
