"""COCO captioning data, as the reference trains its MLM captioner (REFERENCE_DETAILED §4.5).

Training (UniLM-style MLM generation, the reference's `preprocess_fg_free`):
  tokens = [CLS] + prompt ("a picture of") + caption + [SEP], cut to `max_tokens` (a long caption
  loses its [SEP], as in the reference); masked positions come from the MLM generator
  (`text.choose_mask_positions`: mask_prob of the non-prompt tokens, at most max_masks,
  whole-word, skipgram) with the prompt excluded. Every chosen token t gets a [MASK] inserted
  just before it, sharing t's position id; t itself stays in the sequence. Visibility mask
  [L, L] (L = max_tokens + max_masks): lower-triangular, with every inserted [MASK]'s column
  zeroed except on its own row, so real tokens never see a [MASK] and a [MASK] sees the real
  tokens before it and itself: it predicts t from the left context only, exactly the situation
  of a decoding step. The targets are the original tokens at the [MASK] slots.

  caption example (L = max_tokens + max_masks, M = max_masks), int32 unless noted:
    text_ids [L]        the sequence with inserted [MASK]s, padded with [PAD]
    text_atts [L, L]    1 where query i may attend to key j
    position_ids [L]    token positions (a [MASK] shares its token's); padding continues counting
    masked_pos [M]      slots of the inserted [MASK]s in sequence order (padded with 0)
    masked_ids [M]      their target tokens (padded with the [CLS] id: the loss's ignore id)
    masked_weight [M]   f32, 1 for real targets
    image [R, R, 3]     f32: RandomResizedCrop(crop_scale_min..1) -> flip ("left"/"right" swapped
                        in the caption unless data.swap_left_right_on_flip is False) ->
                        RandAugment (colour and geometric ops) -> CLIP normalisation

Evaluation records `{"image", optional "image_id", optional "caption": [references]}` (one per
image; repeated images are merged): `load_caption_eval`. The image id is "image_id" when given,
else the trailing digits of the file name ("COCO_val2014_000000391895.jpg" -> 391895, as the
reference), else the image path.
"""
from __future__ import annotations

import os
import re
from typing import Any, Sequence

import numpy as np

from x2vlm_jax.data import examples as examples_lib
from x2vlm_jax.data import records
from x2vlm_jax.data import text as text_lib

BadRecordError = records.BadRecordError
BadDataError = records.BadDataError


def build_caption_example(ids: Sequence[int], masked: Sequence[int], *, mask_id: int, pad_id: int,
                          ignore_id: int, max_tokens: int, max_masks: int) -> dict[str, np.ndarray]:
  """The fixed-shape training fields (module docstring) of token ids `ids` ([CLS] ... , at most
  `max_tokens`) whose positions `masked` (at most `max_masks`) get an inserted [MASK]."""
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
                       f"no room for a caption in max_tokens={max_tokens}")

  @classmethod
  def from_config(cls, cfg, tokenizer) -> "CaptionEncoder":
    """From `config.data` (skipgram and whole-word settings) and its `captioning` sub-config."""
    sub = cfg.captioning
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


CAPTION_KEYS = ("image", "text_ids", "text_atts", "position_ids", "masked_pos", "masked_ids",
                "masked_weight")


class CaptionProcessor(examples_lib._Processor):  # pylint: disable=protected-access
  """`{"image", "caption": str | [str], optional "image_id"}` -> caption example (one caption of
  the record drawn at random)."""

  def __init__(self, cfg, image_res: int, patch_size: int, encoder: text_lib.TextEncoder):
    super().__init__(cfg, cfg.captioning, image_res, patch_size, encoder)
    self.crop_scale = (float(cfg.captioning.crop_scale_min), 1.0)
    self.captioner = CaptionEncoder.from_config(cfg, encoder.tokenizer)

  def process(self, where: str, rec: dict, rng: np.random.Generator) -> dict:
    captions = [c for c in examples_lib._as_text_list(rec.get(self.caption_key))  # pylint: disable=protected-access
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


def collate_captioning(examples: Sequence[dict], rng: np.random.Generator | None = None) -> dict:
  """Caption examples -> {image [B,R,R,3] f32, text_ids/position_ids [B,L], text_atts [B,L,L],
  masked_pos/masked_ids [B,M] i32, masked_weight [B,M] f32}."""
  del rng
  batch = {k: np.stack([e[k] for e in examples]).astype(np.int32)
           for k in ("text_ids", "text_atts", "position_ids", "masked_pos", "masked_ids")}
  batch["masked_weight"] = np.stack([e["masked_weight"] for e in examples]).astype(np.float32)
  batch["image"] = np.stack([e["image"] for e in examples]).astype(np.float32)
  return batch


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


def load_caption_eval(path: str, image_root: str, image_id_key: str = "image_id") -> dict:
  """Caption evaluation split, images left on disk: dict(image_ids [N] (ints or strings),
  image_paths [N], where [N], references {image_id: [str, ...]} or None when no record has
  captions (a test-server split)). Raises BadDataError naming file:line for a bad record."""
  recs = []
  src = records.make_source([path])
  for i in range(len(src)):
    raw = src[i]
    try:
      recs.append((raw.where, records.parse_record(raw)))
    except BadRecordError as e:
      raise BadDataError(f"{raw.where}: {e}") from e
  if not recs:
    raise BadDataError(f"{path}: no images")
  ids, paths, where, refs, seen = [], [], [], {}, set()
  for w, rec in recs:
    image = rec.get("image")
    if not isinstance(image, str) or not image:
      raise BadDataError(f"{w}: record has no 'image' path")
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
    paths.append(image if os.path.isabs(image) or not image_root
                 else os.path.join(image_root, image))
    where.append(w)
  if refs and set(refs) != set(ids):
    missing = [i for i in ids if i not in refs][:5]
    raise BadDataError(f"{path}: some images have reference captions and others not "
                       f"(e.g. {missing})")
  return dict(image_ids=ids, image_paths=paths, where=where, references=refs or None)
