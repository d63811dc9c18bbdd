"""The official VQA accuracy (vqaEval.py) on crafted cases computed by hand, one per quirk of the
official code (x2vlm_jax/evaluate/vqa_metrics.py lists them)."""
import json

import pytest

from tools import score_vqa
from x2vlm_jax.evaluate import vqa_metrics as vm


def test_prediction_normalisation_rules():
  assert vm.normalize_prediction("Two") == "2"
  assert vm.normalize_prediction("the dog") == "dog"
  assert vm.normalize_prediction("a red, white bus!") == "red white bus"  # ", " touches a space
  assert vm.normalize_prediction("1,000") == "1000"  # digit,digit: commas deleted
  assert vm.normalize_prediction("left-hand") == "left hand"  # hyphen -> space
  assert vm.normalize_prediction("3.5") == "3.5"  # a decimal point stays
  assert vm.normalize_prediction("yes.") == "yes"
  assert vm.normalize_prediction("dont know") == "don't know"
  assert vm.normalize_prediction("  none\t") == "0"


def test_quirk_1_agreeing_humans_are_raw_the_prediction_is_normalised():
  assert vm.question_accuracy("Two", ["2"] * 10) == 1.0  # the prediction became "2"
  assert vm.question_accuracy("yes", ["Yes"] * 10) == 0.0  # the humans stayed "Yes"
  assert vm.question_accuracy("Yes", ["Yes"] * 10) == 0.0  # ... and the prediction is "yes"


def test_quirk_2_disagreeing_humans_get_punctuation_only():
  humans = ["two"] * 3 + ["3"] * 7
  assert vm.normalize_humans(humans) == humans  # no digits, no lower-casing
  assert vm.question_accuracy("two", humans) == 0.0  # the prediction became "2"
  assert vm.question_accuracy("3", humans) == 1.0
  assert vm.question_accuracy("dog", ["Dog"] * 5 + ["cat"] * 5) == 0.0


def test_quirk_3_a_mark_becomes_a_space_and_is_never_stripped():
  assert vm.process_punctuation("yes!") == "yes "
  assert vm.normalize_humans(["yes!", "no"]) == ["yes ", "no"]
  assert vm.normalize_prediction("yes!") == "yes"
  # Three humans said "yes!" (-> "yes "), seven "no": the prediction "yes!" ("yes") matches none.
  assert vm.question_accuracy("yes!", ["yes!"] * 3 + ["no"] * 7) == 0.0
  # Agreeing humans are raw: "yes!" == "yes!"... but the prediction is "yes".
  assert vm.question_accuracy("yes!", ["yes!"] * 10) == 0.0


def test_quirk_4_a_mark_touching_a_space_or_a_digit_comma_digit_is_deleted_everywhere():
  assert vm.process_punctuation("red, white-blue") == "red white blue"  # "," touches a space
  assert vm.process_punctuation("red ,white-blue!") == "red white blue "
  assert vm.process_punctuation("1,000 cars!") == "1000 cars"
  assert vm.process_punctuation("cars!") == "cars "


def test_quirk_5_periods_not_before_a_digit_go_at_most_32_of_them():
  assert vm.process_punctuation("3.5 mph.") == "3.5 mph"
  assert vm.process_punctuation("." * 40) == "." * 8


def test_quirk_6_human_answers_are_not_stripped():
  assert vm.question_accuracy("yes", [" yes"] * 3 + ["no"] * 7) == 0.0
  # The prediction is stripped: " yes " matches the three "yes" (3 x 2/3 + 7 x 1) / 10.
  assert vm.question_accuracy(" yes ", ["yes"] * 3 + ["no"] * 7) == pytest.approx(0.9)


def test_quirk_7_leave_one_out_is_by_position():
  # Two identical "cat" answers: leaving one out keeps the other (1/3), not 0.
  assert vm.question_accuracy("cat", ["cat", "cat"] + ["dog"] * 8) == pytest.approx(
      (2 * (1 / 3) + 8 * (2 / 3)) / 10)


def test_quirk_8_printed_accuracy_is_rounded_to_two_decimals():
  assert vm.printed_accuracy([1.0, 0.0, 0.0]) == 33.33
  assert vm.printed_accuracy([2 / 3]) == 66.67


def test_partial_agreement_over_the_leave_one_out_subsets():
  ten = ["2"] * 3 + ["3"] * 7
  # Predicting "2": leaving out one of the three "2" (3 subsets) leaves 2 matches -> 2/3; the 7
  # other subsets keep 3 matches -> 1. Mean = (3 * 2/3 + 7 * 1) / 10 = 0.9.
  assert vm.question_accuracy("2", ten) == pytest.approx(0.9)
  assert vm.question_accuracy("3", ten) == pytest.approx(1.0)
  one = ["cat"] + ["dog"] * 9  # "cat" once: 9 subsets with 1 match (1/3), one with 0 -> 0.3
  assert vm.question_accuracy("cat", one) == pytest.approx(0.3)
  assert vm.question_accuracy("horse", one) == 0.0
  # "Two" becomes "2"; the disagreeing humans' "two" stays "two": "2" matches 2 of 4:
  # the two subsets without a "2" keep 1 match (1/3), the other two keep 2 (2/3) -> 0.5.
  assert vm.question_accuracy("Two", ["2", "two", "2", "3"]) == pytest.approx(0.5)


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
  assert metrics["overall"] == round(100 * (1.0 + 0.9 + 0.3) / 3, 2) == 73.33
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
