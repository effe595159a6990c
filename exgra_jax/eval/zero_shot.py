"""Zero-shot classification as VQA, OmniMedVQA style (SPEC.md section 5).

A multiple-choice item becomes one open question whose prompt lists the options; the
free-text answer is mapped back to the option it resembles most (difflib ratio), and
accuracy is counted per dataset. Items: `{"question", "options": [str, ...],
"gt_answer": str, "dataset": str}` (OmniMedVQA's option_A..option_D fields are read too).
"""
from __future__ import annotations

import collections
import difflib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

INSTRUCTION = (" Only return what you think is the correct answer from the candidate "
               "answers, do not return any other irrelevant text!")


def item_options(item: Mapping[str, Any]) -> list[str]:
  """The option list of an item: `options`, or OmniMedVQA's option_A, option_B, ..."""
  if "options" in item:
    options = list(item["options"])
  else:
    options = [item[key] for key in sorted(item) if key.startswith("option_")]
  if len(options) < 2:
    raise ValueError(f"item {item.get('question_id', item.get('id'))!r}: needs at least two "
                     f"options, got {options!r}")
  return [str(option) for option in options]


def build_prompt(question: str, options: Sequence[str]) -> str:
  """question + 'Here are N candidate answers:' + the options (one per line) + instruction."""
  listed = "".join(f"\n{option}" for option in options)
  return f"{question} Here are {len(options)} candidate answers:{listed}\n{INSTRUCTION.strip()}"


def map_to_option(prediction: str, options: Sequence[str]) -> str:
  """The option with the highest difflib.SequenceMatcher ratio (first one on ties)."""
  ratios = [difflib.SequenceMatcher(None, prediction, option).ratio() for option in options]
  return options[ratios.index(max(ratios))]


def accuracy_per_dataset(items: Iterable[Mapping[str, Any]],
                         predictions: Mapping[str, str]) -> dict[str, dict[str, float]]:
  """Items + {question id: raw prediction} -> {dataset: {accuracy, count}} and 'overall'."""
  hits: dict[str, list[float]] = collections.defaultdict(list)
  for item in items:
    key = str(item.get("question_id", item.get("id")))
    if key not in predictions:
      raise ValueError(f"no prediction for question {key!r}")
    options = item_options(item)
    chosen = map_to_option(predictions[key], options)
    hit = float(chosen == str(item["gt_answer"]))
    hits[str(item.get("dataset", "all"))].append(hit)
    hits["overall"].append(hit)
  return {name: {"accuracy": sum(v) / len(v), "count": len(v)} for name, v in hits.items()}
