"""COCO captioning as UniLM-style MLM generation (the reference's `XVLMForMLMCaptioning`,
`Captioning_MLM.py`, REFERENCE_DETAILED §4.5).

Training records `{"image", "caption": str | [str], optional "image_id"}` (one caption drawn per
visit). Sequence (the reference's `preprocess_fg_free`): tokens = [CLS] + prompt ("a picture of")
+ caption + [SEP], cut to `max_tokens` (a long caption loses its [SEP], as in the reference);
masked positions come from the MLM generator (`text.choose_mask_positions`: mask_prob of the
non-prompt tokens, at most max_masks, whole-word, skipgram) with the prompt excluded. Every chosen
token t gets a [MASK] inserted just before it, sharing t's position id; t itself stays in the
sequence. Visibility mask [L, L] (L = max_tokens + max_masks): lower-triangular, with every
inserted [MASK]'s column zeroed except on its own row, so real tokens never see a [MASK] and a
[MASK] sees the real tokens before it and itself: it predicts t from the left context only,
exactly the situation of a decoding step. The targets are the original tokens at the [MASK] slots.

Batch (B = batch_size, L = max_tokens + max_masks, M = max_masks), int32 unless noted:
  image [B, R, R, 3]    f32: RandomResizedCrop(crop_scale_min..1) -> flip ("left"/"right" swapped
                        in the caption unless data.swap_left_right_on_flip is False) ->
                        RandAugment (colour and geometric ops) -> CLIP normalisation
  text_ids [B, L]       the sequence with inserted [MASK]s, padded with [PAD]
  text_atts [B, L, L]   1 where query i may attend to key j
  position_ids [B, L]   token positions (a [MASK] shares its token's); padding continues counting
  masked_pos [B, M]     slots of the inserted [MASK]s in sequence order (padded with 0)
  masked_ids [B, M]     their target tokens (padded with the [CLS] id: the loss's ignore id)
  masked_weight [B, M]  f32, 1 for real targets
Objective: every text layer over the sequence, cross-attending to the whole image in the fusion
layers; the MLM head (`model.mlm_head`) scores the [MASK] slots with the label-smoothed KL loss
(smoothing `config.data.captioning.label_smoothing`, ignored token [CLS]) -> {caption}.

Evaluator type "captioning", one split per file of `{"image", optional "image_id", optional
"caption": [references]}` records (one per image; repeated images are merged; the image id is
"image_id" when given, else the trailing digits of the file name ("COCO_val2014_000000391895.jpg"
-> 391895, as the reference), else the image path). Decoding (`evaluate/generation.py`) starts
from "[CLS] " + prompt: beam search with `beams` beams (1: greedy), `min_length`..`max_length`
generated tokens, no repeated trigrams, `length_penalty`; each step appends a [MASK] at the next
slot (position id = slot), runs every text layer with the image under a causal mask and reads the
next token from the MLM head at the [MASK] (layer states are recomputed, not cached: bit-for-bit
the training computation). Metrics eval/<name>/<split>/bleu_4 and .../cider (x100,
`evaluate/caption_metrics.score_captions`) when the split has references; <name>_<split>.json
holds the captions in the COCO result format [{"image_id", "caption"}].
"""
from __future__ import annotations

import os
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from x2vlm_jax import losses
from x2vlm_jax.data import config as data_config
from x2vlm_jax.data import eval_data, examples, pipeline
from x2vlm_jax.data import text as text_lib
from x2vlm_jax.evaluate import common, generation
from x2vlm_jax.tasks import base

BadRecordError = examples.BadRecordError
BadDataError = eval_data.BadDataError


# ------------------------------------------------------------------------------ training data
def build_caption_example(ids: Sequence[int], masked: Sequence[int], *, mask_id: int, pad_id: int,
                          ignore_id: int, max_tokens: int, max_masks: int) -> dict[str, np.ndarray]:
  """The fixed-shape training fields (module docstring, without the batch axis) of token ids
  `ids` ([CLS] ... , at most `max_tokens`) whose positions `masked` (at most `max_masks`) get an
  inserted [MASK]."""
  if len(ids) > max_tokens or len(masked) > max_masks:
    raise ValueError(f"{len(ids)} tokens / {len(masked)} masks exceed max_tokens {max_tokens} / "
                     f"max_masks {max_masks}")
  chosen = set(int(p) for p in masked)
  seq, positions, mask_slots, targets = [], [], [], []
  for p, token in enumerate(ids):
    if p in chosen:
      mask_slots.append(len(seq))
      targets.append(int(token))
      seq.append(mask_id)
      positions.append(p)
    seq.append(int(token))
    positions.append(p)
  length = max_tokens + max_masks
  text_ids = np.full((length,), pad_id, np.int32)
  text_ids[: len(seq)] = seq
  position_ids = np.arange(length, dtype=np.int32) - len(seq) + len(ids)
  position_ids[: len(seq)] = positions
  text_atts = np.tril(np.ones((length, length), np.int32))
  text_atts[:, mask_slots] = 0
  text_atts[mask_slots, mask_slots] = 1
  masked_pos = np.zeros((max_masks,), np.int32)
  masked_ids = np.full((max_masks,), ignore_id, np.int32)
  masked_weight = np.zeros((max_masks,), np.float32)
  masked_pos[: len(mask_slots)] = mask_slots
  masked_ids[: len(targets)] = targets
  masked_weight[: len(targets)] = 1.0
  return dict(text_ids=text_ids, text_atts=text_atts, position_ids=position_ids,
              masked_pos=masked_pos, masked_ids=masked_ids, masked_weight=masked_weight)


def prompt_ids(tokenizer, prompt: str) -> list[int]:
  """[CLS] + the prompt's tokens: where training sequences start and decoding begins."""
  return [tokenizer.cls_id] + (tokenizer.encode(prompt.strip()) if prompt.strip() else [])


class CaptionEncoder:
  """Caption -> the training fields of one example (module docstring)."""

  def __init__(self, tokenizer, prompt: str, max_tokens: int, max_masks: int,
               masking: text_lib.MaskingConfig):
    self.tokenizer = tokenizer
    self.prompt_ids = prompt_ids(tokenizer, prompt)
    self.max_tokens = int(max_tokens)
    self.max_masks = int(max_masks)
    self.masking = masking
    if len(self.prompt_ids) + 1 >= self.max_tokens:
      raise ValueError(f"the prompt {prompt!r} ({len(self.prompt_ids)} tokens with [CLS]) leaves "
                       f"no room for a caption in config.data.captioning.max_tokens={max_tokens}")

  @classmethod
  def from_config(cls, cfg, sub, tokenizer) -> "CaptionEncoder":
    """From `config.data` (skipgram and whole-word settings) and the task's section `sub`
    (`config.data.captioning`: prompt, max_tokens, mask_prob, max_masks)."""
    masking = text_lib.MaskingConfig(
        mask_prob=sub.mask_prob, max_masks=sub.max_masks, skipgram_prb=cfg.skipgram_prb,
        skipgram_size=cfg.skipgram_size, mask_whole_word=cfg.mask_whole_word)
    return cls(tokenizer, sub.prompt, sub.max_tokens, sub.max_masks, masking)

  @property
  def num_source_tokens(self) -> int:
    """The prompt's tokens after [CLS] (never masked)."""
    return len(self.prompt_ids) - 1

  def token_ids(self, caption: str) -> list[int]:
    """[CLS] prompt caption [SEP] cut to max_tokens; EmptyCaptionError for a caption without
    tokens."""
    ids = self.tokenizer.encode(caption.strip()) if isinstance(caption, str) else []
    if not ids:
      raise text_lib.EmptyCaptionError(f"caption has no tokens (raw: {caption!r:.80})")
    return (self.prompt_ids + ids + [self.tokenizer.sep_id])[: self.max_tokens]

  def __call__(self, caption: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    ids = self.token_ids(caption)
    masked = text_lib.choose_mask_positions(ids, self.tokenizer.is_subword, self.masking, rng,
                                            num_source_tokens=self.num_source_tokens)
    tok = self.tokenizer
    return build_caption_example(ids, masked, mask_id=tok.mask_id, pad_id=tok.pad_id,
                                 ignore_id=tok.cls_id, max_tokens=self.max_tokens,
                                 max_masks=self.max_masks)


class CaptionProcessor(examples.Processor):
  """`{"image", "caption": str | [str], optional "image_id"}` -> caption example (one caption of
  the record drawn at random)."""

  def __init__(self, cfg, sub, image_res: int, patch_size: int, encoder: text_lib.TextEncoder):
    super().__init__(cfg, sub, image_res, patch_size, encoder)
    self.crop_scale = (float(sub.crop_scale_min), 1.0)
    self.captioner = CaptionEncoder.from_config(cfg, sub, encoder.tokenizer)

  def process(self, where: str, rec: dict, rng: np.random.Generator) -> dict:
    captions = [c for c in examples.text_list(rec.get(self.caption_key))
                if self.captioner.tokenizer.encode(c.strip())]
    if not captions:
      raise BadRecordError(f"no usable caption in {self.caption_key!r} "
                           f"(found {rec.get(self.caption_key)!r:.80})")
    caption = captions[int(rng.integers(0, len(captions)))]
    flipped = bool(rng.random() < self.hflip_prob)
    caption = self._flip_text(caption, flipped)
    image = self._augment(self._image(rec), rng, self.crop_scale, flipped)
    out = self.captioner(caption, rng)
    out["image"] = image
    return out


BATCH_FIELDS = dict(text_ids=np.int32, text_atts=np.int32, position_ids=np.int32,
                    masked_pos=np.int32, masked_ids=np.int32, masked_weight=np.float32,
                    image=np.float32)


def collate(examples_: Sequence[dict], rng: np.random.Generator | None = None) -> dict:
  """Caption examples -> the batch of the module docstring."""
  del rng
  return pipeline.stack_fields(examples_, BATCH_FIELDS)


# ------------------------------------------------------------------------------ objective
def caption_loss(m, batch, *, deterministic: bool = True, label_smoothing: float = 0.1
                 ) -> dict[str, jax.Array]:
  """The captioning objective on the bound model (module docstring) -> {'caption'}."""
  image_embeds = m.encode_image(batch["image"], deterministic)
  image_atts = jnp.ones(image_embeds.shape[:2], jnp.int32)
  hidden = m.text.encode_multimodal(batch["text_ids"], batch["text_atts"], image_embeds,
                                    image_atts, deterministic, batch["position_ids"])
  at_masks = jnp.take_along_axis(hidden, batch["masked_pos"][:, :, None], axis=1)
  logits = m.text.mlm_logits(at_masks)
  return {"caption": losses.label_smoothing_loss(
      logits, batch["masked_ids"], batch["masked_weight"], smoothing=label_smoothing,
      ignore_id=batch["text_ids"][:, :1])}


# ------------------------------------------------------------------------------ evaluation data
_TRAILING_DIGITS = re.compile(r"(\d+)$")


def caption_image_id(rec: dict, image_id_key: str = "image_id") -> Any:
  """The COCO image id of an evaluation record (module docstring); digit strings become ints."""
  value = rec.get(image_id_key)
  if value is None:
    path = str(rec.get("image", ""))
    match = _TRAILING_DIGITS.search(os.path.splitext(os.path.basename(path))[0])
    return int(match.group(1)) if match else path
  if isinstance(value, str) and value.strip().isdigit():
    return int(value.strip())
  return value


def load_caption_eval(path: str, image_root: str, image_id_key: str = "image_id", *,
                      image_res: int | None = None, exif_transpose: bool = True,
                      decode_workers: int = 0) -> dict:
  """Caption evaluation split: dict(image_ids [N] (ints or strings), image_paths [N], where [N],
  references {image_id: [str, ...]} or None when no record has captions (a test-server split)).
  With `image_res`, the image files are checked and `images` (`eval_data.EvalImages` [N], uint8,
  decoded batch by batch, by `decode_workers` grain processes if > 0) is added. Raises
  BadDataError naming file:line for a bad record."""
  ids, paths, where, refs, seen = [], [], [], {}, set()
  for w, rec in eval_data.read_split(path, "images"):
    image = eval_data.image_path(rec, w, image_root)
    image_id = caption_image_id(rec, image_id_key)
    captions = rec.get("caption")
    if captions is not None:
      captions = [captions] if isinstance(captions, str) else captions
      if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise BadDataError(f"{w}: 'caption' must be a string or a list of strings")
      refs.setdefault(image_id, []).extend(captions)
    if image_id in seen:
      continue
    seen.add(image_id)
    ids.append(image_id)
    paths.append(image)
    where.append(w)
  if refs and set(refs) != set(ids):
    missing = [i for i in ids if i not in refs][:5]
    raise BadDataError(f"{path}: some images have reference captions and others not "
                       f"(e.g. {missing})")
  data = dict(image_ids=ids, image_paths=paths, where=where, references=refs or None)
  if image_res is not None:
    eval_data.check_files_exist(paths, where)
    data["images"] = eval_data.EvalImages(paths, where, image_res, exif_transpose=exif_transpose,
                                          decode_workers=decode_workers)
  return data


# ------------------------------------------------------------------------------ decoding
def caption_log_probs(m, image_embeds: jax.Array, ids: jax.Array, slot: jax.Array,
                      vocab_size: int | None = None) -> jax.Array:
  """Bound-model step: every text layer over `ids [N*G, T]` (causal, positions 0..T-1) with the
  images `image_embeds [N, 1+P, D]` (row n*G + g reads image n; G beams per image);
  log-probabilities [N*G, V] (float32) of the MLM head at `slot`
  (where the [MASK] is), over the first `vocab_size` ids (the tokenizer's; default all)."""
  n, length = ids.shape
  causal = jnp.broadcast_to(jnp.tril(jnp.ones((length, length), jnp.int32)), (n, length, length))
  positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (n, length))
  image_atts = jnp.ones(image_embeds.shape[:2], jnp.int32)
  hidden = m.text.encode_multimodal(ids, causal, image_embeds, image_atts, True, positions)
  at_slot = jax.lax.dynamic_slice_in_dim(hidden, slot, 1, axis=1)
  logits = m.text.mlm_logits(at_slot)[:, 0]
  return jax.nn.log_softmax(logits[:, :vocab_size] if vocab_size else logits, axis=-1)


def make_caption_fn(model, prompt: Sequence[int], *, num_beams: int, max_length: int,
                    min_length: int, eos_id: int, mask_id: int, pad_id: int,
                    length_penalty: float = 0.0, vocab_size: int | None = None,
                    mesh: jax.sharding.Mesh | None = None) -> Callable:
  """jit(params, images [B, R, R, 3]) -> `generation.BeamOutput` (num_beams > 1) or (tokens
  [B, T], steps) (greedy). Tokens are drawn from the first `vocab_size` ids (the tokenizer's,
  which may be fewer than the model's embedding rows). With `mesh`, the outputs are replicated."""
  from x2vlm_jax import sharding as sharding_lib
  from x2vlm_jax.models import x2vlm

  prompt = [int(i) for i in prompt]
  rules = dict(max_length=max_length, min_length=min_length, eos_id=eos_id, mask_id=mask_id,
               pad_id=pad_id)
  out = {} if mesh is None else dict(out_shardings=sharding_lib.replicated(mesh))

  def fn(params, images):
    common.TRACE_COUNTS[f"captions_beam{num_beams}"] += 1
    variables = {"params": params}
    # The beams' rows are b * num_beams + j: each image's beams share its cross-attention keys
    # and values (`X2VLM.fuse` with G = num_beams texts per image).
    image_embeds = model.apply(variables, images, method=x2vlm.X2VLM.encode_image)

    def log_prob_fn(ids, slot):
      return model.apply(variables, image_embeds, ids, slot, vocab_size, method=caption_log_probs)

    if num_beams == 1:
      return generation.greedy_search(log_prob_fn, prompt, images.shape[0], **rules)
    return generation.beam_search(log_prob_fn, prompt, images.shape[0], num_beams=num_beams,
                                  length_penalty=length_penalty, **rules)

  return jax.jit(fn, **out)


def check_caption_length(prompt: Sequence[int], max_length: int, max_position: int,
                         field: str = "max_length", prompt_field: str = "the prompt") -> None:
  """[CLS] + prompt (token ids `prompt`) + `max_length` generated tokens must fit the position
  table; `field` / `prompt_field` name the settings in the message."""
  if len(prompt) + max_length > max_position:
    raise ValueError(f"{field} {max_length} + the {len(prompt)} tokens of [CLS] + {prompt_field} "
                     f"exceed config.model.max_position {max_position}")


def generate_captions(model, params, images, tokenizer, prompt: Sequence[int], *,
                      batch_size: int, num_beams: int, max_length: int, min_length: int,
                      length_penalty: float = 0.0, mesh: jax.sharding.Mesh | None = None,
                      fn: Callable | None = None) -> list[str]:
  """One caption per image of `images` (an `eval_data.EvalImages`, or an array [N, R, R, 3]),
  in fixed-size batches. `fn`: `make_caption_fn` made once by the caller (default: made here)."""
  check_caption_length(prompt, max_length, model.max_position)
  common.check_batch_size(batch_size, mesh)
  params = common.place_params(params, mesh)
  fn = fn or make_caption_fn(model, prompt, num_beams=num_beams, max_length=max_length,
                             min_length=min_length, eos_id=tokenizer.sep_id,
                             mask_id=tokenizer.mask_id, pad_id=tokenizer.pad_id,
                             length_penalty=length_penalty, vocab_size=tokenizer.vocab_size,
                             mesh=mesh)

  def batch_sequences(x):
    """A batch of images -> its token sequences [B, max_length] i32, padded with -1."""
    out = fn(params, x)
    if num_beams == 1:
      sequences = generation.greedy_sequences(jax.device_get(out[0]), int(out[1]),
                                              eos_id=tokenizer.sep_id)
    else:
      sequences = generation.best_sequences(out, eos_id=tokenizer.sep_id,
                                            length_penalty=length_penalty)
    rows = np.full((len(sequences), max_length), -1, np.int32)
    for row, seq in zip(rows, sequences):
      row[: len(seq)] = seq
    return rows

  rows = common.run_batched(batch_sequences, (images,), batch_size, mesh, name="captions",
                            log_every=20)
  return [generation.decode_text(tokenizer, [t for t in row if t >= 0])
          for row in np.asarray(jax.device_get(rows)).tolist()]


def evaluate_captioning(model, params, data: dict, tokenizer, *, prompt: Sequence[int],
                        batch_size: int, num_beams: int = 3, max_length: int = 50,
                        min_length: int = 5, length_penalty: float = 0.0,
                        mesh: jax.sharding.Mesh | None = None, fn: Callable | None = None
                        ) -> tuple[dict, list[dict]]:
  """Captions for `data` (`load_caption_eval` with `image_res`) -> (metrics, predictions):
  predictions in the COCO result format [{"image_id", "caption"}]; metrics {"bleu_1".."bleu_4",
  "cider"} (x100, `caption_metrics.score_captions`) when the split has references, else {}.
  An image that could not be decoded gets the empty caption (a miss that stays in the scores)."""
  captions = generate_captions(model, params, data["images"], tokenizer, prompt,
                               batch_size=batch_size, num_beams=num_beams, max_length=max_length,
                               min_length=min_length, length_penalty=length_penalty, mesh=mesh,
                               fn=fn)
  bad = data["images"].bad_mask() if hasattr(data["images"], "bad_mask") else None
  if bad is not None:
    captions = ["" if bad[n] else c for n, c in enumerate(captions)]
  predictions = [{"image_id": i, "caption": c} for i, c in zip(data["image_ids"], captions)]
  metrics = {}
  if data["references"] is not None:
    from x2vlm_jax.evaluate import caption_metrics

    metrics = caption_metrics.score_captions(
        data["references"], {p["image_id"]: p["caption"] for p in predictions})
  return metrics, predictions


class CaptioningEvaluator(common.Evaluator):
  """Captions decoded per split, BLEU-4 and CIDEr-D (module docstring)."""

  TYPE = "captioning"

  @classmethod
  def default_config(cls):
    cfg = super().default_config()
    cfg.update(dict(
        files=(),  # {"image", optional "image_id", "caption": [references]} records, one per split
        image_root="",
        beams=3,  # 1: greedy
        max_length=50,  # generated tokens at most
        min_length=5,  # [SEP] is forbidden before this many tokens
        length_penalty=0.0,  # > 0: finished scores / ((5 + length) / 6) ** this
    ))
    return cfg

  def __init__(self, name, cfg, *, config, model, mesh=None):
    super().__init__(name, cfg, config=config, model=model, mesh=mesh)
    if not model.mlm_head:
      raise ValueError(f"{self.field('type')} = 'captioning' decodes with the MLM head: it needs "
                       "config.model.mlm_head = True")
    if cfg.beams < 1:
      raise ValueError(f"{self.field('beams')} = {cfg.beams}: must be >= 1 (1: greedy)")
    d = config.data
    self.tokenizer = text_lib.load_tokenizer(d.vocab_path)
    self.prompt = prompt_ids(self.tokenizer, d.captioning.prompt)
    check_caption_length(self.prompt, cfg.max_length, config.model.max_position,
                         self.field("max_length"),
                         f"config.data.captioning.prompt {d.captioning.prompt!r}")
    self.splits = [(split, load_caption_eval(path, cfg.image_root,
                                             image_res=config.model.image_res,
                                             exif_transpose=d.exif_transpose,
                                             decode_workers=cfg.decode_workers))
                   for path, split in common.named_splits(cfg.files, self.field("files"))]
    self.fn = make_caption_fn(
        model, self.prompt, num_beams=cfg.beams, max_length=cfg.max_length,
        min_length=cfg.min_length, eos_id=self.tokenizer.sep_id, mask_id=self.tokenizer.mask_id,
        pad_id=self.tokenizer.pad_id, length_penalty=cfg.length_penalty,
        vocab_size=self.tokenizer.vocab_size, mesh=mesh)

  def run(self, params, step=0, *, predictions_dir=None):
    results = {}
    for split, data in self.splits:
      metrics, predictions = evaluate_captioning(
          self.model, params, data, self.tokenizer, prompt=self.prompt,
          batch_size=self.batch_size, num_beams=self.cfg.beams, max_length=self.cfg.max_length,
          min_length=self.cfg.min_length, length_penalty=self.cfg.length_penalty,
          mesh=self.mesh, fn=self.fn)
      for key in ("bleu_4", "cider"):
        if key in metrics:
          results[self.metric_name(split, key)] = metrics[key]
      self.log(f"{split}: {len(predictions)} images"
               + "".join(f", {k} {v:.2f}" for k, v in metrics.items() if k in ("bleu_4", "cider")))
      common.write_json(predictions_dir, f"{self.name}_{split}.json", predictions)
    return results


# ------------------------------------------------------------------------------ the task
class CaptioningTask(base.Task):
  """See the module docstring."""

  name = "captioning"
  loss_terms = ("caption",)
  evaluators = {CaptioningEvaluator.TYPE: CaptioningEvaluator}

  def config(self):
    return data_config.image_section(
        prompt="a picture of",  # tokens after [CLS] that are never masked (and start decoding)
        # [CLS] prompt caption [SEP] is cut to max_tokens; the caption is used raw (lower-cased by
        # the tokenizer, no pre_caption), as the reference.
        max_tokens=40,
        mask_prob=0.6,  # of the non-prompt tokens (reference: 0.6)
        max_masks=18,  # M; sequences are max_tokens + max_masks long
        crop_scale_min=0.5,
        hflip_prob=0.5,  # "left"/"right" swapped in the caption (data.swap_left_right_on_flip)
        randaug=True,  # RandAugment with colour and geometric ops (reference train transform)
        label_smoothing=0.1,  # of the KL loss at the inserted [MASK]s (reference: 0.1)
    )

  def validate(self, config):
    super().validate(config)
    if not config.model.mlm_head:
      raise ValueError("captioning training needs config.model.mlm_head = True (the captioner "
                       "generates with the MLM head)")
    c, max_position = self.section(config), config.model.max_position
    if c.max_tokens + c.max_masks > max_position:
      raise ValueError(f"{self.field('max_tokens')} {c.max_tokens} + {self.field('max_masks')} "
                       f"{c.max_masks} exceed config.model.max_position {max_position}")

  def processor(self, config, tokenizer):
    encoder = text_lib.TextEncoder.from_config(config.data, tokenizer)
    return CaptionProcessor(config.data, self.section(config), config.model.image_res,
                            config.model.patch_size, encoder)

  def collate(self, config):
    return collate

  def loss(self, m, batch, rng, *, deterministic, config):
    del rng  # no sampling
    return caption_loss(m, batch, deterministic=deterministic,
                        label_smoothing=self.section(config).label_smoothing)


TASK = CaptioningTask()
