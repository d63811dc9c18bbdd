"""Evaluation driven by `config.eval`: retrieval (ITC + ITM re-ranking) and grounding per split.

Used after pre-training (zero-shot), after fine-tuning, and by `main.py --mode eval`:
  retrieval_file      `{"image", "caption": [..]}` JSONL (Karpathy test format) -> TR/IR@1/5/10
  grounding_files     `{"image", "text", "bbox"}` JSONL, one per split -> Acc@0.5 and mIoU each
  vqa_files           `{"question_id", "image", "question", ["answer"]}`, one per split -> VQA
                      accuracy (official definition) when answers are given
  nlvr_files          `{"images": [a, b], "sentence", "label"}`, one per split -> accuracy
Images are resized to `config.model.image_res`. Returns flat metrics named `eval/...` (percent),
ready for `metrics.jsonl`. With `predictions_dir`, also writes
  retrieval_scores.npz            the re-ranked score matrices (tools/score_retrieval.py reads it)
  retrieval_rankings.json         top-10 texts of every image and top-10 images of every text
  grounding_<split>.jsonl         every record's predicted box [x, y, w, h] in original pixels
  vqa_<split>.json                [{"question_id", "answer"}] (tools/score_vqa.py, the VQA server)
"""
from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np

from x2vlm_jax.data import eval_data
from x2vlm_jax.data import examples as examples_lib
from x2vlm_jax.data import text as text_lib

TOP_RANKED = 10


def split_name(path: str) -> str:
  """'data/refcoco+_testA.jsonl' -> 'refcoco+_testA'."""
  return os.path.splitext(os.path.basename(path))[0]


def _named_splits(paths, field: str) -> list[tuple[str, str]]:
  """[(path, split name)], refusing two files with the same name (their metrics would collide)."""
  names = [split_name(p) for p in paths]
  if len(set(names)) != len(names):
    raise ValueError(f"config.eval.{field}: two files share a name: {names}")
  return list(zip(paths, names))


def top_rankings(scores_i2t: np.ndarray, scores_t2i: np.ndarray, k: int = TOP_RANKED) -> dict:
  """Best-first indices: {'image_to_text': [N_img][k], 'text_to_image': [N_txt][k]}.

  Ties keep the lower index first (a stable sort), as the metrics do."""
  def top(scores):
    order = np.argsort(-np.asarray(scores, np.float64), axis=1, kind="stable")
    return order[:, :k].tolist()
  return {"image_to_text": top(scores_i2t), "text_to_image": top(scores_t2i)}


def _write_grounding_predictions(path: str, jsonl: str, pred_xywh: np.ndarray) -> None:
  with open(path, "w") as out:
    for n, box in enumerate(pred_xywh):
      out.write(json.dumps({"source": f"{jsonl}:{n + 1}",
                            "pred_bbox": [round(float(v), 2) for v in box]}) + "\n")


def run(config, model, params, *, predictions_dir: str | None = None) -> dict[str, float]:
  ecfg, dcfg = config.eval, config.data
  if not (ecfg.retrieval_file or ecfg.grounding_files or ecfg.vqa_files or ecfg.nlvr_files):
    return {}
  from x2vlm_jax.evaluate import classification, grounding, retrieval, retrieval_metrics

  params = jax.device_get(params)
  tokenizer = text_lib.load_tokenizer(dcfg.vocab_path)
  common = dict(image_res=config.model.image_res, tokenizer=tokenizer,
                max_tokens=dcfg.max_tokens, max_words=dcfg.max_words)
  if predictions_dir:
    os.makedirs(predictions_dir, exist_ok=True)
  results: dict[str, float] = {}
  if ecfg.retrieval_file:
    data = eval_data.load_retrieval_eval(ecfg.retrieval_file, ecfg.retrieval_image_root, **common)
    metrics, scores_i2t, scores_t2i = retrieval.evaluate_retrieval(
        model, params, data, k_test=ecfg.k_test, batch_size=ecfg.batch_size, include_itc=True)
    results.update({f"eval/retrieval/{k}": v for k, v in metrics.items()})
    if predictions_dir:
      retrieval_metrics.save_scores(os.path.join(predictions_dir, "retrieval_scores.npz"),
                                    scores_i2t, scores_t2i)
      with open(os.path.join(predictions_dir, "retrieval_rankings.json"), "w") as f:
        json.dump(top_rankings(scores_i2t, scores_t2i), f)
  for path, name in _named_splits(ecfg.grounding_files, "grounding_files"):
    data = eval_data.load_grounding_eval(path, ecfg.grounding_image_root, **common)
    metrics, pred = grounding.evaluate_grounding(model, params, data, batch_size=ecfg.batch_size,
                                                 plus_one=ecfg.grounding_plus_one)
    results[f"eval/grounding/{name}/acc"] = metrics["grounding_acc"]
    results[f"eval/grounding/{name}/miou"] = metrics["grounding_miou"]
    if predictions_dir:
      _write_grounding_predictions(os.path.join(predictions_dir, f"grounding_{name}.jsonl"),
                                   path, pred)
  text_args = dict(tokenizer=tokenizer, max_tokens=dcfg.max_tokens, max_words=dcfg.max_words)
  for path, name in _named_splits(ecfg.vqa_files, "vqa_files"):

    answers = examples_lib.load_answer_list(dcfg.vqa.answer_list)
    data = eval_data.load_vqa_eval(path, ecfg.vqa_image_root, **text_args)
    metrics, predictions = classification.evaluate_vqa(
        model, params, data, answers, image_res=config.model.image_res,
        batch_size=ecfg.batch_size)
    if "vqa_acc" in metrics:
      results[f"eval/vqa/{name}/acc"] = metrics["vqa_acc"]
    if predictions_dir:
      with open(os.path.join(predictions_dir, f"vqa_{name}.json"), "w") as f:
        json.dump(predictions, f)
  for path, name in _named_splits(ecfg.nlvr_files, "nlvr_files"):
    data = eval_data.load_nlvr_eval(path, ecfg.nlvr_image_root, **text_args)
    metrics, _ = classification.evaluate_nlvr(model, params, data,
                                              image_res=config.model.image_res,
                                              batch_size=ecfg.batch_size)
    results[f"eval/nlvr/{name}/acc"] = metrics["nlvr_acc"]
  logging.info("Evaluation: %s", " ".join(f"{k}={v:.2f}" for k, v in results.items()))
  return results
