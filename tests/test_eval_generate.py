"""Batched generation: greedy equals transformers' generate across buckets and partial
batches, and on our own model exported to transformers; sampling keys; the release's answer
clean-up."""
import json
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
import transformers

from configs import base
from exgra_jax import run_config
from exgra_jax.data import text
from exgra_jax.inference import generate as gen
from exgra_jax.inference import prompts as prompts_lib
from exgra_jax.inference import single_question
from exgra_jax.hf import exporter
from exgra_jax.models.config import LlavaConfig, LlmConfig, VisionConfig
from exgra_jax.models import llava
from exgra_jax.models.llava import LlavaModel
from models_torch_weights import hf_llava_config, llava_params

IMAGE_TOKEN = 63
CFG = LlavaConfig(
    vision=VisionConfig(image_size=28, patch_size=7, hidden_size=32, num_layers=2, num_heads=4,
                        intermediate_size=64),
    llm=LlmConfig(vocab_size=64, hidden_size=48, intermediate_size=80, num_layers=2,
                  num_heads=4, num_kv_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6),
    connector="none", projector="mlp2x_gelu")
NEW = 8


@pytest.fixture(scope="module")
def pair():
  torch.manual_seed(0)
  model = transformers.LlavaForConditionalGeneration(
      hf_llava_config(CFG, IMAGE_TOKEN, initializer_range=0.3)).eval()
  return model, llava_params(model.state_dict(), CFG)


def _prompts(lengths=(24, 20, 22)):
  rng = np.random.RandomState(1)
  prompts = []
  for length in lengths:
    ids = rng.randint(1, IMAGE_TOKEN - 1, length)
    ids[3:3 + CFG.vision.num_patches] = IMAGE_TOKEN
    prompts.append(ids.tolist())
  return prompts, rng.randn(len(lengths), 28, 28, 3).astype(np.float32)


def _generate(params, prompts, pixels, temperature=0.0, key=None):
  settings = gen.GenerationSettings(batch_size=2, length_buckets=(22, 32),
                                    max_new_tokens=NEW, temperature=temperature)
  return gen.generate(LlavaModel(CFG), params, prompts, pixels, settings,
                      image_patch_id=IMAGE_TOKEN, eos_id=-1, pad_id=0,
                      detokenize=lambda ids: " ".join(map(str, ids)), key=key)


def test_greedy_answers_equal_transformers_generate(pair):
  model, params = pair
  prompts, pixels = _prompts()
  answers = _generate(params, prompts, pixels)  # buckets 32 then 22 (partial batch)
  for prompt, image, answer in zip(prompts, pixels, answers):
    with torch.no_grad():
      ref = model.generate(input_ids=torch.tensor([prompt]),
                           pixel_values=torch.tensor(image.transpose(2, 0, 1)[None]),
                           do_sample=False, max_new_tokens=NEW, eos_token_id=None,
                           pad_token_id=0)
    expected = ref[0, len(prompt):].tolist()
    assert len(set(expected)) > 2, "degenerate reference"
    assert answer == " ".join(map(str, expected))


def test_sampling_near_zero_temperature_is_greedy_and_keys_reproduce(pair):
  _, params = pair
  prompts, pixels = _prompts((20, 21))
  greedy = _generate(params, prompts, pixels)
  assert _generate(params, prompts, pixels, 1e-6, jax.random.key(3)) == greedy
  hot = [_generate(params, prompts, pixels, 5.0, jax.random.key(k)) for k in (1, 1, 2)]
  assert hot[0] == hot[1] and hot[0] != hot[2]


@pytest.mark.parametrize("text,expected", [
    ("Assistant: Yes, it is.###Human: more", "Yes, it is."),
    ("### Assistant:  ###Response: No", "No"),
    ("  left lung  ", "left lung"),
])
def test_clean_answer_like_the_release(text, expected):
  assert gen.clean_answer(text, "###") == expected


def test_settings_from_the_base_config():
  config = base.get_config()
  config.eval.temperature = 0.5
  settings = gen.GenerationSettings.from_config(config)
  assert settings == gen.GenerationSettings(batch_size=8, length_buckets=(512, 1024, 2048),
                                            max_new_tokens=1024, temperature=0.5, stop="###")


def test_bad_settings_and_prompts():
  with pytest.raises(ValueError, match="largest length bucket"):
    gen.bucket_length(40, (16, 32))
  with pytest.raises(ValueError, match="ascending"):
    gen.GenerationSettings(batch_size=1, length_buckets=(32, 16), max_new_tokens=1)
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    gen.pad_prompts([[1], []], 4, 0)


def test_generation_sharded_over_two_devices_matches_unsharded():
  root = pathlib.Path(__file__).resolve().parents[1]
  out = subprocess.run([sys.executable, str(root / "tests" / "eval_sharded_generate.py")],
                       capture_output=True, text=True, timeout=300, check=False,
                       env={**os.environ, "PYTHONPATH": str(root)})
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["devices"] == 2
  assert result["sharded_0.0"] == result["plain_0.0"]
  assert result["sharded_2.0"] == result["plain_2.0"]
  assert len(result["plain_0.0"]) == 3 and all(result["plain_0.0"])


def test_greedy_answers_equal_transformers_generate_on_our_export(demo_world, tmp_path):
  """Our tiny model, exported to a transformers LLaVA directory, decodes the same tokens
  with transformers' `generate` as with ours (demo tokenizer, a demo image)."""
  root = pathlib.Path(__file__).resolve().parents[1]
  config = run_config.load(str(root / "configs" / "demo.py"), [])
  cfg = LlavaConfig.from_config(config.model)
  model = LlavaModel(cfg)
  n = cfg.vision.num_patches
  params = nn.unbox(llava.init_boxed_params(cfg, jax.random.key(3)))
  tokenizer_dir = os.path.join(demo_world, "tokenizer")
  exporter.export(params, config.model, str(tmp_path / "hf"), tokenizer_dir=tokenizer_dir)
  hf = transformers.LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "hf")).eval()
  tok = text.load_tokenizer(tokenizer_dir)
  prompt = prompts_lib.build_prompt("Which organ is shown?\n<image>", "train", n)
  prompt_ids = tok(prompt).input_ids
  pixels = single_question.load_pixels(os.path.join(demo_world, "images", "CT_small.dcm"),
                                        112)[None]
  settings = gen.GenerationSettings(batch_size=1, length_buckets=(len(prompt_ids),),
                                    max_new_tokens=NEW)
  (ours,) = gen.generate(model, params, [prompt_ids], pixels, settings,
                         image_patch_id=tok.convert_tokens_to_ids("<im_patch>"), eos_id=-1,
                         pad_id=tok.pad_token_id, detokenize=lambda t: " ".join(map(str, t)))
  generation = hf.generation_config
  generation.stop_strings = None  # the export's "###"; a fixed-length comparison stops never
  with torch.no_grad():
    ref = hf.generate(input_ids=torch.tensor([prompt_ids]),
                      pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2)),
                      generation_config=generation, do_sample=False, max_new_tokens=NEW,
                      eos_token_id=None, pad_token_id=tok.pad_token_id)
  expected = ref[0, len(prompt_ids):].tolist()
  assert len(set(expected)) > 2, "degenerate reference"
  assert ours == " ".join(map(str, expected))
