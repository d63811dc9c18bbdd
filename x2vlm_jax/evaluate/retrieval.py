"""Model-driven image-text retrieval evaluation: ITC similarities + top-k ITM re-ranking.

REFERENCE_DETAILED.md §4.1:
  1. every image -> ViT embeddings [N_img, 1+N, D] and features [N_img, E]; every text -> text
     encoder embeddings [N_txt, L, H] and features [N_txt, E] (features L2-normalised);
  2. sims = image_feat @ text_feat.T   [N_img, N_txt]   (no temperature);
  3. i2t: for each image its top-k_test texts by sims are re-scored with the raw ITM class-1
     logit of fuse(image, text); everything else is -100. t2i symmetric (rows = texts).
  4. TR@k / IR@k from the two score matrices (`retrieval_metrics.retrieval_metrics`).

Usage (data as `tasks.retrieval.load_retrieval_eval` reads it):
  metrics, scores_i2t, scores_t2i = evaluate_retrieval(model, params, data, k_test=256,
                                                       batch_size=64)
  # captions in several languages for one image set: images encoded once, metrics per language
  per_lang_metrics, per_lang_scores = evaluate_multilingual_retrieval(model, params, data, ...)

Execution: images and texts are encoded in fixed-size batches (the last one padded by repeating
its last row, the padding dropped), so each jitted function compiles once; the embeddings stay
on device. Pairs are scored by one jitted function that gathers the cached image embeddings,
text embeddings and text masks by index inside jit (`rerank.rerank_scores` always passes exactly
`batch_size` pairs; image->text batches that hold whole rows of k candidates pass one index
per image, so the fusion layers project each image's keys/values once for its k texts; a second
compiled shape). With `mesh`, every batch (of images, texts or pairs) is split over the
('data', 'fsdp') mesh axes, and `batch_size` must be divisible by their size. Every process
evaluates all rows (no multi-host row split; see `rerank` for the recipe).

The engine of the image, multilingual and video retrieval evaluators (`tasks/retrieval.py`,
`tasks/video_retrieval.py`) and of `inference.Predictor.score`. `data["images"]` may be an array
or a lazy `eval_data.EvalImages` (decoded one batch at a time).
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from x2vlm_jax import sharding as sharding_lib
from x2vlm_jax.evaluate import common
from x2vlm_jax.evaluate import rerank
from x2vlm_jax.evaluate import retrieval_metrics as metrics_lib

Mesh = jax.sharding.Mesh
TRACE_COUNTS = common.TRACE_COUNTS


# --------------------------------------------------------------------------------------------
# Jitted model functions.


def make_retrieval_fns(model, mesh: Mesh | None = None) -> dict[str, Callable[..., Any]]:
  """The jitted functions of the retrieval evaluation (`model`: an `X2VLM`, or any module with
  its `encode_image`, `image_features`, `encode_text`, `text_features`, `fuse`, `itm_logits`).

    encode_images(params, images [B, R, R, 3]) -> (embeds [B, 1+N, D], feat [B, E])
    encode_texts(params, ids [B, L], atts [B, L]) -> (embeds [B, L, H], feat [B, E])
    similarities(image_feat [N_img, E], text_feat [N_txt, E]) -> [N_img, N_txt] float32
    pair_itm(params, image_embeds [N_img, 1+N, D], text_embeds [N_txt, L, H], text_atts
             [N_txt, L], img_idx [P] (or [P/G]: G consecutive pairs per image),
             txt_idx [P]) -> [P, 2] float32 raw ITM logits (1 = match)
  """
  out_repl = {} if mesh is None else dict(out_shardings=sharding_lib.replicated(mesh))

  def encode_images(params, images):
    TRACE_COUNTS["encode_images"] += 1

    def f(m, x):
      embeds = m.encode_image(x)
      return embeds, m.image_features(embeds)

    return model.apply({"params": params}, images, method=f)

  def encode_texts(params, ids, atts):
    TRACE_COUNTS["encode_texts"] += 1

    def f(m, i, a):
      embeds = m.encode_text(i, a)
      return embeds, m.text_features(embeds)

    return model.apply({"params": params}, ids, atts, method=f)

  def similarities(image_feat, text_feat):
    TRACE_COUNTS["similarities"] += 1
    return jnp.matmul(image_feat.astype(jnp.float32), text_feat.astype(jnp.float32).T,
                      precision=jax.lax.Precision.HIGHEST)

  def pair_itm(params, image_embeds, text_embeds, text_atts, img_idx, txt_idx):
    """ITM logits [P, 2] of pairs (img_idx[p], txt_idx[p]), or with img_idx [P/G] of the pairs
    (img_idx[p // G], txt_idx[p]): then each image's G texts share its cross-attention
    keys/values (`X2VLM.fuse`)."""
    TRACE_COUNTS["pair_itm"] += 1
    vision = jnp.take(image_embeds, img_idx, axis=0)
    text = jnp.take(text_embeds, txt_idx, axis=0)
    atts = jnp.take(text_atts, txt_idx, axis=0)
    vision_atts = jnp.ones(vision.shape[:2], jnp.int32)

    def f(m, v, va, t, ta):
      return m.itm_logits(m.fuse(v, va, t, ta))

    return model.apply({"params": params}, vision, vision_atts, text, atts,
                       method=f).astype(jnp.float32)

  return dict(encode_images=jax.jit(encode_images), encode_texts=jax.jit(encode_texts),
              similarities=jax.jit(similarities, **out_repl),
              pair_itm=jax.jit(pair_itm, **out_repl))


# --------------------------------------------------------------------------------------------
# Evaluation.


def itc_only_metrics(sims: Any, img2txt, txt2img) -> dict[str, float]:
  """Retrieval metrics of the ITC similarities alone (no ITM re-ranking).

  Args:
    sims: [N_img, N_txt] similarities (scores_i2t = sims, scores_t2i = sims.T).
    img2txt: N_img lists of ground-truth text indices. txt2img: [N_txt] image of each text.

  Returns:
    `retrieval_metrics.retrieval_metrics` keys (percent).
  """
  sims = np.asarray(sims, dtype=np.float32)
  return metrics_lib.retrieval_metrics(sims, sims.T, img2txt, txt2img)


def encode_images(params, images: Any, *, batch_size: int, fns: dict,
                  mesh: Mesh | None = None) -> tuple[jax.Array, jax.Array]:
  """images [N_img, R, R, 3] -> (image_embeds [N_img, 1+N, D], image_feat [N_img, E]) on device."""
  return common.run_batched(lambda x: fns["encode_images"](params, x), (images,), batch_size, mesh)


def encode_texts(params, text_ids: Any, text_atts: Any, *, batch_size: int, fns: dict,
                 mesh: Mesh | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """ids/atts [N_txt, L] -> (text_embeds [N_txt, L, H], text_feat [N_txt, E], text_atts) on
  device (the masks replicated over `mesh`, for the pair scorer's gathers)."""
  text_embeds, text_feat = common.run_batched(
      lambda i, a: fns["encode_texts"](params, i, a), (text_ids, text_atts), batch_size, mesh)
  return text_embeds, text_feat, common.put_replicated(np.asarray(text_atts, np.int32), mesh)


def compute_embeddings(model, params, data: dict, *, batch_size: int, mesh: Mesh | None = None,
                       fns: dict | None = None) -> dict[str, jax.Array]:
  """Encodes every image and text of `data` (device arrays, padding dropped).

  Returns:
    dict(image_embeds [N_img, 1+N, D], image_feat [N_img, E], text_embeds [N_txt, L, H],
         text_feat [N_txt, E], text_atts [N_txt, L], sims [N_img, N_txt] float32).
  """
  common.check_batch_size(batch_size, mesh)
  fns = fns or make_retrieval_fns(model, mesh)
  image_embeds, image_feat = encode_images(params, data["images"], batch_size=batch_size,
                                           fns=fns, mesh=mesh)
  text_embeds, text_feat, text_atts = encode_texts(params, data["text_ids"], data["text_atts"],
                                                   batch_size=batch_size, fns=fns, mesh=mesh)
  return dict(image_embeds=image_embeds, image_feat=image_feat, text_embeds=text_embeds,
              text_feat=text_feat, text_atts=text_atts,
              sims=fns["similarities"](image_feat, text_feat))


def rerank_and_score(params, emb: dict, img2txt, txt2img, *, k_test: int, batch_size: int,
                     fns: dict, mesh: Mesh | None = None, include_itc: bool = False,
                     log_fn: Callable[[str], Any] = logging.info
                     ) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
  """Steps 3-4 of the module docstring on encoded images and texts (`compute_embeddings` keys):
  top-k ITM re-ranking both ways, then the metrics. Returns (metrics, scores_i2t, scores_t2i) as
  `evaluate_retrieval` does."""
  sims = np.asarray(jax.device_get(emb["sims"]), np.float32)

  # Image -> text re-ranking issues each image's k candidates as consecutive pairs. When a batch
  # holds whole rows (batch_size a multiple of k, and the rows split evenly over the mesh), each
  # image goes to the fusion layers once with its k texts (keys/values projected once, not k
  # times).
  shards = common.batch_shards(mesh)
  k_i2t = min(k_test, sims.shape[1])
  group = k_i2t if k_i2t > 1 and batch_size % (k_i2t * shards) == 0 else 1

  def pair_score_fn(img_idx, txt_idx):
    rows = img_idx.reshape(-1, group)
    if group > 1 and (rows == rows[:, :1]).all():
      img_idx = rows[:, 0]
    logits = fns["pair_itm"](params, emb["image_embeds"], emb["text_embeds"], emb["text_atts"],
                             common.put_batch(img_idx, mesh), common.put_batch(txt_idx, mesh))
    return logits[:, 1]  # the reference re-ranks by the raw class-1 logit

  scores = {}
  for direction in ("i2t", "t2i"):
    scores[direction] = rerank.rerank_scores(sims, k_test, pair_score_fn, batch_size=batch_size,
                                             direction=direction, log_fn=log_fn)
  metrics = metrics_lib.retrieval_metrics(scores["i2t"], scores["t2i"], img2txt, txt2img)
  if include_itc:
    itc = itc_only_metrics(sims, img2txt, txt2img)
    log_fn(f"retrieval R@1: ITC txt {itc['txt_r1']:.2f} img {itc['img_r1']:.2f} | ITM re-ranked "
           f"(k={k_test}) txt {metrics['txt_r1']:.2f} img {metrics['img_r1']:.2f}")
    metrics.update({f"itc_{k}": v for k, v in itc.items()})
  return metrics, scores["i2t"], scores["t2i"]


def evaluate_retrieval(model, params, data: dict, *, k_test: int, batch_size: int,
                       mesh: Mesh | None = None, include_itc: bool = False,
                       log_fn: Callable[[str], Any] = logging.info, fns: dict | None = None
                       ) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
  """Zero-shot / fine-tuned retrieval evaluation (module docstring).

  Args:
    model: `X2VLM` (deterministic apply). params: its params (unboxed; host or device).
    data: `eval_data.load_retrieval_eval` output: images [N_img, R, R, 3] f32, text_ids
      [N_txt, L] i32, text_atts [N_txt, L] i32, txt2img [N_txt], img2txt (N_img lists).
    k_test: candidates re-scored with ITM per row (clamped to the number of candidates).
    batch_size: images / texts per encoding call and pairs per ITM call.
    mesh: optional device mesh; batches are split over ('data', 'fsdp').
    include_itc: also return the ITC-only metrics as `itc_<key>` (and log ITC vs ITM R@1).
    log_fn: receives progress lines.
    fns: `make_retrieval_fns(model, mesh)` made once by the caller (default: made here).

  Returns:
    (metrics: `retrieval_metrics` keys in percent [+ `itc_*`],
     scores_i2t [N_img, N_txt] float32, scores_t2i [N_txt, N_img] float32), the scores holding
    the raw ITM class-1 logit for each row's top-k and -100 elsewhere.
  """
  common.check_batch_size(batch_size, mesh)
  n_img, n_txt = len(data["images"]), len(data["text_ids"])
  params = common.place_params(params, mesh)
  fns = fns or make_retrieval_fns(model, mesh)

  t0 = time.monotonic()
  emb = compute_embeddings(model, params, data, batch_size=batch_size, mesh=mesh, fns=fns)
  log_fn(f"retrieval: encoded {n_img} images and {n_txt} texts in {time.monotonic() - t0:.1f}s")
  metrics, scores_i2t, scores_t2i = rerank_and_score(
      params, emb, data["img2txt"], data["txt2img"], k_test=k_test, batch_size=batch_size,
      fns=fns, mesh=mesh, include_itc=include_itc, log_fn=log_fn)
  log_fn(f"retrieval: done in {time.monotonic() - t0:.1f}s, r_mean {metrics['r_mean']:.2f}")
  return metrics, scores_i2t, scores_t2i


def evaluate_multilingual_retrieval(
    model, params, data: dict, *, k_test: int, batch_size: int, mesh: Mesh | None = None,
    include_itc: bool = False, log_fn: Callable[[str], Any] = logging.info,
    fns: dict | None = None
) -> tuple[dict[str, dict[str, float]], dict[str, tuple[np.ndarray, np.ndarray]]]:
  """Retrieval per language over one image set (Multi30K, multilingual COCO): the images are
  encoded once, then each language's captions are encoded, ranked and re-ranked against them.

  Args:
    data: `eval_data.load_multilingual_retrieval_eval` output: images [N_img, R, R, 3] and
      languages {lang: dict(text_ids, text_atts, txt2img, img2txt)}.
    Others as `evaluate_retrieval`.
  Returns:
    ({lang: metrics}, {lang: (scores_i2t, scores_t2i)}), each as `evaluate_retrieval` returns.
  """
  common.check_batch_size(batch_size, mesh)
  params = common.place_params(params, mesh)
  fns = fns or make_retrieval_fns(model, mesh)
  t0 = time.monotonic()
  image_embeds, image_feat = encode_images(params, data["images"], batch_size=batch_size,
                                           fns=fns, mesh=mesh)
  log_fn(f"retrieval: encoded {len(data['images'])} images in {time.monotonic() - t0:.1f}s")
  metrics, scores = {}, {}
  for lang, texts in data["languages"].items():
    text_embeds, text_feat, text_atts = encode_texts(
        params, texts["text_ids"], texts["text_atts"], batch_size=batch_size, fns=fns, mesh=mesh)
    emb = dict(image_embeds=image_embeds, text_embeds=text_embeds, text_atts=text_atts,
               sims=fns["similarities"](image_feat, text_feat))
    lang_log = lambda line, lang=lang: log_fn(f"[{lang}] {line}")
    metrics[lang], i2t, t2i = rerank_and_score(
        params, emb, texts["img2txt"], texts["txt2img"], k_test=k_test, batch_size=batch_size,
        fns=fns, mesh=mesh, include_itc=include_itc, log_fn=lang_log)
    scores[lang] = (i2t, t2i)
    log_fn(f"retrieval [{lang}]: {len(texts['text_ids'])} texts, r_mean "
           f"{metrics[lang]['r_mean']:.2f} ({time.monotonic() - t0:.1f}s)")
  return metrics, scores


# --------------------------------------------------------------------------------------------
# Prediction files.

TOP_RANKED = 10


def top_rankings(scores_i2t: np.ndarray, scores_t2i: np.ndarray, k: int = TOP_RANKED) -> dict:
  """Best-first indices: {'image_to_text': [N_img][k], 'text_to_image': [N_txt][k]}.

  Ties keep the lower index first (a stable sort), as the metrics do."""
  def top(scores):
    order = np.argsort(-np.asarray(scores, np.float32), axis=1, kind="stable")
    return order[:, :k].tolist()
  return {"image_to_text": top(scores_i2t), "text_to_image": top(scores_t2i)}


def write_outputs(predictions_dir: str | None, stem: str, scores_a2t: np.ndarray,
                  scores_t2a: np.ndarray) -> None:
  """`<stem>_scores.npz` (the re-ranked score matrices, tools/score_retrieval.py) and
  `<stem>_rankings.json` (top 10 texts of every image and top 10 images of every text)."""
  if not predictions_dir:
    return
  import json
  import os

  os.makedirs(predictions_dir, exist_ok=True)
  metrics_lib.save_scores(os.path.join(predictions_dir, f"{stem}_scores.npz"),
                          scores_a2t, scores_t2a)
  with open(os.path.join(predictions_dir, f"{stem}_rankings.json"), "w") as f:
    json.dump(top_rankings(scores_a2t, scores_t2a), f)
