"""Normaliser rules one by one and VQA metrics on hand-worked cases."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from exgra_jax.eval import normalize, vqa_metrics

_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("text,expected", [
    ("left/right", "left right"),          # mark not next to a space -> space
    ("left / right", "left  right"),       # mark next to a space -> deleted
    ("1,000 cells", "1000 cells"),         # digit-comma-digit -> every mark deleted
    ("yes!", "yes "),
    ("(a)b", " a b"),
])
def test_strip_punctuation(text, expected):
  assert normalize.strip_punctuation(text) == expected


def test_strip_periods_keeps_decimal_points():
  assert normalize.strip_periods("3.5 cm. ok.") == "3.5 cm ok"


def test_map_words_numbers_and_articles():
  assert normalize.map_words("The  two lesions, none in an  organ") == "2 lesions, 0 in organ"


@pytest.mark.parametrize("text,expected", [
    ("The Left Lung.", "left lung"),
    ("Yes, there are TWO nodules!", "yes there are 2 nodules"),
    ("x-ray", "x ray"),
    ("1,000", "1000"),
    ("a, b", "b"),
])
def test_normalize_answer(text, expected):
  assert normalize.normalize_answer(text) == expected


def test_normalize_rejects_non_string():
  with pytest.raises(TypeError, match="answer must be a string"):
    normalize.normalize_answer(3)


def test_closed_hit_is_substring_no_in_not():
  assert vqa_metrics.score_item("It is not present", "No")["hit"] == 1.0
  assert vqa_metrics.score_item("Yes.", "no")["hit"] == 0.0


def test_recall_counts_repeated_prediction_words():
  # pred "lung lung left": set {lung, left, right}; tp = 2 (lung twice) + 0, fn = right (1)
  f1, precision, recall = vqa_metrics.f1_precision_recall("lung lung left", "right lung")
  assert recall == pytest.approx(2 / 3)
  assert precision == pytest.approx(2 / 3)  # fp = left (1)
  assert f1 == pytest.approx(2 / 3)
  assert vqa_metrics.f1_precision_recall("", "lung") == (0.0, 0.0, 0.0)
  assert vqa_metrics.f1_precision_recall("heart", "lung") == (0.0, 0.0, 0.0)


def test_exact_match_and_bleu():
  assert vqa_metrics.exact_match("left lung lung", "lung") == pytest.approx(1 / 3)
  assert vqa_metrics.exact_match("", "lung") == 0.0
  assert vqa_metrics.bleu("left lung", "left lung", (1.0,)) == pytest.approx(1.0)
  # unigram precision 1/2, brevity penalty 1 (same length)
  assert vqa_metrics.bleu("left heart", "left lung", (1.0,)) == pytest.approx(0.5)
  assert vqa_metrics.bleu("left heart", "left lung", (0.5, 0.5)) == pytest.approx(0.0, abs=1e-12)


def test_bleu2_and_bleu3_are_the_releases_single_order_scores():
  """run_eval.py's weights (0,1,0,0) / (0,0,1,0): bigram (trigram) precision x brevity
  penalty. "the left lung" vs "left lung": bigrams "the left", "left lung", one matched;
  hypothesis longer than the reference, penalty 1 -> 1/2 (cumulative BLEU-2 would be
  sqrt(2/3 * 1/2) = 0.577). No trigram match: nltk's floor, not 0."""
  weights = vqa_metrics.BLEU_WEIGHTS
  assert vqa_metrics.bleu("the left lung", "left lung", weights["bleu2"]) == pytest.approx(0.5)
  assert vqa_metrics.bleu("left upper lung", "left upper lung", weights["bleu3"]) == (
      pytest.approx(1.0))
  assert vqa_metrics.bleu("brain", "brain", weights["bleu2"]) == pytest.approx(
      sys.float_info.min, rel=1e-9)
  assert vqa_metrics.bleu("heart", "brain", weights["bleu2"]) == 0.0


def test_candidates_map_prediction_to_best_f1():
  cands = vqa_metrics.parse_candidates({"0": ["Left lung", "right lung", "heart"]})
  assert cands == ["left lung", "right lung", "heart"]
  assert vqa_metrics.closest_candidate("in the left lung", cands) == "left lung"
  assert vqa_metrics.score_item("in the left lung", "Left lung.", cands)["candidate_hit"] == 1.0
  assert vqa_metrics.score_item("heart", "Left lung.", cands)["candidate_hit"] == 0.0
  with pytest.raises(ValueError, match="key '0'"):
    vqa_metrics.parse_candidates({"x": []})


def _refs():
  return [
      {"id": "1", "answer_type": "CLOSED", "conversations": [{"value": "q"}, {"value": "Yes"}]},
      {"id": "2", "answer_type": "CLOSED", "conversatons": [{"value": "q"}, {"value": "No"}]},
      {"id": "3", "answer_type": "OPEN", "conversations": [{"value": "q"}, {"value": "left lung"}]},
  ]


def test_evaluate_answers_aggregates_and_counts_wrong_closed():
  answers = [{"question_id": "1", "text": "yes"}, {"question_id": "2", "text": "yes"},
             {"question_id": 3, "text": "the lung"}]
  result = vqa_metrics.evaluate_answers(_refs(), answers)
  assert result["CLOSED"]["count"] == 2 and result["OPEN"]["count"] == 1
  assert result["closed_accuracy"] == pytest.approx(0.5)   # wrong "yes" still counted
  assert result["open_recall"] == pytest.approx(0.5)
  assert result["selection_score"] == pytest.approx(0.5)
  assert result["overall"]["count"] == 3
  closed_only = vqa_metrics.evaluate_answers(_refs()[:2], answers[:2])
  assert closed_only["open_recall"] is None and closed_only["selection_score"] == 0.5


def test_evaluate_answers_refuses_partial_answers():
  with pytest.raises(ValueError, match="missing"):
    vqa_metrics.evaluate_answers(_refs(), [{"question_id": "1", "text": "yes"}])
  with pytest.raises(ValueError, match="duplicate"):
    vqa_metrics.evaluate_answers(_refs(), [{"question_id": "1", "text": "a"}] * 2)
  bad = [{"id": "1", "answer_type": "MAYBE", "conversations": []}]
  with pytest.raises(ValueError, match="OPEN or CLOSED"):
    vqa_metrics.evaluate_answers(bad, [{"question_id": "1", "text": "a"}])


def test_tool_prints_json(tmp_path):
  gt, pred, cand = tmp_path / "gt.json", tmp_path / "pred.jsonl", tmp_path / "cand.json"
  gt.write_text(json.dumps(_refs()))
  pred.write_text("\n".join(json.dumps({"question_id": i, "prompt": "", "text": t,
                                        "answer_id": "x", "model_id": "m", "metadata": {}})
                            for i, t in [("1", "Yes"), ("2", "no"), ("3", "left lung")]))
  cand.write_text(json.dumps({"0": ["left lung", "heart"]}))
  out = subprocess.run([sys.executable, "tools/vqa_metrics.py", f"--gt={gt}", f"--pred={pred}",
                        f"--candidate={cand}"], capture_output=True, text=True, check=True,
                       cwd=_ROOT, env={**os.environ, "PYTHONPATH": str(_ROOT)})
  result = json.loads(out.stdout)
  assert result["closed_accuracy"] == 1.0 and result["OPEN"]["candidate_hit"] == 1.0
  assert result["metrics_version"] == vqa_metrics.METRICS_VERSION
