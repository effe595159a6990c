"""Weight-only quantized answering (`--quantize`, inference/single_question.load_for_generation):
what the answering plan holds, and that serve, chat and `--mode=eval` answer through the one
hook. The answers of a trained int8 model against its float32 self's are checked in
tests/test_demo_learns.py (a model that learned its answers)."""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from configs import demo, model_presets
from exgra_jax.eval import vqa
from exgra_jax.inference import generate, prompts, single_question
from exgra_jax.models.config import LlavaConfig, num_image_tokens
from exgra_jax.models.llava import init_boxed_params
from exgra_jax.serving import engine
from exgra_jax.train import memory_plan
from exgra_jax.weights import loading
from exgra_jax.weights.checksum import parameter_checksum


def _answers(model_dir: str, world: str, records: list[dict], quantize: str) -> list[str]:
  return _answer_with(*single_question.load_for_generation(model_dir, quantize=quantize),
                      world, records)


def _answer_with(model, params, tokenizer, world: str, records: list[dict]) -> list[str]:
  texts = [prompts.build_prompt(r["conversations"][0]["value"], "simple",
                                num_image_tokens(model.cfg), model.cfg.image_tokens)
           for r in records]
  pixels = np.stack([single_question.load_pixels(
      os.path.join(world, "vqa", "images", r["image"]), model.cfg.vision.image_size)
      for r in records])
  settings = generate.GenerationSettings(batch_size=24, length_buckets=(512,),
                                         max_new_tokens=8)
  return generate.answer_prompts(model, params, tokenizer, texts, pixels, settings)


def _random_tiny(demo_world: str, directory) -> str:
  """A params-only checkpoint of the tiny preset at its random init (std 0.02)."""
  model_config = model_presets.tiny()
  params = nn.unbox(jax.jit(lambda: init_boxed_params(
      LlavaConfig.from_config(model_config), jax.random.key(0)))())
  model_dir = str(directory / "model")
  loading.save_params(model_dir, params, model_config,
                      tokenizer_dir=os.path.join(demo_world, "tokenizer"))
  return model_dir


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


def test_serve_engine_and_eval_mode_answer_with_int8_weights(demo_world, tmp_path):
  """`--quantize=int8` on serve / chat (serving.engine.load_model, the shared model flags'
  loader_args) and `--config.eval.quantize=int8` on `--mode=eval` go through the one hook
  (single_question.answering_model): the engine's model answers 8 demo questions as
  predict's loader with int8 does, and eval's protocol records the int8 params' checksum,
  not the float ones'."""
  model_dir = _random_tiny(demo_world, tmp_path)
  with open(os.path.join(demo_world, "vqa", "test_w_options_new.json")) as f:
    records = json.load(f)[:8]
  served = engine.load_model(model_dir, quantize="int8")
  assert served.params["llm"]["layers_0"]["self_attn"]["q_proj"]["kernel"].array.qvalue.dtype \
      == jnp.int8
  assert _answer_with(served.model, served.params, served.tokenizer, demo_world, records) \
      == _answers(model_dir, demo_world, records, "int8")

  config = demo.get_config("small")
  config.data.root = demo_world
  config.eval.records = str(tmp_path / "eight.json")
  config.eval.max_new_tokens = 4
  config.eval.quantize = "int8"
  with open(config.eval.records, "w") as f:
    json.dump(records, f)
  result = vqa.evaluate(config, tmp_path / "run", checkpoint=model_dir)
  with open(os.path.join(result["output_dir"], "protocol.json")) as f:
    recorded = json.load(f)["checkpoint"]["params_checksum"]
  _, int8_params, _ = single_question.load_for_generation(model_dir, quantize="int8")
  assert recorded == parameter_checksum(int8_params)
  assert recorded != parameter_checksum(loading.load(model_dir).params)
