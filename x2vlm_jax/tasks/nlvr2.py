"""NLVR2: is a sentence true of a pair of images? (the reference's `XVLMForNLVR`).

Records `{"images": [path0, path1], "sentence", "label": "True" | "False" | bool | 0 | 1}`; keys
`config.data.nlvr2.image_key` / `caption_key` / `label_key`.

Fine-tuning: each image gets its own RandomResizedCrop(scale=(crop_scale_min, 1)), flip and
RandAugment (reference); the sentence is never rewritten ("left"/"right" name the images, not
sides within one). Batch: image0, image1 [B, R, R, 3] f32, text_ids / text_atts [B, L] i32 (the
sentence), label [B] i32 (1 = true). Objective: both images through the ViT in one batch, the
sentence fused with each, the two fused [CLS] concatenated into the head `nlvr_cls` (2 logits,
new, lr x lr_mult) -> {nlvr}: softmax cross-entropy.

Evaluator type "nlvr2", one split per file of records as above (the keys "images", "sentence",
"label"): the arg-max of the head -> eval/<name>/<split>/acc (percent). No prediction files.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from x2vlm_jax import losses
from x2vlm_jax.data import config as data_config
from x2vlm_jax.data import eval_data, examples, pipeline
from x2vlm_jax.data import text as text_lib
from x2vlm_jax.evaluate import common
from x2vlm_jax.models import x2vlm
from x2vlm_jax.tasks import base

BadDataError = eval_data.BadDataError
BadRecordError = examples.BadRecordError
HEAD = "nlvr_cls"


# ------------------------------------------------------------------------------ training data
def nlvr_label(value: Any) -> int:
  """NLVR2 labels are "True"/"False" strings or booleans (or 0/1) -> 1/0."""
  if isinstance(value, bool):
    return int(value)
  if isinstance(value, int) and value in (0, 1):
    return value
  if isinstance(value, str) and value.strip().lower() in ("true", "false"):
    return int(value.strip().lower() == "true")
  raise BadRecordError(f"label must be True/False, found {value!r:.80}")


class NlvrProcessor(examples.Processor):
  """A record -> image0, image1, the sentence's text fields, label i32 (module docstring)."""

  def __init__(self, cfg, sub, image_res: int, patch_size: int, encoder: text_lib.TextEncoder):
    super().__init__(cfg, sub, image_res, patch_size, encoder)
    self.crop_scale = (float(sub.crop_scale_min), 1.0)
    self.label_key = sub.label_key

  def process(self, where: str, rec: dict, rng: np.random.Generator) -> dict:
    sentence = rec.get(self.caption_key)
    if not isinstance(sentence, str):
      raise BadRecordError(f"{self.caption_key!r} must be a string, found {sentence!r:.80}")
    paths = rec.get(self.image_key)
    if not isinstance(paths, list) or len(paths) != 2:
      raise BadRecordError(f"{self.image_key!r} must list two images, found {paths!r:.80}")
    label = nlvr_label(rec.get(self.label_key))
    out = self.encoder(sentence, rng)
    for k, path in enumerate(paths):
      img = self._image({self.image_key: path})
      flipped = bool(rng.random() < self.hflip_prob)
      out[f"image{k}"] = self._augment(img, rng, self.crop_scale, flipped)
    out["label"] = np.int32(label)
    return {k: out[k] for k in BATCH_FIELDS}


BATCH_FIELDS = dict(image0=np.float32, image1=np.float32, text_ids=np.int32, text_atts=np.int32,
                    label=np.int32)


def collate(examples_, rng=None) -> dict:
  """Examples -> {image0, image1 [B,R,R,3] f32, text_ids/atts [B,L] i32, label [B] i32}."""
  del rng
  return pipeline.stack_fields(examples_, BATCH_FIELDS)


# ------------------------------------------------------------------------------ the model
def nlvr_logits(m, batch, deterministic: bool = True) -> jax.Array:
  """`image0, image1 [B, H, W, 3]`, sentence `text_ids/atts [B, L]` -> [B, 2] f32 (1 = true).
  Both images go through the ViT in one batch; the sentence is fused with each."""
  batch_size = batch["image0"].shape[0]
  images = jnp.concatenate([batch["image0"], batch["image1"]])
  image_embeds = m.encode_image(images, deterministic)
  image_atts = jnp.ones(image_embeds.shape[:2], jnp.int32)
  text_embeds = m.encode_text(batch["text_ids"], batch["text_atts"], deterministic)
  text_both = jnp.concatenate([text_embeds, text_embeds])
  atts_both = jnp.concatenate([batch["text_atts"], batch["text_atts"]])
  cross = m.fuse(image_embeds, image_atts, text_both, atts_both, deterministic)
  return m.head_logits(HEAD, cross[:batch_size], cross[batch_size:])


# ------------------------------------------------------------------------------ evaluation
def load_nlvr_eval(path: str, image_root: str, image_res: int, tokenizer, max_tokens: int, *,
                   max_words: int | None = None, exif_transpose: bool = True,
                   decode_workers: int = 0) -> dict:
  """`{"images": [a, b], "sentence", "label"}` records -> dict(images0, images1: `EvalImages`
  [N] (uint8, decoded batch by batch, by `decode_workers` grain processes if > 0), where [N],
  text_ids / text_atts [N, L] i32, label [N] i32). A bad record or a missing image fails naming
  its record."""
  recs = eval_data.read_split(path, "examples")
  paths0, paths1, sentences, labels = [], [], [], []
  for where, rec in recs:
    images, sentence = rec.get("images"), rec.get("sentence")
    if not isinstance(images, list) or len(images) != 2:
      raise BadDataError(f"{where}: 'images' must list two image paths")
    if not isinstance(sentence, str):
      raise BadDataError(f"{where}: 'sentence' must be a string")
    paths0.append(eval_data.image_path({"image": images[0]}, where, image_root))
    paths1.append(eval_data.image_path({"image": images[1]}, where, image_root))
    sentences.append(sentence)
    try:
      labels.append(nlvr_label(rec.get("label")))
    except BadRecordError as e:
      raise BadDataError(f"{where}: {e}") from e
  where = [w for w, _ in recs]
  eval_data.check_files_exist(paths0 + paths1, where + where)
  text_ids, text_atts = eval_data.encode_texts(
      sentences, where, eval_data.as_tokenizer(tokenizer), max_tokens,
      max_tokens if max_words is None else max_words)
  images = [eval_data.EvalImages(paths, where, image_res, exif_transpose=exif_transpose,
                                 decode_workers=decode_workers) for paths in (paths0, paths1)]
  return dict(images0=images[0], images1=images[1], where=where, text_ids=text_ids,
              text_atts=text_atts, label=np.asarray(labels, np.int32))


def make_nlvr_fn(model, mesh: jax.sharding.Mesh | None = None) -> Callable[..., jax.Array]:
  """Jitted `(params, image0, image1 [B, R, R, 3], ids [B, L], atts [B, L]) -> predicted labels
  [B] i32` (the arg-max of the head)."""
  from x2vlm_jax import sharding as sharding_lib

  out = {} if mesh is None else dict(out_shardings=sharding_lib.replicated(mesh))

  def predict(params, image0, image1, ids, atts):
    common.TRACE_COUNTS["nlvr_logits"] += 1
    batch = dict(image0=image0, image1=image1, text_ids=ids, text_atts=atts)
    logits = model.apply({"params": params}, batch, method=nlvr_logits)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)

  return jax.jit(predict, **out)


class NlvrEvaluator(common.Evaluator):
  """Accuracy per split (module docstring)."""

  TYPE = "nlvr2"

  @classmethod
  def default_config(cls):
    cfg = super().default_config()
    cfg.update(dict(
        files=(),  # {"images": [a, b], "sentence", "label"} records, one file per split
        image_root="",
    ))
    return cfg

  def __init__(self, name, cfg, *, config, model, mesh=None):
    super().__init__(name, cfg, config=config, model=model, mesh=mesh)
    model.head(HEAD)  # the model must have the head (a ValueError naming its heads)
    d = config.data
    tokenizer = text_lib.load_tokenizer(d.vocab_path)
    self.splits = [(split, load_nlvr_eval(
        path, cfg.image_root, config.model.image_res, tokenizer, d.max_tokens,
        max_words=d.max_words, exif_transpose=d.exif_transpose,
        decode_workers=cfg.decode_workers))
                   for path, split in common.named_splits(cfg.files, self.field("files"))]
    self.fn = make_nlvr_fn(model, mesh)

  def run(self, params, step=0, *, predictions_dir=None):
    del predictions_dir  # no prediction files
    params = common.place_params(params, self.mesh)
    results = {}
    for split, data in self.splits:
      t0 = time.monotonic()
      pred = common.run_batched(
          lambda x0, x1, i, a: self.fn(params, x0, x1, i, a),
          (data["images0"], data["images1"], data["text_ids"], data["text_atts"]),
          self.batch_size, self.mesh, name=f"eval/{self.name}/{split}", log_every=50)
      pred = np.asarray(jax.device_get(pred))
      bad = data["images0"].bad_mask() | data["images1"].bad_mask()  # unreadable: a miss
      accuracy = 100.0 * float(np.mean((pred == data["label"]) & ~bad))
      results[self.metric_name(split, "acc")] = accuracy
      self.log(f"{split}: {len(pred)} examples in {time.monotonic() - t0:.1f}s, accuracy "
               f"{accuracy:.2f}")
    return results


# ------------------------------------------------------------------------------ the task
class Nlvr2Task(base.Task):
  """See the module docstring."""

  name = "nlvr2"
  loss_terms = ("nlvr",)
  new_params = (r"^nlvr_cls/",)
  allow_missing = ("nlvr_cls/*",)
  evaluators = {NlvrEvaluator.TYPE: NlvrEvaluator}

  def config(self):
    return data_config.image_section(
        image_key="images",  # [path0, path1]
        caption_key="sentence",
        label_key="label",  # "True" | "False" | bool | 0 | 1
    )

  def model_changes(self, config):
    return {"heads": (x2vlm.TaskHead(HEAD, 2, 2),)}

  def processor(self, config, tokenizer):
    encoder = text_lib.TextEncoder.from_config(config.data, tokenizer)
    return NlvrProcessor(config.data, self.section(config), config.model.image_res,
                         config.model.patch_size, encoder)

  def collate(self, config):
    return collate

  def loss(self, m, batch, rng, *, deterministic, config):
    del rng  # no sampling
    return {"nlvr": losses.classification_loss(nlvr_logits(m, batch, deterministic),
                                               batch["label"])}


TASK = Nlvr2Task()
