"""VQA (as classification over an answer list) and NLVR2 evaluation.

Images are read from disk one batch at a time (test transform: resize to R x R), so a split of
any size fits in memory; batches are split over the mesh's batch axes.

  evaluate_vqa(model, params, data, answers, ...)  -> (metrics, predictions)
      data from `eval_data.load_vqa_eval`; the answer is the classification head's arg-max, or,
      for a model with the answer decoder (model.vqa_decoder_layers > 0), the best of the
      answer list ranked by the decoder (`objectives.rank_answers`, k_test candidates);
      predictions in the official result format
      [{"question_id", "answer"}]; metrics {"vqa_acc"} (official VQA accuracy, percent) when the
      split has human answers, else {}.
  evaluate_nlvr(model, params, data, ...)  -> {"nlvr_acc"} (percent)
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from x2vlm_jax import objectives
from x2vlm_jax.data import eval_data
from x2vlm_jax.data import examples as examples_lib
from x2vlm_jax.evaluate import retrieval as retrieval_lib
from x2vlm_jax.evaluate import vqa_metrics


def make_vqa_fn(model) -> Callable[..., jax.Array]:
  """jit(params, images [B,R,R,3], ids [B,L], atts [B,L]) -> answer logits [B, A] float32."""

  def fn(params, images, ids, atts):
    batch = dict(image=images, text_ids=ids, text_atts=atts)
    return model.apply({"params": params}, batch, method=objectives.vqa_logits)

  return jax.jit(fn)


def make_vqa_rank_fn(model, answer_ids: np.ndarray, answer_atts: np.ndarray,
                     k: int) -> Callable[..., jax.Array]:
  """jit(params, images [B,R,R,3], ids [B,L], atts [B,L]) -> answer indices [B, k], best first,
  ranked by the answer decoder over the tokenized answer list `answer_ids/atts [A, La]`."""

  def fn(params, images, ids, atts):
    batch = dict(image=images, text_ids=ids, text_atts=atts)
    ranked, _ = model.apply({"params": params}, batch, answer_ids, answer_atts, k,
                            method=objectives.rank_answers)
    return ranked

  return jax.jit(fn)


def make_nlvr_fn(model) -> Callable[..., jax.Array]:
  """jit(params, image0, image1 [B,R,R,3], ids [B,L], atts [B,L]) -> logits [B, 2] float32."""

  def fn(params, image0, image1, ids, atts):
    batch = dict(image0=image0, image1=image1, text_ids=ids, text_atts=atts)
    return model.apply({"params": params}, batch, method=objectives.nlvr_logits)

  return jax.jit(fn)


def _batched_logits(fn: Callable, params: Any, image_lists: Sequence[Sequence[str]],
                    texts: tuple[np.ndarray, np.ndarray], where: Sequence[str], *, image_res: int,
                    batch_size: int, mesh: Mesh | None, name: str) -> np.ndarray:
  """Runs `fn(params, *image_batches, ids, atts)` over the examples; returns host logits [N, C]."""
  retrieval_lib._check_batch_size(batch_size, mesh)
  params = retrieval_lib._place_params(params, mesh)
  n = len(where)
  outs, start_time = [], time.time()
  for start in range(0, n, batch_size):
    stop = min(n, start + batch_size)
    images = [eval_data.load_eval_images(paths[start:stop], image_res,
                                         where=where[start:stop])[0] for paths in image_lists]
    arrays = images + [texts[0][start:stop], texts[1][start:stop]]
    device = [retrieval_lib._put_batch(retrieval_lib._pad_rows(a, batch_size), mesh)
              for a in arrays]
    outs.append(np.asarray(jax.device_get(fn(params, *device)))[: stop - start])
    if (start // batch_size) % 50 == 0:
      rate = stop / max(time.time() - start_time, 1e-9)
      logging.info("%s: %d/%d examples (%.1f/s)", name, stop, n, rate)
  return np.concatenate(outs, axis=0)


def evaluate_vqa(model, params, data: dict, answers: Sequence[str], *, image_res: int,
                 batch_size: int, mesh: Mesh | None = None, tokenizer=None,
                 answer_max_tokens: int = 10, k_test: int = 128) -> tuple[dict, list[dict]]:
  """One answer per question; the official accuracy when `data["answers"]` is given.

  A model with an answer decoder ranks `answers` (tokenized with `tokenizer` to
  `answer_max_tokens`, the top `k_test` by first-token probability re-scored in full); otherwise
  the classification head's arg-max is taken.
  """
  common = dict(image_res=image_res, batch_size=batch_size, mesh=mesh, name="VQA")
  texts = (data["text_ids"], data["text_atts"])
  if model.vqa_decoder_layers > 0:
    if tokenizer is None:
      raise ValueError("ranking answers with the decoder needs the tokenizer")
    answer_ids, answer_atts = examples_lib.tokenize_answers(answers, tokenizer, answer_max_tokens)
    fn = make_vqa_rank_fn(model, answer_ids, answer_atts, k_test)
    best = _batched_logits(fn, params, [data["image_paths"]], texts, data["where"], **common)[:, 0]
  else:
    logits = _batched_logits(make_vqa_fn(model), params, [data["image_paths"]], texts,
                             data["where"], **common)
    if logits.shape[1] != len(answers):
      raise ValueError(f"the model has {logits.shape[1]} answer logits but the answer list has "
                       f"{len(answers)} answers (model.vqa_num_answers vs data.vqa.answer_list)")
    best = np.argmax(logits, axis=1)
  predictions = [{"question_id": qid, "answer": answers[int(k)]}
                 for qid, k in zip(data["question_id"], best)]
  metrics = {}
  if data["answers"] is not None:
    accs = [vqa_metrics.question_accuracy(p["answer"], humans)
            for p, humans in zip(predictions, data["answers"])]
    metrics["vqa_acc"] = 100.0 * float(np.mean(accs))
  return metrics, predictions


def evaluate_nlvr(model, params, data: dict, *, image_res: int, batch_size: int,
                  mesh: Mesh | None = None) -> tuple[dict, np.ndarray]:
  """Accuracy (percent) of the 2-way head; also returns the predicted labels [N]."""
  logits = _batched_logits(make_nlvr_fn(model), params,
                           [data["image_paths0"], data["image_paths1"]],
                           (data["text_ids"], data["text_atts"]), data["where"],
                           image_res=image_res, batch_size=batch_size, mesh=mesh, name="NLVR2")
  pred = np.argmax(logits, axis=1).astype(np.int32)
  return {"nlvr_acc": 100.0 * float(np.mean(pred == data["label"]))}, pred
