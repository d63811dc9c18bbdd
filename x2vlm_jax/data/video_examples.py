"""Video records -> training examples and batches; video evaluation sets.

Records (JSONL / JSON list / ArrayRecord; the "video" path is relative to `video_root`, and is a
video file, a folder of frames or a JSON list of base64 frames, see `video.py`):
  video-text: {"video": path, "caption": str | [str, ...], optional "video_id"}
  video QA:   {"video": path, "question": str, "answer": str | [str, ...]}

Video-text example (F = num_frames, R = image_res, L = max_tokens, M = max_masks):
  frames [F, R, R, 3] f32; text_ids, text_atts, text_ids_masked [L] i32; masked_pos, masked_ids
  [M] i32; video_idx i32 (a stable hash of video_id, else of the path: equal for the captions of
  one video).
Video-QA example: frames [F, R, R, 3] f32; text_ids, text_atts [L] i32 (the question);
  answer_label i32: the answer's index in the answer list, or -100 when the answer is not in it
  (ignored by the loss, counted wrong by the evaluation, as the reference's MSRVTT-QA).
Transform: F frames sampled (`sampling`), then ONE RandomResizedCrop(scale=(crop_scale_min, 1)),
  ONE flip decision and ONE RandAugment draw applied to every frame of the clip, CLIP
  normalisation. A flip swaps "left"/"right" in a caption (data.swap_left_right_on_flip, as for
  images); a question or answer that says "left" or "right" is never flipped (as VQA).
Batches (B = batch_size): frames [B, F, R, R, 3] f32 and the stacked example fields.

Evaluation sets (videos left on disk, read batch by batch by x2vlm_jax/evaluate/video.py):
  load_video_retrieval_eval: {"video", "caption": [..]} (MSR-VTT 1k-A) -> dict(video_paths [N],
      where [N], text_ids/atts [T, L] i32, txt2img [T] i32, img2txt: N lists of text indices)
  load_video_qa_eval: {"video", "question", "answer"} -> dict(video_paths, where, questions,
      text_ids/atts [Q, L] i32, answers [Q] str, answer_label [Q] i32 (-100 outside the list))
  load_eval_clips(paths, ...) -> [N, F, R, R, 3] f32 (deterministic sampling, test transform)
Any unusable evaluation record or video raises BadDataError naming it.
"""
from __future__ import annotations

import collections
import concurrent.futures
import json
import types
from typing import Any, Sequence

import numpy as np
from PIL import Image

from x2vlm_jax.data import eval_data
from x2vlm_jax.data import examples as examples_lib
from x2vlm_jax.data import records
from x2vlm_jax.data import text as text_lib
from x2vlm_jax.data import video as video_lib

IGNORE_LABEL = -100
BadDataError = records.BadDataError
BadRecordError = records.BadRecordError
# Shared with the image processors and evaluation loaders.
# pylint: disable=protected-access
_as_tokenizer = eval_data._as_tokenizer
_read_split = eval_data._read_split
# pylint: enable=protected-access


def load_answer_labels(path: str) -> list[str]:
  """Candidate answers, index = label: a JSON list, or an {answer: label} object (the reference's
  MSRVTT-QA `ans2label` file; labels must be 0..A-1)."""
  if not path:
    raise ValueError("config.data.video_qa.answer_list is empty: video QA needs the answer list")
  with open(path) as f:
    answers = json.load(f)
  if isinstance(answers, dict):
    labels = sorted(answers.values()) if all(isinstance(v, int) for v in answers.values()) else []
    if labels != list(range(len(answers))):
      raise ValueError(f"{path}: an answer -> label object must map to the labels "
                       f"0..{len(answers) - 1}")
    answers = sorted(answers, key=answers.get)
  if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
    raise ValueError(f"{path}: expected a JSON list of answers or an {{answer: label}} object")
  if len({a.strip().lower() for a in answers}) != len(answers):
    raise ValueError(f"{path}: the answer list has duplicates")
  return answers


def _answer_index(answers: Sequence[str]) -> dict[str, int]:
  return {a.strip().lower(): k for k, a in enumerate(answers)}


def answer_text(value: Any) -> str:
  """A record's answer: the string, or the most frequent of a list (ties: the first)."""
  if isinstance(value, str) and value.strip():
    return value.strip()
  texts = [v.strip() for v in value if isinstance(v, str) and v.strip()] if isinstance(
      value, list) else []
  if not texts:
    raise BadRecordError(f"no answer (found {value!r:.80})")
  counts = collections.Counter(texts)
  return max(texts, key=lambda t: (counts[t], -texts.index(t)))


class _VideoProcessor(examples_lib._Processor):  # pylint: disable=protected-access
  """Shared parts of the video processors: reading and augmenting the clip."""

  def __init__(self, cfg, sub, image_res: int, patch_size: int, encoder: text_lib.TextEncoder):
    image_fields = types.SimpleNamespace(
        image_root=sub.video_root, image_key=sub.video_key, caption_key=sub.caption_key,
        hflip_prob=sub.hflip_prob, randaug=sub.randaug)
    super().__init__(cfg, image_fields, image_res, patch_size, encoder)
    if sub.sampling not in video_lib.SAMPLINGS:
      raise ValueError(f"data video sampling {sub.sampling!r}: expected one of "
                       f"{video_lib.SAMPLINGS}")
    if sub.num_frames < 1:
      raise ValueError(f"data video num_frames must be >= 1, got {sub.num_frames}")
    self.num_frames = int(sub.num_frames)
    self.sampling = sub.sampling
    self.min_frames = int(sub.min_frames)
    self.folder_fps = float(sub.frame_folder_fps)
    self.crop_scale = (float(sub.crop_scale_min), 1.0)

  def _path(self, rec: dict) -> str:
    if self.image_key not in rec:
      raise BadRecordError(f"record has no {self.image_key!r} (keys {sorted(rec)})")
    return video_lib.resolve_path(rec[self.image_key], self.image_root)

  def _clip(self, rec: dict, rng: np.random.Generator, flipped: bool) -> np.ndarray:
    """Samples and augments the clip -> [F, R, R, 3] f32: every frame goes through `_augment`
    with a generator seeded alike, so all get the same crop and RandAugment ops."""
    clip = video_lib.read_clip(self._path(rec), self.num_frames, self.sampling, rng,
                               min_frames=self.min_frames, folder_fps=self.folder_fps)
    seed = int(rng.integers(0, 2**63))
    return np.stack([self._augment(Image.fromarray(f), np.random.default_rng(seed),
                                   self.crop_scale, flipped) for f in clip.frames])


class VideoTextProcessor(_VideoProcessor):
  """`{"video", "caption"}` record -> video-text example (module docstring)."""

  def __init__(self, cfg, image_res: int, patch_size: int, encoder: text_lib.TextEncoder):
    super().__init__(cfg, cfg.video_text, image_res, patch_size, encoder)
    self.video_id_key = cfg.video_text.video_id_key

  def process(self, where: str, rec: dict, rng: np.random.Generator) -> dict:
    caption = self._choose_caption(rec, rng)
    flipped = bool(rng.random() < self.hflip_prob)
    caption = self._flip_text(caption, flipped)
    frames = self._clip(rec, rng, flipped)
    out = self.encoder(caption, rng)
    out["frames"] = frames
    video_id = rec.get(self.video_id_key)
    out["video_idx"] = np.int32(examples_lib.stable_id(
        video_id if video_id is not None else rec[self.image_key]))
    return out


class VideoQaProcessor(_VideoProcessor):
  """`{"video", "question", "answer"}` record -> video-QA example (module docstring)."""

  def __init__(self, cfg, image_res: int, patch_size: int, encoder: text_lib.TextEncoder):
    super().__init__(cfg, cfg.video_qa, image_res, patch_size, encoder)
    self.answer_key = cfg.video_qa.answer_key
    self.answer_index = _answer_index(load_answer_labels(cfg.video_qa.answer_list))

  def process(self, where: str, rec: dict, rng: np.random.Generator) -> dict:
    question = rec.get(self.caption_key)
    if not isinstance(question, str):
      raise BadRecordError(f"{self.caption_key!r} must be a string, found {question!r:.80}")
    answer = answer_text(rec.get(self.answer_key))
    out = self.encoder(question, rng)  # raises EmptyCaptionError for an empty question
    words = f"{question} {answer}".lower().split()
    may_flip = "left" not in words and "right" not in words
    flipped = bool(rng.random() < self.hflip_prob) and may_flip  # always one draw
    return dict(frames=self._clip(rec, rng, flipped), text_ids=out["text_ids"],
                text_atts=out["text_atts"],
                answer_label=np.int32(self.answer_index.get(answer.lower(), IGNORE_LABEL)))


def _stack(examples: Sequence[dict], keys: Sequence[str], dtype) -> dict[str, np.ndarray]:
  return {k: np.stack([e[k] for e in examples]).astype(dtype) for k in keys}


def collate_video_text(examples: Sequence[dict], rng: np.random.Generator | None = None) -> dict:
  """Video-text examples -> {frames [B,F,R,R,3] f32, text_ids, text_atts, text_ids_masked [B,L],
  masked_pos, masked_ids [B,M], video_idx [B] i32}. `rng` is unused."""
  del rng
  batch = _stack(examples, ("text_ids", "text_atts", "text_ids_masked", "masked_pos",
                            "masked_ids", "video_idx"), np.int32)
  batch.update(_stack(examples, ("frames",), np.float32))
  return batch


def collate_video_qa(examples: Sequence[dict], rng: np.random.Generator | None = None) -> dict:
  """Video-QA examples -> {frames [B,F,R,R,3] f32, text_ids, text_atts [B,L] i32,
  answer_label [B] i32}. `rng` is unused."""
  del rng
  batch = _stack(examples, ("text_ids", "text_atts", "answer_label"), np.int32)
  batch.update(_stack(examples, ("frames",), np.float32))
  return batch


# ------------------------------------------------------------------------------------ evaluation


def _video_paths(recs, video_key: str, video_root: str) -> list[str]:
  paths = []
  for where, rec in recs:
    try:
      paths.append(video_lib.resolve_path(rec.get(video_key), video_root))
    except BadRecordError as e:
      raise BadDataError(f"{where}: {e}") from e
  return paths


def load_video_retrieval_eval(jsonl: str, video_root: str, tokenizer, max_tokens: int, *,
                              max_words: int | None = None, video_key: str = "video") -> dict:
  """Video retrieval evaluation set (module docstring): every video's captions, in order."""
  recs = _read_split(jsonl, "videos")
  texts, text_where, txt2img, img2txt = [], [], [], []
  for n, (where, rec) in enumerate(recs):
    caps = rec.get("caption")
    caps = [caps] if isinstance(caps, str) else caps
    if not isinstance(caps, list) or not caps or not all(isinstance(c, str) for c in caps):
      raise BadDataError(f"{where}: 'caption' must be a string or a non-empty list of strings")
    img2txt.append(list(range(len(texts), len(texts) + len(caps))))
    texts.extend(caps)
    text_where.extend([where] * len(caps))
    txt2img.extend([n] * len(caps))
  text_ids, text_atts = eval_data.encode_texts(texts, text_where, _as_tokenizer(tokenizer),
                                               max_tokens,
                                               max_tokens if max_words is None else max_words)
  return dict(video_paths=_video_paths(recs, video_key, video_root), where=[w for w, _ in recs],
              text_ids=text_ids, text_atts=text_atts, txt2img=np.asarray(txt2img, np.int32),
              img2txt=img2txt)


def load_video_qa_eval(jsonl: str, video_root: str, tokenizer, max_tokens: int,
                       answers: Sequence[str], *, max_words: int | None = None,
                       video_key: str = "video", question_key: str = "question",
                       answer_key: str = "answer") -> dict:
  """Video-QA evaluation split (module docstring); answers outside `answers` get label -100."""
  recs = _read_split(jsonl, "questions")
  index = _answer_index(answers)
  questions, given, labels = [], [], []
  for where, rec in recs:
    question = rec.get(question_key)
    if not isinstance(question, str):
      raise BadDataError(f"{where}: {question_key!r} must be a string")
    try:
      answer = answer_text(rec.get(answer_key))
    except BadRecordError as e:
      raise BadDataError(f"{where}: {e}") from e
    questions.append(question)
    given.append(answer)
    labels.append(index.get(answer.lower(), IGNORE_LABEL))
  where = [w for w, _ in recs]
  text_ids, text_atts = eval_data.encode_texts(questions, where, _as_tokenizer(tokenizer),
                                               max_tokens,
                                               max_tokens if max_words is None else max_words)
  return dict(video_paths=_video_paths(recs, video_key, video_root), where=where,
              questions=questions, text_ids=text_ids, text_atts=text_atts, answers=given,
              answer_label=np.asarray(labels, np.int32))


def load_eval_clips(paths: Sequence[str], where: Sequence[str], *, num_frames: int,
                    image_res: int, sampling: str = "uniform", folder_fps: float = 1.0,
                    num_threads: int = 4) -> np.ndarray:
  """[N, F, R, R, 3] f32: each video's deterministic frames (`sampling`: uniform or fps) through
  the test transform. A video that cannot be read raises BadDataError naming its record."""
  if sampling == "random_segment":
    raise ValueError("evaluation sampling must be deterministic (uniform or fps)")
  out = np.zeros((len(paths), num_frames, image_res, image_res, 3), np.float32)

  def load(k):
    try:
      clip = video_lib.read_clip(paths[k], num_frames, sampling, folder_fps=folder_fps)
    except video_lib.VideoDecodeError as e:
      raise BadDataError(f"{where[k]}: {e}") from e
    out[k] = video_lib.eval_transform(clip, image_res)

  with concurrent.futures.ThreadPoolExecutor(max(num_threads, 1)) as pool:
    list(pool.map(load, range(len(paths))))
  return out
