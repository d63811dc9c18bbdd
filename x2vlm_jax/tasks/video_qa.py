"""Video question answering as classification (MSRVTT-QA / MSVD-QA; the reference's
`XVLMForClassification`, the CLIPBERT setting of its VQA_msrvtt.py).

Records `{"video": path, "question": str, "answer": str | [str, ...]}` (a list: its most frequent
answer, ties to the first), the path relative to `video_root` (a video file, a folder of frames
or a JSON list of base64 frames: x2vlm_jax/data/video.py). The candidate answers
(`answer_list`) are a JSON list or the reference's `{answer: label}` file (`train_ans2label.json`);
`num_answers` must equal their number.

Example and batch (`VideoQaProcessor`, `collate`): frames [B, F, R, R, 3] f32; text_ids /
text_atts [B, L] i32 (the question); answer_label [B] i32, the answer's index in the list or
-100 when it is not in it (ignored by the loss, counted wrong by the evaluation, as the
reference's MSRVTT-QA). Transform: as `video_text` (one crop, flip decision and RandAugment draw
per clip), but a clip whose question or answer says "left" or "right" is never flipped.
Objective: `X2VLM.encode_video`, the question fused with the video, the head "vqa_head" (the
parameter name of the image VQA classifier, so its checkpoints load) on the fused [CLS] ->
answer logits [B, A] -> {video_qa}: softmax cross-entropy averaged over the questions whose
answer is in the list (label -100 ignored, the reference's CrossEntropyLoss(ignore_index=-100));
0 when there are none. Adds the head and the frame embedding (fresh when the init checkpoint
lacks them, lr x lr_mult).

Evaluator type "video_qa", one split per file (`files`, videos under `video_root`, frames as
`config.data.video_qa` says with deterministic sampling): the arg-max of the head ->
eval/<name>/<split>/acc (percent; an answer outside the list is always wrong); <name>_<split>.json
holds [{"where", "question", "answer", "prediction"}] per question.
"""
from __future__ import annotations

import collections
import logging
from typing import Any, Callable, Sequence

import jax
import numpy as np

from x2vlm_jax import losses, objectives
from x2vlm_jax.data import config as data_config
from x2vlm_jax.data import eval_data, examples, pipeline
from x2vlm_jax.data import text as text_lib
from x2vlm_jax.data import video as video_lib
from x2vlm_jax.data import video_examples
from x2vlm_jax.evaluate import common
from x2vlm_jax.evaluate import video as video_eval
from x2vlm_jax.models import x2vlm
from x2vlm_jax.tasks import base, video_retrieval

NAME = "video_qa"
HEAD = "vqa_head"  # the image VQA classifier's parameter name: its checkpoints load as they are
IGNORE_LABEL = -100
BadDataError = eval_data.BadDataError
BadRecordError = examples.BadRecordError
ANSWER_LIST_FIELD = f"config.data.{NAME}.answer_list"
NUM_ANSWERS_FIELD = f"config.data.{NAME}.num_answers"


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


def load_answers(config) -> list[str]:
  """The candidate answers of `config.data.video_qa.answer_list`, checked against
  `num_answers` (the head's outputs)."""
  section = config.data[NAME]
  answers = examples.load_answer_list(section.answer_list, ANSWER_LIST_FIELD)
  if len(answers) != section.num_answers:
    raise ValueError(f"{section.answer_list} lists {len(answers)} answers but "
                     f"{NUM_ANSWERS_FIELD} is {section.num_answers}")
  return answers


# ------------------------------------------------------------------------------ training data
class VideoQaProcessor(video_examples.VideoProcessor):
  """`{"video", "question", "answer"}` record -> video-QA example (module docstring)."""

  def __init__(self, cfg, sub, image_res: int, patch_size: int, encoder: text_lib.TextEncoder):
    super().__init__(cfg, sub, image_res, patch_size, encoder)
    self.answer_key = sub.answer_key
    self.answer_index = examples.answer_index(
        examples.load_answer_list(sub.answer_list, ANSWER_LIST_FIELD))

  def process(self, where: str, rec: dict, rng: np.random.Generator) -> dict:
    question = rec.get(self.caption_key)
    if not isinstance(question, str):
      raise BadRecordError(f"{self.caption_key!r} must be a string, found {question!r:.80}")
    answer = answer_text(rec.get(self.answer_key))
    out = self.encoder(question, rng)  # raises EmptyCaptionError for an empty question
    words = f"{question} {answer}".lower().split()
    may_flip = "left" not in words and "right" not in words
    flipped = bool(rng.random() < self.hflip_prob) and may_flip  # always one draw
    return dict(frames=self.clip(rec, rng, flipped), text_ids=out["text_ids"],
                text_atts=out["text_atts"],
                answer_label=np.int32(self.answer_index.get(answer.lower(), IGNORE_LABEL)))


BATCH_FIELDS = dict(frames=np.float32, text_ids=np.int32, text_atts=np.int32,
                    answer_label=np.int32)


def collate(examples_: Sequence[dict], rng: np.random.Generator | None = None) -> dict:
  """Video-QA examples -> {frames [B,F,R,R,3] f32, text_ids, text_atts [B,L] i32,
  answer_label [B] i32}. `rng` is unused."""
  del rng
  return pipeline.stack_fields(examples_, BATCH_FIELDS)


# ------------------------------------------------------------------------------ objective
def video_qa_logits(m, batch, deterministic: bool = True):
  """`frames [B, F, R, R, 3]`, question `text_ids/atts [B, L]` -> answer logits [B, A] float32
  from the fused [CLS] through the head."""
  video_embeds = m.encode_video(batch["frames"], deterministic)
  cross = objectives.fuse_text_with(m, video_embeds, batch["text_ids"], batch["text_atts"],
                                    deterministic)
  return m.head_logits(HEAD, cross)


def video_qa_loss(m, batch, deterministic: bool = True) -> dict:
  """Batch as `video_qa_logits` + `answer_label [B]` -> {'video_qa'} (module docstring)."""
  logits = video_qa_logits(m, batch, deterministic)
  return {"video_qa": losses.mlm_loss(logits[:, None], batch["answer_label"][:, None])}


# ------------------------------------------------------------------------------ evaluation
def load_video_qa_eval(path: str, video_root: str, tokenizer, max_tokens: int,
                       answers: Sequence[str], *, max_words: int | None = None,
                       video_key: str = "video", question_key: str = "question",
                       answer_key: str = "answer") -> dict:
  """`{"video", "question", "answer"}` records -> dict(video_paths [Q], where [Q], questions [Q],
  text_ids / text_atts [Q, L] i32, answers [Q] str, answer_label [Q] i32: the answer's index in
  `answers`, -100 outside the list). A bad record fails naming it."""
  recs = eval_data.read_split(path, "questions")
  index = examples.answer_index(answers)
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
  text_ids, text_atts = eval_data.encode_texts(
      questions, where, eval_data.as_tokenizer(tokenizer), max_tokens,
      max_tokens if max_words is None else max_words)
  return dict(video_paths=video_examples.video_paths(recs, video_key, video_root), where=where,
              questions=questions, text_ids=text_ids, text_atts=text_atts, answers=given,
              answer_label=np.asarray(labels, np.int32))


def make_video_qa_fn(model) -> Callable[..., jax.Array]:
  """jit(params, frames [B, F, R, R, 3], ids [B, L], atts [B, L]) -> answer logits [B, A]."""

  def video_qa_answer_logits(params, frames, ids, atts):
    common.TRACE_COUNTS["video_qa_answer_logits"] += 1
    batch = dict(frames=frames, text_ids=ids, text_atts=atts)
    return model.apply({"params": params}, batch, method=video_qa_logits)

  return jax.jit(video_qa_answer_logits)


def evaluate_video_qa(model, params, data: dict, answers: Sequence[str], *, num_frames: int,
                      image_res: int, batch_size: int, sampling: str = "uniform",
                      folder_fps: float = 1.0, mesh=None,
                      log_fn: Callable[[str], Any] = logging.info, fn: Callable | None = None
                      ) -> tuple[dict[str, float], list[dict]]:
  """Accuracy (percent) of the head's arg-max on `data` (`load_video_qa_eval`), and the
  predictions [{"where", "question", "answer", "prediction"}]. `fn`: `make_video_qa_fn(model)`
  made once by the caller (default: made here)."""
  params = common.place_params(params, mesh)
  bad: set[int] = set()  # unreadable videos: named in warnings, their questions wrong
  logits = video_eval.run_over_videos(
      fn or make_video_qa_fn(model), params, data["video_paths"], data["where"],
      (data["text_ids"], data["text_atts"]), batch_size=batch_size, num_frames=num_frames,
      image_res=image_res, sampling=sampling, folder_fps=folder_fps, mesh=mesh, name="video QA",
      log_fn=log_fn, bad=bad)
  logits = np.asarray(jax.device_get(logits))
  if logits.shape[1] != len(answers):
    raise ValueError(f"the model has {logits.shape[1]} answer logits but the answer list has "
                     f"{len(answers)} answers ({NUM_ANSWERS_FIELD} vs {ANSWER_LIST_FIELD})")
  best = np.argmax(logits, axis=1)
  correct = best == data["answer_label"]  # label -100 (not in the list) never matches
  correct[sorted(bad)] = False
  predictions = [dict(where=w, question=q, answer=a, prediction=answers[int(k)])
                 for w, q, a, k in zip(data["where"], data["questions"], data["answers"], best)]
  return {"acc": 100.0 * float(np.mean(correct))}, predictions


class VideoQaEvaluator(common.Evaluator):
  """Accuracy per split (module docstring)."""

  TYPE = "video_qa"

  @classmethod
  def default_config(cls):
    cfg = super().default_config()
    cfg.update(dict(
        files=(),  # {"video", "question", "answer"} records, one file per split
        video_root="",  # relative video paths are joined to this
    ))
    return cfg

  def __init__(self, name, cfg, *, config, model, mesh=None):
    super().__init__(name, cfg, config=config, model=model, mesh=mesh)
    d, section = config.data, config.data[NAME]
    video_examples.check_num_frames(section.num_frames, config.model, TASK.field("num_frames"))
    self.section = section
    self.answers = load_answers(config)
    tokenizer = text_lib.load_tokenizer(d.vocab_path)
    self.splits = []
    for path, split in common.named_splits(cfg.files, self.field("files")):
      data = load_video_qa_eval(
          path, cfg.video_root, tokenizer, d.max_tokens, self.answers, max_words=d.max_words,
          video_key=section.video_key, question_key=section.caption_key,
          answer_key=section.answer_key)
      eval_data.check_files_exist(data["video_paths"], data["where"])
      self.splits.append((split, data))
    self.fn = make_video_qa_fn(model)

  def run(self, params, step=0, *, predictions_dir=None):
    s, results = self.section, {}
    for split, data in self.splits:
      metrics, predictions = evaluate_video_qa(
          self.model, params, data, self.answers, num_frames=s.num_frames,
          image_res=self.config.model.image_res, batch_size=self.batch_size,
          sampling=video_lib.eval_sampling(s.sampling), folder_fps=s.frame_folder_fps,
          mesh=self.mesh, fn=self.fn, log_fn=lambda line, split=split: self.log(f"{split}: {line}"))
      results[self.metric_name(split, "acc")] = metrics["acc"]
      common.write_json(predictions_dir, f"{self.name}_{split}.json", predictions)
    return results


# ------------------------------------------------------------------------------ the task
class VideoQaTask(base.Task):
  """See the module docstring."""

  name = NAME
  loss_terms = ("video_qa",)
  new_params = (video_retrieval.FRAME_EMBEDDING_PATTERN, rf"^{HEAD}/")
  allow_missing = ("frame_pos_embed", f"{HEAD}/*")
  model_files = ("answer_list",)
  evaluators = {VideoQaEvaluator.TYPE: VideoQaEvaluator}

  def config(self):
    return data_config.video_section(
        caption_key="question",
        answer_key="answer",
        # JSON list of candidate answers, or the reference's {answer: label} file; other answers:
        # ignored in training, wrong at test.
        answer_list="",
        num_answers=0,  # A: the head's outputs, = the answer list's length (checked)
    )

  def validate(self, config):
    super().validate(config)
    load_answers(config)
    video_examples.check_num_frames(self.section(config).num_frames, config.model,
                                    self.field("num_frames"))

  def model_changes(self, config):
    num_answers = self.section(config).num_answers
    if num_answers <= 0:
      raise ValueError(f"{self.field('num_answers')} is {num_answers}: set it to the length of "
                       f"{self.field('answer_list')} (the head's outputs)")
    return {"heads": (x2vlm.TaskHead(HEAD, num_answers, 1),)}

  def processor(self, config, tokenizer):
    encoder = text_lib.TextEncoder.from_config(config.data, tokenizer)
    return VideoQaProcessor(config.data, self.section(config), config.model.image_res,
                            config.model.patch_size, encoder)

  def collate(self, config):
    return collate

  def loss(self, m, batch, rng, *, deterministic, config):
    del rng, config  # no sampling
    return video_qa_loss(m, batch, deterministic)


TASK = VideoQaTask()
