"""Zero-shot classification as VQA, OmniMedVQA style (docs/eval.md).

A multiple-choice item becomes one open question whose prompt lists the options; the
free-text answer is mapped back to the option it resembles most (difflib ratio), and
accuracy is counted per dataset. Items: `{"question", "options": [str, ...],
"gt_answer": str, "dataset": str}` (OmniMedVQA's option_A..option_D fields are read too).
`evaluate_loaded` runs a loaded model over such items (resumable answers file) and writes
`zero_shot_accuracy.json` beside the answers.
"""
from __future__ import annotations

import collections
import difflib
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from exgra_jax import temp_paths
from exgra_jax.data.records import IMAGE_TOKEN
from exgra_jax.eval import answers
from exgra_jax.inference import generate, prompts
from exgra_jax.models.llava import LlavaModel

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
    key = item_id(item)
    if key not in predictions:
      raise ValueError(f"no prediction for question {key!r}")
    options = item_options(item)
    chosen = map_to_option(predictions[key], options)
    hit = float(chosen == str(item["gt_answer"]))
    hits[str(item.get("dataset", "all"))].append(hit)
    hits["overall"].append(hit)
  return {name: {"accuracy": sum(v) / len(v), "count": len(v)} for name, v in hits.items()}


def item_id(item: Mapping[str, Any]) -> str:
  return str(item.get("question_id", item.get("id")))


def evaluate_loaded(model: LlavaModel, params, tokenizer, items: Sequence[Mapping[str, Any]],
                    load_pixels: Callable[[Mapping[str, Any]], np.ndarray], *,
                    settings: generate.GenerationSettings, template: str,
                    num_image_tokens: int, output_dir: str, model_id: str,
                    batch_sharding: jax.sharding.Sharding | None = None
                    ) -> dict[str, dict[str, float]]:
  """Answers every item with its option prompt, then accuracy per dataset (also written)."""
  by_id = {item_id(item): item for item in items}
  if len(by_id) != len(items):
    raise ValueError("zero-shot item ids must be unique")
  questions = [(qid, prompts.build_prompt(
      f"{build_prompt(item['question'], item_options(item))}\n{IMAGE_TOKEN}", template,
      num_image_tokens, model.cfg.image_tokens)) for qid, item in by_id.items()]

  records = answers.answer_about_images(questions, by_id, load_pixels, model, params,
                                       tokenizer, settings, output_dir, model_id,
                                       batch_sharding=batch_sharding)
  result = accuracy_per_dataset(items, {r["question_id"]: r["text"] for r in records})
  if jax.process_index() == 0:  # every process has the same answers; one writes
    temp_paths.replace_file(os.path.join(output_dir, "zero_shot_accuracy.json"),
                            json.dumps(result, indent=2))
  return result
