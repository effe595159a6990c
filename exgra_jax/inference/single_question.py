"""One image + one question -> one answer: the body of `python -m exgra_jax.predict`.

Kept apart from the command line so that it works on any loaded model (our checkpoint or
an imported HF directory): the image file is decoded by data/ (JPEG, PNG, 16-bit,
DICOM), CLIP-preprocessed, the question wrapped in the chosen template, and the answer
decoded greedily with the stop string and clean-up of `generate`.
"""
from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np
from etils import epath

from exgra_jax import run_paths
from exgra_jax.data import images, text
from exgra_jax.data.records import IMAGE_TOKEN
from exgra_jax.inference import generate, prompts
from exgra_jax.models import adapters
from exgra_jax.models.config import LlavaConfig, num_image_tokens
from exgra_jax.models.llava import LlavaModel
from exgra_jax.weights import loading


def load_pixels(path: str, image_size: int) -> np.ndarray:
  """An image file (any format data/ decodes, DICOM included) -> [S, S, 3] float32."""
  with open(path, "rb") as f:
    return images.clip_input(f.read(), image_size)


def answer_question(model: LlavaModel, params, tokenizer, image_path: str, question: str, *,
                    template: str, max_new_tokens: int, stop: str = "###",
                    temperature: float = 0.0) -> str:
  """The model's cleaned answer; `<image>` is added to the question when missing."""
  if IMAGE_TOKEN not in question:
    question = f"{question}\n{IMAGE_TOKEN}"
  prompt = prompts.build_prompt(question, template, num_image_tokens(model.cfg),
                                model.cfg.image_tokens)
  settings = generate.GenerationSettings(batch_size=1,
                                         length_buckets=(len(tokenizer(prompt).input_ids),),
                                         max_new_tokens=max_new_tokens,
                                         temperature=temperature, stop=stop)
  pixels = load_pixels(image_path, model.cfg.vision.image_size)[None]
  (answer,) = generate.answer_prompts(model, params, tokenizer, [prompt], pixels, settings)
  return answer


def answering_model(model_config: Any, params: Any, quantize: str = ""
                    ) -> tuple[LlavaModel, Any]:
  """(model, params) that answer with loaded weights: `model_config` (a checkpoint's
  `model_config`) built as a LlavaModel, and with quantize = int8 | int4 the LLM's projections
  weight-only quantized (models/adapters.py: qwix PTQ, answering through its quantized
  matmuls). The one hook every answering path takes (predict, chat, serve, --mode=eval)."""
  model = LlavaModel(LlavaConfig.from_config(model_config))
  if not quantize:
    return model, params
  model = adapters.quantized_model(model, quantize)
  return model, adapters.quantize_params(model, params)


def load_for_generation(model_dir: str, *, tokenizer_dir: str | None = None,
                        clip_dir: str | None = None, quantize: str = ""):
  """(model, params, tokenizer) of anything `weights.loading.load` reads (train /
  params-only checkpoint, HF directory). Refuses incomplete weights and a missing tokenizer.

  quantize: "" (as stored) | int8 | int4 (`answering_model`).
  """
  loaded = loading.load(model_dir, tokenizer_dir=tokenizer_dir, clip_dir=clip_dir)
  loading.require_complete_weights(loaded.report)
  if not loaded.tokenizer_dir:
    raise ValueError(f"{model_dir} holds no tokenizer: pass --tokenizer=DIR")
  model, params = answering_model(loaded.model_config, loaded.params, quantize)
  return model, params, text.load_tokenizer(loaded.tokenizer_dir, model.cfg.image_tokens)


def answer_from_checkpoint(model_dir: str, image: str, question: str, *,
                           template: str = "simple", max_new_tokens: int = 128,
                           temperature: float = 0.0, stop: str = "###",
                           tokenizer_dir: str | None = None, clip_dir: str | None = None,
                           quantize: str = "") -> str:
  """The answer of the model at `model_dir` (see `load_for_generation`)."""
  model, params, tokenizer = load_for_generation(model_dir, tokenizer_dir=tokenizer_dir,
                                                 clip_dir=clip_dir, quantize=quantize)
  return answer_question(model, params, tokenizer,
                         image, question, template=template, max_new_tokens=max_new_tokens,
                         stop=stop, temperature=temperature)


def answer_from_workdir(config: ml_collections.ConfigDict, workdir: epath.Path, *,
                        image: str | None, question: str | None) -> dict[str, Any]:
  """`main --mode=predict`: `answer_from_checkpoint` on the run's answering checkpoint
  (`RunDir.answering_checkpoint`: the best, else the newest), with config.eval's template,
  decoding and quantization."""
  if not image or not question:
    raise ValueError("--mode=predict needs --image and --question")
  checkpoint = str(run_paths.RunDir(workdir).answering_checkpoint(config.stages))
  answer = answer_from_checkpoint(checkpoint, image, question, template=config.eval.template,
                                  max_new_tokens=config.eval.max_new_tokens,
                                  temperature=config.eval.temperature, stop=config.eval.stop,
                                  tokenizer_dir=run_paths.tokenizer_dir(config),
                                  quantize=config.eval.quantize)
  return {"checkpoint": checkpoint, "image": image, "question": question, "answer": answer}
