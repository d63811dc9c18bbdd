"""VQA v2 as classification over a fixed answer list (the reference's `XVLMForVQAClassification`).

Records `{"question_id", "image", "question", "answer": [str, ...] | str}`: a list of human
answers (VQA v2: 10) or one string (VG QA); keys `config.data.vqa.caption_key` / `answer_key`.
`answer_list` is a JSON list of the candidate answers (or an {answer: label} object), and
`num_answers`, the head's size, must be its length.

Fine-tuning: the question and the augmented image (`examples.QuestionProcessor`:
RandomResizedCrop(scale=(crop_scale_min, 1)) -> flip, never when the question or an answer says
"left"/"right" -> RandAugment). Batch: image [B, R, R, 3] f32, text_ids / text_atts [B, L] i32
(the question), answer_targets [B, A] f32 (`answer_targets`: min(1, votes / 3) per listed answer,
1 for a single string answer). Objective: the question fused with the whole image, the head
`vqa_head` (A logits, new, lr x lr_mult) on the fused [CLS] -> {vqa}: soft binary cross-entropy.

Evaluator type "vqa", one split per file of `{"question_id", "image", "question", optional
"answer": [human answers]}` records: the arg-max answer of `config.data.vqa.answer_list` ->
<name>_<split>.json = [{"question_id", "answer"}] (the official result format;
tools/score_vqa.py), and eval/<name>/<split>/acc (the official VQA accuracy, percent;
`evaluate/vqa_metrics.py`) when every record has human answers. `question_states`,
`load_vqa_eval` and `VqaEvaluator` are shared with the generative task (tasks/vqa_generative.py).
"""
from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from x2vlm_jax import losses, objectives
from x2vlm_jax.data import config as data_config
from x2vlm_jax.data import eval_data, examples, pipeline
from x2vlm_jax.data import text as text_lib
from x2vlm_jax.evaluate import common, vqa_metrics
from x2vlm_jax.models import x2vlm
from x2vlm_jax.tasks import base

BadDataError = eval_data.BadDataError
HEAD = "vqa_head"


# ------------------------------------------------------------------------------ training data
def answer_targets(answers: Any, answer_index: dict[str, int]) -> np.ndarray:
  """Soft targets [A] f32: min(1, count / 3) per listed answer for a list of human answers
  (VQA's accuracy of that answer), 1.0 for a single string answer (VG QA). Answers outside the
  list get no target. `answer_index`: `examples.answer_index` of the answer list."""
  targets = np.zeros((len(answer_index),), np.float32)
  if isinstance(answers, str):
    answers = [answers]
    per_vote = 1.0
  else:
    answers = examples.text_list(answers)
    per_vote = 1.0 / 3.0
  for a in answers:
    k = answer_index.get(a.strip().lower())
    if k is not None:
      targets[k] = min(1.0, targets[k] + per_vote)
  return targets


class VqaProcessor(examples.QuestionProcessor):
  """A record -> image, question text fields, answer_targets [A] f32 (module docstring)."""

  def __init__(self, cfg, sub, image_res: int, patch_size: int, encoder: text_lib.TextEncoder,
               answers: Sequence[str]):
    super().__init__(cfg, sub, image_res, patch_size, encoder)
    self.answer_index = examples.answer_index(answers)

  def process(self, where: str, rec: dict, rng: np.random.Generator) -> dict:
    out, answers = self.question_and_image(rec, rng)
    out["answer_targets"] = answer_targets(answers, self.answer_index)
    return {k: out[k] for k in BATCH_FIELDS}


BATCH_FIELDS = dict(image=np.float32, text_ids=np.int32, text_atts=np.int32,
                    answer_targets=np.float32)


def collate(examples_, rng=None) -> dict:
  """Examples -> {image [B,R,R,3] f32, text_ids/atts [B,L] i32, answer_targets [B,A] f32}."""
  del rng
  return pipeline.stack_fields(examples_, BATCH_FIELDS)


# ------------------------------------------------------------------------------ the model
def question_states(m, batch, deterministic: bool = True) -> jax.Array:
  """The question fused with its whole image: `image [B, H, W, 3]`, `text_ids/atts [B, L]` ->
  [B, L, H] (what the classification head and the answer decoder read)."""
  image_embeds = m.encode_image(batch["image"], deterministic)
  return objectives.fuse_text_with(m, image_embeds, batch["text_ids"], batch["text_atts"],
                                   deterministic)


def vqa_logits(m, batch, deterministic: bool = True) -> jax.Array:
  """Batch as `question_states` -> answer logits [B, A] f32 of the head on the fused [CLS]."""
  return m.head_logits(HEAD, question_states(m, batch, deterministic))


# ------------------------------------------------------------------------------ evaluation
def load_vqa_eval(path: str, image_root: str, image_res: int, tokenizer, max_tokens: int, *,
                  max_words: int | None = None, exif_transpose: bool = True,
                  decode_workers: int = 0) -> dict:
  """`{"question_id", "image", "question", optional "answer": [str, ...] | str}` records ->
  dict(question_id [Q] (as written), images: `EvalImages` [Q] (uint8, decoded batch by batch, by
  `decode_workers` grain processes if > 0), where [Q], text_ids / text_atts [Q, L] i32, answers:
  Q lists of human answers, or None when any record has none (a test split)). A bad record or a
  missing image fails naming its record."""
  recs = eval_data.read_split(path, "questions")
  qids, paths, questions, answers = [], [], [], []
  for where, rec in recs:
    if "question_id" not in rec:
      raise BadDataError(f"{where}: record has no 'question_id'")
    question = rec.get("question")
    if not isinstance(question, str):
      raise BadDataError(f"{where}: 'question' must be a string")
    qids.append(rec["question_id"])
    paths.append(eval_data.image_path(rec, where, image_root))
    questions.append(question)
    ans = rec.get("answer")
    answers.append([ans] if isinstance(ans, str) else ans if isinstance(ans, list) else None)
  where = [w for w, _ in recs]
  if len(set(map(str, qids))) != len(qids):
    raise BadDataError(f"{path}: question_id values repeat")
  eval_data.check_files_exist(paths, where)
  text_ids, text_atts = eval_data.encode_texts(
      questions, where, eval_data.as_tokenizer(tokenizer), max_tokens,
      max_tokens if max_words is None else max_words)
  images = eval_data.EvalImages(paths, where, image_res, exif_transpose=exif_transpose,
                                decode_workers=decode_workers)
  return dict(question_id=qids, images=images, where=where, text_ids=text_ids, text_atts=text_atts,
              answers=None if any(a is None for a in answers) else answers)


def score_answers(data: dict, predicted: Sequence[str]) -> tuple[list[dict], float | None]:
  """The answer given to each question ([Q] strings, record order) -> (predictions
  [{"question_id", "answer"}] in record order, the official VQA accuracy in percent as the
  official code prints it (2 decimals), or None without human answers). A question whose image
  could not be decoded (`EvalImages.bad`) scores 0."""
  predictions = [{"question_id": qid, "answer": answer}
                 for qid, answer in zip(data["question_id"], predicted)]
  if data["answers"] is None:
    return predictions, None
  bad = data["images"].bad_mask() if hasattr(data["images"], "bad_mask") else None
  accs = [0.0 if bad is not None and bad[n] else vqa_metrics.question_accuracy(p["answer"], humans)
          for n, (p, humans) in enumerate(zip(predictions, data["answers"]))]
  return predictions, vqa_metrics.printed_accuracy(accs)


def make_vqa_fn(model, mesh: jax.sharding.Mesh | None = None) -> Callable[..., jax.Array]:
  """Jitted `(params, images [B, R, R, 3], ids [B, L], atts [B, L]) -> answer indices [B] i32`,
  the arg-max of the head's logits."""
  from x2vlm_jax import sharding as sharding_lib

  out = {} if mesh is None else dict(out_shardings=sharding_lib.replicated(mesh))

  def predict(params, images, ids, atts):
    common.TRACE_COUNTS["vqa_logits"] += 1
    batch = dict(image=images, text_ids=ids, text_atts=atts)
    logits = model.apply({"params": params}, batch, method=vqa_logits)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)

  return jax.jit(predict, **out)


class VqaEvaluator(common.Evaluator):
  """One answer per question of each split, the official accuracy (module docstring).
  Subclasses choose the answer differently (`make_fn`) from their own section's answer list."""

  TYPE = "vqa"
  SECTION = "vqa"  # config.data.<SECTION>.answer_list holds the candidate answers

  @classmethod
  def default_config(cls):
    cfg = super().default_config()
    cfg.update(dict(
        files=(),  # {"question_id", "image", "question", ["answer"]} records, one file per split
        image_root="",
    ))
    return cfg

  def __init__(self, name, cfg, *, config, model, mesh=None):
    super().__init__(name, cfg, config=config, model=model, mesh=mesh)
    d = config.data
    self.answers = self.candidate_answers()
    tokenizer = text_lib.load_tokenizer(d.vocab_path)
    self.fn = self.make_fn(tokenizer)
    self.splits = [(split, load_vqa_eval(
        path, cfg.image_root, config.model.image_res, tokenizer, d.max_tokens,
        max_words=d.max_words, exif_transpose=d.exif_transpose,
        decode_workers=cfg.decode_workers))
                   for path, split in common.named_splits(cfg.files, self.field("files"))]

  def candidate_answers(self) -> list[str]:
    """The answers the evaluator chooses from: `config.data.<SECTION>.answer_list`."""
    return examples.load_answer_list(self.config.data[self.SECTION].answer_list,
                                     f"config.data.{self.SECTION}.answer_list")

  def make_fn(self, tokenizer) -> Callable[..., jax.Array]:
    """Jitted `(params, images, ids, atts) -> answer indices [B]` (the head's arg-max; its size
    must be the answer list's)."""
    del tokenizer
    outputs = self.model.head(HEAD).outputs
    if outputs != len(self.answers):
      raise ValueError(f"the model's {HEAD} has {outputs} answer logits but "
                       f"config.data.vqa.answer_list ({self.config.data.vqa.answer_list}) lists "
                       f"{len(self.answers)} answers (config.data.vqa.num_answers)")
    return make_vqa_fn(self.model, self.mesh)

  def run(self, params, step=0, *, predictions_dir=None):
    params = common.place_params(params, self.mesh)
    results = {}
    for split, data in self.splits:
      t0 = time.monotonic()
      predictions, accuracy = score_answers(data, self.predict(params, split, data))
      common.write_json(predictions_dir, f"{self.name}_{split}.json", predictions)
      line = f"{split}: {len(predictions)} questions in {time.monotonic() - t0:.1f}s"
      if accuracy is not None:
        results[self.metric_name(split, "acc")] = accuracy
        line += f", accuracy {accuracy:.2f}"
      self.log(line)
    return results

  def predict(self, params, split: str, data: dict) -> list[str]:
    """The answer to every question of a split ([Q] strings): `self.fn`'s indices into the
    candidate answers."""
    best = common.run_batched(lambda x, i, a: self.fn(params, x, i, a),
                              (data["images"], data["text_ids"], data["text_atts"]),
                              self.batch_size, self.mesh, name=f"eval/{self.name}/{split}",
                              log_every=50)
    return [self.answers[int(k)] for k in np.asarray(jax.device_get(best))]


# ------------------------------------------------------------------------------ the task
class VqaTask(base.Task):
  """See the module docstring."""

  name = "vqa"
  loss_terms = ("vqa",)
  new_params = (r"^vqa_head/",)
  allow_missing = ("vqa_head/*",)
  evaluators = {VqaEvaluator.TYPE: VqaEvaluator}
  model_files = ("answer_list",)

  def config(self):
    return data_config.image_section(
        caption_key="question",
        answer_key="answer",  # [human answers] (soft targets) or one string (VG QA)
        answer_list="",  # JSON list of the candidate answers (or an {answer: label} object)
        num_answers=0,  # the head's logits: the answer list's length (3,129 for VQA v2)
    )  # flips never when the question or an answer says "left" / "right"

  def answers(self, config) -> list[str]:
    return examples.load_answer_list(self.section(config).answer_list, self.field("answer_list"))

  def validate(self, config):
    super().validate(config)
    num_answers = self.section(config).num_answers
    if num_answers <= 0:
      raise ValueError(f"{self.field('num_answers')} is {num_answers}: set it to the length of "
                       f"{self.field('answer_list')}")
    answers = self.answers(config)
    if len(answers) != num_answers:
      raise ValueError(f"{self.field('answer_list')} ({self.section(config).answer_list}) lists "
                       f"{len(answers)} answers but {self.field('num_answers')} is {num_answers}")

  def model_changes(self, config):
    num_answers = self.section(config).num_answers
    if num_answers <= 0:
      raise ValueError(f"{self.field('num_answers')} is {num_answers}: the VQA head needs one "
                       f"logit per answer of {self.field('answer_list')}")
    return {"heads": (x2vlm.TaskHead(HEAD, int(num_answers), 1),)}

  def processor(self, config, tokenizer):
    encoder = text_lib.TextEncoder.from_config(config.data, tokenizer)
    return VqaProcessor(config.data, self.section(config), config.model.image_res,
                        config.model.patch_size, encoder, self.answers(config))

  def collate(self, config):
    return collate

  def loss(self, m, batch, rng, *, deterministic, config):
    del rng  # no sampling
    return {"vqa": losses.soft_bce_loss(vqa_logits(m, batch, deterministic),
                                        batch["answer_targets"])}


TASK = VqaTask()
