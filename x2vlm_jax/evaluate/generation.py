"""Task-free text generation with a masked-token step: beam search, greedy search and decoding.

A model generates left to right by filling a [MASK]: step s writes [MASK] at the next slot of a
fixed buffer (the prompt, then the tokens generated so far), and `log_prob_fn(ids, slot)` returns
the next token's log-probabilities read at that slot. The same machinery serves every task that
generates text (descriptions of an image, free-form answers, ...): the task supplies the prompt
and `log_prob_fn` (its model call), this module the search and the host-side decoding.

Shapes are fixed: one buffer `ids [N, P + max_length]` (P = prompt tokens, [CLS] included); what
lies after the current slot is padding the causal mask hides, so one jitted function runs the
whole search in a `lax.while_loop` and compiles once per batch size.

Rules, as the reference's `beam_search` (models/model_generation.py):
  * `min_length`: [SEP] (EOS) is forbidden for the first `min_length` generated tokens;
  * no repeated trigrams: a token that would complete a trigram already in the beam gets -10000;
  * beam search keeps `num_beams` beams: a beam that emitted [SEP] stays in the history (its
    continuations get -10000 and drop out); the answer is the best-scoring [SEP] over all steps
    (the last step's beams also count if it is the last), score / ((5 + length) / 6) **
    length_penalty when length_penalty > 0, followed back through the back-pointers;
  * greedy (`num_beams=1`) is the arg-max at each step, cut after the first [SEP]: the same
    tokens as beam search with one beam.
  The search stops once every input's best finished sequence outscores its live beams (scores
  only fall, so nothing later could win; with length_penalty > 0 it runs `max_length` steps).

  out = beam_search(log_prob_fn, prompt, batch_size, num_beams=3, max_length=50, ...)  # in jit
  sequences = best_sequences(out, eos_id=...)            # host: lists of generated token ids
  tokens, steps = greedy_search(log_prob_fn, prompt, batch_size, max_length=50, ...)  # in jit
  sequences = greedy_sequences(tokens, steps, eos_id=...)
  texts = [decode_text(tokenizer, s) for s in sequences]
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

NEG = -10000.0  # the reference's penalty for forbidden tokens and finished beams
_PHANTOM = -1e9  # initial score of beams 1..K-1 (all beams start as the prompt; one is real)

LogProbFn = Callable[[jax.Array, jax.Array], jax.Array]  # (ids [N, T], slot []) -> [N, V]


# ------------------------------------------------------------------------------ device side
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
  stopped_early: jax.Array  # [] bool: every input's best sequence was final before max_length


def beam_search(log_prob_fn: LogProbFn, prompt: Sequence[int], batch_size: int, *,
                num_beams: int, max_length: int, min_length: int, eos_id: int, mask_id: int,
                pad_id: int, no_repeat_trigrams: bool = True,
                length_penalty: float = 0.0, early_stop: bool = True) -> BeamOutput:
  """Beam search over `log_prob_fn(ids [B*K, P+max_length], slot) -> [B*K, V]` (row b*K + k is
  beam k of input b); traceable (call it inside jit). See the module docstring for the rules;
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
  """The best sequence of every input from the beam history (the reference's back-tracking):
  lists of generated token ids, ending with [SEP] when one was produced."""
  n = int(out.num_steps)
  token_ids, back_ptrs, scores = (np.asarray(jax.device_get(a))[:n]
                                  for a in (out.token_ids, out.back_ptrs, out.scores))
  # Cut short: the best sequence is a finished one (the reference would also weigh the live beams
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


def decode_text(tokenizer, ids: Sequence[int]) -> str:
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
