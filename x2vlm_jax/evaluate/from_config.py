"""Zero-shot evaluation of a pre-trained model: retrieval (ITC + ITM re-ranking) and grounding.

Driven by `config.eval`: `retrieval_file` (`{"image", "caption": [..]}` JSONL) and
`grounding_file` (`{"image", "text", "bbox"}` JSONL), images resized to `config.model.image_res`.
Returns flat metrics named `eval/...` (percent), ready for `metrics.jsonl`.
"""
from __future__ import annotations

import logging
import os

import jax

from x2vlm_jax.data import eval_data
from x2vlm_jax.data import text as text_lib


def run(config, model, params, *, predictions_dir: str | None = None) -> dict[str, float]:
  ecfg, dcfg = config.eval, config.data
  if not (ecfg.retrieval_file or ecfg.grounding_file):
    return {}
  from x2vlm_jax.evaluate import grounding, retrieval, retrieval_metrics

  params = jax.device_get(params)
  tokenizer = text_lib.load_tokenizer(dcfg.vocab_path)
  common = dict(image_res=config.model.image_res, tokenizer=tokenizer,
                max_tokens=dcfg.max_tokens, max_words=dcfg.max_words)
  results: dict[str, float] = {}
  if ecfg.retrieval_file:
    data = eval_data.load_retrieval_eval(ecfg.retrieval_file, ecfg.retrieval_image_root, **common)
    metrics, scores_i2t, scores_t2i = retrieval.evaluate_retrieval(
        model, params, data, k_test=ecfg.k_test, batch_size=ecfg.batch_size, include_itc=True)
    results.update({f"eval/retrieval/{k}": v for k, v in metrics.items()})
    if predictions_dir:
      os.makedirs(predictions_dir, exist_ok=True)
      retrieval_metrics.save_scores(os.path.join(predictions_dir, "retrieval_scores.npz"),
                                    scores_i2t, scores_t2i)
  if ecfg.grounding_file:
    data = eval_data.load_grounding_eval(ecfg.grounding_file, ecfg.grounding_image_root, **common)
    metrics, _ = grounding.evaluate_grounding(model, params, data, batch_size=ecfg.batch_size)
    results.update({f"eval/{k}": v for k, v in metrics.items()})
  logging.info("Evaluation: %s", " ".join(f"{k}={v:.2f}" for k, v in results.items()))
  return results
