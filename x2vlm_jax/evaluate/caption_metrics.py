"""COCO caption metrics (BLEU-1..4, CIDEr-D) as pycocoevalcap computes them, in plain Python.

Pipeline (what `COCOEvalCap.evaluate()` does for these two metrics, without Java):
  1. Tokenise every reference and prediction like pycocoevalcap's `PTBTokenizer`: Stanford
     CoreNLP 3.4.1 `PTBTokenizer -preserveLines -lowerCase`, then drop the tokens in
     `PTB_PUNCTUATION`; a scorer splits the rest on whitespace (`tokenize` below; all captions
     are tokenised together as lines of one text, `tokenize_captions`).
  2. `bleu`: corpus BLEU-1..4 with the "closest" reference length (ties to the shorter one) and a
     corpus-level brevity penalty, smoothed by tiny=1e-15 / small=1e-9 exactly as `BleuScorer`.
  3. `cider_d`: pycocoevalcap's `Cider`, i.e. CIDEr-D: n = 1..4, TF-IDF vectors whose document
     frequencies come from the references of the evaluated images, candidate weights clipped by
     the reference's, a Gaussian length penalty (sigma = 6), averaged over references and n, x10.

All scoring functions take RAW strings keyed by image id — references {id: [str, ...]} and
predictions {id: str} — and tokenise them internally; the two key sets must be equal. The raw
functions return what pycocoevalcap returns (BLEU in [0, 1], CIDEr e.g. 1.391);
`score_captions` returns the x100 numbers papers quote (BLEU-4 40.2, CIDEr 139.1).

Files:
  references   COCO captions annotations {"annotations": [{"image_id", "caption"}, ...]}, or a
               Karpathy-style JSON list / JSONL of {"image": path, "caption": str | [str, ...],
               optional "image_id"} (id = "image_id", else the trailing digits of the file name)
  predictions  the COCO result format [{"image_id", "caption"}, ...] (JSON list or JSONL)
"""
from __future__ import annotations

import collections
import json
import math
import os
import re
import unicodedata
from typing import Any, Callable, Mapping, Sequence

# The tokens pycocoevalcap's ptbtokenizer.py drops after tokenising. It compares them with the
# *lower-cased* tokenizer output, so the bracket escapes listed here never match: "(" comes out
# as "-lrb-" and stays in the scored text (as it does in pycocoevalcap).
PTB_PUNCTUATION = frozenset(("''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?",
                             "!", ",", ":", "-", "--", "...", ";"))

_BLEU_TINY = 1e-15  # BleuScorer: "so that if guess is 0 still return 0"
_BLEU_SMALL = 1e-9
_CIDER_N = 4
_CIDER_SIGMA = 6.0

# ---------------------------------------------------------------------------------------------
# Tokeniser: a longest-match lexer over the rules of Stanford's PTBLexer (CoreNLP 3.4.1) that
# matter for English captions. Each rule is (pattern, action). A pattern may name a group `tok`:
# only that part is consumed, the rest is trailing context that counts for the longest match
# (as in JFlex). Ties go to the earlier rule. Actions map the consumed text to output tokens.
# ---------------------------------------------------------------------------------------------
_L = r"[^\W\d_]"  # a letter
_AN = r"[^\W_]"  # a letter or a digit
_APOS = "['\u2019]"
_NUM = r"(?:\d*(?:[.:,]\d+)+|\d+)"
_NUMBER = r"[-+]?" + _NUM
_DNUM = r"\d+(?:[.:,]\d+)*"  # a number that starts with a digit
_REDAUX = r"(?:'(?:s|m|d|re|ve|ll)(?![A-Za-z])|\u2019(?:s|m|d|re|ve|ll))"
_SPACE = re.compile(r"[\s\u00a0\u200b\u200e\u200f\ufeff]+")
# An ASCII chunk of letters and digits with a letter, ending at a space: always one token
# (after the assimilations below), so it skips the rule scan.
_PLAIN_WORD = re.compile(r"[A-Za-z0-9]*[A-Za-z][A-Za-z0-9]*(?=\s|$)")
# A word of 2+ ASCII letters then one of . , ; : and a space: the word, the mark dropped (unless
# the word is an abbreviation: checked with _RULES).
_WORD_AND_MARK = re.compile(r"([A-Za-z]{2,})[.,;:](?=\s|$)")
_ASSIMILATIONS = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "gotta": ("got", "ta"),
                  "wanna": ("wan", "na"), "lemme": ("lem", "me"), "gimme": ("gim", "me")}

# Abbreviations that keep their final period (caseless, except the states that are also common
# words: those only when capitalised). _ABBREV_BEFORE_NUMBER keep it only before a digit ("no. 5").
_ABBREV = (
    "(?i:jan|feb|mar|apr|jun|jul|aug|sept?|oct|nov|dec|mon|tues?|wed|thu|thurs|fri|"  # dates
    "ala|ariz|calif|colo|conn|ct|dak|fla|ga|ind|kans?|ky|md|mich|minn|mo|mont|neb|nev|okla|"
    "penn|tenn|va|vt|wisc?|wyo|"  # states
    "inc|cos?|corp|pp?t[ye]s?|ltd|plc|rt|bancorp|bhd|assn|univ|intl|sys|tel|est|ext|sq|jr|sr|"
    "bros|esq|etc|al|seq|bldg|blvd|rd|"  # companies and others
    "mr|mrs|ms|drs?|profs?|sens?|reps?|attys?|lt|col|gen|messrs|govs?|adm|rev|maj|sgt|cpl|pvt|"
    "capt|ste?|ave|pres|lieut|hon|brig|co?mdr|pfc|spc|supts?|det|mt|ft|adj|adv|asst|assoc|ens|"
    "insp|mlle|mme|msgr|sfc|invt|elec|natl|m[ft]g|dept|vs|alex|wm|jos|cie|cf|treas|ph)|"  # titles
    + "|".join(f"{w[0]}(?i:{w[1:]})" for w in (
        "Az", "Ark", "Del", "Ill", "La", "Mass", "Miss", "Ore", "Pa", "Tex", "Wash")))
# A single letter and its period ("a.") split when the next word (possibly on the next line,
# i.e. in the next caption) starts a sentence: one of these, capitalised, then a space.
_SENTENCE_STARTERS = "|".join(f"{w[0]}(?i:{w[1:]})" for w in (
    "About", "According", "Additionally", "After", "An", "A", "As", "At", "But", "Earlier", "He",
    "Her", "Here", "However", "If", "In", "It", "Last", "Many", "More", r"Mr\.", r"Ms\.", "Now",
    "Once", "One", "Other", "Our", "She", "Since", "So", "Some", "Such", "That", "The", "Their",
    "Then", "There", "These", "They", "This", "We", "When", "While", "What", "Yet", "You"))
_ABBREV_BEFORE_NUMBER = "ca|figs?|prop|nos?|pp|op"
_ABBREV_DOT = re.compile(rf"(?:{_ABBREV}|(?i:{_ABBREV_BEFORE_NUMBER}))\.")
_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}
_CURRENCY = {"\u20ac": "$", "\u00a3": "#", "\u00a2": "cents"}
_ENTITIES = {"&amp;": "&", "&lt;": "<", "&gt;": ">"}


def _keep(text: str) -> list[str]:
  return [text]


def _drop(text: str) -> list[str]:
  return []


def _without_period(text: str) -> list[str]:
  return [text[:-1]]


def _ascii_apostrophe(text: str) -> list[str]:
  return [text.replace("\u2019", "'").replace("\u2018", "'").replace("`", "'")]


def _dashes(text: str) -> list[str]:
  """PTB3 dashes: 2-4 hyphens (or a Unicode dash) are "--"; one or 5+ hyphens stay as they are."""
  return ["--"] if (2 <= len(text) <= 4 or text[0] != "-") else [text]


def _smiley(text: str) -> list[str]:
  return ["".join(_BRACKETS.get(c, c) for c in text)]


def _single_char(text: str) -> list[str]:
  """A character no other rule takes: a symbol token, or deleted as PTBLexer's "untokenizable"
  (controls, format characters and, as 3.4.1 does, anything outside the Basic Multilingual Plane
  such as emoji)."""
  if ord(text) > 0xFFFF or unicodedata.category(text) in ("Cc", "Cf", "Cs", "Co", "Cn"):
    return []
  return [text]


_I = re.IGNORECASE
_RULE_SPECS = (  # (pattern, flags, action), in tie-breaking order
    (r"(?P<tok>can)not", _I, _keep),
    (r"(?P<tok>gon(?=na)|got(?=ta)|wan(?=na)|lem(?=me)|gim(?=me))(?:na|ta|me)", _I, _keep),
    (r"</?[A-Za-z][A-Za-z0-9:.\-]*>", 0, _keep),  # SGML tags
    (r"(?:https?|ftp)://[^\s\"<>|(){}\[\]]*[^\s\"'<>|.!?(){},;:&\[\]-]", _I, _keep),
    (r"www\.(?:[^\s\"<>|.!?(){},]+\.)+[a-zA-Z]{2,4}", _I, _keep),
    (r"[a-zA-Z0-9][^\s\"<>|()]*@(?:[^\s\"<>|().]+\.)*[^\s\"<>|().]+", 0, _keep),  # e-mail
    # n't: "can't" -> "ca" "n't" (the word before it may not end in n).
    (rf"(?P<tok>{_L}*[a-mo-zA-MO-Z])[nN]['\u2019`\u2018][tT]", 0, _keep),
    (r"n['\u2019`\u2018]t", _I, _ascii_apostrophe),
    # 's 'm 'd 're 've 'll: after "'" not before an ASCII letter ("it'sa" is not split); after
    # "’" always. A word followed by one ends there, even where a longer rule would match.
    (rf"(?P<tok>{_L}{_AN}*){_REDAUX}", _I, _keep),
    (_REDAUX, _I, _ascii_apostrophe),
    (rf"(?:{_APOS}n{_APOS}?|{_APOS}em|{_APOS}[2-9]0s|{_APOS}till?|{_APOS}cause)(?!{_L})", _I,
     _ascii_apostrophe),
    (rf"[A-HJ-XZn]['\u2019`\u2018]{_L}{{2,}}", 0, _keep),  # O'Brien
    (rf"{_L}*[aeiouyAEIOUY]['\u2019`\u2018][aeiouA-Z]{_L}*", 0, _keep),  # "white'an" stays whole
    (rf"[yY]{_APOS}", 0, _ascii_apostrophe),  # y'all -> y' all
    (rf"(?P<tok>{_APOS}t)(?:is|was)(?!{_L})", _I, _ascii_apostrophe),  # 'tis -> 't is
    (rf"(?P<tok>[A-Za-z]\.)\s+(?:{_SENTENCE_STARTERS})\s", 0, _without_period),
    (rf"[A-Za-z](?:\.[A-Za-z])*\.|(?:{_ABBREV})\.", 0, _keep),  # "a." "u.s.a." "st." "etc."
    (rf"(?P<tok>(?:{_ABBREV_BEFORE_NUMBER})\.)\s?\d", _I, _keep),
    (r"[A-Z]+(?:[+&][A-Z]+)+", 0, _keep),  # AT&T (upper case only)
    (r"(?:\d{1,4}[- \u00a0])?\d{1,4}\\?/\d{1,4}", 0, _keep),  # fractions: "1/2", "5 1/2"
    (r"\d{1,2}[-/]\d{1,2}[-/]\d{2,4}", 0, _keep),  # dates
    (rf"{_AN}+(?:-{_L}+){{0,2}}(?:\\?/{_AN}+(?:-{_L}+){{0,2}}){{1,2}}", 0, _keep),  # and/or
    (rf"{_L}{_AN}*(?:[.!?]{_L}{_AN}*)*", 0, _keep),  # words, "st.louis"
    # Hyphenated words and numbers: "3-year-old", "o'clock", "1,000", "-5".
    # Python's alternation is ordered, not longest: one rule per order of the two alternatives.
    (rf"(?:[dDoOlL]{_APOS}{_AN})?(?:{_AN}+|{_DNUM})(?:[-_](?:[dDoOlL]{_APOS}{_AN})?{_AN}+)*", 0,
     _keep),
    (rf"(?:[dDoOlL]{_APOS}{_AN})?(?:{_DNUM}|{_AN}+)(?:[-_](?:[dDoOlL]{_APOS}{_AN})?{_AN}+)*", 0,
     _keep),
    (_NUMBER, 0, _keep),  # signed numbers: "-5", "+3"
    # Words joined by "." or "," before a hyphen: "an,teddy-bear", "a.b-c".
    (rf"{_AN}(?:{_AN}|[.,\u00ad])*(?:-(?:(?:{_AN}|\u00ad)+|[A-Za-z](?:\.[A-Za-z])+\.))+",
     0, _keep),
    (r"@[A-Za-z_][A-Za-z_0-9]*", 0, _keep),
    (rf"#{_L}(?:\w*{_AN})?", 0, _keep),  # hashtags
    (r"[`'\u2018\u2019]'|[`\u2018-\u201f\u00ab\u00bb\u2039\u203a]{1,2}|[\"']", 0, _drop),  # quotes
    (r"[:;=]-?[()\]PpDd](?![^\W_])", 0, _smiley),
    (r"[()\[\]{}]", 0, lambda t: [_BRACKETS[t]]),
    (r"-+|[\u2013\u2014\u2015]", 0, _dashes),
    (r"\.\.\.+|\.|\u2026", 0, _drop),  # periods and ellipses: all in the drop list
    (r"[?!]+", 0, _keep),  # "!!!" and "?!" are kept; "!" and "?" are dropped later
    (r"[,;:]", 0, _drop),
    (r"[A-Z]*\$", 0, _keep),
    (r"[\u20ac\u00a3\u00a2]", 0, lambda t: [_CURRENCY[t]]),
    (r"&(?:amp|lt|gt);", 0, lambda t: [_ENTITIES[t]]),
    (r"@+|#+|_+|\*+", 0, _keep),
    (r".", re.DOTALL, _single_char),
)
_RULES: list[tuple[re.Pattern, Callable[[str], list[str]]]] = [
    (re.compile(pattern, flags), action) for pattern, flags, action in _RULE_SPECS]


def _lex_lines(text: str) -> list[list[str]]:
  """PTB tokens of each "\\n"-separated line of `text`, before lower-casing and punctuation
  removal. As in PTBLexer with -preserveLines, a rule's trailing context may reach the next line."""
  lines, pos, end = [[]], 0, len(text)
  while pos < end:
    space = _SPACE.match(text, pos)
    if space:
      lines.extend([] for _ in range(space.group().count("\n")))
      pos = space.end()
      continue
    plain = _PLAIN_WORD.match(text, pos) or _WORD_AND_MARK.match(text, pos)
    if plain and not (plain.group().endswith(".") and _ABBREV_DOT.fullmatch(plain.group())):
      word = plain.group(plain.lastindex or 0)
      lines[-1].extend(_ASSIMILATIONS.get(word.lower(), (word,)))
      pos = plain.end()
      continue
    best, best_len = None, 0
    for pattern, action in _RULES:
      m = pattern.match(text, pos)
      if m and m.end() - pos > best_len:
        best, best_len = (m, action), m.end() - pos
    m, action = best
    consumed = m.group("tok") if "tok" in m.re.groupindex else m.group()
    lines[-1].extend(action(consumed))
    pos += len(consumed)
  return lines


def _scored_words(tokens: Sequence[str]) -> list[str]:
  """ptbtokenizer.py's filter, then the scorers' whitespace split (a fraction "5 1/2" is one PTB
  token with a no-break space, which Python's split() still splits)."""
  return " ".join(t for t in (t.lower() for t in tokens) if t not in PTB_PUNCTUATION).split()


def tokenize_captions(captions: Sequence[str]) -> list[list[str]]:
  """`tokenize` for a sequence of captions tokenised together, as pycocoevalcap does: one
  caption a line ("\\n" inside a caption becomes a space), so that the start of the next
  caption decides a few boundary cases (see `tokenize`). pycocoevalcap's order is the images in
  the annotation file's order, each with its captions in file order."""
  if not captions:
    return []
  lines = _lex_lines("\n".join(c.replace("\n", " ") for c in captions))
  return [_scored_words(tokens) for tokens in lines]


def tokenize(text: str) -> list[str]:
  """The words pycocoevalcap scores for one caption: PTB tokens, lower-cased, punctuation dropped.

  Reproduces CoreNLP 3.4.1 `PTBTokenizer -preserveLines -lowerCase` followed by the removal of
  `PTB_PUNCTUATION` and the scorers' whitespace split:
    "A Dog's toy (red), isn't it?" -> ["a", "dog", "'s", "toy", "-lrb-", "red", "-rrb-", "is",
                                       "n't", "it"]
  - clitics split off: 's 'm 'd 're 've 'll n't ("can't" -> "ca n't"); "cannot", "gonna",
    "gotta", "wanna", "lemme", "gimme" split in two ("gon na");
  - periods split off except in abbreviations ("st.", "mr.", "etc.", "u.s.", "no. 5") and inside
    words/numbers ("st.louis", "3.5", "1,000", "12:30"); hyphenated words stay whole. A single
    letter keeps its period ("vitamin c.") unless a sentence starter follows ("a. The", also
    across captions: `tokenize_captions`);
  - quotes, periods, ellipses, commas, colons, semicolons, single "!"/"?", "-" and "--" (also
    Unicode dashes) are dropped; "!!!" or "?!" stay; brackets become "-lrb-" "-rrb-" "-lsb-"
    "-rsb-" "-lcb-" "-rcb-" and stay (pycocoevalcap's list holds them upper-case, so they never
    match); "$5" -> "$" "5", "50%" -> "50" "%", "#5" -> "#" "5", "b&w" -> "b" "&" "w".

  This is a re-implementation, not Stanford's lexer: it agrees with the 3.4.1 jar on ordinary
  captions and on the cases in tests/test_caption_metrics.py, and on ~99.5% of deliberately
  garbled random strings. Known differences (all rare in captions): curly apostrophes in odd
  places ("\u2019no", "st\u201910"), apostrophe forms like "'10" or "i'US", emoticons beyond
  :) :( ;) =) :P :D :] and their "-" forms, phone numbers, SGML tags with attributes, URLs and
  e-mails beyond simple ones, Unicode beyond Python's notion of letters and digits (PTBLexer
  deletes some characters as "untokenizable"; here only controls and non-BMP characters such as
  emoji go), currency signs other than $ EUR GBP cent, and Java vs Python lower-casing of special
  letters (dotted I). A carriage return or other line separator inside a caption is a space here;
  in pycocoevalcap it starts a new line and shifts every later caption.
  """
  return tokenize_captions([text])[0]


# ---------------------------------------------------------------------------------------------
# Scores on tokenised captions.
# ---------------------------------------------------------------------------------------------
def ngram_counts(words: Sequence[str], max_n: int) -> collections.Counter:
  """Counts of every 1..max_n-gram (tuples of words) of one tokenised caption."""
  counts = collections.Counter()
  for n in range(1, max_n + 1):
    counts.update(zip(*(words[i:] for i in range(n))))
  return counts


def _closest_length(ref_lengths: Sequence[int], length: int) -> int:
  """The reference length nearest to `length`; on a tie the shorter one (BleuScorer "closest")."""
  return min(ref_lengths, key=lambda r: (abs(r - length), r))


def bleu_from_tokens(references: Mapping[Any, Sequence[Sequence[str]]],
                     predictions: Mapping[Any, Sequence[str]], max_n: int = 4) -> list[float]:
  """Corpus BLEU-1..max_n of tokenised captions (same keys), in [0, 1], as pycocoevalcap's Bleu.

  Per image: guesses g_k = max(0, len - k + 1); matches m_k = sum over the candidate's k-grams of
  min(count, max count in any one reference); r = the closest reference length. Summed over the
  corpus: BLEU-k = prod_{i<=k} ((m_i + 1e-15) / (g_i + 1e-9)) ** (1/k), times the brevity penalty
  exp(1 - R/C) when the ratio (C + 1e-15) / (R + 1e-9) < 1 (C, R: total candidate and closest
  reference lengths; the penalty uses the ratio so smoothed).
  """
  if max_n < 1:
    raise ValueError(f"max_n must be >= 1, got {max_n}")
  matches, guesses = [0] * max_n, [0] * max_n
  cand_len = ref_len = 0
  for key, words in predictions.items():
    refs = references[key]
    max_ref = collections.Counter()
    for ref in refs:
      max_ref |= ngram_counts(ref, max_n)  # element-wise max
    for gram, count in ngram_counts(words, max_n).items():
      matches[len(gram) - 1] += min(count, max_ref[gram])
    for k in range(max_n):
      guesses[k] += max(0, len(words) - k)
    cand_len += len(words)
    ref_len += _closest_length([len(r) for r in refs], len(words))
  ratio = (cand_len + _BLEU_TINY) / (ref_len + _BLEU_SMALL)
  penalty = math.exp(1.0 - 1.0 / ratio) if ratio < 1 else 1.0
  scores, product = [], 1.0
  for k in range(max_n):
    product *= (matches[k] + _BLEU_TINY) / (guesses[k] + _BLEU_SMALL)
    scores.append(product ** (1.0 / (k + 1)) * penalty)
  return scores


def document_frequencies(references: Mapping[Any, Sequence[Sequence[str]]],
                         max_n: int = _CIDER_N) -> collections.Counter:
  """For each n-gram, the number of images with at least one reference containing it."""
  return _document_frequencies({k: [ngram_counts(r, max_n) for r in refs]
                                for k, refs in references.items()})


def _document_frequencies(ref_counts: Mapping[Any, Sequence[Mapping]]) -> collections.Counter:
  df = collections.Counter()
  for counts in ref_counts.values():
    df.update(set().union(*counts))
  return df


def _tfidf(counts: Mapping, length: int, idf: Mapping, log_num_images: float):
  """A caption's TF-IDF vector {gram: tf * (log N - log max(1, df))} over all n, the norm of each
  n's part, and the caption "length" CiderScorer uses: its number of bigrams, max(0, len - 1)
  (sic). `idf` holds log N - log df for the n-grams of the references; others get log N."""
  vec = {gram: tf * idf.get(gram, log_num_images) for gram, tf in counts.items()}
  squares = [0.0] * _CIDER_N
  for gram, weight in vec.items():
    squares[len(gram) - 1] += weight * weight
  return vec, [math.sqrt(s) for s in squares], max(0, length - 1)


def _cider_similarity(cand, ref) -> float:
  """Mean over n of the clipped cosine similarity of candidate and reference, length-penalised."""
  (c_vec, c_norms, c_len), (r_vec, r_norms, r_len) = cand, ref
  dots = [0.0] * _CIDER_N
  for gram, weight in c_vec.items():
    r_weight = r_vec.get(gram)
    if r_weight:
      dots[len(gram) - 1] += min(weight, r_weight) * r_weight
  penalty = math.exp(-((c_len - r_len) ** 2) / (2 * _CIDER_SIGMA ** 2))
  total = 0.0
  for dot, c_norm, r_norm in zip(dots, c_norms, r_norms):
    if c_norm != 0 and r_norm != 0:
      dot /= c_norm * r_norm
    total += dot * penalty
  return total / _CIDER_N


def cider_d_from_tokens(references: Mapping[Any, Sequence[Sequence[str]]],
                        predictions: Mapping[Any, Sequence[str]]) -> float:
  """CIDEr-D of tokenised captions (same keys), as pycocoevalcap's Cider (raw, e.g. 1.391).

  For image i with candidate c and references S_i:
    CIDEr(c, S_i) = 10 / |S_i| * sum_{s in S_i} 1/4 * sum_{n=1..4} exp(-(l_c - l_s)^2 / 72) *
                    sum_g min(v_n(c)[g], v_n(s)[g]) * v_n(s)[g] / (|v_n(c)| |v_n(s)|)
  with v_n(x)[g] = count of n-gram g in x * (log N - log max(1, df(g))), N the number of images,
  df(g) the number of images whose references contain g, l_x = max(0, len(x) - 1) (the bigram
  count, as CiderScorer measures length), and no division when a norm is 0. Result: the mean
  over images.
  """
  ref_counts = {k: [ngram_counts(r, _CIDER_N) for r in refs] for k, refs in references.items()}
  log_n = math.log(float(len(references)))
  idf = {gram: log_n - math.log(max(1.0, df))
         for gram, df in _document_frequencies(ref_counts).items()}
  scores = []
  for key, words in predictions.items():
    cand = _tfidf(ngram_counts(words, _CIDER_N), len(words), idf, log_n)
    refs = [_tfidf(c, len(r), idf, log_n) for c, r in zip(ref_counts[key], references[key])]
    total = sum(_cider_similarity(cand, ref) for ref in refs)
    scores.append(10.0 * total / len(refs))
  return sum(scores) / len(scores)


# ---------------------------------------------------------------------------------------------
# Raw-string API.
# ---------------------------------------------------------------------------------------------
def _ids_text(ids: set) -> str:
  shown = sorted(ids, key=str)[:5]
  return f"{len(ids)} (e.g. {', '.join(repr(i) for i in shown)})"


def check_ids(references: Mapping, predictions: Mapping) -> None:
  """Raises ValueError unless every prediction has references and every image a prediction, each
  prediction is a string and each image has at least one reference string."""
  no_ref = set(predictions) - set(references)
  if no_ref:
    raise ValueError(f"predictions without references for image ids: {_ids_text(no_ref)}")
  no_pred = set(references) - set(predictions)
  if no_pred:
    raise ValueError(f"references without a prediction for image ids: {_ids_text(no_pred)}")
  if not predictions:
    raise ValueError("no predictions to score")
  for key, caption in predictions.items():
    if not isinstance(caption, str):
      raise ValueError(f"image {key!r}: prediction must be a string, got {caption!r:.100}")
  for key, refs in references.items():
    if isinstance(refs, str) or not refs or not all(isinstance(r, str) for r in refs):
      raise ValueError(f"image {key!r}: references must be a non-empty list of strings, "
                       f"got {refs!r:.100}")


def _tokenized(references: Mapping[Any, Sequence[str]], predictions: Mapping[Any, str]):
  """Both sides tokenised as pycocoevalcap does: all references as one text, then all
  predictions as another, images in the order of `references`."""
  check_ids(references, predictions)
  words = iter(tokenize_captions([c for refs in references.values() for c in refs]))
  refs = {k: [next(words) for _ in v] for k, v in references.items()}
  preds = dict(zip(references, tokenize_captions([predictions[k] for k in references])))
  return refs, preds


def bleu(references: Mapping[Any, Sequence[str]], predictions: Mapping[Any, str],
         max_n: int = 4) -> list[float]:
  """Corpus BLEU-1..max_n in [0, 1] of raw captions, tokenised here with `tokenize`.

  Args:
    references: {image_id: [raw reference caption, ...]}.
    predictions: {image_id: raw predicted caption}; same ids as `references`.
    max_n: highest n-gram order (pycocoevalcap supports up to 4).
  """
  return bleu_from_tokens(*_tokenized(references, predictions), max_n=max_n)


def cider_d(references: Mapping[Any, Sequence[str]], predictions: Mapping[Any, str]) -> float:
  """CIDEr-D (pycocoevalcap's `Cider`, raw e.g. 1.391) of raw captions, tokenised with `tokenize`.
  Document frequencies come from the references passed in: score the whole test set at once."""
  return cider_d_from_tokens(*_tokenized(references, predictions))


def score_captions(references: Mapping[Any, Sequence[str]],
                   predictions: Mapping[Any, str]) -> dict[str, float]:
  """{"bleu_1", ..., "bleu_4", "cider"} x100 (BLEU-4 40.2, CIDEr 139.1) of raw captions.

  Raises:
    ValueError naming the image ids that have a prediction but no references or references but
    no prediction, or when a caption is not a string.
  """
  refs, preds = _tokenized(references, predictions)
  metrics = {f"bleu_{k + 1}": 100.0 * s for k, s in enumerate(bleu_from_tokens(refs, preds, 4))}
  metrics["cider"] = 100.0 * cider_d_from_tokens(refs, preds)
  return metrics


# ---------------------------------------------------------------------------------------------
# Files.
# ---------------------------------------------------------------------------------------------
_TRAILING_DIGITS = re.compile(r"(\d+)$")


def normalize_image_id(value: Any) -> Any:
  """Integer ids stay; a string of digits becomes its int (so "391895" meets 391895); other
  strings stay as they are."""
  if isinstance(value, bool) or not isinstance(value, (int, str)):
    raise ValueError(f"image id must be an int or a string, got {value!r:.100}")
  if isinstance(value, str) and value.strip().isdigit():
    return int(value.strip())
  return value


def image_id_from_path(path: str) -> int:
  """The reference's id of an image file: the trailing digits of its name without extension,
  "val2014/COCO_val2014_000000391895.jpg" -> 391895."""
  stem = os.path.splitext(os.path.basename(path))[0]
  match = _TRAILING_DIGITS.search(stem)
  if not match:
    raise ValueError(f"no image id (trailing digits) in the file name {path!r}")
  return int(match.group(1))


def _read_records(path: str | os.PathLike):
  """The parsed JSON document, or the list of records of a JSON-lines file (`.jsonl`)."""
  path = os.fspath(path)
  with open(path) as f:
    if path.endswith(".jsonl"):
      records = []
      for line_no, line in enumerate(f, 1):
        if line.strip():
          try:
            records.append(json.loads(line))
          except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {line_no}: invalid JSON: {e}") from None
      return records
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: invalid JSON: {e}") from None


def _caption_list(value: Any, where: str) -> list[str]:
  captions = [value] if isinstance(value, str) else value
  if not isinstance(captions, list) or not captions or not all(isinstance(c, str)
                                                                for c in captions):
    raise ValueError(f"{where}: 'caption' must be a string or a non-empty list of strings, "
                     f"got {value!r:.100}")
  return captions


def load_references(path: str | os.PathLike) -> dict[Any, list[str]]:
  """{image_id: [caption, ...]} from COCO caption annotations or a Karpathy-style file.

  COCO: {"annotations": [{"image_id", "caption"}, ...]}, images in the order of an "images"
  list when there is one (other keys ignored). Karpathy: a JSON list or JSONL of
  {"image", "caption": str | [str, ...]} with the id from "image_id" when present, else from the
  file name's trailing digits (`image_id_from_path`); records of the same image are merged.
  Ids go through `normalize_image_id`.
  """
  data = _read_records(path)
  refs: dict[Any, list[str]] = collections.defaultdict(list)
  if isinstance(data, dict):
    if not isinstance(data.get("annotations"), list):
      raise ValueError(f"{path}: expected a list of records or an object with an 'annotations' "
                       f"list, found keys {sorted(data)[:10]}")
    for i, ann in enumerate(data["annotations"]):
      where = f"{path}: annotation {i}"
      if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
        raise ValueError(f"{where}: expected {{'image_id', 'caption'}}, got {ann!r:.200}")
      if not isinstance(ann["caption"], str):
        raise ValueError(f"{where}: 'caption' must be a string, got {ann['caption']!r:.100}")
      refs[_normalize_id_at(ann["image_id"], where)].append(ann["caption"])
    refs = _in_images_order(refs, data.get("images"), f"{path}: images")
  elif isinstance(data, list):
    for i, rec in enumerate(data):
      where = f"{path}: record {i}"
      if not isinstance(rec, dict) or "caption" not in rec:
        raise ValueError(f"{where}: expected {{'image', 'caption'}}, got {rec!r:.200}")
      if "image_id" in rec:
        key = _normalize_id_at(rec["image_id"], where)
      elif isinstance(rec.get("image"), str):
        try:
          key = image_id_from_path(rec["image"])
        except ValueError as e:
          raise ValueError(f"{where}: {e}") from None
      else:
        raise ValueError(f"{where}: needs an 'image_id' or an 'image' file name, got {rec!r:.200}")
      refs[key].extend(_caption_list(rec["caption"], where))
  else:
    raise ValueError(f"{path}: expected a JSON list or object, got {type(data).__name__}")
  if not refs:
    raise ValueError(f"{path}: no references")
  return dict(refs)


def _in_images_order(refs: dict, images: Any, where: str) -> dict:
  """References ordered as the file's "images" list (pycocoevalcap tokenises in that order, which
  decides a few tokenisation boundary cases); images it does not list come last."""
  if not isinstance(images, list):
    return refs
  order = [_normalize_id_at(im["id"], where) for im in images
           if isinstance(im, dict) and "id" in im]
  ordered = {k: refs[k] for k in order if k in refs}
  ordered.update((k, v) for k, v in refs.items() if k not in ordered)
  return ordered


def _normalize_id_at(value: Any, where: str) -> Any:
  try:
    return normalize_image_id(value)
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None


def load_predictions(path: str | os.PathLike) -> dict[Any, str]:
  """{image_id: caption} from the COCO result format [{"image_id", "caption"}, ...] (JSON list or
  JSONL). An image predicted twice is an error (pycocoevalcap's Bleu asserts one per image)."""
  data = _read_records(path)
  if not isinstance(data, list):
    raise ValueError(f"{path}: expected a JSON list of {{'image_id', 'caption'}} records, got "
                     f"{type(data).__name__}")
  preds: dict[Any, str] = {}
  for i, rec in enumerate(data):
    where = f"{path}: record {i}"
    if not isinstance(rec, dict) or "image_id" not in rec or "caption" not in rec:
      raise ValueError(f"{where}: expected {{'image_id', 'caption'}}, got {rec!r:.200}")
    if not isinstance(rec["caption"], str):
      raise ValueError(f"{where}: 'caption' must be a string, got {rec['caption']!r:.100}")
    key = _normalize_id_at(rec["image_id"], where)
    if key in preds:
      raise ValueError(f"{where}: image {key!r} is predicted twice")
    preds[key] = rec["caption"]
  if not preds:
    raise ValueError(f"{path}: no predictions")
  return preds
