"""Model-driven image-text retrieval evaluation: ITC similarities + top-k ITM re-ranking.

REFERENCE_DETAILED.md §4.1:
  1. every image -> ViT embeddings [N_img, 1+N, D] and features [N_img, E]; every text -> text
     encoder embeddings [N_txt, L, H] and features [N_txt, E] (features L2-normalised);
  2. sims = image_feat @ text_feat.T   [N_img, N_txt]   (no temperature);
  3. i2t: for each image its top-k_test texts by sims are re-scored with the raw ITM class-1
     logit of fuse(image, text); everything else is -100. t2i symmetric (rows = texts).
  4. TR@k / IR@k from the two score matrices (`retrieval_metrics`).

Usage (data as `tasks.retrieval.load_retrieval_eval` reads it):
  result = evaluate_retrieval(model, params, data, k_test=256, batch_size=64)
  result.metrics                       # {'txt_r1', ..., 'r_mean', 'itc_txt_r1', ...}
  scores_i2t, scores_t2i = result.dense()   # the reference's matrices (only when you need them)
  # captions in several languages for one image set: images encoded once, results per language
  per_lang = evaluate_multilingual_retrieval(model, params, data, ...)

Execution, streaming and on the mesh:
  * images (decoded a batch at a time from `eval_data.EvalImages`, uint8 until the device, where
    `X2VLM.encode_image` normalises them) and texts are encoded in fixed-size batches split over
    the mesh's ('data', 'fsdp') axes, each jitted function compiled once; the embeddings are
    written into device buffers in place (`common.run_batched`), in `embed_dtype` (float32, or
    bfloat16 to halve them), sharded over the batch axes;
  * step 2 never builds [N_img, N_txt]: the top-k of each row is taken on the device over chunks
    of rows (ties: the lower index first, as a stable sort), and with `include_itc` the ranks of
    the ITC similarities alone likewise; the host keeps [rows, k] candidates and scores;
  * step 3 scores each distinct pair of both directions once, grouped by image (`rerank.py`):
    an image goes through the fusion layers once per group of the texts paired with it (its own
    candidates and the texts that ranked it), its keys and values projected once per group;
  * step 4 reads the ranks from the candidates (`retrieval_metrics.ranks_from_candidates`); the
    full score matrices exist only when asked for (`RetrievalResult.dense`, score files).
In a multi-process run each process loads (decodes) only the image and text rows its devices
hold; the candidates and the re-ranking's bookkeeping are computed by every process on all rows
(the re-ranking's row split is not done yet; see `rerank` for the recipe).

The engine of the image, multilingual and video retrieval evaluators (`tasks/retrieval.py`,
`tasks/video_retrieval.py`) and of `inference.Predictor.score`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from x2vlm_jax import sharding as sharding_lib
from x2vlm_jax.evaluate import common
from x2vlm_jax.evaluate import rerank
from x2vlm_jax.evaluate import retrieval_metrics as metrics_lib

Mesh = jax.sharding.Mesh
TRACE_COUNTS = common.TRACE_COUNTS
EMBED_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Similarity elements per top-k / rank call: bounds the device temporaries (64 MB in float32).
_CHUNK_ELEMS = 1 << 24


# --------------------------------------------------------------------------------------------
# Jitted model functions.


def make_retrieval_fns(model, mesh: Mesh | None = None,
                       embed_dtype: str = "float32") -> dict[str, Callable[..., Any]]:
  """The jitted functions of the retrieval evaluation (`model`: an `X2VLM`, or any module with
  its `encode_image`, `image_features`, `encode_text`, `text_features`, `fuse`, `itm_logits`).

    encode_images(params, images [B, R, R, 3]) -> (embeds [B, 1+N, D] embed_dtype, feat [B, E])
    encode_texts(params, ids [B, L], atts [B, L]) -> (embeds [B, L, H] embed_dtype, feat [B, E])
    top_k(row_feat [C, E], col_feat [M, E], k) -> (sims [C, k] float32, columns [C, k] int32)
    itc_ranks(row_feat [C, E], col_feat [M, E], gt [C, G] (-1 = none)) -> [C] int32
    pair_itm(params, image_embeds [N_img, 1+N, D], text_embeds [N_txt, L, H], text_atts
             [N_txt, L], img_idx [P] (or [P/G]: G consecutive pairs per image),
             txt_idx [P]) -> [P, 2] float32 raw ITM logits (class 1 = match)
  """
  if embed_dtype not in EMBED_DTYPES:
    raise ValueError(f"embed_dtype {embed_dtype!r}: expected one of {sorted(EMBED_DTYPES)}")
  dtype = EMBED_DTYPES[embed_dtype]
  out_repl = {} if mesh is None else dict(out_shardings=sharding_lib.replicated(mesh))

  def encode_images(params, images):
    TRACE_COUNTS["encode_images"] += 1

    def f(m, x):
      embeds = m.encode_image(x)
      return embeds.astype(dtype), m.image_features(embeds)

    return model.apply({"params": params}, images, method=f)

  def encode_texts(params, ids, atts):
    TRACE_COUNTS["encode_texts"] += 1

    def f(m, i, a):
      embeds = m.encode_text(i, a)
      return embeds.astype(dtype), m.text_features(embeds)

    return model.apply({"params": params}, ids, atts, method=f)

  def similarities(row_feat, col_feat):
    return jnp.matmul(row_feat.astype(jnp.float32), col_feat.astype(jnp.float32).T,
                      precision=jax.lax.Precision.HIGHEST)

  def top_k(row_feat, col_feat, k):
    TRACE_COUNTS["top_k"] += 1
    values, columns = jax.lax.top_k(similarities(row_feat, col_feat), k)  # ties: lower first
    return values, columns.astype(jnp.int32)

  def itc_ranks(row_feat, col_feat, gt):
    """Rank of each row's best ground-truth column among the similarities, ties broken by the
    lower column (`retrieval_metrics` rule)."""
    TRACE_COUNTS["itc_ranks"] += 1
    sims = similarities(row_feat, col_feat)  # [C, M]
    gt_vals = jnp.take_along_axis(sims, jnp.maximum(gt, 0), axis=1)  # [C, G]
    cols = jnp.arange(sims.shape[1])
    above = jnp.sum(sims[:, None, :] > gt_vals[:, :, None], axis=-1)
    tied_before = jnp.sum((sims[:, None, :] == gt_vals[:, :, None])
                          & (cols[None, None, :] < gt[:, :, None]), axis=-1)
    ranks = jnp.where(gt >= 0, above + tied_before, jnp.iinfo(jnp.int32).max)
    return jnp.min(ranks, axis=1).astype(jnp.int32)

  def pair_itm(params, image_embeds, text_embeds, text_atts, img_idx, txt_idx):
    """ITM logits [P, 2] of pairs (img_idx[p], txt_idx[p]), or with img_idx [P/G] of the
    pairs (img_idx[p // G], txt_idx[p]): then each image's G texts share its cross-attention
    keys/values (`X2VLM.fuse`)."""
    TRACE_COUNTS["pair_itm"] += 1
    # Embeddings stored in bfloat16 are widened back: the fusion computes as trained.
    vision = jnp.take(image_embeds, img_idx, axis=0).astype(jnp.float32)
    text = jnp.take(text_embeds, txt_idx, axis=0).astype(jnp.float32)
    atts = jnp.take(text_atts, txt_idx, axis=0)
    vision_atts = jnp.ones(vision.shape[:2], jnp.int32)

    def f(m, v, va, t, ta):
      return m.itm_logits(m.fuse(v, va, t, ta))

    return model.apply({"params": params}, vision, vision_atts, text, atts,
                       method=f).astype(jnp.float32)

  return dict(encode_images=jax.jit(encode_images), encode_texts=jax.jit(encode_texts),
              top_k=jax.jit(top_k, static_argnames="k", **out_repl),
              itc_ranks=jax.jit(itc_ranks, **out_repl),
              pair_itm=jax.jit(pair_itm, **out_repl))


# --------------------------------------------------------------------------------------------
# Encoding.


def encode_images(params, images: Any, *, batch_size: int, fns: dict,
                  mesh: Mesh | None = None) -> tuple[jax.Array, jax.Array]:
  """images [N_img, R, R, 3] (float or uint8 array, or `EvalImages`) -> (image_embeds
  [N_pad, 1+N, D] with padding rows at the end, image_feat [N_img, E]) on device."""
  embeds, feat = common.run_batched(lambda x: fns["encode_images"](params, x), (images,),
                                    batch_size, mesh, keep_padding=True)
  return embeds, feat[:len(images)]


def encode_texts(params, text_ids: Any, text_atts: Any, *, batch_size: int, fns: dict,
                 mesh: Mesh | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """ids/atts [N_txt, L] -> (text_embeds [N_pad, L, H] with padding rows at the end, text_feat
  [N_txt, E], text_atts [N_txt, L]) on device (the masks replicated over `mesh`, for the pair
  scorer's gathers)."""
  text_embeds, text_feat = common.run_batched(
      lambda i, a: fns["encode_texts"](params, i, a), (text_ids, text_atts), batch_size, mesh,
      keep_padding=True)
  atts = common.put_replicated(np.asarray(text_atts, np.int32), mesh)
  return text_embeds, text_feat[:len(text_ids)], atts


def bad_mask(images: Any) -> np.ndarray | None:
  """[N] bool of the images that could not be decoded (`EvalImages.bad_mask`), None for arrays."""
  return images.bad_mask() if hasattr(images, "bad_mask") else None


# --------------------------------------------------------------------------------------------
# Candidates, re-ranking, metrics.


def _row_chunks(n_rows: int, n_cols: int) -> int:
  return max(1, min(n_rows, _CHUNK_ELEMS // max(n_cols, 1)))


def top_k_candidates(row_feat: jax.Array, col_feat: jax.Array, k: int, *, fns: dict,
                     mesh: Mesh | None = None) -> tuple[np.ndarray, np.ndarray]:
  """The k most similar columns of every row, best first, by ITC similarity: (similarities
  [rows, k] float32, columns [rows, k] int32) on the host. Rows go to the device in chunks of
  fixed size (the last padded), so no [rows, cols] matrix ever exists."""
  chunk = _row_chunks(len(row_feat), len(col_feat))
  chunk = common.round_batch_size(chunk, mesh)
  feat = np.asarray(jax.device_get(row_feat))
  values, columns = common.run_batched(lambda x: fns["top_k"](x, col_feat, k=k), (feat,), chunk,
                                       mesh)
  return np.asarray(jax.device_get(values)), np.asarray(jax.device_get(columns))


def itc_ranks(row_feat: jax.Array, col_feat: jax.Array, gt, *, fns: dict,
              mesh: Mesh | None = None) -> np.ndarray:
  """[rows] 0-based rank of each row's best ground-truth column by ITC similarity alone."""
  offsets, cols = metrics_lib.ground_truth_csr(gt, len(row_feat), len(col_feat), "gt")
  lengths = np.diff(offsets)
  padded = np.full((len(row_feat), int(lengths.max())), -1, np.int32)
  padded[np.repeat(np.arange(len(row_feat)), lengths),
         np.arange(len(cols)) - np.repeat(offsets[:-1], lengths)] = cols
  # The rank computation compares every column with each of a row's G ground-truth values.
  chunk = common.round_batch_size(_row_chunks(len(row_feat), len(col_feat) * padded.shape[1]),
                                  mesh)
  feat = np.asarray(jax.device_get(row_feat))
  ranks = common.run_batched(lambda x, g: fns["itc_ranks"](x, col_feat, g), (feat, padded),
                             chunk, mesh)
  return np.asarray(jax.device_get(ranks)).astype(np.int64)


@dataclasses.dataclass
class RetrievalResult:
  """What a retrieval evaluation keeps: the metrics, each row's candidates and their re-ranked
  scores (i2t: [N_img, k] texts; t2i: [N_txt, k] images)."""
  metrics: dict[str, float]
  candidates_i2t: np.ndarray
  scores_i2t: np.ndarray
  candidates_t2i: np.ndarray
  scores_t2i: np.ndarray

  @property
  def num_images(self) -> int:
    return len(self.candidates_i2t)

  @property
  def num_texts(self) -> int:
    return len(self.candidates_t2i)

  def dense(self, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """The reference's matrices: scores_i2t [N_img, N_txt], scores_t2i [N_txt, N_img] (-100 off
    the candidates). Memory N_img x N_txt x 2: for score files and small sets only."""
    return (rerank.dense_scores(self.candidates_i2t, self.scores_i2t, self.num_texts, dtype),
            rerank.dense_scores(self.candidates_t2i, self.scores_t2i, self.num_images, dtype))

  def rankings(self, m: int = 10) -> dict:
    """Best-first indices: {'image_to_text': [N_img][m], 'text_to_image': [N_txt][m]} (ties: the
    lower index first, as the metrics)."""
    return {"image_to_text": rerank.top_columns(self.candidates_i2t, self.scores_i2t,
                                                self.num_texts, m),
            "text_to_image": rerank.top_columns(self.candidates_t2i, self.scores_t2i,
                                                self.num_images, m)}


def _count_misses(txt_ranks, img_ranks, bad_images, txt2img):
  """Rows of unreadable images (and the texts whose image it is) ranked last: misses."""
  if bad_images is None or not bad_images.any():
    return txt_ranks, img_ranks
  miss = np.iinfo(np.int64).max  # beyond every R@k
  txt_ranks = np.where(bad_images, miss, txt_ranks)
  gt_bad = np.asarray([bad_images[np.asarray(g).reshape(-1)].any() for g in txt2img])
  return txt_ranks, np.where(gt_bad, miss, img_ranks)


def rerank_and_score(params, emb: dict, img2txt, txt2img, *, k_test: int, batch_size: int,
                     fns: dict, mesh: Mesh | None = None, include_itc: bool = False,
                     log_fn: Callable[[str], Any] = logging.info,
                     bad_images: np.ndarray | None = None) -> RetrievalResult:
  """Steps 2-4 of the module docstring on encoded images and texts: `emb` holds image_embeds
  [>= N_img, 1+N, D], image_feat [N_img, E], text_embeds [>= N_txt, L, H], text_feat [N_txt, E],
  text_atts [N_txt, L] (device arrays). `bad_images` [N_img] bool: images that could not be
  decoded; their rows, and the rows of the texts that describe them, count as misses."""
  n_img, n_txt = len(emb["image_feat"]), len(emb["text_feat"])
  k_i2t, k_t2i = min(k_test, n_txt), min(k_test, n_img)
  t0 = time.monotonic()
  _, cand_i2t = top_k_candidates(emb["image_feat"], emb["text_feat"], k_i2t, fns=fns, mesh=mesh)
  _, cand_t2i = top_k_candidates(emb["text_feat"], emb["image_feat"], k_t2i, fns=fns, mesh=mesh)
  log_fn(f"top-{k_test} candidates by ITC in {time.monotonic() - t0:.1f}s")

  # Groups of k texts per image (an image with its own candidates fills one), the rest of each
  # image's texts in groups of k / 8: two compiled shapes, little padding.
  sizes = (k_i2t, max(1, k_i2t // 8)) if k_i2t > 1 else (1,)

  def rows_per_call(group: int) -> int:
    return common.round_batch_size(max(1, batch_size // group), mesh)

  def score(rows, texts):  # the reference re-ranks by the raw class-1 logit
    return fns["pair_itm"](params, emb["image_embeds"], emb["text_embeds"], emb["text_atts"],
                           common.put_batch(rows, mesh), common.put_batch(texts, mesh))[:, 1]

  scores_i2t, scores_t2i = rerank.rerank(cand_i2t, cand_t2i, score, group_sizes=sizes,
                                         rows_per_call=rows_per_call, log_fn=log_fn)
  misses = functools.partial(_count_misses, bad_images=bad_images, txt2img=txt2img)
  metrics = metrics_lib.metrics_from_ranks(*misses(
      metrics_lib.ranks_from_candidates(cand_i2t, scores_i2t, img2txt, n_txt),
      metrics_lib.ranks_from_candidates(cand_t2i, scores_t2i, txt2img, n_img)))
  if bad_images is not None and bad_images.any():
    metrics["bad_images"] = float(bad_images.sum())
    log_fn(f"{int(bad_images.sum())} unreadable images: their rows and their texts' count as "
           "misses")
  if include_itc:
    itc = metrics_lib.metrics_from_ranks(*misses(
        itc_ranks(emb["image_feat"], emb["text_feat"], img2txt, fns=fns, mesh=mesh),
        itc_ranks(emb["text_feat"], emb["image_feat"], txt2img, fns=fns, mesh=mesh)))
    log_fn(f"retrieval R@1: ITC txt {itc['txt_r1']:.2f} img {itc['img_r1']:.2f} | ITM re-ranked "
           f"(k={k_test}) txt {metrics['txt_r1']:.2f} img {metrics['img_r1']:.2f}")
    metrics.update({f"itc_{k}": v for k, v in itc.items()})
  return RetrievalResult(metrics, cand_i2t, scores_i2t, cand_t2i, scores_t2i)


def evaluate_retrieval(model, params, data: dict, *, k_test: int, batch_size: int,
                       mesh: Mesh | None = None, include_itc: bool = False,
                       log_fn: Callable[[str], Any] = logging.info, fns: dict | None = None
                       ) -> RetrievalResult:
  """Zero-shot / fine-tuned retrieval evaluation (module docstring).

  Args:
    model: `X2VLM` (deterministic apply). params: its params (unboxed; host or device).
    data: `tasks.retrieval.load_retrieval_eval` output: images ([N_img, R, R, 3] f32
      CLIP-normalised or uint8 pixels, or `EvalImages`), text_ids [N_txt, L] i32, text_atts
      [N_txt, L] i32, txt2img [N_txt], img2txt (N_img lists).
    k_test: candidates re-scored with ITM per row (clamped to the number of candidates).
    batch_size: images / texts per encoding call, and ~pairs per ITM call (rounded to whole
      groups of k_test texts).
    mesh: optional device mesh; batches are split over ('data', 'fsdp').
    include_itc: also the ITC-only metrics as `itc_<key>` (and a log line ITC vs ITM R@1).
    log_fn: receives progress lines.
    fns: `make_retrieval_fns(model, mesh)` made once by the caller (default: made here).

  Returns:
    a `RetrievalResult` (metrics in percent: `retrieval_metrics` keys [+ `itc_*`]).
  """
  common.check_batch_size(batch_size, mesh)
  n_img, n_txt = len(data["images"]), len(data["text_ids"])
  params = common.place_params(params, mesh)
  fns = fns or make_retrieval_fns(model, mesh)
  t0 = time.monotonic()
  image_embeds, image_feat = encode_images(params, data["images"], batch_size=batch_size,
                                           fns=fns, mesh=mesh)
  text_embeds, text_feat, text_atts = encode_texts(params, data["text_ids"], data["text_atts"],
                                                   batch_size=batch_size, fns=fns, mesh=mesh)
  log_fn(f"encoded {n_img} images and {n_txt} texts in {time.monotonic() - t0:.1f}s")
  emb = dict(image_embeds=image_embeds, image_feat=image_feat, text_embeds=text_embeds,
             text_feat=text_feat, text_atts=text_atts)
  result = rerank_and_score(params, emb, data["img2txt"], data["txt2img"], k_test=k_test,
                            batch_size=batch_size, fns=fns, mesh=mesh, include_itc=include_itc,
                            log_fn=log_fn, bad_images=bad_mask(data["images"]))
  log_fn(f"done in {time.monotonic() - t0:.1f}s, r_mean {result.metrics['r_mean']:.2f}")
  return result


def evaluate_multilingual_retrieval(
    model, params, data: dict, *, k_test: int, batch_size: int, mesh: Mesh | None = None,
    include_itc: bool = False, log_fn: Callable[[str], Any] = logging.info,
    fns: dict | None = None) -> dict[str, RetrievalResult]:
  """Retrieval per language over one image set (Multi30K, multilingual COCO): the images are
  encoded once, then each language's captions are encoded, ranked and re-ranked against them.

  Args:
    data: `tasks.retrieval.load_multilingual_retrieval_eval` output: images and languages
      {lang: dict(text_ids, text_atts, txt2img, img2txt)}.
    Others as `evaluate_retrieval`.
  Returns:
    {lang: RetrievalResult}.
  """
  common.check_batch_size(batch_size, mesh)
  params = common.place_params(params, mesh)
  fns = fns or make_retrieval_fns(model, mesh)
  t0 = time.monotonic()
  image_embeds, image_feat = encode_images(params, data["images"], batch_size=batch_size,
                                           fns=fns, mesh=mesh)
  log_fn(f"encoded {len(data['images'])} images in {time.monotonic() - t0:.1f}s")
  results = {}
  for lang, texts in data["languages"].items():
    text_embeds, text_feat, text_atts = encode_texts(
        params, texts["text_ids"], texts["text_atts"], batch_size=batch_size, fns=fns, mesh=mesh)
    emb = dict(image_embeds=image_embeds, image_feat=image_feat, text_embeds=text_embeds,
               text_feat=text_feat, text_atts=text_atts)
    results[lang] = rerank_and_score(
        params, emb, texts["img2txt"], texts["txt2img"], k_test=k_test, batch_size=batch_size,
        fns=fns, mesh=mesh, include_itc=include_itc,
        log_fn=lambda line, lang=lang: log_fn(f"[{lang}] {line}"),
        bad_images=bad_mask(data["images"]))
    log_fn(f"[{lang}] {len(texts['text_ids'])} texts, r_mean "
           f"{results[lang].metrics['r_mean']:.2f} ({time.monotonic() - t0:.1f}s)")
  return results


# --------------------------------------------------------------------------------------------
# Prediction files.

TOP_RANKED = 10


def write_outputs(predictions_dir: str | None, stem: str, result: RetrievalResult, *,
                  save_scores: bool = False, scores_dtype: str = "float32") -> None:
  """`<stem>_rankings.json` (top 10 texts of every image and top 10 images of every text) and,
  with `save_scores`, `<stem>_scores.npz` (the reference's re-ranked score matrices in
  `scores_dtype`, float32 or float16; tools/score_retrieval.py reads it)."""
  if not predictions_dir:
    return
  os.makedirs(predictions_dir, exist_ok=True)
  with open(os.path.join(predictions_dir, f"{stem}_rankings.json"), "w") as f:
    json.dump(result.rankings(TOP_RANKED), f)
  if save_scores:
    if scores_dtype not in ("float32", "float16"):
      raise ValueError(f"scores_dtype {scores_dtype!r}: expected float32 or float16")
    metrics_lib.save_scores(os.path.join(predictions_dir, f"{stem}_scores.npz"),
                            *result.dense(np.dtype(scores_dtype)))
