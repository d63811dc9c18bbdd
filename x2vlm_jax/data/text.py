"""Text side of the data pipeline: caption cleaning, tokenizers, MLM masking.

Tokenizers (`load_tokenizer` picks one from the path): BERT's lower-cased WordPiece over a
vocab.txt, or XLM-R's sentencepiece model with fairseq's id layout (CCLM / multilingual X2-VLM).
Both expose cls/sep/pad/mask/unk ids, vocab_size and `is_subword` (for whole-word masking), so
everything below works on either.

Shapes (L = max_tokens, M = max_masks), all int32:
  text_ids [L]          [CLS] tokens [SEP], padded with [PAD]
  text_atts [L]         1 on real tokens, 0 on padding
  text_ids_masked [L]   masked positions replaced (80% [MASK] / 10% random id / 10% kept)
  masked_pos [M]        masked positions (padded with 0)
  masked_ids [M]        original ids at masked_pos (padded with -100, the loss's ignore index)

Special-token ids are read from the vocabulary file, never hard-coded.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Sequence

import numpy as np

IGNORE_ID = -100

_PUNCT = re.compile(r"[,.'!?\"()*#:;~]")
_MULTI_SPACE = re.compile(r"\s{2,}")
_LEFT_RIGHT = re.compile(r"\b(left|right)\b", re.IGNORECASE)


class EmptyCaptionError(ValueError):
  """pre_caption left nothing of the caption."""


def pre_caption(caption: str, max_words: int) -> str:
  """Cleans a caption like the reference `pre_caption` (REFERENCE_DETAILED §3.6).

  Lower-case; each of ,.'!?"()*#:;~ and - / becomes a space; "<person>" -> "person"; runs of
  whitespace collapse to one space; strip; keep the first `max_words` words.

  Raises:
    EmptyCaptionError: nothing is left.
  """
  if not isinstance(caption, str):
    raise EmptyCaptionError(f"caption is not a string: {caption!r}")
  text = _PUNCT.sub(" ", caption.lower())
  text = text.replace("-", " ").replace("/", " ").replace("<person>", "person")
  text = _MULTI_SPACE.sub(" ", text)
  text = text.rstrip("\n").strip(" ")
  words = text.split(" ")
  if len(words) > max_words:
    text = " ".join(words[:max_words])
  if not text:
    raise EmptyCaptionError(f"caption is empty after cleaning (raw: {caption!r})")
  return text


def swap_left_right(text: str) -> str:
  """Swaps the whole words "left" <-> "right", keeping their case ("Left" -> "Right")."""

  def repl(m: re.Match) -> str:
    word = m.group(0)
    new = "right" if word.lower() == "left" else "left"
    if word.isupper():
      return new.upper()
    if word[0].isupper():
      return new.capitalize()
    return new

  return _LEFT_RIGHT.sub(repl, text)


class Tokenizer:
  """Lower-cased BERT WordPiece tokenizer over a vocab.txt (one token per line, id = line number).

  Wraps `tokenizers.BertWordPieceTokenizer` (NOT `BertTokenizerFast(vocab_file=...)`, which in
  transformers 5 silently maps everything to [UNK]). Picklable (reloads from the path), so it can
  travel to grain worker processes.
  """

  def __init__(self, vocab_path: str):
    self.vocab_path = str(vocab_path)
    self._load()

  def _load(self):
    from tokenizers import BertWordPieceTokenizer  # pylint: disable=g-import-not-at-top

    with open(self.vocab_path, encoding="utf-8") as f:
      self._id_to_token = [line.rstrip("\n").rstrip("\r") for line in f]
    self._token_to_id = {t: i for i, t in enumerate(self._id_to_token)}
    specials = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
    missing = [t for t in specials if t not in self._token_to_id]
    if missing:
      raise ValueError(f"vocab {self.vocab_path} lacks special tokens {missing}")
    self._tok = BertWordPieceTokenizer(self.vocab_path, lowercase=True)
    self.pad_id = self._token_to_id["[PAD]"]
    self.unk_id = self._token_to_id["[UNK]"]
    self.cls_id = self._token_to_id["[CLS]"]
    self.sep_id = self._token_to_id["[SEP]"]
    self.mask_id = self._token_to_id["[MASK]"]
    self.vocab_size = len(self._id_to_token)
    # is_subword[i]: token i is a "##" continuation piece (whole-word masking).
    self.is_subword = np.array([t.startswith("##") for t in self._id_to_token], dtype=bool)

  def __getstate__(self):
    return {"vocab_path": self.vocab_path}

  def __setstate__(self, state):
    self.vocab_path = state["vocab_path"]
    self._load()

  def encode(self, text: str) -> list[int]:
    """WordPiece ids of `text`, no special tokens."""
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def tokenize(self, text: str) -> list[str]:
    return self._tok.encode(text, add_special_tokens=False).tokens

  def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
    return [self._id_to_token[int(i)] for i in ids]

  def convert_tokens_to_ids(self, tokens: Sequence[str]) -> list[int]:
    return [self._token_to_id.get(t, self.unk_id) for t in tokens]


class SentencePieceTokenizer:
  """XLM-R's tokenizer: a sentencepiece model with fairseq's id layout (HF XLMRobertaTokenizer).

  Ids: <s>=0 (cls), <pad>=1, </s>=2 (sep), <unk>=3, sentencepiece piece p >= 3 -> p + 1, and
  <mask> = the last id; vocab_size = pieces + 2 (250002 for xlm-roberta's 250000 pieces).
  The sentencepiece model must have XLM-R's layout: <unk>=0, <s>=1, </s>=2 (spm's defaults).
  Case and accents are kept (the model's own normalisation applies). A piece that does not start
  with the word-boundary mark "▁" continues the previous word (`is_subword`). Same interface as
  `Tokenizer`; picklable (reloads from the path).
  """

  FAIRSEQ_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
  WORD_START = "\u2581"  # "▁"

  def __init__(self, model_path: str):
    self.vocab_path = str(model_path)
    self._load()

  def _load(self):
    import sentencepiece  # pylint: disable=g-import-not-at-top

    sp = sentencepiece.SentencePieceProcessor(model_file=self.vocab_path)
    if not (sp.unk_id() == 0 and sp.bos_id() == 1 and sp.eos_id() == 2):
      raise ValueError(f"sentencepiece model {self.vocab_path}: expected XLM-R's layout "
                       f"<unk>=0 <s>=1 </s>=2, found unk={sp.unk_id()} bos={sp.bos_id()} "
                       f"eos={sp.eos_id()}")
    self._sp = sp
    pieces = sp.get_piece_size()
    self._id_to_token = (list(self.FAIRSEQ_SPECIALS)
                         + [sp.id_to_piece(i) for i in range(3, pieces)] + ["<mask>"])
    self._token_to_id = {t: i for i, t in enumerate(self._id_to_token)}
    self.cls_id, self.pad_id, self.sep_id, self.unk_id = 0, 1, 2, 3
    self.mask_id = len(self._id_to_token) - 1
    self.vocab_size = len(self._id_to_token)
    special = np.zeros((self.vocab_size,), bool)
    special[[self.cls_id, self.pad_id, self.sep_id, self.unk_id, self.mask_id]] = True
    self.is_subword = np.array([not t.startswith(self.WORD_START) for t in self._id_to_token],
                               dtype=bool) & ~special

  def __getstate__(self):
    return {"vocab_path": self.vocab_path}

  def __setstate__(self, state):
    self.vocab_path = state["vocab_path"]
    self._load()

  def _to_fairseq(self, spm_ids: Sequence[int]) -> list[int]:
    return [self.unk_id if i == 0 else i + 1 for i in spm_ids]

  def encode(self, text: str) -> list[int]:
    """Fairseq ids of `text`, no special tokens."""
    return self._to_fairseq(self._sp.encode(text))

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [self._to_fairseq(ids) for ids in self._sp.encode(list(texts))]

  def tokenize(self, text: str) -> list[str]:
    return self.convert_ids_to_tokens(self.encode(text))

  def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
    return [self._id_to_token[int(i)] for i in ids]

  def convert_tokens_to_ids(self, tokens: Sequence[str]) -> list[int]:
    return [self._token_to_id.get(t, self.unk_id) for t in tokens]


# Tokenizer files looked for inside a directory, in this order.
_TOKENIZER_FILES = ("vocab.txt", "sentencepiece.bpe.model")


def tokenizer_in_directory(directory: str) -> str | None:
  """The first of `_TOKENIZER_FILES` that `directory` holds (its path), or None."""
  for name in _TOKENIZER_FILES:
    if os.path.isfile(os.path.join(directory, name)):
      return os.path.join(directory, name)
  return None


def load_tokenizer(vocab_path: str) -> Tokenizer | SentencePieceTokenizer:
  """The tokenizer a path names: sentencepiece (XLM-R ids) for a `.model` file, WordPiece for a
  BERT vocab.txt; a directory is searched for vocab.txt, then sentencepiece.bpe.model."""
  path = str(vocab_path)
  if not path:
    raise ValueError("no tokenizer given (config.data.vocab_path): a BERT vocab.txt, an XLM-R "
                     "sentencepiece .model, or a directory holding one")
  if os.path.isdir(path):
    found = tokenizer_in_directory(path)
    if found is None:
      raise FileNotFoundError(f"tokenizer directory {path} holds none of {_TOKENIZER_FILES}")
    path = found
  if path.endswith(".model"):
    return SentencePieceTokenizer(path)
  return Tokenizer(path)


def add_specials(ids: Sequence[int], tokenizer: Tokenizer, max_tokens: int) -> list[int]:
  """[CLS] ids [SEP], truncated so the result has at most `max_tokens` ids (SEP kept)."""
  out = [tokenizer.cls_id] + list(ids[: max_tokens - 1])
  return out[: max_tokens - 1] + [tokenizer.sep_id]


def pad_ids(ids: Sequence[int], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Returns (ids [length] int32, atts [length] int32)."""
  out = np.full((length,), pad_id, np.int32)
  atts = np.zeros((length,), np.int32)
  n = min(len(ids), length)
  out[:n] = ids[:n]
  atts[:n] = 1
  return out, atts


@dataclasses.dataclass(frozen=True)
class MaskingConfig:
  mask_prob: float = 0.5
  max_masks: int = 12
  skipgram_prb: float = 0.2
  skipgram_size: int = 3
  mask_whole_word: bool = True


def whole_word_span(
    ids: Sequence[int], st: int, end: int, is_subword: np.ndarray
) -> tuple[int, int]:
  """Grows the span [st, end) to whole words: left while ids[st] is a "##" piece, right while
  ids[end] is one."""
  while st >= 0 and is_subword[ids[st]]:
    st -= 1
  while end < len(ids) and is_subword[ids[end]]:
    end += 1
  return st, end


def choose_mask_positions(
    ids: Sequence[int], is_subword: np.ndarray, cfg: MaskingConfig, rng: np.random.Generator,
    num_source_tokens: int = 0,
) -> list[int]:
  """Positions to mask in `ids` ([CLS] ... [SEP]), REFERENCE_DETAILED §2.4 steps 3-6.

  n_pred = min(max_masks, max(1, round(len * mask_prob))) (Python's banker's rounding, len
  includes [CLS] and [SEP]); candidates are every position but 0 ([SEP] is one), visited in random
  order; each starts a 1-token span, or with prob `skipgram_prb` a span of randint(2..size)
  tokens; spans grow to whole words over "##" pieces; overflow is cut to a random subset.
  `num_source_tokens` > 0 (the captioner's prompt after [CLS]): those tokens are never masked
  and do not count in `len` (the reference's `num_source_tokens`).
  """
  n = len(ids)
  n_pred = min(cfg.max_masks, max(1, int(round((n - num_source_tokens) * cfg.mask_prob))))
  if n < 2 + num_source_tokens:
    return []
  cand = list(range(1 + num_source_tokens, n))
  rng.shuffle(cand)
  max_cand = n - 1
  chosen: dict[int, None] = {}  # insertion-ordered set
  for pos in cand:
    if len(chosen) >= n_pred:
      break
    if pos in chosen:
      continue
    if cfg.skipgram_prb > 0 and cfg.skipgram_size >= 2 and rng.random() < cfg.skipgram_prb:
      span = int(rng.integers(2, cfg.skipgram_size + 1))
    else:
      span = 1
    st, end = pos, pos + span
    if cfg.mask_whole_word:
      st, end = whole_word_span(ids, st, end, is_subword)
    for mp in range(st, end):
      if num_source_tokens < mp <= max_cand:
        chosen[mp] = None
      else:
        break
  positions = list(chosen)
  if len(positions) > n_pred:
    keep = rng.permutation(len(positions))[:n_pred]
    positions = [positions[k] for k in keep]
  return positions


def mask_tokens(
    ids: Sequence[int],
    tokenizer: Tokenizer,
    cfg: MaskingConfig,
    rng: np.random.Generator,
) -> tuple[list[int], list[int], list[int]]:
  """MLM masking of one sequence. Returns (masked ids, masked_pos, masked_ids (originals))."""
  positions = choose_mask_positions(ids, tokenizer.is_subword, cfg, rng)
  masked = list(ids)
  for p in positions:
    if rng.random() < 0.8:
      masked[p] = tokenizer.mask_id
    elif rng.random() < 0.5:
      masked[p] = int(rng.integers(0, tokenizer.vocab_size))  # whole vocab, specials included
  return masked, positions, [int(ids[p]) for p in positions]


class TextEncoder:
  """Caption -> the fixed-shape MLM fields of one example (see the module docstring).

  `token_ids` remembers the ids of up to `cache_size` captions: the processors tokenise every
  caption of a record to validate it and then the one they pick again, and small datasets repeat
  captions every epoch (the demo's data path spent a fifth of its time in the tokenizer). 0 turns
  the cache off.
  """

  def __init__(
      self,
      tokenizer: Tokenizer,
      max_tokens: int,
      max_words: int,
      masking: MaskingConfig,
      cache_size: int = 65536,
  ):
    self.tokenizer = tokenizer
    self.max_tokens = max_tokens
    self.max_words = max_words
    self.masking = masking
    self.cache_size = cache_size
    self._ids_cache: dict[str, tuple[int, ...]] = {}

  @classmethod
  def from_config(cls, cfg, tokenizer: Tokenizer | None = None) -> "TextEncoder":
    tokenizer = tokenizer or load_tokenizer(cfg.vocab_path)
    masking = MaskingConfig(
        mask_prob=cfg.mask_prob,
        max_masks=cfg.max_masks,
        skipgram_prb=cfg.skipgram_prb,
        skipgram_size=cfg.skipgram_size,
        mask_whole_word=cfg.mask_whole_word,
    )
    return cls(tokenizer, cfg.max_tokens, cfg.max_words, masking)

  def token_ids(self, caption: str) -> list[int]:
    """[CLS] + WordPiece(pre_caption(caption)) + [SEP]; raises EmptyCaptionError if no token."""
    ids = self._ids_cache.get(caption)
    if ids is None:
      text = pre_caption(caption, self.max_words)
      pieces = self.tokenizer.encode(text)
      if not pieces:
        raise EmptyCaptionError(f"caption has no tokens after tokenisation (raw: {caption!r})")
      ids = tuple(add_specials(pieces, self.tokenizer, self.max_tokens))
      if self.cache_size > 0:
        if len(self._ids_cache) >= self.cache_size:
          self._ids_cache.clear()  # bounded; dict get/set are atomic, so threads may share it
        self._ids_cache[caption] = ids
    return list(ids)

  def __call__(self, caption: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    ids = self.token_ids(caption)
    return self.encode_ids(ids, rng)

  def encode_ids(self, ids: Sequence[int], rng: np.random.Generator) -> dict[str, np.ndarray]:
    tok = self.tokenizer
    masked, pos, orig = mask_tokens(ids, tok, self.masking, rng)
    text_ids, text_atts = pad_ids(ids, self.max_tokens, tok.pad_id)
    text_ids_masked, _ = pad_ids(masked, self.max_tokens, tok.pad_id)
    m = self.masking.max_masks
    masked_pos = np.zeros((m,), np.int32)
    masked_ids = np.full((m,), IGNORE_ID, np.int32)
    masked_pos[: len(pos)] = pos
    masked_ids[: len(orig)] = orig
    return dict(
        text_ids=text_ids,
        text_atts=text_atts,
        text_ids_masked=text_ids_masked,
        masked_pos=masked_pos,
        masked_ids=masked_ids,
    )
