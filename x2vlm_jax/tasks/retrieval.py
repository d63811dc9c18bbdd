"""Image-text retrieval (COCO, Flickr30K; multilingual: Multi30K, multilingual COCO).

Fine-tuning (the reference's `XVLMForRetrieval`): image-text batches (records and transform as
`image_text`, fine-tuning crop scale 0.5) -> {itc, itm}; captions of the same image (equal
`image_idx`, from "image_id" or the path) share the ITC target mass and are never sampled as each
other's ITM negatives. No MLM.

Evaluators (REFERENCE_DETAILED §4.1; the engine is `evaluate/retrieval.py`):
  type "retrieval": `{"image", "caption": [..]}` records (Karpathy test format, JSONL or a JSON
    list) -> eval/<name>/{txt_r1, txt_r5, txt_r10, img_r1, ..., r_mean} (ITM re-ranked top
    `k_test`) and itc_* (ITC alone); files <name>_rankings.json (top 10 each way) and, with
    `save_scores`, <name>_scores.npz (the full re-ranked score matrices).
  type "multilingual_retrieval": `{"image", "caption": {lang: [..]}}` (one image set, captions
    per language) -> eval/<name>/<lang>/... per language and eval/<name>/mean/... over them;
    files <name>_<lang>_{scores.npz,rankings.json}.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from x2vlm_jax import flops
from x2vlm_jax.data import eval_data
from x2vlm_jax.data import text as text_lib
from x2vlm_jax.evaluate import common
from x2vlm_jax.evaluate import retrieval as engine
from x2vlm_jax.tasks import image_text

BadDataError = eval_data.BadDataError


# ------------------------------------------------------------------------------ evaluation data
def _captions(rec: dict, key: str, where: str, what: str) -> list[str]:
  caps = rec.get(key)
  caps = [caps] if isinstance(caps, str) else caps
  if not isinstance(caps, list) or not caps or not all(isinstance(c, str) for c in caps):
    raise BadDataError(f"{where}: {what} must be a string or a non-empty list of strings")
  return caps


def load_retrieval_eval(path: str, image_root: str, image_res: int, tokenizer, max_tokens: int,
                        *, max_words: int | None = None, exif_transpose: bool = True,
                        decode_workers: int = 0) -> dict:
  """`{"image", "caption": str | [str, ...]}` records -> dict(images: `EvalImages` [N_img]
  (uint8, decoded batch by batch, by `decode_workers` grain processes if > 0), text_ids /
  text_atts [N_txt, L] i32, txt2img [N_txt] i32 (the image of each text), img2txt: N_img lists
  of text indices). A bad record fails naming it."""
  recs = eval_data.read_split(path, "images")
  texts, text_where, txt2img, img2txt, paths = [], [], [], [], []
  for n, (where, rec) in enumerate(recs):
    paths.append(eval_data.image_path(rec, where, image_root))
    img2txt.append([])
    for c in _captions(rec, "caption", where, "'caption'"):
      img2txt[-1].append(len(texts))
      texts.append(c)
      text_where.append(where)
      txt2img.append(n)
  where = [w for w, _ in recs]
  eval_data.check_files_exist(paths, where)
  text_ids, text_atts = eval_data.encode_texts(
      texts, text_where, eval_data.as_tokenizer(tokenizer), max_tokens,
      max_tokens if max_words is None else max_words)
  images = eval_data.EvalImages(paths, where, image_res, exif_transpose=exif_transpose,
                                decode_workers=decode_workers)
  return dict(images=images, text_ids=text_ids, text_atts=text_atts,
              txt2img=np.asarray(txt2img, np.int32), img2txt=img2txt)


def load_multilingual_retrieval_eval(path: str, image_root: str, image_res: int, tokenizer,
                                     max_tokens: int, *, languages: Sequence[str] = (),
                                     max_words: int | None = None,
                                     exif_transpose: bool = True,
                                     decode_workers: int = 0) -> dict:
  """`{"image", "caption": {lang: str | [str]}}` records -> dict(images: `EvalImages`,
  languages: {lang: dict(text_ids, text_atts, txt2img, img2txt) as `load_retrieval_eval`}).

  `languages` selects and orders the languages (default: those of the first record, sorted); every
  record must have at least one caption in each of them, or BadDataError names the record.
  """
  tokenizer = eval_data.as_tokenizer(tokenizer)
  max_words = max_tokens if max_words is None else max_words
  recs = eval_data.read_split(path, "images")
  for where, rec in recs:
    if not isinstance(rec.get("caption"), dict):
      raise BadDataError(f"{where}: 'caption' must map each language to its captions, "
                         f"e.g. {{\"en\": [...], \"de\": [...]}}")
  langs = list(languages) or sorted(recs[0][1]["caption"])
  texts = {lang: dict(texts=[], where=[], txt2img=[], img2txt=[]) for lang in langs}
  paths = []
  for n, (where, rec) in enumerate(recs):
    paths.append(eval_data.image_path(rec, where, image_root))
    for lang in langs:
      caps = rec["caption"].get(lang)
      caps = [caps] if isinstance(caps, str) else caps
      if not isinstance(caps, list) or not caps or not all(isinstance(c, str) for c in caps):
        raise BadDataError(f"{where}: no '{lang}' captions (a string or a non-empty list of "
                           f"strings); languages evaluated: {langs}")
      t = texts[lang]
      t["img2txt"].append(list(range(len(t["texts"]), len(t["texts"]) + len(caps))))
      t["texts"].extend(caps)
      t["where"].extend([where] * len(caps))
      t["txt2img"].extend([n] * len(caps))
  per_lang = {}
  for lang, t in texts.items():
    text_ids, text_atts = eval_data.encode_texts(t["texts"], t["where"], tokenizer, max_tokens,
                                                 max_words)
    per_lang[lang] = dict(text_ids=text_ids, text_atts=text_atts,
                          txt2img=np.asarray(t["txt2img"], np.int32), img2txt=t["img2txt"])
  where = [w for w, _ in recs]
  eval_data.check_files_exist(paths, where)
  images = eval_data.EvalImages(paths, where, image_res, exif_transpose=exif_transpose,
                                decode_workers=decode_workers)
  return dict(images=images, languages=per_lang)


# ------------------------------------------------------------------------------ evaluators
class RetrievalEvaluator(common.Evaluator):
  """Image-text retrieval: ITC similarities, top-k ITM re-ranking both ways (module docstring)."""

  TYPE = "retrieval"

  @classmethod
  def default_config(cls):
    cfg = super().default_config()
    cfg.update(dict(
        file="",  # {"image", "caption": [..]} records
        image_root="",
        k_test=16,  # ITM re-ranking depth per row (reference: 256 COCO, 128 Flickr)
        # Storage of the image / text embeddings the re-ranking reads: bfloat16 halves them
        # (the fusion still computes in the model's dtype).
        embed_dtype="float32",
        save_scores=False,  # also write the full score matrices (<name>_scores.npz)
        scores_dtype="float32",  # ... as float32 or float16
    ))
    return cfg

  def __init__(self, name, cfg, *, config, model, mesh=None):
    super().__init__(name, cfg, config=config, model=model, mesh=mesh)
    if not cfg.file:
      raise ValueError(f"{self.field('file')} is empty: name the evaluation records")
    d = config.data
    self.data = self.load(cfg, text_lib.load_tokenizer(d.vocab_path), config.model.image_res,
                          d.max_tokens, d.max_words, d.exif_transpose)
    self.fns = engine.make_retrieval_fns(model, mesh, cfg.embed_dtype)

  def load(self, cfg, tokenizer, image_res, max_tokens, max_words, exif_transpose):
    return load_retrieval_eval(cfg.file, cfg.image_root, image_res, tokenizer, max_tokens,
                               max_words=max_words, exif_transpose=exif_transpose,
                               decode_workers=cfg.decode_workers)

  def write(self, predictions_dir, stem, result):
    engine.write_outputs(predictions_dir, stem, result, save_scores=self.cfg.save_scores,
                         scores_dtype=self.cfg.scores_dtype)

  def run(self, params, step=0, *, predictions_dir=None):
    result = engine.evaluate_retrieval(
        self.model, params, self.data, k_test=self.cfg.k_test, batch_size=self.batch_size,
        mesh=self.mesh, include_itc=True, log_fn=self.log, fns=self.fns)
    self.write(predictions_dir, self.name, result)
    return {self.metric_name(k): v for k, v in result.metrics.items()}


class MultilingualRetrievalEvaluator(RetrievalEvaluator):
  """Retrieval per language over one image set (images encoded once)."""

  TYPE = "multilingual_retrieval"

  @classmethod
  def default_config(cls):
    cfg = super().default_config()
    cfg.file = ""  # {"image", "caption": {lang: [..]}} records
    cfg.languages = ()  # () = the languages of the first record
    return cfg

  def load(self, cfg, tokenizer, image_res, max_tokens, max_words, exif_transpose):
    return load_multilingual_retrieval_eval(
        cfg.file, cfg.image_root, image_res, tokenizer, max_tokens, languages=tuple(cfg.languages),
        max_words=max_words, exif_transpose=exif_transpose, decode_workers=cfg.decode_workers)

  def run(self, params, step=0, *, predictions_dir=None):
    per_lang = engine.evaluate_multilingual_retrieval(
        self.model, params, self.data, k_test=self.cfg.k_test, batch_size=self.batch_size,
        mesh=self.mesh, include_itc=True, log_fn=self.log, fns=self.fns)
    results = {}
    for lang, result in per_lang.items():
      results.update({self.metric_name(lang, k): v for k, v in result.metrics.items()})
      self.write(predictions_dir, f"{self.name}_{lang}", result)
    for key in next(iter(per_lang.values())).metrics:
      results[self.metric_name("mean", key)] = float(np.mean([r.metrics[key]
                                                              for r in per_lang.values()]))
    return results


# ------------------------------------------------------------------------------ the task
class RetrievalTask(image_text.ImageTextTask):
  """See the module docstring: image-text records, processing and batches, another objective."""

  name = "retrieval"
  loss_terms = ("itc", "itm")
  evaluators = {RetrievalEvaluator.TYPE: RetrievalEvaluator,
                MultilingualRetrievalEvaluator.TYPE: MultilingualRetrievalEvaluator}

  def config(self):
    return image_text.image_text_section()  # fine-tuning crop: RandomResizedCrop(scale 0.5..1)

  def loss(self, m, batch, rng, *, deterministic, config):
    return image_text.image_text_loss(m, batch, rng, deterministic=deterministic, config=config,
                                      with_mlm=False)

  def forward_flops(self, config):
    b = self.section(config).batch_size
    sizes = flops.BatchSizes(images=b, texts=b, text_len=config.data.max_tokens, masks=0)
    return {"vit": flops.vit_flops(config.model, b),
            **flops.aligning_flops(config.model, sizes, with_mlm=False)}


TASK = RetrievalTask()
