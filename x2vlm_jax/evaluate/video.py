"""Video evaluation: video-text retrieval (MSR-VTT 1k-A) and video QA (MSRVTT-QA / MSVD-QA).

Videos are read from disk one batch at a time (deterministic frame sampling, test transform:
resize to R x R), the next batch decoded by a thread while the device encodes the current one.

  evaluate_video_retrieval(model, params, data, ...) -> (metrics, scores_v2t, scores_t2v)
      data from `video_examples.load_video_retrieval_eval`. Every video goes through
      `model.encode_video` (per-frame ViT, frame embedding, mean over frames) once; then the
      image-retrieval machinery (`retrieval.encode_texts`, `retrieval.rerank_and_score`): ITC
      similarities, top-k ITM re-ranking with the raw class-1 logit, TR/IR@1/5/10 where
      "image" is the video (REFERENCE_DETAILED §4.6).
  evaluate_video_qa(model, params, data, answers, ...) -> (metrics {"video_qa_acc"}, predictions)
      arg-max of the classification head; a question whose answer is not in the list counts as
      wrong (reference MSRVTT-QA); predictions [{"where", "question", "answer", "prediction"}].
"""
from __future__ import annotations

import concurrent.futures
import logging
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from x2vlm_jax import objectives
from x2vlm_jax.data import video_examples
from x2vlm_jax.evaluate import retrieval as retrieval_lib

Mesh = jax.sharding.Mesh


def make_video_encoder(model) -> Callable[..., Any]:
  """jit(params, frames [B, F, R, R, 3]) -> (video_embeds [B, 1+N, D], video_feat [B, E])."""

  def fn(params, frames):
    retrieval_lib.TRACE_COUNTS["encode_videos"] += 1

    def f(m, x):
      embeds = m.encode_video(x)
      return embeds, m.image_features(embeds)

    return model.apply({"params": params}, frames, method=f)

  return jax.jit(fn)


def make_video_qa_fn(model) -> Callable[..., jax.Array]:
  """jit(params, frames [B, F, R, R, 3], ids [B, L], atts [B, L]) -> answer logits [B, A]."""

  def fn(params, frames, ids, atts):
    batch = dict(frames=frames, text_ids=ids, text_atts=atts)
    return model.apply({"params": params}, batch, method=objectives.video_qa_logits)

  return jax.jit(fn)


def run_over_videos(fn: Callable[..., Any], params, paths: Sequence[str], where: Sequence[str],
                    extra: tuple[np.ndarray, ...] = (), *, batch_size: int, num_frames: int,
                    image_res: int, sampling: str = "uniform", folder_fps: float = 1.0,
                    mesh: Mesh | None = None, name: str = "video",
                    log_fn: Callable[[str], Any] = logging.info) -> Any:
  """`fn(params, frames, *extra_batches)` over fixed-size batches of the videos (the last padded
  by repeating its last row); `extra` arrays [N, ...] are batched alongside. Returns the outputs
  (a pytree of device arrays with leading dim N, padding dropped), concatenated on device."""
  retrieval_lib._check_batch_size(batch_size, mesh)  # pylint: disable=protected-access
  put = lambda a: retrieval_lib._put_batch(  # pylint: disable=protected-access
      retrieval_lib._pad_rows(a, batch_size), mesh)  # pylint: disable=protected-access
  n = len(paths)
  if n == 0:
    raise ValueError("nothing to evaluate: no videos")
  starts = list(range(0, n, batch_size))

  def load(start):
    stop = min(n, start + batch_size)
    return video_examples.load_eval_clips(
        paths[start:stop], where[start:stop], num_frames=num_frames, image_res=image_res,
        sampling=sampling, folder_fps=folder_fps)

  outs, t0 = [], time.monotonic()
  with concurrent.futures.ThreadPoolExecutor(1) as prefetch:
    pending = prefetch.submit(load, starts[0])
    for b, start in enumerate(starts):
      frames = pending.result()
      if b + 1 < len(starts):
        pending = prefetch.submit(load, starts[b + 1])
      stop = start + len(frames)
      out = fn(params, put(frames), *[put(np.asarray(a[start:stop])) for a in extra])
      if stop - start < batch_size:
        out = jax.tree.map(lambda y, m=stop - start: y[:m], out)
      outs.append(out)
      if b % 50 == 0 or b + 1 == len(starts):
        log_fn(f"{name}: {stop}/{n} videos ({stop / max(time.monotonic() - t0, 1e-9):.1f}/s)")
  if len(outs) == 1:
    return outs[0]
  return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *outs)


def evaluate_video_retrieval(model, params, data: dict, *, num_frames: int, image_res: int,
                             k_test: int, batch_size: int, sampling: str = "uniform",
                             folder_fps: float = 1.0, mesh: Mesh | None = None,
                             include_itc: bool = False,
                             log_fn: Callable[[str], Any] = logging.info
                             ) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
  """Video-text retrieval (module docstring). Returns the metrics of `evaluate_retrieval`
  (txt_r*: video -> text, img_r*: text -> video) and the re-ranked score matrices
  [N_video, N_txt], [N_txt, N_video]."""
  params = retrieval_lib._place_params(params, mesh)  # pylint: disable=protected-access
  fns = retrieval_lib.make_retrieval_fns(model, mesh)
  t0 = time.monotonic()
  video_embeds, video_feat = run_over_videos(
      make_video_encoder(model), params, data["video_paths"], data["where"],
      batch_size=batch_size, num_frames=num_frames, image_res=image_res, sampling=sampling,
      folder_fps=folder_fps, mesh=mesh, name="video retrieval", log_fn=log_fn)
  text_embeds, text_feat, text_atts = retrieval_lib.encode_texts(
      params, data["text_ids"], data["text_atts"], batch_size=batch_size, fns=fns, mesh=mesh)
  log_fn(f"video retrieval: encoded {len(data['video_paths'])} videos and "
         f"{len(data['text_ids'])} texts in {time.monotonic() - t0:.1f}s")
  emb = dict(image_embeds=video_embeds, text_embeds=text_embeds, text_atts=text_atts,
             sims=fns["similarities"](video_feat, text_feat))
  metrics, scores_v2t, scores_t2v = retrieval_lib.rerank_and_score(
      params, emb, data["img2txt"], data["txt2img"], k_test=k_test, batch_size=batch_size,
      fns=fns, mesh=mesh, include_itc=include_itc, log_fn=log_fn)
  log_fn(f"video retrieval: done in {time.monotonic() - t0:.1f}s, r_mean {metrics['r_mean']:.2f}")
  return metrics, scores_v2t, scores_t2v


def evaluate_video_qa(model, params, data: dict, answers: Sequence[str], *, num_frames: int,
                      image_res: int, batch_size: int, sampling: str = "uniform",
                      folder_fps: float = 1.0, mesh: Mesh | None = None,
                      log_fn: Callable[[str], Any] = logging.info
                      ) -> tuple[dict[str, float], list[dict]]:
  """Video QA accuracy (percent) of the classification head's arg-max (module docstring)."""
  params = retrieval_lib._place_params(params, mesh)  # pylint: disable=protected-access
  logits = run_over_videos(
      make_video_qa_fn(model), params, data["video_paths"], data["where"],
      (data["text_ids"], data["text_atts"]), batch_size=batch_size, num_frames=num_frames,
      image_res=image_res, sampling=sampling, folder_fps=folder_fps, mesh=mesh, name="video QA",
      log_fn=log_fn)
  logits = np.asarray(jax.device_get(logits))
  if logits.shape[1] != len(answers):
    raise ValueError(f"the model has {logits.shape[1]} answer logits but the answer list has "
                     f"{len(answers)} answers (model.vqa_num_answers vs data.video_qa.answer_list)")
  best = np.argmax(logits, axis=1)
  correct = best == data["answer_label"]  # label -100 (not in the list) never matches
  predictions = [dict(where=w, question=q, answer=a, prediction=answers[int(k)])
                 for w, q, a, k in zip(data["where"], data["questions"], data["answers"], best)]
  return {"video_qa_acc": 100.0 * float(np.mean(correct))}, predictions
