"""Winoground (Thrush et al., CVPR 2022): compositional image-text matching, evaluation only.

A group holds two images and two captions with the same words in another order, caption c
describing image c ("a red circle left of a blue square" / "a blue square left of a red
circle"). With s(c, i) the score of caption c with image i (an array s [G, 2, 2] indexed
[group, caption, image]), a group counts as correct for

  text   s(c0, i0) > s(c1, i0) and s(c1, i1) > s(c0, i1)   (each image prefers its caption)
  image  s(c0, i0) > s(c0, i1) and s(c1, i1) > s(c1, i0)   (each caption prefers its image)
  group  text and image

Comparisons are strict: a tie (equal scores) is a failure, as in the paper. Scores come from two
heads of the same model: the ITM head (the match probability softmax(logits)[1]; its decisions
compare the log-odds logit_1 - logit_0, which orders pairs exactly as the probability does but
cannot saturate into a tie at 1.0 in float32; the raw class-1 logit that retrieval re-ranks by
may order them differently) and the ITC cosine of the image and text features.

Data: Winoground's released layout, `examples.jsonl` with records {"id", "image_0", "image_1",
"caption_0", "caption_1", "tag", "secondary_tag", "num_main_preds", "collapsed_tag"} (JSONL or a
JSON list); image_0 / image_1 are file stems: `<stem>.png` (else .jpg, .jpeg; a stem that already
ends in one of them is used as it is) in `image_root/images/` or `image_root/`, `image_root`
defaulting to the folder of the file. A group that cannot be scored (a record that is not a JSON
object, a missing image field or file, an image that cannot be decoded, a caption that is empty
or empty after cleaning) is logged with its id and the reason, counted (`bad_groups`) and scored
as a failure in every score: it stays in every denominator.

Evaluator type "winoground" (`file`, `image_root`): both images and both captions of every group
are encoded once, in batches split over the mesh; the four fusions of a group run in one jitted
call over a batch of groups (each image's cross-attention keys / values shared by its two
captions) -> eval/<name>/<split>/{text, image, group} (ITM) and
eval/<name>/<split>/itc_{text, image, group}, percent of groups; with `per_tag`, the same six
per collapsed_tag as eval/<name>/<split>/<tag>/... (tag lower-cased: object, relation, both),
and eval/<name>/<split>/bad_groups when there are any. <split> is `split`, default the file's
stem. With `predictions_dir`: winoground_<name>_<split>.jsonl, one line per group: id, source
(file:line), collapsed_tag, the pair scores `itm` (probability), `itm_log_odds` and `itc` as
{"c0_i0", "c0_i1", "c1_i0", "c1_i1"} (null for a bad group), the six correct flags ("text", ...,
"itc_group") and `bad` (the reason) for a group that could not be scored.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from x2vlm_jax.data import eval_data, records
from x2vlm_jax.data import text as text_lib
from x2vlm_jax.evaluate import common
from x2vlm_jax.evaluate import retrieval as engine
from x2vlm_jax.tasks import base

BadDataError = eval_data.BadDataError
EXTENSIONS = (".png", ".jpg", ".jpeg")  # tried in this order for a stem without one
PAIRS = ("c0_i0", "c0_i1", "c1_i0", "c1_i1")  # s[g].ravel() order: [caption, image]
_LOGGED_BAD = 10  # bad groups named one by one in the log (all of them in the predictions file)


# ------------------------------------------------------------------------------ the scores
def winoground_correct(s: Any) -> dict[str, np.ndarray]:
  """s [G, 2, 2] (s[g, c, i]: caption c with image i) -> {text, image, group: [G] bool}.

  Strict '>': a tie fails, and so does a NaN (every comparison with NaN is False)."""
  s = np.asarray(s, np.float64)
  text = (s[:, 0, 0] > s[:, 1, 0]) & (s[:, 1, 1] > s[:, 0, 1])
  image = (s[:, 0, 0] > s[:, 0, 1]) & (s[:, 1, 1] > s[:, 1, 0])
  return {"text": text, "image": image, "group": text & image}


def percent_correct(correct: dict[str, np.ndarray], bad: np.ndarray) -> dict[str, float]:
  """{score: [G] bool} and bad [G] bool -> {score: % of the G groups correct}, a bad group
  counted as a failure (it stays in the denominator)."""
  return {k: 100.0 * float(np.mean(v & ~bad)) for k, v in correct.items()}


# ------------------------------------------------------------------------------ the data
def image_roots(image_root: str, file: str) -> tuple[str, str]:
  """The folders searched for a group's images: `image_root` (default: the folder of `file`)
  and its `images/` (the released layout)."""
  root = image_root or os.path.dirname(os.path.abspath(file))
  return root, os.path.join(root, "images")


def resolve_image(stem: str, roots: Sequence[str]) -> str | None:
  """The first existing file `<root>/<stem><ext>` over `roots` and `EXTENSIONS` (the stem alone
  when it already ends in one of them; an absolute stem ignores the roots), or None."""
  bases = [stem] if os.path.isabs(stem) else [os.path.join(root, stem) for root in roots]
  has_ext = os.path.splitext(stem)[1].lower() in EXTENSIONS
  for base in bases:
    for path in [base] if has_ext else [base + ext for ext in EXTENSIONS]:
      if os.path.isfile(path):
        return path
  return None


def parse_group(rec: dict, roots: Sequence[str], max_words: int
                ) -> tuple[list[str], list[str]]:
  """A Winoground record -> ([image_0 path, image_1 path], [caption_0, caption_1]).

  Raises:
    records.BadRecordError: the reason the group cannot be scored.
  """
  paths, captions = [], []
  for k in (0, 1):
    stem = rec.get(f"image_{k}")
    if not isinstance(stem, str) or not stem:
      raise records.BadRecordError(f"image_{k} is missing or not a file stem: {stem!r:.60}")
    path = resolve_image(stem, roots)
    if path is None:
      raise records.BadRecordError(
          f"no image file for image_{k} {stem!r} (tried {'/'.join(EXTENSIONS)} in "
          f"{' and '.join(roots)})")
    paths.append(path)
  for k in (0, 1):
    caption = rec.get(f"caption_{k}")
    try:
      text_lib.pre_caption(caption, max_words)
    except text_lib.EmptyCaptionError:
      raise records.BadRecordError(f"caption_{k} is empty (after cleaning) or not a string: "
                                   f"{caption!r:.60}") from None
    captions.append(caption)
  return paths, captions


@dataclasses.dataclass
class WinogroundData:
  """One split: G groups, of which G' (`good`) go through the model.

  ids [G] (the record's "id", else its file:line), where [G] (file:line), tags [G]
  (collapsed_tag or None), bad {group index: reason} (found when read), good [G'] int (the
  groups scored: group good[k] has images rows 2k, 2k + 1 of `images` and captions rows 2k,
  2k + 1 of text_ids / text_atts), images `EvalImages` [2G'], text_ids / text_atts [2G', L]."""
  file: str
  ids: list
  where: list[str]
  tags: list[str | None]
  bad: dict[int, str]
  good: np.ndarray
  images: Any
  text_ids: np.ndarray
  text_atts: np.ndarray

  def __len__(self) -> int:
    return len(self.ids)


def _log_bad(file: str, ids: list, bad: dict[int, str]) -> None:
  """Names the first `_LOGGED_BAD` bad groups (id and reason) in the log, counts the rest."""
  for g in sorted(bad)[:_LOGGED_BAD]:
    logging.warning("Winoground %s: group %s: %s; scored as a failure", file, ids[g], bad[g])
  if len(bad) > _LOGGED_BAD:
    logging.warning("Winoground %s: %d more bad groups (all named in the predictions file)",
                    file, len(bad) - _LOGGED_BAD)


def load_winoground(path: str, image_root: str, image_res: int, tokenizer, max_tokens: int, *,
                    max_words: int | None = None, exif_transpose: bool = True,
                    decode_workers: int = 0) -> WinogroundData:
  """Winoground records (module docstring) -> `WinogroundData`. A bad group is kept, named and
  marked bad; a file that is missing, empty or without one scorable group raises."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no file {path}")
  max_words = max_tokens if max_words is None else max_words
  roots = image_roots(image_root, path)
  source = records.make_source([path])
  if len(source) == 0:
    raise BadDataError(f"{path}: no groups")
  ids, where, tags, bad, good, paths, captions, rows_where = [], [], [], {}, [], [], [], []
  for g in range(len(source)):
    raw = source[g]
    where.append(raw.where)
    try:
      rec = records.parse_record(raw)
    except records.BadRecordError as e:
      ids.append(raw.where)
      tags.append(None)
      bad[g] = str(e)
      continue
    ids.append(rec.get("id", raw.where))
    tags.append(rec.get("collapsed_tag") if isinstance(rec.get("collapsed_tag"), str) else None)
    try:
      group_paths, group_captions = parse_group(rec, roots, max_words)
    except records.BadRecordError as e:
      bad[g] = str(e)
      continue
    good.append(g)
    paths += group_paths
    captions += group_captions
    rows_where += [f"{raw.where} (group {ids[g]}, image_{k})" for k in (0, 1)]
  _log_bad(path, ids, bad)
  if not good:
    raise BadDataError(f"{path}: none of its {len(source)} groups can be scored (first: "
                       f"{where[0]}: {bad[0]}); is image_root right?")
  text_ids, text_atts = eval_data.encode_texts(
      captions, rows_where, eval_data.as_tokenizer(tokenizer), max_tokens, max_words)
  images = eval_data.EvalImages(paths, rows_where, image_res, exif_transpose=exif_transpose,
                                decode_workers=decode_workers)
  return WinogroundData(path, ids, where, tags, bad, np.asarray(good, np.int64), images,
                        text_ids, text_atts)


# ------------------------------------------------------------------------------ the model
def make_group_scores_fn(model, mesh: jax.sharding.Mesh | None = None,
                         fns: dict | None = None) -> Callable[..., tuple[jax.Array, ...]]:
  """Jitted `(params, image_embeds [>= N, 1+P, D], image_feat [N, E], text_embeds [>= N, L, H],
  text_feat [N, E], text_atts [N, L], rows [B, 2] i32) -> (itm_prob, itm_log_odds, itc), each
  [B, 2, 2] float32 indexed [group, caption, image]`: group b's images are rows rows[b] of the
  image arrays and its captions rows rows[b] of the text arrays. The 4B fusions go through
  `fns["pair_itm"]` (`evaluate.retrieval.make_retrieval_fns`) grouped by image: each image's
  keys / values are projected once for its two captions."""
  from x2vlm_jax import sharding as sharding_lib

  fns = fns or engine.make_retrieval_fns(model, mesh)
  out = {} if mesh is None else dict(out_shardings=sharding_lib.replicated(mesh))

  def group_scores(params, image_embeds, image_feat, text_embeds, text_feat, text_atts, rows):
    common.TRACE_COUNTS["winoground_scores"] += 1
    b = rows.shape[0]
    # Pairs in (group, image, caption) order: image rows[b, i] with text rows[b, 0], rows[b, 1].
    pair_texts = jnp.broadcast_to(rows[:, None, :], (b, 2, 2)).reshape(-1)
    logits = fns["pair_itm"](params, image_embeds, text_embeds, text_atts, rows.reshape(-1),
                             pair_texts).reshape(b, 2, 2, 2).swapaxes(1, 2)  # [b, c, i, class]
    prob = jax.nn.softmax(logits, axis=-1)[..., 1]
    log_odds = logits[..., 1] - logits[..., 0]
    image = jnp.take(image_feat, rows, axis=0).astype(jnp.float32)  # [B, 2 (image), E]
    text = jnp.take(text_feat, rows, axis=0).astype(jnp.float32)  # [B, 2 (caption), E]
    itc = jnp.einsum("bce,bie->bci", text, image)
    return prob, log_odds, itc

  return jax.jit(group_scores, **out)


@dataclasses.dataclass
class WinogroundResult:
  """Every group's pair scores (itm_prob, itm_log_odds, itc: [G, 2, 2] [group, caption, image],
  NaN for a bad group), correct flags ({"text", ..., "itc_group"}: [G] bool, False for a bad
  group) and the bad groups {index: reason} (read or decode failures)."""
  scores: dict[str, np.ndarray]
  correct: dict[str, np.ndarray]
  bad: dict[int, str]

  def bad_mask(self) -> np.ndarray:
    mask = np.zeros(len(next(iter(self.correct.values()))), bool)
    mask[sorted(self.bad)] = True
    return mask


def evaluate_winoground(params, data: WinogroundData, *, batch_size: int, fn: Callable,
                        fns: dict, mesh: jax.sharding.Mesh | None = None,
                        log_fn: Callable[[str], Any] = logging.info) -> WinogroundResult:
  """The pair scores and correct flags of every group of `data` (`load_winoground`).

  batch_size: images / captions per encoding call, ~fusions per scoring call (batch_size / 4
  groups, rounded to the mesh). fn: `make_group_scores_fn`; fns: its `make_retrieval_fns`."""
  t0 = time.monotonic()
  params = common.place_params(params, mesh)
  image_embeds, image_feat = engine.encode_images(params, data.images, batch_size=batch_size,
                                                  fns=fns, mesh=mesh)
  text_embeds, text_feat, text_atts = engine.encode_texts(
      params, data.text_ids, data.text_atts, batch_size=batch_size, fns=fns, mesh=mesh)
  rows = np.arange(2 * len(data.good), dtype=np.int32).reshape(-1, 2)
  groups_per_call = common.round_batch_size(max(1, batch_size // 4), mesh)
  scored = common.run_batched(
      lambda r: fn(params, image_embeds, image_feat, text_embeds, text_feat, text_atts, r),
      (rows,), groups_per_call, mesh)
  names = ("itm_prob", "itm_log_odds", "itc")
  scores = {k: np.full((len(data), 2, 2), np.nan, np.float32) for k in names}
  for k, v in zip(names, scored):
    scores[k][data.good] = np.asarray(jax.device_get(v), np.float32)
  bad = dict(data.bad)
  unreadable = engine.bad_mask(data.images)
  if unreadable is not None and unreadable.any():
    found = {}
    for row in np.flatnonzero(unreadable):
      g = int(data.good[row // 2])
      reason = f"image_{row % 2} {data.images.paths[row]} cannot be decoded"
      found[g] = f"{found[g]}; {reason}" if g in found else reason
    _log_bad(data.file, data.ids, found)
    bad.update(found)
    for s in scores.values():  # scored on placeholder pixels: meaningless
      s[sorted(found)] = np.nan
  mask = np.zeros(len(data), bool)
  mask[sorted(bad)] = True
  correct = {}
  for prefix, key in (("", "itm_log_odds"), ("itc_", "itc")):
    for score, flags in winoground_correct(scores[key]).items():
      correct[prefix + score] = flags & ~mask
  log_fn(f"{len(data)} groups ({len(bad)} bad) in {time.monotonic() - t0:.1f}s")
  return WinogroundResult(scores, correct, bad)


def winoground_metrics(result: WinogroundResult, tags: Sequence[str | None], *,
                       per_tag: bool = True) -> dict[str, float]:
  """{"text", "image", "group", "itc_text", ...: percent of groups} (+ "bad_groups" when any;
  with `per_tag`, "<tag>/<score>" over each collapsed_tag's groups, tag lower-cased)."""
  mask = result.bad_mask()
  metrics = percent_correct(result.correct, mask)
  if mask.any():
    metrics["bad_groups"] = float(mask.sum())
  if per_tag:
    tags = np.asarray([t if t is not None else "" for t in tags], object)
    for tag in sorted({t for t in tags if t}):
      name = re.sub(r"[^a-z0-9]+", "_", tag.lower()).strip("_") or "tag"
      chosen = tags == tag
      for k, v in percent_correct({k: v[chosen] for k, v in result.correct.items()},
                                  mask[chosen]).items():
        metrics[f"{name}/{k}"] = v
  return metrics


def write_predictions(path: str, data: WinogroundData, result: WinogroundResult) -> None:
  """One JSON line per group (module docstring)."""
  def pairs(s):
    return None if np.isnan(s).any() else dict(zip(PAIRS, (float(v) for v in s.ravel())))

  with open(path, "w") as out:
    for g in range(len(data)):
      line = {"id": data.ids[g], "source": data.where[g], "collapsed_tag": data.tags[g],
              **{k: pairs(result.scores[key][g]) for k, key in
                 (("itm", "itm_prob"), ("itm_log_odds", "itm_log_odds"), ("itc", "itc"))},
              **{k: bool(v[g]) for k, v in result.correct.items()}}
      if g in result.bad:
        line["bad"] = result.bad[g]
      out.write(json.dumps(line) + "\n")


# ------------------------------------------------------------------------------ the evaluator
class WinogroundEvaluator(common.Evaluator):
  """Winoground text / image / group scores of the ITM and ITC heads (module docstring)."""

  TYPE = "winoground"

  @classmethod
  def default_config(cls):
    cfg = super().default_config()
    cfg.update(dict(
        file="",  # examples.jsonl of Winoground's released layout
        image_root="",  # the folder of images/<stem>.png (or of the images); "" = file's folder
        split="",  # the metrics' <split>; "" = the file's stem
        per_tag=True,  # also the scores per collapsed_tag (Object / Relation / Both)
    ))
    return cfg

  def __init__(self, name, cfg, *, config, model, mesh=None):
    super().__init__(name, cfg, config=config, model=model, mesh=mesh)
    if not cfg.file:
      raise ValueError(f"{self.field('file')} is empty: name Winoground's examples.jsonl")
    d = config.data
    self.split = cfg.split or common.split_name(cfg.file)
    self.data = load_winoground(cfg.file, cfg.image_root, config.model.image_res,
                                text_lib.load_tokenizer(d.vocab_path), d.max_tokens,
                                max_words=d.max_words, exif_transpose=d.exif_transpose,
                                decode_workers=cfg.decode_workers)
    self.fns = engine.make_retrieval_fns(model, mesh)
    self.fn = make_group_scores_fn(model, mesh, self.fns)

  def run(self, params, step=0, *, predictions_dir=None):
    del step
    result = evaluate_winoground(params, self.data, batch_size=self.batch_size, fn=self.fn,
                                 fns=self.fns, mesh=self.mesh,
                                 log_fn=lambda line: self.log(f"{self.split}: {line}"))
    metrics = winoground_metrics(result, self.data.tags, per_tag=self.cfg.per_tag)
    self.log(f"{self.split}: ITM text {metrics['text']:.2f} image {metrics['image']:.2f} group "
             f"{metrics['group']:.2f} | ITC text {metrics['itc_text']:.2f} image "
             f"{metrics['itc_image']:.2f} group {metrics['itc_group']:.2f}")
    if predictions_dir:
      os.makedirs(predictions_dir, exist_ok=True)
      write_predictions(os.path.join(predictions_dir, f"winoground_{self.name}_{self.split}.jsonl"),
                        self.data, result)
    return {self.metric_name(self.split, k): v for k, v in metrics.items()}


# ------------------------------------------------------------------------------ the task
class WinogroundTask(base.Task):
  """Evaluation only: no data section fields, no objective; its evaluator type "winoground"."""

  name = "winoground"
  evaluators = {WinogroundEvaluator.TYPE: WinogroundEvaluator}

  def config(self):
    return ml_collections.ConfigDict()  # nothing to train on

  def validate(self, config):
    raise ValueError("config.train.tasks.winoground: Winoground is evaluation only; drop it from "
                     "config.train.tasks and add config.evals.<name> = "
                     "evaluator('winoground', file=..., image_root=...)")


TASK = WinogroundTask()
