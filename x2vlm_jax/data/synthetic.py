"""Random examples shaped exactly like the pipeline's, for benchmarks without data.

Tasks build their `synthetic_batch` from these and their own collate functions
(tools/benchmark.py times the train step on them):

  synthetic_texts(config, n, rng)   [CLS] words [SEP] [PAD].. texts of random lengths, MLM-masked
                                    as the pipeline masks them (`TextEncoder` fields)
  synthetic_images(config, n, rng)  random CLIP-normalised [R, R, 3] images
  random_box(rng, R)                a valid pixel xywh box inside an R x R image
"""
from __future__ import annotations

import numpy as np

# Token ids of the synthetic texts: a BERT-base vocabulary ([PAD] 0, [CLS] 101, [SEP] 102,
# [MASK] 103, words from 999) when the model's vocabulary is that large, else the demo layout
# ([PAD] [UNK] [CLS] [SEP] [MASK] = 0..4, words from 5).
_BERT_IDS = dict(pad=0, cls=101, sep=102, mask=103, first_word=999)
_SMALL_IDS = dict(pad=0, cls=2, sep=3, mask=4, first_word=5)
_CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
_CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def _token_ids(vocab_size: int) -> dict[str, int]:
  return _BERT_IDS if vocab_size > 2 * _BERT_IDS["first_word"] else _SMALL_IDS


def synthetic_texts(config, n: int, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
  """`n` texts with the fields of `TextEncoder`: [CLS] words [SEP] then [PAD] up to max_tokens
  (lengths uniform in [min(5, L), L]), MLM positions as the pipeline picks them
  (n_pred = min(max_masks, max(1, round(len * mask_prob))), never position 0), 80% [MASK] /
  10% random / 10% unchanged, masked_pos padded with 0 and masked_ids with -100."""
  d, vocab = config.data, config.model.vocab_size
  L, M = d.max_tokens, d.max_masks
  ids_of = _token_ids(vocab)
  out = []
  for _ in range(n):
    length = int(rng.integers(min(5, L), L + 1))
    words = rng.integers(ids_of["first_word"], vocab, size=max(length - 2, 0))
    seq = np.array([ids_of["cls"], *words, ids_of["sep"]][:length], np.int32)
    text_ids = np.full((L,), ids_of["pad"], np.int32)
    text_ids[:length] = seq
    text_atts = (np.arange(L) < length).astype(np.int32)
    n_pred = min(M, max(1, int(round(length * d.mask_prob))), length - 1)
    pos = np.sort(rng.choice(np.arange(1, length), size=n_pred, replace=False)).astype(np.int32)
    masked = text_ids.copy()
    for p in pos:
      u = rng.random()
      masked[p] = ids_of["mask"] if u < 0.8 else (int(rng.integers(0, vocab)) if u < 0.9
                                                   else masked[p])
    masked_pos = np.zeros((M,), np.int32)
    masked_ids = np.full((M,), -100, np.int32)
    masked_pos[:n_pred] = pos
    masked_ids[:n_pred] = text_ids[pos]
    out.append(dict(text_ids=text_ids, text_atts=text_atts, text_ids_masked=masked,
                    masked_pos=masked_pos, masked_ids=masked_ids))
  return out


def synthetic_images(config, n: int, rng: np.random.Generator) -> list[np.ndarray]:
  """`n` random CLIP-normalised [R, R, 3] float32 images (R = model.image_res)."""
  res = config.model.image_res
  return [((rng.random((res, res, 3), dtype=np.float32) - _CLIP_MEAN) / _CLIP_STD)
          for _ in range(n)]


def random_box(rng: np.random.Generator, res: int) -> tuple[float, float, float, float]:
  """A pixel xywh box 10%..70% of the side wide and high, inside a res x res image."""
  w, h = rng.uniform(0.1, 0.7, size=2) * res
  return float(rng.uniform(0, res - w)), float(rng.uniform(0, res - h)), float(w), float(h)
