"""VQA evaluation of a loaded model: prompts -> answers file -> metrics -> protocol report.

`evaluate_loaded` is everything `--mode=eval` needs once a checkpoint is loaded: it
refuses incomplete weights before generating anything, answers each VQA item with the
configured template and decoding (resumable answers file), scores them with
`vqa_metrics`, and writes `protocol.json` / `protocol.md` beside the answers.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from exgra_jax.eval import answers, generate, prompts, report, vqa_metrics
from exgra_jax.models.llava import LlavaModel


@dataclasses.dataclass(frozen=True)
class VqaInputs:
  """The test split: items (VQA-set format), their files for checksums, candidates."""
  items: Sequence[Mapping[str, Any]]
  data_files: Mapping[str, str]
  candidates: Sequence[str] | None = None


def evaluate_loaded(model: LlavaModel, params, tokenizer, inputs: VqaInputs,
                    load_pixels: Callable[[Mapping[str, Any]], np.ndarray], *,
                    settings: generate.GenerationSettings, template: str,
                    num_image_tokens: int, output_dir: str, model_id: str, checkpoint: str,
                    load_report: Mapping[str, Any],
                    batch_sharding: jax.sharding.Sharding | None = None) -> dict[str, Any]:
  """Answers, scores and reports one VQA split; returns the metrics.

  `tokenizer` is a transformers tokenizer holding `<im_patch>` (data/ builds it);
  `load_pixels(item)` returns the item's CLIP-preprocessed image [S, S, 3].
  """
  report.require_complete_weights(load_report)
  by_id = {str(item.get("id")): item for item in inputs.items}
  if len(by_id) != len(inputs.items):
    raise ValueError("VQA item ids must be unique")
  questions = [(qid, prompts.build_prompt(vqa_metrics.question_text(item), template,
                                          num_image_tokens))
               for qid, item in by_id.items()]

  def answer_batch(chunk: Sequence[tuple[str, str]]) -> list[str]:
    pixels = np.stack([load_pixels(by_id[qid]) for qid, _ in chunk])
    return generate.answer_prompts(model, params, tokenizer, [p for _, p in chunk], pixels,
                                   settings, batch_sharding=batch_sharding)

  os.makedirs(output_dir, exist_ok=True)
  records = answers.answer_all(questions, answer_batch,
                               os.path.join(output_dir, "answers.jsonl"), model_id,
                               chunk_size=settings.batch_size)
  metrics = vqa_metrics.evaluate_answers(inputs.items, records, inputs.candidates)
  metrics["metrics_version"] = vqa_metrics.METRICS_VERSION
  decoding = {**dataclasses.asdict(settings), "greedy": settings.temperature == 0}
  template_text = prompts.build_prompt("{question}", template, 1)
  protocol = report.build_report(checkpoint=checkpoint, data_files=inputs.data_files,
                                 template=template_text, decoding=decoding, metrics=metrics,
                                 load_report=load_report)
  report.write_report(output_dir, protocol)
  return metrics
