"""VQA with the generative answer decoder, as the reference fine-tunes it (`XVLMForVQA`).

Records as the classification task's (tasks/vqa.py): `{"question_id", "image", "question",
"answer": [str, ...] | str}`; keys `config.data.vqa_generative.caption_key` / `answer_key`. No
answer list is needed to train (any answer trains); `answer_list` holds the candidates ranked at
evaluation.

The model gains `answer_decoder` (`answer_decoder_layers` = config.model.fusion_layers: a causal
BERT stack with cross-attention, its own embeddings and tied LM head; `models/loading.py` starts
it from the fusion layers, embeddings and MLM head when a checkpoint has none; lr x lr_mult).

Fine-tuning: the question and the augmented image as the classification task's, plus the record's
distinct answers (`answer_weights`: count / number of human answers each, a single string answer
`vg_answer_weight`; the `max_answers` heaviest) as `[CLS] answer [SEP]` (`tokenize_answers`,
`answer_max_tokens`). Batch: image [B, R, R, 3] f32, text_ids / text_atts [B, L] i32,
answer_ids / answer_atts [B, K, La] i32, answer_weights [B, K] f32 (0 for padding rows).
Objective: the question fused with its image (`vqa.question_states`), every answer decoded
against it, teacher-forced -> {vqa_answer} = sum(weight x answer NLL) / B.

Evaluator type "vqa_generative" (files, image_root, k_test): `rank_answers` ranks
`config.data.vqa_generative.answer_list` (the `k_test` answers whose first token is likeliest
after [CLS], re-scored by their full likelihood); predictions <name>_<split>.json and
eval/<name>/<split>/acc as the "vqa" evaluator's.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from x2vlm_jax import losses
from x2vlm_jax.data import config as data_config
from x2vlm_jax.data import examples, pipeline
from x2vlm_jax.data import text as text_lib
from x2vlm_jax.evaluate import common, generation
from x2vlm_jax.tasks import base, vqa


# ------------------------------------------------------------------------------ training data
def answer_weights(answers: Any, vg_weight: float = 0.5) -> list[tuple[str, float]]:
  """Distinct answers and their weights for the decoder (reference `vqa_dataset`): a list of
  human answers gives count(a) / len(answers) each (VQA); a single string answer gets `vg_weight`
  (VG QA). Sorted by weight, then text, highest first."""
  if isinstance(answers, str):
    return [(answers.strip(), float(vg_weight))]
  answers = [a.strip() for a in examples.text_list(answers)]
  counts: dict[str, int] = {}
  for a in answers:
    counts[a] = counts.get(a, 0) + 1
  weighted = [(a, c / len(answers)) for a, c in counts.items()]
  return sorted(weighted, key=lambda item: (-item[1], item[0]))


def tokenize_answers(answers: Sequence[str], tokenizer: text_lib.Tokenizer,
                     max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
  """Answers -> (ids, atts) [N, max_tokens] i32: `[CLS] answer [SEP]` padded (cut to fit, [SEP]
  kept), as the decoder reads them in training and when ranking the answer list."""
  ids = np.full((len(answers), max_tokens), tokenizer.pad_id, np.int32)
  atts = np.zeros((len(answers), max_tokens), np.int32)
  for n, answer in enumerate(answers):
    ids[n], atts[n] = text_lib.pad_ids(
        text_lib.add_specials(tokenizer.encode(answer.lower()), tokenizer, max_tokens),
        max_tokens, tokenizer.pad_id)
  return ids, atts


class AnswerProcessor(examples.QuestionProcessor):
  """A record -> image, question text fields and the record's distinct answers as decoder
  inputs: answer_ids, answer_atts [K, La] i32 (K = max_answers, La = answer_max_tokens) and
  answer_weights [K] f32 (`answer_weights`; 0 for padding rows)."""

  def __init__(self, cfg, sub, image_res: int, patch_size: int, encoder: text_lib.TextEncoder):
    super().__init__(cfg, sub, image_res, patch_size, encoder)
    self.max_answers = int(sub.max_answers)
    self.answer_max_tokens = int(sub.answer_max_tokens)
    self.vg_weight = float(sub.vg_answer_weight)

  def process(self, where: str, rec: dict, rng: np.random.Generator) -> dict:
    out, answers = self.question_and_image(rec, rng)
    weighted = answer_weights(answers, self.vg_weight)[: self.max_answers]
    texts = [a for a, _ in weighted] + [""] * (self.max_answers - len(weighted))
    ids, atts = tokenize_answers(texts, self.encoder.tokenizer, self.answer_max_tokens)
    weights = np.zeros((self.max_answers,), np.float32)
    weights[: len(weighted)] = [w for _, w in weighted]
    out.update(answer_ids=ids, answer_atts=atts, answer_weights=weights)
    return {k: out[k] for k in BATCH_FIELDS}


BATCH_FIELDS = dict(image=np.float32, text_ids=np.int32, text_atts=np.int32,
                    answer_ids=np.int32, answer_atts=np.int32, answer_weights=np.float32)


def collate(examples_, rng=None) -> dict:
  """Examples -> {image [B,R,R,3] f32, text_ids/atts [B,L] i32, answer_ids/atts [B,K,La] i32,
  answer_weights [B,K] f32}."""
  del rng
  return pipeline.stack_fields(examples_, BATCH_FIELDS)


# ------------------------------------------------------------------------------ the model
def answer_loss(m, batch, deterministic: bool = True) -> jax.Array:
  """The question as `vqa.question_states`, every answer `answer_ids/atts [B, K, La]` decoded
  against its question, weighted by `answer_weights [B, K]` -> sum(weight x answer NLL) / B."""
  states = vqa.question_states(m, batch, deterministic)
  batch_size, num_answers, answer_len = batch["answer_ids"].shape
  # Rows b*K + k: the K answers of question b share its keys/values in cross-attention.
  ids = batch["answer_ids"].reshape(batch_size * num_answers, answer_len)
  atts = batch["answer_atts"].reshape(batch_size * num_answers, answer_len)
  logits = m.answer_logits(ids, atts, states, batch["text_atts"], deterministic)
  nll = losses.sequence_nll(logits, ids, atts).reshape(batch_size, num_answers)
  return losses.weighted_answer_loss(nll, batch["answer_weights"])


def rank_answers(m, batch, answer_ids: jax.Array, answer_atts: jax.Array, k: int):
  """Inference (the reference's `rank_answer`): rank a fixed answer list.

  1. The decoder reads `[CLS]` alone: probability of each candidate's first token -> the k best.
  2. Those k answers are decoded teacher-forced: score = log p(first token) - NLL(answer).
     The NLL counts the first token again, as the reference does.
  Args:
    batch: `image [B, H, W, 3]`, question `text_ids/atts [B, L]`.
    answer_ids, answer_atts: the tokenized answer list [A, La] (`[CLS] answer [SEP]`).
    k: candidates re-scored per question (k_test; clipped to A).
  Returns:
    (candidates [B, k] answer indices best first, probs [B, k] softmax of the scores).
  """
  states = vqa.question_states(m, batch, True)
  question_atts = batch["text_atts"]
  batch_size = states.shape[0]
  num_answers, answer_len = answer_ids.shape
  k = min(k, num_answers)
  start = jnp.broadcast_to(answer_ids[:1, :1], (batch_size, 1))
  first_logits = m.answer_logits(start, jnp.ones_like(start), states, question_atts, True)[:, 0]
  first_log_probs = jax.nn.log_softmax(first_logits, axis=-1)  # [B, V]
  candidate_log_probs = jnp.take(first_log_probs, answer_ids[:, 1], axis=1)  # [B, A]
  top_log_probs, top_idx = jax.lax.top_k(candidate_log_probs, k)  # [B, k]
  ids = jnp.take(answer_ids, top_idx.reshape(-1), axis=0)  # [B * k, La], rows b*k + j
  atts = jnp.take(answer_atts, top_idx.reshape(-1), axis=0)
  logits = m.answer_logits(ids, atts, states, question_atts, True)  # k answers per question
  nll = losses.sequence_nll(logits, ids, atts).reshape(batch_size, k)
  probs = jax.nn.softmax(top_log_probs - nll, axis=-1)
  order = jnp.argsort(-probs, axis=-1, stable=True)
  return (jnp.take_along_axis(top_idx, order, axis=-1),
          jnp.take_along_axis(probs, order, axis=-1))


# ------------------------------------------------------------------------------ evaluation
def make_rank_fn(model, answer_ids: np.ndarray, answer_atts: np.ndarray, k: int,
                 mesh: jax.sharding.Mesh | None = None) -> Callable[..., jax.Array]:
  """Jitted `(params, images [B, R, R, 3], ids [B, L], atts [B, L]) -> answer indices [B] i32`:
  the best of the tokenized answer list `answer_ids/atts [A, La]` ranked by `rank_answers`."""
  from x2vlm_jax import sharding as sharding_lib

  out = {} if mesh is None else dict(out_shardings=sharding_lib.replicated(mesh))

  def predict(params, images, ids, atts):
    common.TRACE_COUNTS["vqa_rank_answers"] += 1
    batch = dict(image=images, text_ids=ids, text_atts=atts)
    ranked, _ = model.apply({"params": params}, batch, answer_ids, answer_atts, k,
                            method=rank_answers)
    return ranked[:, 0]

  return jax.jit(predict, **out)


# ------------------------------------------------------------------ free-form answers
def answer_log_probs(m, states: jax.Array, question_atts: jax.Array, ids: jax.Array,
                     slot: jax.Array, vocab_size: int) -> jax.Array:
  """Bound-model generation step of the answer decoder: answers `ids [B*G, T]` (`[CLS]` + the
  tokens so far; row b*G + g reads question b, fused states [B, Lq, H], mask [B, Lq]) -> log-
  probabilities [B*G, vocab_size] f32 of the token at `slot`, read causally at `slot - 1`."""
  logits = m.answer_logits(ids, jnp.ones_like(ids), states, question_atts, True)
  at_prev = jax.lax.dynamic_slice_in_dim(logits, slot - 1, 1, axis=1)[:, 0]
  return jax.nn.log_softmax(at_prev[:, :vocab_size], axis=-1)


def answer_nll(m, images, ids, atts, answer_ids, answer_atts):
  """Bound model: NLL [B] of each question's answer `[CLS] answer [SEP]` [B, La] under the
  decoder, teacher-forced (`losses.sequence_nll`)."""
  states = vqa.question_states(m, dict(image=images, text_ids=ids, text_atts=atts))
  return losses.sequence_nll(m.answer_logits(answer_ids, answer_atts, states, atts, True),
                             answer_ids, answer_atts)


def make_answer_generator(model, *, num_beams: int, max_length: int, cls_id: int, eos_id: int,
                          mask_id: int, pad_id: int, vocab_size: int,
                          greedy: bool | None = None) -> Callable:
  """jit(params, images [B, R, R, 3], ids [B, L], atts [B, L]) -> free-form answers from the
  answer decoder: (tokens [B, max_length], steps) from `generation.greedy_search` (default for
  num_beams = 1) or a `generation.BeamOutput` (`greedy=False`). Decoding starts from [CLS],
  [SEP] is forbidden as the first token, no repeated trigrams."""
  greedy = num_beams == 1 if greedy is None else greedy
  rules = dict(max_length=max_length, min_length=1, eos_id=eos_id, mask_id=mask_id,
               pad_id=pad_id)

  def fn(params, images, ids, atts):
    variables = {"params": params}
    states = model.apply(variables, dict(image=images, text_ids=ids, text_atts=atts),
                         method=vqa.question_states)

    def log_prob_fn(tokens, slot):
      return model.apply(variables, states, atts, tokens, slot, vocab_size,
                         method=answer_log_probs)

    if greedy:
      return generation.greedy_search(log_prob_fn, [cls_id], images.shape[0], **rules)
    return generation.beam_search(log_prob_fn, [cls_id], images.shape[0], num_beams=num_beams,
                                  **rules)

  return jax.jit(fn)


def generated_sequences(out, num_beams: int, eos_id: int) -> list[list[int]]:
  """`make_answer_generator`'s output for a batch -> each row's generated token ids, up to and
  including the first [SEP]."""
  if num_beams == 1:
    tokens, steps = out
    return generation.greedy_sequences(jax.device_get(tokens), int(steps), eos_id=eos_id)
  return generation.best_sequences(out, eos_id=eos_id)


class VqaGenerativeEvaluator(vqa.VqaEvaluator):
  """The "vqa" evaluator with the answer chosen by the decoder (module docstring): `mode`
  "rank" ranks the answer list (the reference's protocol), "generate" decodes free-form answers
  (greedy for `beam_size` 1, else beam search; at most `max_answer_tokens` tokens with [SEP]),
  scored with the same official accuracy."""

  TYPE = "vqa_generative"
  SECTION = "vqa_generative"
  MODES = ("rank", "generate")

  @classmethod
  def default_config(cls):
    cfg = super().default_config()
    cfg.k_test = 128  # "rank": candidates re-scored per question (by first-token probability)
    cfg.mode = "rank"  # or "generate": free-form answers, no answer list
    cfg.beam_size = 1  # "generate": 1 = greedy
    cfg.max_answer_tokens = 0  # "generate": 0 = config.data.vqa_generative.answer_max_tokens - 1
    return cfg

  def candidate_answers(self) -> list[str]:
    if self.cfg.mode not in self.MODES:
      raise ValueError(f"{self.field('mode')} is {self.cfg.mode!r}: one of {self.MODES}")
    return [] if self.cfg.mode == "generate" else super().candidate_answers()

  def make_fn(self, tokenizer):
    if self.model.answer_decoder_layers <= 0:
      raise ValueError(f"{self.field('type')} = {self.TYPE!r} answers with the answer decoder, "
                       "which the model lacks")
    self.tokenizer = tokenizer
    if self.cfg.mode == "generate":
      max_tokens = (int(self.cfg.max_answer_tokens)
                    or int(self.config.data.vqa_generative.answer_max_tokens) - 1)
      if int(self.cfg.beam_size) < 1 or not 1 <= max_tokens < self.model.max_position:
        raise ValueError(f"{self.field('beam_size')} must be >= 1 and the answer length "
                         f"({self.field('max_answer_tokens')}: {max_tokens}) in "
                         f"1..{self.model.max_position - 1}")
      return make_answer_generator(
          self.model, num_beams=int(self.cfg.beam_size), max_length=max_tokens,
          cls_id=tokenizer.cls_id, eos_id=tokenizer.sep_id, mask_id=tokenizer.mask_id,
          pad_id=tokenizer.pad_id, vocab_size=tokenizer.vocab_size)
    answer_ids, answer_atts = tokenize_answers(
        self.answers, tokenizer, self.config.data.vqa_generative.answer_max_tokens)
    return make_rank_fn(self.model, answer_ids, answer_atts, int(self.cfg.k_test), self.mesh)

  def predict(self, params, split, data):
    if self.cfg.mode != "generate":
      return super().predict(params, split, data)
    answers, n = [], len(data["text_ids"])
    arrays = (data["images"], data["text_ids"], data["text_atts"])
    for start in range(0, n, self.batch_size):
      stop = min(n, start + self.batch_size)
      batch = [common.put_batch(common.pad_rows(np.asarray(a[start:stop]), self.batch_size),
                                self.mesh) for a in arrays]
      sequences = generated_sequences(self.fn(params, *batch), int(self.cfg.beam_size),
                                      self.tokenizer.sep_id)
      answers += [generation.decode_text(self.tokenizer, s) for s in sequences[: stop - start]]
    return answers


# ------------------------------------------------------------------------------ the task
class VqaGenerativeTask(base.Task):
  """See the module docstring."""

  name = "vqa_generative"
  loss_terms = ("vqa_answer",)
  new_params = (r"^answer_decoder/",)
  evaluators = {VqaGenerativeEvaluator.TYPE: VqaGenerativeEvaluator}
  model_files = ("answer_list",)

  def config(self):
    return data_config.image_section(
        caption_key="question",
        answer_key="answer",  # [human answers] or one string (VG QA)
        answer_list="",  # JSON list of the candidate answers ranked at evaluation
        max_answers=10,  # K: distinct answers kept per question (the heaviest)
        answer_max_tokens=10,  # La: tokens of `[CLS] answer [SEP]`
        vg_answer_weight=0.5,  # the weight of a single string answer (VG QA)
    )  # flips never when the question or an answer says "left" / "right"

  def model_changes(self, config):
    # The reference's decoder is as deep as the fusion stack (and starts as it).
    return {"answer_decoder_layers": int(config.model.fusion_layers)}

  def processor(self, config, tokenizer):
    encoder = text_lib.TextEncoder.from_config(config.data, tokenizer)
    return AnswerProcessor(config.data, self.section(config), config.model.image_res,
                           config.model.patch_size, encoder)

  def collate(self, config):
    return collate

  def loss(self, m, batch, rng, *, deterministic, config):
    del rng  # no sampling
    return {"vqa_answer": answer_loss(m, batch, deterministic)}


TASK = VqaGenerativeTask()
