"""VQA accuracy exactly as the official VQA evaluation (`vqaEval.py`, vendored by the reference as
vqaTools/vqaEval.py) computes and prints it, quirks included.

For a question with 10 human answers, a predicted answer scores the average, over the 10 ways of
leaving one human answer out, of min(#remaining humans who gave that answer / 3, 1). What is
compared, as the official code does it:

  * the prediction: newlines and tabs -> spaces, stripped, then `process_punctuation`, then
    `process_digit_article` (lower-cased; number words -> digits; articles dropped;
    apostrophe-less contractions restored). Always, whether or not the humans agree.
  * the human answers: used raw (not stripped, not lower-cased) when all of them are the same
    string; when they disagree, each goes through `process_punctuation` only.
Quirks this reproduces (each checked in tests/test_vqa_metrics.py):
  1. Humans who agree are not normalised, the prediction is: "Two" scores 1 against ten "2",
     "yes" scores 0 against ten "Yes".
  2. Humans who disagree get punctuation handling only: "two" from a human never equals a
     prediction, whose "two" became "2"; "Yes" never equals a lower-cased prediction.
  3. `process_punctuation` replaces a mark that touches no space with a space and never strips:
     a human "yes!" becomes "yes " (trailing space) and matches nothing; the prediction's "yes!"
     becomes "yes" (its words are re-joined by `process_digit_article`).
  4. A mark is deleted instead when that mark touches a space anywhere in the text ("red, white-
     blue" -> "red white blue"), and every mark is when the text has a digit,digit anywhere
     ("1,000 cars!" -> "1000 cars").
  5. The period pattern `(?!<=\d)(\.)(?!\d)` is a lookahead written for a lookbehind: it deletes
     every period not followed by a digit, and `re.UNICODE` (32) sits where `count` goes: at most
     32 periods per text are deleted.
  6. Human answers are not stripped: " yes" stays " yes".
  7. The leave-one-out is by position (the official answers carry distinct answer ids).
  8. The printed accuracies are rounded to 2 decimals: overall, per answer type and per question
     type are round(100 x mean, 2) of the unrounded per-question accuracies.

Files (the official formats):
  annotations  {"annotations": [{"question_id", "answers": [{"answer": str}, ...],
                                 "answer_type", "question_type", ...}, ...]}
  questions    {"questions": [{"question_id", "image_id", "question"}, ...]}
  predictions  [{"question_id", "answer"}, ...]
"""
from __future__ import annotations

import collections
import json
import re
from typing import Iterable, Mapping, Sequence

_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                 "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset(("a", "an", "the"))
# Contractions written without their apostrophe, as annotators type them, and their full form.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
                "@", "`", ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_IN_NUMBER = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: the official pattern


def clean_whitespace(answer: str) -> str:
  """Newlines and tabs to spaces, stripped (the prediction only)."""
  return answer.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
  """The official `processPunctuation`: each punctuation mark is deleted when it touches a space
  somewhere in `text` or `text` has a digit,digit, else replaced by a space; then periods not
  followed by a digit are deleted (at most 32; quirks 3-5 of the module docstring)."""
  out = text
  for mark in _PUNCTUATION:
    if (mark + " " in text or " " + mark in text) or _DIGIT_COMMA_DIGIT.search(text):
      out = out.replace(mark, "")
    else:
      out = out.replace(mark, " ")
  return _PERIOD_NOT_IN_NUMBER.sub("", out, count=32)  # sic: the official call's re.UNICODE


def process_digit_article(text: str) -> str:
  """The official `processDigitArticle`: lower-cased words, number words -> digits, articles
  dropped, contractions restored, joined by single spaces."""
  words = []
  for word in text.lower().split():
    word = _NUMBER_WORDS.get(word, word)
    if word not in _ARTICLES:
      words.append(word)
  return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_prediction(answer: str) -> str:
  """What the official evaluation compares a predicted answer as."""
  return process_digit_article(process_punctuation(clean_whitespace(answer)))


def normalize_humans(answers: Sequence[str]) -> list[str]:
  """What it compares the human answers as: raw when they all agree, else punctuation-processed."""
  answers = list(answers)
  if len(set(answers)) > 1:
    return [process_punctuation(a) for a in answers]
  return answers


def question_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
  """Accuracy in [0, 1] of one predicted answer against the human answers (usually 10), as the
  official evaluation computes it (module docstring)."""
  if not human_answers:
    raise ValueError("a question needs at least one human answer")
  humans = normalize_humans(human_answers)
  prediction = normalize_prediction(prediction)
  scores = []
  for left_out in range(len(humans)):
    matches = sum(1 for i, a in enumerate(humans) if i != left_out and a == prediction)
    scores.append(min(1.0, matches / 3.0))
  return sum(scores) / len(scores)


def printed_accuracy(accuracies: Sequence[float]) -> float:
  """round(100 x mean, 2) of per-question accuracies in [0, 1]: the number the official code
  prints."""
  if not accuracies:
    raise ValueError("no questions")
  return round(100.0 * float(sum(accuracies)) / len(accuracies), 2)


def vqa_accuracy(predictions: Iterable[Mapping], annotations: Iterable[Mapping],
                 questions: Iterable[Mapping] | None = None) -> dict:
  """Overall / per answer type / per question type accuracy (percent, rounded to 2 decimals as the
  official code prints them) over the predicted questions.

  Args:
    predictions: [{"question_id", "answer"}, ...], one per question.
    annotations: the official annotation entries, or the reference's question records
      {"question_id", "answer": [str, ...]}.
    questions: optional official question entries; every one must have a prediction.
  Returns:
    {"overall": float, "per_answer_type": {type: float}, "per_question_type": {type: float},
     "num_questions": int}.
  Raises:
    ValueError naming question ids without annotations, predicted twice, or not predicted.
  """
  by_id = {a["question_id"]: a for a in annotations}
  answered = {}
  for p in predictions:
    qid = p["question_id"]
    if qid in answered:
      raise ValueError(f"question {qid} is predicted twice")
    if qid not in by_id:
      raise ValueError(f"question {qid} has a prediction but no annotation")
    answered[qid] = str(p["answer"])
  if questions is not None:
    missing = sorted({q["question_id"] for q in questions} - set(answered))
    if missing:
      raise ValueError(f"{len(missing)} questions have no prediction, e.g. {missing[:5]}")
  if not answered:
    raise ValueError("no predictions")
  per_answer_type, per_question_type = collections.defaultdict(list), collections.defaultdict(list)
  total = []
  for qid, answer in answered.items():
    ann = by_id[qid]
    given = ann.get("answers", ann.get("answer"))  # official annotations / reference records
    if isinstance(given, str):
      given = [given]
    if not isinstance(given, list) or not given:
      raise ValueError(f"question {qid}: its annotation has no 'answers' list")
    humans = [a["answer"] if isinstance(a, Mapping) else str(a) for a in given]
    acc = question_accuracy(answer, humans)
    total.append(acc)
    if "answer_type" in ann:
      per_answer_type[ann["answer_type"]].append(acc)
    if "question_type" in ann:
      per_question_type[ann["question_type"]].append(acc)
  mean = printed_accuracy
  return {"overall": mean(total),
          "per_answer_type": {k: mean(v) for k, v in sorted(per_answer_type.items())},
          "per_question_type": {k: mean(v) for k, v in sorted(per_question_type.items())},
          "num_questions": len(total)}


def load_json(path: str, key: str | None = None) -> list:
  """A JSON list, the list under `key` of a JSON object (the official files wrap theirs), or the
  records of a JSON-lines file (`.jsonl`)."""
  with open(path) as f:
    if path.endswith(".jsonl"):
      return [json.loads(line) for line in f if line.strip()]
    data = json.load(f)
  if isinstance(data, dict):
    if key is None or key not in data:
      raise ValueError(f"{path}: expected a list{f' or an object with {key!r}' if key else ''}")
    data = data[key]
  if not isinstance(data, list):
    raise ValueError(f"{path}: expected a list of records")
  return data
