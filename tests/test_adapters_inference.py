"""Weight-only quantized answering (`--quantize`, inference/single_question.load_for_generation):
the answers of an int8 tiny model to the demo world's VQA test questions against its float32
self's (the issue's >= 95 % target is for a trained model; see the test's docstring)."""
import json
import os

import jax
import ml_collections
import numpy as np
from flax import linen as nn

from configs import model_presets
from exgra_jax.inference import generate, prompts, single_question
from exgra_jax.models.config import LlavaConfig, num_image_tokens
from exgra_jax.models.llava import init_boxed_params
from exgra_jax.train import memory_plan
from exgra_jax.weights import loading


def _answers(model_dir: str, world: str, records: list[dict], quantize: str) -> list[str]:
  model, params, tokenizer = single_question.load_for_generation(model_dir, quantize=quantize)
  texts = [prompts.build_prompt(r["conversations"][0]["value"], "simple",
                                num_image_tokens(model.cfg), model.cfg.image_tokens)
           for r in records]
  pixels = np.stack([single_question.load_pixels(
      os.path.join(world, "vqa", "images", r["image"]), model.cfg.vision.image_size)
      for r in records])
  settings = generate.GenerationSettings(batch_size=24, length_buckets=(512,),
                                         max_new_tokens=8)
  return generate.answer_prompts(model, params, tokenizer, texts, pixels, settings)


def test_int8_answers_the_demo_questions_close_to_full_precision(demo_world, tmp_path):
  """The tiny preset at its random init (std 0.02), through the loader every answering
  command uses, on the demo world's 72 test questions, 8 greedy tokens each. Measured:
  int8 gives the float32 answer on 63 of 72 (0.875); the misses are near-ties of a model
  that learned nothing (a wider init, 10 x, agrees on 0.47 and answers chaotically)."""
  model_config = model_presets.tiny()
  params = nn.unbox(jax.jit(lambda: init_boxed_params(
      LlavaConfig.from_config(model_config), jax.random.key(0)))())
  model_dir = str(tmp_path / "model")
  loading.save_params(model_dir, params, model_config,
                          tokenizer_dir=os.path.join(demo_world, "tokenizer"))
  with open(os.path.join(demo_world, "vqa", "test_w_options_new.json")) as f:
    records = json.load(f)
  full = _answers(model_dir, demo_world, records, "")
  int8 = _answers(model_dir, demo_world, records, "int8")
  same = np.mean([a == b for a, b in zip(full, int8)])
  print(f"int8 answers equal to float32 on {same:.3f} of {len(records)} questions")
  assert len(set(full)) > 10  # the answers depend on the question / image
  assert 0.8 <= same < 1.0, [pair for pair in zip(full, int8) if pair[0] != pair[1]]


def test_answering_plan_holds_int8_projection_weights():
  """tools/plan_memory.py --generate: the compiled answering program's arguments shrink by
  exactly what int8 saves, worked by hand for the tiny preset (d 128, 4 heads / 2 kv heads of
  32, SwiGLU 344, 2 layers): per layer the q/k/v/o/gate/up/down kernels hold 181,248 weights
  (float32 -> int8: 3 bytes each saved) and 1,200 output channels (one float32 scale each)."""
  config = ml_collections.ConfigDict({"model": model_presets.tiny()})
  device = jax.devices()[0]
  plans = {q: memory_plan.plan_generation_memory(config, q, 2, 300, 4, device)
           for q in ("", "int8", "int4")}
  saved = plans[""].argument_bytes - plans["int8"].argument_bytes
  assert saved == 2 * (181_248 * 3 - 1_200 * 4)
  assert plans["int4"].argument_bytes < plans["int8"].argument_bytes
  assert plans[""].parameters == plans["int8"].parameters == plans["int4"].parameters
