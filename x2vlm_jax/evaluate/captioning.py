"""Caption generation with the MLM captioner (REFERENCE_DETAILED §4.5) and COCO evaluation.

Decoding starts from `[CLS] a picture of` (the training prompt). Step s appends a [MASK] at the
next slot (position id = slot), runs every text layer over the sequence with the image, and
reads the next token's distribution from the [MASK]'s output: each real token sees the tokens
before it and itself (lower-triangular mask), exactly as in training.

Shapes are fixed: one buffer `ids [N, P + max_length]` (P = prompt tokens with [CLS]); what lies
after the current slot is padding the causal mask hides, so one jitted function runs the whole
search in a `lax.while_loop` and compiles once per batch size. Layer states are recomputed each
step, not cached (simpler, bit-for-bit the training computation; a cache only saves time).

Rules, as the reference's `beam_search` (models/model_generation.py):
  * `min_length`: [SEP] (EOS) is forbidden for the first `min_length` generated tokens;
  * no repeated trigrams: a token that would complete a trigram already in the beam gets -10000;
  * beam search keeps `num_beams` beams: a beam that emitted [SEP] stays in the history (its
    continuations get -10000 and drop out); the answer is the best-scoring [SEP] over all steps
    (the last step's beams also count if it is the last), score / ((5 + length) / 6) **
    length_penalty when length_penalty > 0, followed back through the back-pointers;
  * greedy (`num_beams=1`) is the arg-max at each step, cut after the first [SEP]: the same
    tokens as beam search with one beam.
  The search stops once every image's best finished caption outscores its live beams (scores
  only fall, so nothing later could win; with length_penalty > 0 it runs `max_length` steps).

  log_probs = caption_log_probs(m, image_embeds, ids, slot)         # via model.apply
  out = beam_search(log_prob_fn, prompt, batch_size, num_beams=3, max_length=50, ...)
  sequences = best_sequences(out, eos_id=...)                        # host: lists of token ids
  captions = [decode_caption(tokenizer, s) for s in sequences]
  metrics, predictions = evaluate_captioning(model, params, data, tokenizer, ...)
"""
from __future__ import annotations

import collections
import json
import logging
import math
import os
import time
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from x2vlm_jax.data import eval_data
from x2vlm_jax.evaluate import retrieval as retrieval_lib

NEG = -10000.0  # the reference's penalty for forbidden tokens and finished beams
_PHANTOM = -1e9  # initial score of beams 1..K-1 (all beams start as the prompt; one is real)

# Python-side trace counts of the jitted search per name (tests assert one compile per shape).
TRACE_COUNTS: collections.Counter = collections.Counter()

LogProbFn = Callable[[jax.Array, jax.Array], jax.Array]  # (ids [N, T], slot []) -> [N, V]


def caption_log_probs(m, image_embeds: jax.Array, ids: jax.Array, slot: jax.Array,
                      vocab_size: int | None = None) -> jax.Array:
  """Bound-model step: every text layer over `ids [N*G, T]` (causal, positions 0..T-1) with the
  images `image_embeds [N, 1+P, D]` (row n*G + g reads image n; G beams per image);
  log-probabilities [N*G, V] (float32) of the MLM head at `slot`
  (where the [MASK] is), over the first `vocab_size` ids (the tokenizer's; default all)."""
  n, length = ids.shape
  causal = jnp.broadcast_to(jnp.tril(jnp.ones((length, length), jnp.int32)), (n, length, length))
  positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (n, length))
  image_atts = jnp.ones(image_embeds.shape[:2], jnp.int32)
  hidden = m.text.encode_multimodal(ids, causal, image_embeds, image_atts, True, positions)
  at_slot = jax.lax.dynamic_slice_in_dim(hidden, slot, 1, axis=1)
  logits = m.text.mlm_logits(at_slot)[:, 0]
  return jax.nn.log_softmax(logits[:, :vocab_size] if vocab_size else logits, axis=-1)


def repeated_trigram_tokens(gen: jax.Array, step: jax.Array, vocab_size: int) -> jax.Array:
  """[N, V] bool: the tokens that would repeat a trigram of `gen [N, T]`, whose first `step`
  tokens are generated (the reference's `get_dup_ngram_candidates` with n = 3)."""
  n, length = gen.shape
  if length < 3:
    return jnp.zeros((n, vocab_size), bool)
  prev2 = jnp.take(gen, jnp.maximum(step - 2, 0), axis=1)
  prev1 = jnp.take(gen, jnp.maximum(step - 1, 0), axis=1)
  starts = jnp.arange(length - 2)
  match = ((gen[:, :-2] == prev2[:, None]) & (gen[:, 1:-1] == prev1[:, None])
           & (starts[None] <= step - 3))
  rows = jnp.broadcast_to(jnp.arange(n)[:, None], match.shape)
  hits = jnp.zeros((n, vocab_size), jnp.int32).at[rows, gen[:, 2:]].add(match.astype(jnp.int32))
  return hits > 0


def _step_log_probs(log_prob_fn: LogProbFn, ids, gen, step, slot, *, mask_id: int, eos_id: int,
                    min_length: int, no_repeat_trigrams: bool) -> jax.Array:
  """The next token's log-probs with the [MASK] at `slot`, trigram and min-length rules applied."""
  log_probs = log_prob_fn(ids.at[:, slot].set(mask_id), slot).astype(jnp.float32)
  if no_repeat_trigrams:
    forbidden = repeated_trigram_tokens(gen, step, log_probs.shape[-1])
    log_probs = log_probs + jnp.where(forbidden, NEG, 0.0)
  if min_length > 0:
    log_probs = log_probs.at[:, eos_id].set(
        jnp.where(step < min_length, NEG, log_probs[:, eos_id]))
  return log_probs


def _prompt_buffer(prompt: Sequence[int], rows: int, max_length: int, pad_id: int) -> jax.Array:
  prompt = jnp.asarray(prompt, jnp.int32)
  ids = jnp.full((rows, len(prompt) + max_length), pad_id, jnp.int32)
  return ids.at[:, : len(prompt)].set(prompt[None])


class BeamOutput(NamedTuple):
  """Per-step beam history, [max_length, B, K] each; only the first `num_steps` steps are real."""
  token_ids: jax.Array  # the token each beam took at that step
  back_ptrs: jax.Array  # the beam (of the previous step) it extends
  scores: jax.Array  # its cumulative log-probability (with penalties)
  num_steps: jax.Array  # [] int32
  stopped_early: jax.Array  # [] bool: every image's best caption was final before max_length


def beam_search(log_prob_fn: LogProbFn, prompt: Sequence[int], batch_size: int, *,
                num_beams: int, max_length: int, min_length: int, eos_id: int, mask_id: int,
                pad_id: int, no_repeat_trigrams: bool = True,
                length_penalty: float = 0.0, early_stop: bool = True) -> BeamOutput:
  """Beam search over `log_prob_fn(ids [B*K, P+max_length], slot) -> [B*K, V]` (row b*K + k is
  beam k of image b); traceable (call it inside jit). See the module docstring for the rules;
  `early_stop=False` always runs `max_length` steps (same result)."""
  k = int(num_beams)
  rows = batch_size * k
  ids = _prompt_buffer(prompt, rows, max_length, pad_id)
  p = len(prompt)
  history = jnp.zeros((max_length, batch_size, k), jnp.int32)
  init = dict(
      step=jnp.zeros((), jnp.int32), ids=ids, gen=jnp.full((rows, max_length), pad_id, jnp.int32),
      scores=jnp.tile(jnp.array([0.0] + [_PHANTOM] * (k - 1), jnp.float32), (batch_size, 1)),
      last_eos=jnp.zeros((batch_size, k), bool),
      best_final=jnp.full((batch_size,), -jnp.inf, jnp.float32), done=jnp.zeros((), bool),
      token_ids=history, back_ptrs=history, history_scores=history.astype(jnp.float32))
  early_stop = early_stop and length_penalty <= 0

  def body(c):
    step = c["step"]
    log_probs = _step_log_probs(log_prob_fn, c["ids"], c["gen"], step, p + step,
                                mask_id=mask_id, eos_id=eos_id, min_length=min_length,
                                no_repeat_trigrams=no_repeat_trigrams)
    cand_scores, cand_ids = jax.lax.top_k(log_probs, k)  # [B*K, K]
    prior = c["scores"] + jnp.where(c["last_eos"], NEG, 0.0)
    cand_scores = (cand_scores + prior.reshape(rows, 1)).reshape(batch_size, k * k)
    scores, flat = jax.lax.top_k(cand_scores, k)  # [B, K]
    back = flat // k
    tokens = jnp.take_along_axis(cand_ids.reshape(batch_size, k * k), flat, axis=1)
    source = (jnp.arange(batch_size)[:, None] * k + back).reshape(-1)
    is_eos = tokens == eos_id
    best_final = jnp.maximum(c["best_final"],
                             jnp.max(jnp.where(is_eos, scores, -jnp.inf), axis=1))
    done = early_stop & jnp.all(best_final >= jnp.max(scores, axis=1))
    return dict(
        step=step + 1,
        ids=c["ids"][source].at[:, p + step].set(tokens.reshape(-1)),
        gen=c["gen"][source].at[:, step].set(tokens.reshape(-1)),
        scores=scores, last_eos=is_eos, best_final=best_final, done=done,
        token_ids=c["token_ids"].at[step].set(tokens),
        back_ptrs=c["back_ptrs"].at[step].set(back.astype(jnp.int32)),
        history_scores=c["history_scores"].at[step].set(scores))

  out = jax.lax.while_loop(lambda c: (c["step"] < max_length) & ~c["done"], body, init)
  return BeamOutput(out["token_ids"], out["back_ptrs"], out["history_scores"], out["step"],
                    out["done"])


def greedy_search(log_prob_fn: LogProbFn, prompt: Sequence[int], batch_size: int, *,
                  max_length: int, min_length: int, eos_id: int, mask_id: int, pad_id: int,
                  no_repeat_trigrams: bool = True) -> tuple[jax.Array, jax.Array]:
  """Arg-max decoding with the same rules; traceable. Returns (tokens [B, max_length], number
  of steps run []); it stops when every row has produced [SEP] (`greedy_sequences` cuts there)."""
  p = len(prompt)
  init = dict(step=jnp.zeros((), jnp.int32), ids=_prompt_buffer(prompt, batch_size, max_length,
                                                                 pad_id),
              gen=jnp.full((batch_size, max_length), pad_id, jnp.int32),
              finished=jnp.zeros((batch_size,), bool))

  def body(c):
    step = c["step"]
    log_probs = _step_log_probs(log_prob_fn, c["ids"], c["gen"], step, p + step,
                                mask_id=mask_id, eos_id=eos_id, min_length=min_length,
                                no_repeat_trigrams=no_repeat_trigrams)
    tokens = jnp.argmax(log_probs, axis=-1).astype(jnp.int32)
    return dict(step=step + 1, ids=c["ids"].at[:, p + step].set(tokens),
                gen=c["gen"].at[:, step].set(tokens), finished=c["finished"] | (tokens == eos_id))

  out = jax.lax.while_loop(lambda c: (c["step"] < max_length) & ~jnp.all(c["finished"]), body,
                           init)
  return out["gen"], out["step"]


# ------------------------------------------------------------------------------ host side
def best_sequences(out: BeamOutput, *, eos_id: int, length_penalty: float = 0.0
                   ) -> list[list[int]]:
  """The best caption of every image from the beam history (the reference's back-tracking):
  lists of generated token ids, ending with [SEP] when one was produced."""
  n = int(out.num_steps)
  token_ids, back_ptrs, scores = (np.asarray(jax.device_get(a))[:n]
                                  for a in (out.token_ids, out.back_ptrs, out.scores))
  # Cut short: the best caption is a finished one (the reference would also weigh the live beams
  # of its last step, which cannot beat it).
  finished_only = bool(out.stopped_early) and n < out.token_ids.shape[0]
  sequences = []
  for b in range(token_ids.shape[1]):
    wids, ptrs, score = token_ids[:, b], back_ptrs[:, b], scores[:, b]
    all_eos = np.flatnonzero(np.all(wids == eos_id, axis=1))
    last = int(all_eos[0]) if len(all_eos) else n - 1
    best, best_frame, best_beam = -math.inf, -1, -1
    for frame in range(last + 1):
      for beam in range(wids.shape[1]):
        if wids[frame, beam] == eos_id or (frame == last and not finished_only):
          s = float(score[frame, beam])
          if length_penalty > 0:
            s /= math.pow((5 + frame + 1) / 6.0, length_penalty)
          if s > best:
            best, best_frame, best_beam = s, frame, beam
    seq = []
    if best_frame >= 0:
      beam = best_beam
      for frame in range(best_frame, -1, -1):
        seq.append(int(wids[frame, beam]))
        beam = int(ptrs[frame, beam])
      seq.reverse()
    sequences.append(seq)
  return sequences


def greedy_sequences(tokens: np.ndarray, num_steps: int, *, eos_id: int) -> list[list[int]]:
  """Greedy tokens [B, T] -> lists of token ids up to and including the first [SEP]."""
  out = []
  for row in np.asarray(tokens)[:, : int(num_steps)].tolist():
    out.append(row[: row.index(eos_id) + 1] if eos_id in row else row)
  return out


_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
            (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def decode_caption(tokenizer, ids: Sequence[int]) -> str:
  """Token ids -> text: special tokens ([CLS], [SEP], [PAD], [MASK], [UNK]) skipped, WordPiece
  "##" pieces merged and punctuation spacing cleaned as HF's `decode(skip_special_tokens=True)`
  (sentencepiece pieces are joined at their word-start marks)."""
  special = {tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id, tokenizer.mask_id,
             tokenizer.unk_id}
  tokens = tokenizer.convert_ids_to_tokens([i for i in ids if int(i) not in special])
  word_start = getattr(tokenizer, "WORD_START", None)
  if word_start:
    return "".join(tokens).replace(word_start, " ").strip()
  text = " ".join(tokens).replace(" ##", "").strip()
  for old, new in _CLEANUP:
    text = text.replace(old, new)
  return text


# ------------------------------------------------------------------------------ model driver
def make_caption_fn(model, prompt: Sequence[int], *, num_beams: int, max_length: int,
                    min_length: int, eos_id: int, mask_id: int, pad_id: int,
                    length_penalty: float = 0.0, vocab_size: int | None = None) -> Callable:
  """jit(params, images [B, R, R, 3]) -> BeamOutput (num_beams > 1) or (tokens [B, T], steps).
  Tokens are drawn from the first `vocab_size` ids (the tokenizer's, which may be fewer than
  the model's embedding rows)."""
  from x2vlm_jax.models import x2vlm

  prompt = [int(i) for i in prompt]
  rules = dict(max_length=max_length, min_length=min_length, eos_id=eos_id, mask_id=mask_id,
               pad_id=pad_id)

  def fn(params, images):
    TRACE_COUNTS[f"captions_beam{num_beams}"] += 1
    variables = {"params": params}
    # The beams' rows are b * num_beams + j: each image's beams share its cross-attention keys
    # and values (`X2VLM.fuse` with G = num_beams texts per image).
    image_embeds = model.apply(variables, images, method=x2vlm.X2VLM.encode_image)

    def log_prob_fn(ids, slot):
      return model.apply(variables, image_embeds, ids, slot, vocab_size, method=caption_log_probs)

    if num_beams == 1:
      return greedy_search(log_prob_fn, prompt, images.shape[0], **rules)
    return beam_search(log_prob_fn, prompt, images.shape[0], num_beams=num_beams,
                       length_penalty=length_penalty, **rules)

  return jax.jit(fn)


def generate_captions(model, params, image_paths: Sequence[str], tokenizer, prompt: Sequence[int],
                      *, image_res: int, batch_size: int, num_beams: int, max_length: int,
                      min_length: int, length_penalty: float = 0.0,
                      where: Sequence[str] | None = None) -> list[str]:
  """One caption per image (test transform: resize to R x R), in fixed-size batches."""
  if len(prompt) + max_length > model.max_position:
    raise ValueError(f"the prompt's {len(prompt)} tokens + max_length {max_length} exceed the "
                     f"model's max_position {model.max_position}")
  fn = make_caption_fn(model, prompt, num_beams=num_beams, max_length=max_length,
                       min_length=min_length, eos_id=tokenizer.sep_id, mask_id=tokenizer.mask_id,
                       pad_id=tokenizer.pad_id, length_penalty=length_penalty,
                       vocab_size=tokenizer.vocab_size)
  params = retrieval_lib._place_params(params, None)  # pylint: disable=protected-access
  where = list(where) if where is not None else list(image_paths)
  captions, start_time = [], time.time()
  for start in range(0, len(image_paths), batch_size):
    stop = min(len(image_paths), start + batch_size)
    images, _ = eval_data.load_eval_images(image_paths[start:stop], image_res,
                                           where=where[start:stop])
    images = retrieval_lib._pad_rows(images, batch_size)  # pylint: disable=protected-access
    out = fn(params, jax.device_put(images))
    if num_beams == 1:
      sequences = greedy_sequences(jax.device_get(out[0]), int(out[1]), eos_id=tokenizer.sep_id)
    else:
      sequences = best_sequences(out, eos_id=tokenizer.sep_id, length_penalty=length_penalty)
    captions.extend(decode_caption(tokenizer, s) for s in sequences[: stop - start])
    if (start // batch_size) % 20 == 0:
      logging.info("Captioning: %d/%d images (%.1f/s)", stop, len(image_paths),
                   stop / max(time.time() - start_time, 1e-9))
  return captions


def evaluate_captioning(model, params, data: dict, tokenizer, *, prompt: Sequence[int],
                        image_res: int, batch_size: int, num_beams: int = 3,
                        max_length: int = 50, min_length: int = 5,
                        length_penalty: float = 0.0) -> tuple[dict, list[dict]]:
  """Captions for `data` (`captioning.load_caption_eval`) -> (metrics, predictions): predictions
  in the COCO result format [{"image_id", "caption"}]; metrics {"bleu_1".."bleu_4", "cider"}
  (x100, `caption_metrics.score_captions`) when the split has references, else {}."""
  captions = generate_captions(model, params, data["image_paths"], tokenizer, prompt,
                               image_res=image_res, batch_size=batch_size, num_beams=num_beams,
                               max_length=max_length, min_length=min_length,
                               length_penalty=length_penalty, where=data["where"])
  predictions = [{"image_id": i, "caption": c} for i, c in zip(data["image_ids"], captions)]
  metrics = {}
  if data["references"] is not None:
    from x2vlm_jax.evaluate import caption_metrics

    metrics = caption_metrics.score_captions(
        data["references"], {p["image_id"]: p["caption"] for p in predictions})
  return metrics, predictions


def run_from_config(config, model, params, tokenizer, predictions_dir: str | None,
                    splits: Sequence[tuple[str, str]]) -> dict[str, float]:
  """`config.eval.caption_files` (as (path, split name) pairs): eval/caption/<split>/bleu_4 and
  .../cider, and captions_<split>.json in `predictions_dir`."""
  from x2vlm_jax.data import captioning as captioning_data

  ecfg = config.eval
  prompt = captioning_data.prompt_ids(tokenizer, config.data.captioning.prompt)
  results: dict[str, float] = {}
  for path, name in splits:
    data = captioning_data.load_caption_eval(path, ecfg.caption_image_root)
    metrics, predictions = evaluate_captioning(
        model, params, data, tokenizer, prompt=prompt, image_res=config.model.image_res,
        batch_size=ecfg.batch_size, num_beams=ecfg.caption_beams,
        max_length=ecfg.caption_max_length, min_length=ecfg.caption_min_length,
        length_penalty=ecfg.caption_length_penalty)
    for key in ("bleu_4", "cider"):
      if key in metrics:
        results[f"eval/caption/{name}/{key}"] = metrics[key]
    if predictions_dir:
      with open(os.path.join(predictions_dir, f"captions_{name}.json"), "w") as f:
        json.dump(predictions, f)
  return results
