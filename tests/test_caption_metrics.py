"""COCO caption metrics (pycocoevalcap's BLEU and CIDEr-D) on cases computed by hand."""
import json
import math
import os
import random
import shutil
import subprocess
import sys

import pytest

from x2vlm_jax.evaluate import caption_metrics as cm

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (raw caption, what pycocoevalcap scores), the right-hand sides produced by the CoreNLP 3.4.1 jar
# that pycocoevalcap ships (PTBTokenizer -preserveLines -lowerCase, then its punctuation filter).
TOKENIZER_CASES = [
    ("A man riding a wave on top of a surfboard.",
     "a man riding a wave on top of a surfboard"),
    ("A Dog's toy (red), isn't it?", "a dog 's toy -lrb- red -rrb- is n't it"),
    ("Two men, who can't stand, are \"playing\" at St. Mary's -- or not...",
     "two men who ca n't stand are playing at st. mary 's or not"),
    ("I'm here, you're there, we'd go, they'll see; won't they?",
     "i 'm here you 're there we 'd go they 'll see wo n't they"),
    ("the dogs' toys are on the table", "the dogs toys are on the table"),
    ("A 3-year-old boy in a t-shirt holds 1,000 $5.50 bills at 10:30 p.m.",
     "a 3-year-old boy in a t-shirt holds 1,000 $ 5.50 bills at 10:30 p.m."),
    ("A [big] {cat} costs 10% & a b&w photo of AT&T",
     "a -lsb- big -rsb- -lcb- cat -rcb- costs 10 % & a b & w photo of at&t"),
    ("He said ``hi'' and `ok' to Mr. Smith, Dr. Who vs. the U.S.A. etc.",
     "he said hi and ok to mr. smith dr. who vs. the u.s.a. etc."),
    ("Wow!!! Is it?! Yes - sure -- fine ... ok.", "wow !!! is it ?! yes sure fine ok"),
    ("plates, cups, etc.", "plates cups etc."),
    ("a vitamin c. tablet", "a vitamin c. tablet"),
    ("a bus on no. 5 and a fig.", "a bus on no. 5 and a fig"),
    ("Cannot, gonna, gotta, wanna: lemme gimme", "can not gon na got ta wan na lem me gim me"),
    ("A dog\u2019s bone \u2013 a \u201cquoted\u201d word\u2014done",
     "a dog 's bone a quoted word done"),
    ("A tv/dvd set, 1/2 of a pie and/or cake", "a tv/dvd set 1/2 of a pie and/or cake"),
    ("the wash. The Wash. in la. in La. miss. Miss.", "the wash the wash. in la in la. miss miss."),
    ("a cat:) and a dog", "a cat :-rrb- and a dog"),
    ("it'sa trick o'clock rock 'n' roll", "it sa trick o'clock rock 'n' roll"),
]


@pytest.mark.parametrize("raw,expected", TOKENIZER_CASES)
def test_tokenize_matches_ptbtokenizer(raw, expected):
  assert cm.tokenize(raw) == expected.split()


def test_tokenize_captions_sees_the_next_caption():
  # A single letter loses its period when the next line starts a sentence ("A man"), as in
  # pycocoevalcap, which tokenises all captions as the lines of one file.
  assert cm.tokenize_captions(["the letter a.", "A man sits."]) == [
      ["the", "letter", "a"], ["a", "man", "sits"]]
  assert cm.tokenize_captions(["the letter a.", "a man sits."]) == [
      ["the", "letter", "a."], ["a", "man", "sits"]]
  assert cm.tokenize_captions(["a\nb", ""]) == [["a", "b"], []]  # "\n" inside a caption: a space
  assert cm.tokenize_captions([]) == []


def test_bleu_of_identical_captions_is_100():
  refs = {1: ["A red bus on the road."], 2: ["Two cats sleep on a sofa"]}
  preds = {1: "a red bus on the road", 2: "two cats sleep on a sofa ."}
  # Every n-gram matches: each precision is (m + 1e-15) / (m + 1e-9) = 1 - O(1e-10).
  assert cm.bleu(refs, preds) == pytest.approx([1.0] * 4, abs=1e-8)


def test_bleu_by_hand_with_brevity_penalty():
  refs = {0: ["The cat sat on the mat.", "There is a cat on the mat."]}
  preds = {0: "The cat on the mat."}
  # Candidate: the cat on the mat (5 words); references 6 and 7 words, closest r = 6.
  # 1-grams: the x2 (clipped by "the" x2 in ref 1), cat, on, mat: 5/5.
  # 2-grams: the cat (ref 1), cat on (ref 2), on the, the mat: 4/4.
  # 3-grams: "the cat on" nowhere, "cat on the", "on the mat" (ref 2): 2/3.
  # 4-grams: "the cat on the" nowhere, "cat on the mat" (ref 2): 1/2.
  # Brevity penalty: c = 5 < r = 6 -> exp(1 - 6/5).
  bp = math.exp(1 - 6 / 5)
  expected = [bp, bp, (2 / 3) ** (1 / 3) * bp, (1 / 3) ** (1 / 4) * bp]
  assert cm.bleu(refs, preds) == pytest.approx(expected, rel=1e-8)
  assert cm.bleu(refs, preds, max_n=2) == pytest.approx(expected[:2], rel=1e-8)
  assert expected[3] == pytest.approx(0.6221, abs=1e-4)


def test_bleu_closest_length_ties_go_to_the_shorter_reference():
  refs = {0: ["a man rides horse", "a man is riding a horse"]}  # 4 and 6 words
  preds = {0: "a man riding a horse"}  # 5 words: both at distance 1, r = 4 -> no penalty
  # 1-grams a x2 (ref 2 has two), man, riding, horse: 5/5; with r = 6 it would be exp(-0.2).
  assert cm.bleu(refs, preds)[0] == pytest.approx(1.0, abs=1e-8)


def test_bleu_is_corpus_level():
  refs = {0: ["a b c d"], 1: ["e f g h"]}
  preds = {0: "a b c d", 1: "e x"}
  # Unigram matches summed over images: (4 + 1) / (4 + 2); lengths 6 vs 8 -> exp(1 - 8/6).
  assert cm.bleu(refs, preds)[0] == pytest.approx(5 / 6 * math.exp(1 - 8 / 6), rel=1e-8)


def test_cider_of_identical_captions_with_unique_ngrams_is_10():
  # Two images whose n-grams appear in one image each: every weight is log(2) (df = 1, N = 2),
  # candidate and reference vectors coincide (cosine 1 for n = 1..4), no length penalty:
  # 10 * mean_n(1) = 10 per image.
  refs = {1: ["A red bus on the road."], 2: ["Two cats sleep at home"]}
  preds = {1: "a red bus on the road", 2: "Two cats sleep at home."}
  assert cm.cider_d(refs, preds) == pytest.approx(10.0, rel=1e-12)
  metrics = cm.score_captions(refs, preds)
  assert metrics["cider"] == pytest.approx(1000.0)
  assert metrics["bleu_4"] == pytest.approx(100.0, abs=1e-6)
  assert list(metrics) == ["bleu_1", "bleu_2", "bleu_3", "bleu_4", "cider"]


def test_cider_by_hand_on_three_images():
  refs = {1: ["a dog"], 2: ["a cat"], 3: ["one bird"]}
  preds = {1: "a dog", 2: "a cat", 3: "a bird bird"}
  # N = 3. df: "a" 2 (images 1, 2), every other n-gram of the references 1.
  # idf = log 3 - log max(1, df): "a" -> log 1.5, the rest (and unseen n-grams, df 0) -> log 3.
  # Images 1 and 2: candidate == reference; unigram and bigram cosines 1, no 3/4-grams (zero
  #   norms: 0): 10 * (1 + 1 + 0 + 0) / 4 = 5.
  # Image 3: candidate unigrams a: log 1.5, bird: 2 log 3; reference one: log 3, bird: log 3.
  #   Clipped dot: min(2 log 3, log 3) * log 3 = log^2 3 ("a" is not in the reference).
  #   Norms: sqrt(log^2 1.5 + 4 log^2 3) and sqrt(2) log 3. No bigram in common.
  #   Length penalty: bigram counts 2 vs 1 -> exp(-1 / 72).
  #   10 / 4 * log 3 / (sqrt(2) sqrt(log^2 1.5 + 4 log^2 3)) * exp(-1/72) = 0.857219...
  l3, l15 = math.log(3), math.log(1.5)
  image3 = 2.5 * l3 / (math.sqrt(2) * math.sqrt(l15 ** 2 + 4 * l3 ** 2)) * math.exp(-1 / 72)
  assert image3 == pytest.approx(0.857219, abs=1e-6)
  assert cm.cider_d(refs, preds) == pytest.approx((5 + 5 + image3) / 3, rel=1e-12)
  # Several references: the similarity is averaged over them. Adding "a dog" twice more to
  # image 1 changes no document frequency, so its score stays 5.
  refs[1] = ["a dog"] * 3
  assert cm.cider_d(refs, preds) == pytest.approx((5 + 5 + image3) / 3, rel=1e-12)
  # One image only: log N = 0, every weight is 0, CIDEr 0 (as pycocoevalcap).
  assert cm.cider_d({1: ["a dog"]}, {1: "a dog"}) == 0.0


def test_mismatched_ids_are_named():
  with pytest.raises(ValueError, match=r"without references.*\b7\b"):
    cm.score_captions({1: ["a dog"]}, {1: "a dog", 7: "a cat"})
  with pytest.raises(ValueError, match=r"without a prediction.*\b2\b"):
    cm.score_captions({1: ["a dog"], 2: ["a cat"]}, {1: "a dog"})
  with pytest.raises(ValueError, match="non-empty list"):
    cm.bleu({1: []}, {1: "a dog"})
  with pytest.raises(ValueError, match="must be a string"):
    cm.cider_d({1: ["a dog"]}, {1: ["a dog"]})


def _write(path, data):
  path.write_text(data if isinstance(data, str) else json.dumps(data))
  return str(path)


def test_load_references_coco_and_karpathy_formats(tmp_path):
  coco = _write(tmp_path / "gt.json", {
      "images": [{"id": 391895}],
      "annotations": [{"image_id": 522418, "id": 2, "caption": "A woman."},
                      {"image_id": 391895, "id": 1, "caption": "A man."},
                      {"image_id": 391895, "id": 3, "caption": "A person."}]})
  loaded = cm.load_references(coco)
  assert loaded == {391895: ["A man.", "A person."], 522418: ["A woman."]}
  assert list(loaded) == [391895, 522418]  # the "images" order, then unlisted images
  karpathy = _write(tmp_path / "test.json", [
      {"image": "val2014/COCO_val2014_000000391895.jpg", "caption": ["A man.", "A person."]},
      {"image": "val2014/COCO_val2014_000000522418.jpg", "caption": "A woman."},
      {"image": "anything.jpg", "image_id": "184613", "caption": ["A cow."]}])
  assert cm.load_references(karpathy) == {391895: ["A man.", "A person."],
                                          522418: ["A woman."], 184613: ["A cow."]}
  jsonl = _write(tmp_path / "test.jsonl",
                 '{"image": "a/img_7.png", "caption": "x"}\n\n{"image": "b/img_7.png", '
                 '"caption": ["y"]}\n')
  assert cm.load_references(jsonl) == {7: ["x", "y"]}  # records of one image merge
  assert cm.image_id_from_path("COCO_val2014_000000391895.jpg") == 391895


def test_load_errors_name_file_and_record(tmp_path):
  bad = _write(tmp_path / "bad.json", [{"image": "a/1.jpg", "caption": ["x"]},
                                       {"image": "a/no_digits.jpg", "caption": ["y"]}])
  with pytest.raises(ValueError, match=r"bad\.json: record 1: .*no_digits"):
    cm.load_references(bad)
  no_caption = _write(tmp_path / "nc.json", {"annotations": [{"image_id": 1}]})
  with pytest.raises(ValueError, match=r"nc\.json: annotation 0"):
    cm.load_references(no_caption)
  broken = _write(tmp_path / "broken.jsonl", '{"image": "1.jpg", "caption": "x"}\n{oops\n')
  with pytest.raises(ValueError, match=r"broken\.jsonl: line 2: invalid JSON"):
    cm.load_references(broken)
  twice = _write(tmp_path / "res.json", [{"image_id": 1, "caption": "a"},
                                         {"image_id": "1", "caption": "b"}])
  with pytest.raises(ValueError, match=r"res\.json: record 1: image 1 is predicted twice"):
    cm.load_predictions(twice)
  wrapped = _write(tmp_path / "wrapped.json", {"annotations": []})
  with pytest.raises(ValueError, match="expected a JSON list"):
    cm.load_predictions(wrapped)
  ok = _write(tmp_path / "ok.json", [{"image_id": 5, "caption": "a dog"}])
  assert cm.load_predictions(ok) == {5: "a dog"}


def test_cli(tmp_path):
  gt = _write(tmp_path / "gt.json", {"annotations": [
      {"image_id": i, "caption": c} for i, c in
      [(1, "A red bus on the road."), (2, "Two cats sleep at home"), (3, "A dog runs.")]]})
  res = _write(tmp_path / "res.json", [{"image_id": 1, "caption": "a red bus on the road"},
                                       {"image_id": 2, "caption": "two cats sleep at home"}])
  tool = os.path.join(_ROOT, "tools", "score_captions.py")
  run = lambda *args: subprocess.run([sys.executable, tool, "--predictions", res,
                                      "--annotations", gt, *args], capture_output=True,
                                     text=True, timeout=60)
  failed = run()  # image 3 has no prediction
  assert failed.returncode != 0 and "without a prediction" in failed.stderr
  done = run("--only-predicted", "--out", str(tmp_path / "m.json"))
  assert done.returncode == 0, done.stderr
  metrics = json.loads(done.stdout.strip().splitlines()[-1])
  assert metrics["cider"] == pytest.approx(1000.0) and metrics["num_images"] == 2
  assert metrics["bleu_4"] == pytest.approx(100.0, abs=1e-6)
  assert json.loads((tmp_path / "m.json").read_text()) == metrics


def _random_corpus(seed, num_images=20):
  rng = random.Random(seed)
  vocab = "a the man dog cat on in with red sitting table two of is".split()
  caption = lambda lo: [rng.choice(vocab) for _ in range(rng.randint(lo, 14))]
  refs = {i: [caption(1) for _ in range(rng.randint(1, 5))] for i in range(num_images)}
  preds = {i: caption(0) for i in range(num_images)}
  return refs, preds


def test_matches_pycocoevalcap_scorers():
  bleu_scorer = pytest.importorskip("pycocoevalcap.bleu.bleu_scorer")
  cider_scorer = pytest.importorskip("pycocoevalcap.cider.cider_scorer")
  for seed in range(3):
    refs, preds = _random_corpus(seed)
    theirs_bleu = bleu_scorer.BleuScorer(n=4)
    theirs_cider = cider_scorer.CiderScorer(n=4, sigma=6.0)
    for i in refs:
      pair = (" ".join(preds[i]), [" ".join(r) for r in refs[i]])
      theirs_bleu += pair
      theirs_cider += pair
    bleu, _ = theirs_bleu.compute_score(option="closest", verbose=0)
    cider, _ = theirs_cider.compute_score()
    assert cm.bleu_from_tokens(refs, preds) == pytest.approx(bleu, rel=1e-12, abs=1e-15)
    assert cm.cider_d_from_tokens(refs, preds) == pytest.approx(float(cider), rel=1e-12)


def test_tokenizer_matches_the_java_ptbtokenizer(tmp_path):
  pytest.importorskip("pycocoevalcap")
  ptb = pytest.importorskip("pycocoevalcap.tokenizer.ptbtokenizer")
  jar = os.path.join(os.path.dirname(ptb.__file__), ptb.STANFORD_CORENLP_3_4_1_JAR)
  if not shutil.which("java") or not os.path.exists(jar):
    pytest.skip("needs java and the CoreNLP jar pycocoevalcap ships")
  captions = [raw for raw, _ in TOKENIZER_CASES] + ["the letter a.", "A man sits.", "Plan B."]
  (tmp_path / "captions.txt").write_text("\n".join(captions))
  out = subprocess.run(["java", "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer",
                        "-preserveLines", "-lowerCase", str(tmp_path / "captions.txt")],
                       capture_output=True, text=True, timeout=120, check=True).stdout
  java = [" ".join(w for w in line.rstrip().split(" ") if w not in ptb.PUNCTUATIONS).split()
          for line in out.split("\n")[:len(captions)]]
  assert cm.tokenize_captions(captions) == java
