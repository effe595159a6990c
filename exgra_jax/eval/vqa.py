"""VQA evaluation of a loaded model: prompts -> answers file -> metrics -> protocol report.

`evaluate_loaded` is everything `--mode=eval` needs once a checkpoint is loaded: it
refuses incomplete weights before generating anything, answers each VQA item with the
configured template and decoding (resumable answers file), scores them with
`vqa_metrics`, and writes `protocol.json` / `protocol.md` beside the answers.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from exgra_jax import run_paths
from exgra_jax.data import text
from exgra_jax.data import records as records_lib
from exgra_jax.eval import answers, report, vqa_metrics
from exgra_jax.inference import generate, prompts, single_question
from exgra_jax.models.config import num_image_tokens
from exgra_jax.models.llava import LlavaModel
from exgra_jax.weights import loading
from exgra_jax.weights.checksum import parameter_checksum


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

  `tokenizer` is a transformers tokenizer holding the model's image tokens (data/text.py);
  `load_pixels(item)` returns the item's CLIP-preprocessed image [S, S, 3].
  """
  loading.require_complete_weights(load_report)
  by_id = {str(item.get("id")): item for item in inputs.items}
  if len(by_id) != len(inputs.items):
    raise ValueError("VQA item ids must be unique")
  questions = [(qid, prompts.build_prompt(vqa_metrics.question_text(item), template,
                                          num_image_tokens, model.cfg.image_tokens))
               for qid, item in by_id.items()]

  records = answers.answer_about_images(questions, by_id, load_pixels, model, params,
                                       tokenizer, settings, output_dir, model_id,
                                       batch_sharding=batch_sharding)
  metrics = vqa_metrics.evaluate_answers(inputs.items, records, inputs.candidates)
  metrics["metrics_version"] = vqa_metrics.METRICS_VERSION
  decoding = {**dataclasses.asdict(settings), "greedy": settings.temperature == 0}
  template_text = prompts.build_prompt("{question}", template, 1)
  params_checksum = parameter_checksum(params)  # collective where params span hosts
  if jax.process_index() == 0:  # every process has the same answers; one writes
    protocol = report.build_report(checkpoint=checkpoint, params_checksum=params_checksum,
                                   data_files=inputs.data_files,
                                   template=template_text, decoding=decoding,
                                   metrics=metrics, load_report=load_report)
    report.write_report(output_dir, protocol)
  return metrics


def vqa_inputs(config: ml_collections.ConfigDict, records: str,
               candidates: str = "") -> VqaInputs:
  """A VQA split from config paths (relative to `data.root`), with its candidate answers."""
  records_path = str(run_paths.resolve_path(config.data.root, records))
  items = vqa_metrics.read_json_or_jsonl(records_path)
  files = {"records": records_path}
  candidate_list = None
  if candidates:
    candidates_path = str(run_paths.resolve_path(config.data.root, candidates))
    with open(candidates_path, encoding="utf-8") as f:
      candidate_list = vqa_metrics.parse_candidates(json.load(f))
    files["candidates"] = candidates_path
  return VqaInputs(items=items, data_files=files, candidates=candidate_list)


def evaluate_split(config: ml_collections.ConfigDict, model: LlavaModel, params, *,
                   records: str, image_root: str, candidates: str, output_dir: str,
                   checkpoint: str, load_report: Mapping[str, Any],
                   batch_sharding: jax.sharding.Sharding | None = None) -> dict[str, Any]:
  """`evaluate_loaded` on the split at `records` with config.eval's template and decoding.

  Images resolve under `image_root` (relative to data.root), kept inside it.
  """
  inputs = vqa_inputs(config, records, candidates)
  root = run_paths.resolve_path(config.data.root, image_root)
  size = model.cfg.vision.image_size

  def load_pixels(item: Mapping[str, Any]) -> np.ndarray:
    relative = records_lib.safe_relative_path(str(item["image"]), str(item.get("id")))
    return single_question.load_pixels(str(root / relative), size)

  tokenizer = text.load_tokenizer(run_paths.tokenizer_dir(config), model.cfg.image_tokens)
  return evaluate_loaded(model, params, tokenizer, inputs, load_pixels,
                         settings=generate.GenerationSettings.from_config(config),
                         template=config.eval.template, num_image_tokens=num_image_tokens(
                             model.cfg), output_dir=output_dir, model_id=config.model.name,
                         checkpoint=checkpoint, load_report=load_report,
                         batch_sharding=batch_sharding)


def evaluate(config: ml_collections.ConfigDict, workdir: epath.Path,
             checkpoint: str | None = None) -> dict[str, Any]:
  """`--mode=eval`: the test split (`eval.records`, else `finetune.test_records`) answered by
  `checkpoint` (default: the fine-tune's best, else the newest checkpoint of the last
  stage), weight-only quantized as config.eval.quantize says; answers, metrics and the protocol report go to `workdir/eval/<split name>`.
  Returns the metrics with the `checkpoint` evaluated and that `output_dir`."""
  records = config.eval.records or config.finetune.test_records
  if not records:
    raise ValueError("nothing to evaluate: set config.eval.records or "
                     "config.finetune.test_records")
  run = run_paths.RunDir(workdir)
  checkpoint = checkpoint or str(run.answering_checkpoint(config.stages))
  loaded = loading.load(checkpoint, tokenizer_dir=run_paths.tokenizer_dir(config))
  model, params = single_question.answering_model(loaded.model_config, loaded.params,
                                                  config.eval.quantize)
  output_dir = str(run.eval(epath.Path(records).stem))
  metrics = evaluate_split(config, model, params, records=records,
                           image_root=config.finetune.image_root,
                           candidates=config.finetune.candidates, output_dir=output_dir,
                           checkpoint=checkpoint, load_report=loaded.report)
  return {**metrics, "checkpoint": checkpoint, "output_dir": output_dir}
