"""An exported directory works with transformers as any LLaVA does (issue 13, item 2):
`AutoProcessor` + `apply_chat_template` + `processor(images=..., text=...)` + `generate`
give the answer `exgra_jax.predict` gives, on a tiny random model over the demo world."""
import os

import flax.linen as nn
import jax
import numpy as np
import PIL.Image
import pytest
import torch
import transformers

from exgra_jax import configuration
from exgra_jax.data import text
from exgra_jax.eval import prompts, single_question
from exgra_jax.hf import exporter
from exgra_jax.models import llava
from exgra_jax.models.config import LlavaConfig, num_image_tokens

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTION = "Which organ is shown?"
MAX_NEW_TOKENS = 24


def _steered_to_stop(llm: dict, tokenizer) -> dict:
  """A random model whose head writes "No" or "###" by the sign of one hidden unit, which
  the embedding of "No" makes positive: answers end at the stop string within a few
  tokens (the stopping is what is tested)."""
  stop, word = (tokenizer.convert_tokens_to_ids(t) for t in ("###", "No"))
  scale = np.zeros_like(llm["norm"]["scale"])
  scale[0] = 1.0
  head = np.zeros_like(llm["lm_head"]["kernel"])
  head[0, stop], head[0, word] = 10.0, -10.0
  embedding = np.array(llm["embed_tokens"]["embedding"])
  embedding[word, 0] = 100.0
  return {**llm, "norm": {"scale": scale}, "lm_head": {"kernel": head},
          "embed_tokens": {"embedding": embedding}}


@pytest.fixture(scope="module")
def export(demo_world, tmp_path_factory):
  config = configuration.load(os.path.join(REPO, "configs", "demo.py:small"),
                              [f"data.root={demo_world}"])
  cfg = LlavaConfig.from_config(config.model)
  params = nn.unbox(llava.init_boxed_params(cfg, jax.random.key(3)))
  tokenizer_dir = os.path.join(demo_world, "tokenizer")
  params["llm"] = _steered_to_stop(params["llm"], text.load_tokenizer(tokenizer_dir))
  out = str(tmp_path_factory.mktemp("export") / "llava")
  exporter.export(params, config.model, out, tokenizer_dir=tokenizer_dir)
  return out, cfg, os.path.join(demo_world, "vqa", "images", "vqa_00001.jpg")


def test_processor_agrees_with_the_model(export):
  out, cfg, image_path = export
  processor = transformers.AutoProcessor.from_pretrained(out)
  hf_config = transformers.AutoConfig.from_pretrained(out)
  assert isinstance(processor, transformers.LlavaProcessor)
  assert processor.image_token_id == hf_config.image_token_index
  assert processor.patch_size == cfg.vision.patch_size
  assert processor.num_additional_image_tokens == 1
  assert processor.vision_feature_select_strategy == hf_config.vision_feature_select_strategy
  messages = [{"role": "user", "content": [{"type": "image"},
                                           {"type": "text", "text": QUESTION}]}]
  prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
  assert prompt == prompts.build_prompt(f"<image>\n{QUESTION}", "train", 1)
  with PIL.Image.open(image_path) as image:
    inputs = processor(images=image.convert("RGB"), text=prompt, return_tensors="np")
  expanded = prompts.build_prompt(f"<image>\n{QUESTION}", "train", num_image_tokens(cfg))
  np.testing.assert_array_equal(inputs["input_ids"][0], processor.tokenizer(expanded).input_ids)
  ours = single_question.load_pixels(image_path, cfg.vision.image_size)
  np.testing.assert_allclose(inputs["pixel_values"][0].transpose(1, 2, 0), ours, atol=1e-5)
  generation = transformers.GenerationConfig.from_pretrained(out)
  assert generation.stop_strings == ["###"] and not generation.do_sample
  assert generation.eos_token_id == processor.tokenizer.eos_token_id


def test_generate_answers_as_predict_does(export):
  out, _, image_path = export
  processor = transformers.AutoProcessor.from_pretrained(out)
  model = transformers.LlavaForConditionalGeneration.from_pretrained(out).eval()
  messages = [{"role": "user", "content": [{"type": "text", "text": QUESTION},
                                           {"type": "image"}]}]  # predict's order
  prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
  assert prompt == prompts.build_prompt(f"{QUESTION}\n<image>", "train", 1)
  with PIL.Image.open(image_path) as image:
    inputs = processor(images=image.convert("RGB"), text=prompt, return_tensors="pt")
  with torch.no_grad():
    generated = model.generate(**inputs, tokenizer=processor.tokenizer,
                               max_new_tokens=MAX_NEW_TOKENS)
  new = generated[0, inputs["input_ids"].shape[1]:]
  answer = processor.decode(new, skip_special_tokens=True)
  assert answer.endswith("###") and len(new) < MAX_NEW_TOKENS  # stopped at the stop string
  ours = single_question.answer_from_checkpoint(out, image_path, QUESTION, template="train",
                                                max_new_tokens=MAX_NEW_TOKENS)
  assert answer.split("###")[0].strip() == ours
