"""The official VQA accuracy on crafted cases computed by hand."""
import json

import pytest

from tools import score_vqa
from x2vlm_jax.evaluate import vqa_metrics as vm


def test_normalisation_rules():
  assert vm.normalize_answer("Two") == "2"
  assert vm.normalize_answer("the dog") == "dog"
  assert vm.normalize_answer("a red, white bus!") == "red white bus"  # ", " touches a space
  assert vm.normalize_answer("1,000") == "1000"  # digit,digit: commas deleted
  assert vm.normalize_answer("left-hand") == "left hand"  # hyphen -> space
  assert vm.normalize_answer("3.5") == "3.5"  # a decimal point stays
  assert vm.normalize_answer("yes.") == "yes"
  assert vm.normalize_answer("dont know") == "don't know"
  assert vm.normalize_answer("  none\t") == "0"


def test_partial_agreement_over_the_leave_one_out_subsets():
  ten = ["2"] * 3 + ["3"] * 7
  # Predicting "2": leaving out one of the three "2" (3 subsets) leaves 2 matches -> 2/3; the 7
  # other subsets keep 3 matches -> 1. Mean = (3 * 2/3 + 7 * 1) / 10 = 0.9.
  assert vm.question_accuracy("2", ten) == pytest.approx(0.9)
  assert vm.question_accuracy("3", ten) == pytest.approx(1.0)
  one = ["cat"] + ["dog"] * 9  # "cat" once: 9 subsets with 1 match (1/3), one with 0 -> 0.3
  assert vm.question_accuracy("cat", one) == pytest.approx(0.3)
  assert vm.question_accuracy("horse", one) == 0.0
  # Normalisation applies when humans disagree: "Two" matches "2", "two" and "2" (3 of 4):
  # three subsets keep 2 matches (2/3), the one without "3" keeps 3 (1) -> 0.75.
  assert vm.question_accuracy("Two", ["2", "two", "2", "3"]) == pytest.approx(0.75)
  # ... but not when they all agree (the official quirk): "Two" vs ten "2" scores 0.
  assert vm.question_accuracy("Two", ["2"] * 10) == 0.0


def test_overall_and_per_type_accuracy_and_the_tool(tmp_path, capsys):
  annotations = {"annotations": [
      {"question_id": 1, "answer_type": "yes/no", "question_type": "is the",
       "answers": [{"answer": "yes"}] * 10},
      {"question_id": 2, "answer_type": "number", "question_type": "how many",
       "answers": [{"answer": a} for a in ["2"] * 3 + ["3"] * 7]},
      {"question_id": 3, "answer_type": "other", "question_type": "what color",
       "answers": [{"answer": a} for a in ["red"] + ["blue"] * 9]},
  ]}
  questions = {"questions": [{"question_id": q, "image_id": 0, "question": "?"} for q in (1, 2, 3)]}
  predictions = [{"question_id": 1, "answer": "yes"}, {"question_id": 2, "answer": "2"},
                 {"question_id": 3, "answer": "red"}]
  for name, data in (("a", annotations), ("q", questions), ("p", predictions)):
    (tmp_path / f"{name}.json").write_text(json.dumps(data))
  metrics = score_vqa.main(["--predictions", str(tmp_path / "p.json"), "--annotations",
                            str(tmp_path / "a.json"), "--questions", str(tmp_path / "q.json")])
  assert metrics["overall"] == pytest.approx(100 * (1.0 + 0.9 + 0.3) / 3)
  assert metrics["per_answer_type"] == pytest.approx({"yes/no": 100.0, "number": 90.0,
                                                      "other": 30.0})
  assert metrics["per_question_type"]["how many"] == pytest.approx(90.0)
  assert "overall: 73.33" in capsys.readouterr().out
  # A question without a prediction is an error when the question file is given.
  (tmp_path / "p2.json").write_text(json.dumps(predictions[:2]))
  with pytest.raises(SystemExit):
    score_vqa.main(["--predictions", str(tmp_path / "p2.json"), "--annotations",
                    str(tmp_path / "a.json"), "--questions", str(tmp_path / "q.json")])
  with pytest.raises(ValueError, match="predicted twice"):
    vm.vqa_accuracy(predictions + predictions[:1], annotations["annotations"])
