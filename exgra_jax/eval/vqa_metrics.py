"""VQA metrics computed as the LLaVA-Med release computes them (docs/eval.md).

Inputs are the VQA set (`{train,val,test}_w_options_new.json`: items with `id`,
`answer_type` OPEN|CLOSED and `conversations` [question, answer]; the release's files
spell the key `conversatons` in places, both are read) and an answers file in the
release's jsonl format, one line per question:
`{"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}`.

Per item (after `normalize_answer` on both sides):
- `hit`: the reference is a substring of the prediction (CLOSED accuracy; "no" is found
  in "not", as in the release).
- `recall`, `precision`, `f1`: the release's counting over the *set* of words of both
  strings: tp adds the prediction's count of each shared word, fn the reference's count of
  each word only in the reference, fp the prediction's count of each word only in the
  prediction; all three are 0 when either side is empty or tp = 0.
- `exact_match`: the release's `calculate_exactmatch`: distinct reference words found in
  the prediction / number of prediction words.
- `bleu1..3`: the release's `run_eval.py` exactly: nltk `sentence_bleu` on whitespace
  tokens, no smoothing, weights (1,0,0,0), (0,1,0,0), (0,0,1,0): the brevity penalty times
  the 1-, 2- or 3-gram precision alone (not the cumulative BLEU-n). An order without a
  match scores nltk's floor, sys.float_info.min (2.2e-308) times the brevity penalty, not
  0, as in the release (no unigram match at all: 0).
- `candidate_hit` (when a candidate list is given): the prediction is mapped to the
  candidate answer with the highest F1 above (first one on ties) and scored 1 when that
  candidate equals the reference.
Aggregates are means per answer type and overall; `selection_score` =
(open recall + closed accuracy) / 2, the model-selection criterion (the one
available term when a split has only one answer type). Wrong CLOSED answers
always count (the release's PathVQA script drops them; we do not).
"""
from __future__ import annotations

import collections
import json
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from nltk.translate import bleu_score

from exgra_jax.eval.normalize import normalize_answer

METRICS_VERSION = "exgra-vqa-2"  # 2: bleu2/3 are the release's single-order scores
ANSWER_TYPES = ("OPEN", "CLOSED")
# The release's sentence_bleu weights (llava/eval/run_eval.py: bleu_score_1..3).
BLEU_WEIGHTS = {"bleu1": (1, 0, 0, 0), "bleu2": (0, 1, 0, 0), "bleu3": (0, 0, 1, 0)}
METRIC_DEFINITIONS = {
    "hit": "normalised reference is a substring of the normalised prediction",
    "recall": "release word counting: tp (prediction counts of shared words) / (tp + fn)",
    "precision": "release word counting: tp / (tp + fp)",
    "f1": "2 p r / (p + r), 0 when tp = 0",
    "exact_match": "distinct reference words in prediction / prediction word count",
    "bleu1": "nltk sentence_bleu, weights (1,0,0,0), no smoothing (the release's)",
    "bleu2": "nltk sentence_bleu, weights (0,1,0,0), no smoothing (the release's); "
             "no bigram match: 2.2e-308 x brevity penalty",
    "bleu3": "nltk sentence_bleu, weights (0,0,1,0), no smoothing (the release's); "
             "no trigram match: 2.2e-308 x brevity penalty",
    "candidate_hit": "prediction mapped to the candidate of highest f1 equals the reference",
    "selection_score": "(OPEN recall + CLOSED hit) / 2 (the available one if only one)",
}


def word_counts(text: str) -> collections.Counter:
  """Whitespace tokens of an already normalised string with their counts."""
  return collections.Counter(text.split())


def f1_precision_recall(prediction: str, reference: str) -> tuple[float, float, float]:
  """The release's `calculate_f1score` on normalised strings -> (f1, precision, recall)."""
  pred, ref = word_counts(prediction), word_counts(reference)
  if not pred or not ref:
    return 0.0, 0.0, 0.0
  tp = sum(count for word, count in pred.items() if word in ref)
  fp = sum(count for word, count in pred.items() if word not in ref)
  fn = sum(count for word, count in ref.items() if word not in pred)
  if tp == 0:
    return 0.0, 0.0, 0.0
  precision, recall = tp / (tp + fp), tp / (tp + fn)
  return 2 * precision * recall / (precision + recall), precision, recall


def exact_match(prediction: str, reference: str) -> float:
  """The release's `calculate_exactmatch` on normalised strings."""
  pred, ref = word_counts(prediction), word_counts(reference)
  total = sum(pred.values())
  return sum(1 for word in ref if word in pred) / total if total else 0.0


def bleu(prediction: str, reference: str, weights: Sequence[float]) -> float:
  """nltk sentence_bleu on whitespace tokens, no smoothing (module docstring)."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # nltk warns on every zero n-gram count.
    return float(bleu_score.sentence_bleu([reference.split()], prediction.split(),
                                           weights=tuple(weights)))


def closest_candidate(prediction: str, candidates: Sequence[str]) -> str:
  """The normalised candidate with the highest F1 against the normalised prediction."""
  if not candidates:
    raise ValueError("candidate list is empty")
  scores = [f1_precision_recall(prediction, candidate)[0] for candidate in candidates]
  return candidates[scores.index(max(scores))]


def score_item(prediction: str, reference: str,
               candidates: Sequence[str] | None = None) -> dict[str, float]:
  """All per-item metrics for one raw prediction / reference pair (normalised here)."""
  pred, ref = normalize_answer(prediction), normalize_answer(reference)
  f1, precision, recall = f1_precision_recall(pred, ref)
  scores = {"hit": float(ref in pred), "recall": recall, "precision": precision, "f1": f1,
            "exact_match": exact_match(pred, ref)}
  scores.update({name: bleu(pred, ref, w) for name, w in BLEU_WEIGHTS.items()})
  if candidates is not None:
    scores["candidate_hit"] = float(closest_candidate(pred, candidates) == ref)
  return scores


def _mean(values: list[float]) -> float | None:
  return sum(values) / len(values) if values else None


def aggregate(items: Iterable[tuple[str, Mapping[str, float]]]) -> dict[str, Any]:
  """(answer_type, per-item scores) pairs -> means per answer type and overall, counts."""
  groups: dict[str, list[Mapping[str, float]]] = {"OPEN": [], "CLOSED": [], "overall": []}
  for answer_type, scores in items:
    groups[answer_type].append(scores)
    groups["overall"].append(scores)
  result: dict[str, Any] = {}
  for name, members in groups.items():
    keys = members[0].keys() if members else ()
    result[name] = {key: _mean([m[key] for m in members]) for key in keys}
    result[name]["count"] = len(members)
  open_recall = result["OPEN"].get("recall")
  closed_accuracy = result["CLOSED"].get("hit")
  result["open_recall"] = open_recall
  result["closed_accuracy"] = closed_accuracy
  known = [v for v in (open_recall, closed_accuracy) if v is not None]
  result["selection_score"] = sum(known) / len(known) if known else None
  return result


def _turns(item: Mapping[str, Any]) -> list:
  turns = item.get("conversations", item.get("conversatons"))
  if not isinstance(turns, list) or len(turns) < 2 or "value" not in turns[1]:
    raise ValueError(f"item {item.get('id')!r}: needs conversations [question, answer]")
  return turns


def question_text(item: Mapping[str, Any]) -> str:
  """The question turn of a VQA-set item (options and `<image>` included)."""
  return _turns(item)[0]["value"]


def reference_answer(item: Mapping[str, Any]) -> tuple[str, str]:
  """A VQA-set item -> (answer_type, reference answer text), with a clear error if malformed."""
  answer_type = str(item.get("answer_type", "")).upper()
  if answer_type not in ANSWER_TYPES:
    raise ValueError(f"item {item.get('id')!r}: answer_type must be OPEN or CLOSED, got "
                     f"{item.get('answer_type')!r}")
  return answer_type, _turns(item)[1]["value"]


def parse_candidates(candidates: Any) -> list[str]:
  """The release's candidate.json (`{"0": [answers]}`) or a plain list -> normalised list."""
  if isinstance(candidates, Mapping):
    if "0" not in candidates:
      raise ValueError("candidate file must be a list or a dict with key '0' (release format)")
    candidates = candidates["0"]
  if not isinstance(candidates, list) or not candidates:
    raise ValueError("candidate answers must be a non-empty list")
  return [normalize_answer(str(c)) for c in candidates]


def evaluate_answers(references: Sequence[Mapping[str, Any]],
                     answers: Sequence[Mapping[str, Any]],
                     candidates: Sequence[str] | None = None) -> dict[str, Any]:
  """Scores every reference item against its answer (matched by id == question_id).

  Raises ValueError naming the ids when an answer is missing, duplicated or unknown:
  a partial answers file must never produce a number.
  """
  by_id: dict[str, Mapping[str, Any]] = {}
  for answer in answers:
    if "question_id" not in answer or "text" not in answer:
      raise ValueError(f"answer lacks question_id or text: {dict(answer)!r}")
    key = str(answer["question_id"])
    if key in by_id:
      raise ValueError(f"duplicate answer for question_id {key!r}")
    by_id[key] = answer
  ref_ids = [str(item.get("id")) for item in references]
  missing = [i for i in ref_ids if i not in by_id]
  unknown = sorted(set(by_id) - set(ref_ids))
  if missing or unknown:
    raise ValueError(f"answers do not match references: missing {missing[:10]} "
                     f"({len(missing)}), unknown {unknown[:10]} ({len(unknown)})")
  scored = []
  for item, key in zip(references, ref_ids):
    answer_type, reference = reference_answer(item)
    scored.append((answer_type, score_item(str(by_id[key]["text"]), reference, candidates)))
  return aggregate(scored)


def read_json_or_jsonl(path: str) -> list[dict[str, Any]]:
  """A JSON list or a JSON-lines file -> list of dicts."""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  if text.lstrip().startswith("["):
    return json.loads(text)
  return [json.loads(line) for line in text.splitlines() if line.strip()]


def evaluate_files(gt_path: str, pred_path: str,
                   candidate_path: str | None = None) -> dict[str, Any]:
  """File-level entry point used by tools/vqa_metrics.py and eval/vqa.py."""
  candidates = None
  if candidate_path:
    with open(candidate_path, encoding="utf-8") as f:
      candidates = parse_candidates(json.load(f))
  result = evaluate_answers(read_json_or_jsonl(gt_path), read_json_or_jsonl(pred_path),
                            candidates)
  result["metrics_version"] = METRICS_VERSION
  return result
