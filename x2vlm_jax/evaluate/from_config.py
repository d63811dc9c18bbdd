"""Evaluation driven by `config.eval`: retrieval (ITC + ITM re-ranking) and grounding per split.

Used after pre-training (zero-shot), after fine-tuning, and by `main.py --mode eval`:
  retrieval_file      `{"image", "caption": [..]}` JSONL (Karpathy test format) -> TR/IR@1/5/10
  multilingual_retrieval_file  `{"image", "caption": {lang: [..]}}` (Multi30K, multilingual COCO)
                      -> TR/IR@1/5/10 per language (`eval/retrieval/<lang>/...`) and their mean
                      over the languages (`eval/retrieval/mean/...`)
  grounding_files     `{"image", "text", "bbox"}` JSONL, one per split -> Acc@0.5 and mIoU each
  vqa_files           `{"question_id", "image", "question", ["answer"]}`, one per split -> VQA
                      accuracy (official definition) when answers are given
  nlvr_files          `{"images": [a, b], "sentence", "label"}`, one per split -> accuracy
  caption_files       `{"image", ["image_id"], "caption": [refs]}`, one per split -> captions
                      (beam search, `evaluate/captioning.py`), BLEU-4 and CIDEr-D (x100) as
                      eval/caption/<split>/bleu_4 and .../cider when references are given
Images are resized to `config.model.image_res`. Returns flat metrics named `eval/...` (percent),
ready for `metrics.jsonl`. With `predictions_dir`, also writes
  retrieval_scores.npz            the re-ranked score matrices (tools/score_retrieval.py reads it)
  retrieval_rankings.json         top-10 texts of every image and top-10 images of every text
  retrieval_<lang>_{scores.npz,rankings.json}     the same for each language
  grounding_<split>.jsonl         every record's predicted box [x, y, w, h] in original pixels
  vqa_<split>.json                [{"question_id", "answer"}] (tools/score_vqa.py, the VQA server)
  video_retrieval_{scores.npz,rankings.json}   as retrieval_*, "image" = video
  video_qa_<split>.json           [{"where", "question", "answer", "prediction"}]
  captions_<split>.json           [{"image_id", "caption"}] (the COCO result format)
Video (frames as config.data.video_text / video_qa: num_frames, uniform or fps sampling):
  video_retrieval_file  `{"video", "caption": [..]}` (MSR-VTT 1k-A) -> eval/video_retrieval/...
  video_qa_files        `{"video", "question", "answer"}` per split -> eval/video_qa/<split>/acc
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


def _write_retrieval_outputs(predictions_dir: str | None, stem: str, scores_a2t: np.ndarray,
                             scores_t2a: np.ndarray) -> None:
  """`<stem>_scores.npz` (tools/score_retrieval.py) and `<stem>_rankings.json` (top 10 each way)."""
  if not predictions_dir:
    return
  from x2vlm_jax.evaluate import retrieval_metrics

  retrieval_metrics.save_scores(os.path.join(predictions_dir, f"{stem}_scores.npz"),
                                scores_a2t, scores_t2a)
  with open(os.path.join(predictions_dir, f"{stem}_rankings.json"), "w") as f:
    json.dump(top_rankings(scores_a2t, scores_t2a), f)


def _write_grounding_predictions(path: str, jsonl: str, pred_xywh: np.ndarray) -> None:
  with open(path, "w") as out:
    for n, box in enumerate(pred_xywh):
      out.write(json.dumps({"source": f"{jsonl}:{n + 1}",
                            "pred_bbox": [round(float(v), 2) for v in box]}) + "\n")


def run(config, model, params, *, predictions_dir: str | None = None) -> dict[str, float]:
  ecfg, dcfg = config.eval, config.data
  if not (ecfg.retrieval_file or ecfg.multilingual_retrieval_file or ecfg.grounding_files
          or ecfg.vqa_files or ecfg.nlvr_files or ecfg.video_retrieval_file
          or ecfg.video_qa_files or ecfg.caption_files):
    return {}
  from x2vlm_jax.evaluate import classification, grounding, retrieval

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
    _write_retrieval_outputs(predictions_dir, "retrieval", scores_i2t, scores_t2i)
  if ecfg.multilingual_retrieval_file:
    data = eval_data.load_multilingual_retrieval_eval(
        ecfg.multilingual_retrieval_file, ecfg.multilingual_retrieval_image_root,
        languages=tuple(ecfg.multilingual_retrieval_languages), **common)
    per_lang, scores = retrieval.evaluate_multilingual_retrieval(
        model, params, data, k_test=ecfg.k_test, batch_size=ecfg.batch_size, include_itc=True)
    for lang, metrics in per_lang.items():
      results.update({f"eval/retrieval/{lang}/{k}": v for k, v in metrics.items()})
      _write_retrieval_outputs(predictions_dir, f"retrieval_{lang}", *scores[lang])
    for key in next(iter(per_lang.values())):
      results[f"eval/retrieval/mean/{key}"] = float(np.mean([m[key] for m in per_lang.values()]))
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
        batch_size=ecfg.batch_size, tokenizer=tokenizer,
        answer_max_tokens=dcfg.vqa.answer_max_tokens, k_test=ecfg.vqa_k_test)
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
  if ecfg.video_retrieval_file or ecfg.video_qa_files:
    results.update(_run_video(config, model, params, text_args, predictions_dir))
  if ecfg.caption_files:
    from x2vlm_jax.evaluate import captioning

    results.update(captioning.run_from_config(
        config, model, params, tokenizer, predictions_dir,
        _named_splits(ecfg.caption_files, "caption_files")))
  logging.info("Evaluation: %s", " ".join(f"{k}={v:.2f}" for k, v in results.items()))
  return results


def _run_video(config, model, params, text_args: dict, predictions_dir: str | None
               ) -> dict[str, float]:
  """Video retrieval and video QA metrics (`eval/video_retrieval/...`, `eval/video_qa/...`)."""
  from x2vlm_jax.data import video as video_lib
  from x2vlm_jax.data import video_examples
  from x2vlm_jax.evaluate import video

  ecfg, dcfg = config.eval, config.data
  results: dict[str, float] = {}
  if ecfg.video_retrieval_file:
    vt = dcfg.video_text
    data = video_examples.load_video_retrieval_eval(ecfg.video_retrieval_file, ecfg.video_root,
                                                    video_key=vt.video_key, **text_args)
    metrics, scores_v2t, scores_t2v = video.evaluate_video_retrieval(
        model, params, data, num_frames=vt.num_frames, image_res=config.model.image_res,
        k_test=ecfg.video_k_test, batch_size=ecfg.batch_size,
        sampling=video_lib.eval_sampling(vt.sampling), folder_fps=vt.frame_folder_fps,
        include_itc=True)
    results.update({f"eval/video_retrieval/{k}": v for k, v in metrics.items()})
    _write_retrieval_outputs(predictions_dir, "video_retrieval", scores_v2t, scores_t2v)
  qa = dcfg.video_qa
  for path, name in _named_splits(ecfg.video_qa_files, "video_qa_files"):
    answers = video_examples.load_answer_labels(qa.answer_list)
    data = video_examples.load_video_qa_eval(path, ecfg.video_root, answers=answers,
                                             video_key=qa.video_key, question_key=qa.caption_key,
                                             answer_key=qa.answer_key, **text_args)
    metrics, predictions = video.evaluate_video_qa(
        model, params, data, answers, num_frames=qa.num_frames, image_res=config.model.image_res,
        batch_size=ecfg.batch_size, sampling=video_lib.eval_sampling(qa.sampling),
        folder_fps=qa.frame_folder_fps)
    results[f"eval/video_qa/{name}/acc"] = metrics["video_qa_acc"]
    if predictions_dir:
      with open(os.path.join(predictions_dir, f"video_qa_{name}.json"), "w") as f:
        json.dump(predictions, f)
  return results
