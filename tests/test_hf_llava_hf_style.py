"""A llava-hf style checkpoint (issue 13, item 1): only `<image>` in the tokenizer (N x
`<image>` per image), vision_feature_select_strategy "full", feature layer -1, GQA and odd
sizes. exgra_jax answers it token for token as transformers' greedy `generate` does; it
survives tools/import_hf.py -> tools/export_hf.py with the same logits, and the exported
processor + `generate` answers as exgra_jax.predict does."""
import os
import subprocess
import sys

import ml_collections
import numpy as np
import PIL.Image
import pytest
import torch
import transformers

import hf_fixtures as fx
from configs import base
from exgra_jax.data import text
from exgra_jax.inference import generate, single_question
from exgra_jax.hf import hf_configs, importer
from exgra_jax.models.config import LlavaConfig, LlmConfig, VisionConfig, num_image_tokens
from exgra_jax.models.llava import LlavaModel
from exgra_jax.train import loop
from exgra_jax.weights import loading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
QUESTION = " ".join(fx.WORDS[3:7])
MAX_NEW_TOKENS = 6


def _config(vocab: int) -> LlavaConfig:
  vision = VisionConfig(image_size=42, patch_size=14, hidden_size=24, num_layers=3,
                        num_heads=4, intermediate_size=40, select_layer=-1,
                        feature_select="full")
  llm = LlmConfig(vocab_size=vocab, hidden_size=40, intermediate_size=52, num_layers=2,
                  num_heads=5, num_kv_heads=1, rms_norm_eps=1e-5, max_position_embeddings=128)
  return LlavaConfig(vision=vision, llm=llm, projector="mlp2x_gelu", name="llava_hf_tiny",
                     image_tokens="image")


@pytest.fixture(scope="module")
def llava_hf(tmp_path_factory):
  root = tmp_path_factory.mktemp("llava_hf")
  directory = str(root / "model")
  tok = fx.write_tokenizer(directory, image_tokens=False)
  tok.add_special_tokens({"pad_token": "<pad>"})
  tok.add_tokens(["<image>"], special_tokens=True)
  tok.save_pretrained(directory)
  cfg = _config(len(tok))
  torch.manual_seed(0)
  model = transformers.LlavaForConditionalGeneration(hf_configs.llava_hf_config(
      cfg, tok.convert_tokens_to_ids("<image>"), initializer_range=fx.INIT,
      text_extra={"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                  "pad_token_id": tok.pad_token_id})).eval()
  model.save_pretrained(directory)
  image = str(root / "image.png")
  PIL.Image.fromarray(np.random.RandomState(0).randint(0, 255, (50, 61, 3), np.uint8)).save(image)
  return cfg, model, directory, image


def _greedy(model, ids: list[int], pixels: np.ndarray, tokenizer) -> str:
  with torch.no_grad():
    out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                         dtype=torch.long), pixel_values=torch.tensor(pixels[None]).permute(
                             0, 3, 1, 2), max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
  return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def test_import_reads_the_style_and_predict_matches_generate(llava_hf):
  cfg, model, directory, image = llava_hf
  imp = importer.import_model(directory)
  got = LlavaConfig.from_config(imp.model_config)
  assert (got.vision, got.llm, got.image_tokens) == (cfg.vision, cfg.llm, "image")
  assert imp.report["added_tokens"] == [] and imp.report["missing"] == []
  with pytest.raises(ValueError, match="set config.model.image_tokens='image'"):
    importer.import_model(directory, overrides={"image_tokens": "im_start_end"})
  tok = text.load_tokenizer(directory, got.image_tokens)
  prompt = f"{QUESTION}\n<image>"
  expanded = text.expand_image_token(prompt, num_image_tokens(got), got.image_tokens)
  assert expanded.count("<image>") == 10  # 3 x 3 patches + CLS ("full")
  ours = single_question.answer_question(LlavaModel(got), imp.params, tok, image, prompt,
                                         template="none", max_new_tokens=MAX_NEW_TOKENS)
  pixels = single_question.load_pixels(image, got.vision.image_size)
  theirs = _greedy(model, tok(expanded).input_ids, pixels, tok)
  assert ours and ours == generate.clean_answer(theirs, "###")


def test_import_export_round_trip_keeps_logits_and_answers(llava_hf, tmp_path):
  cfg, model, directory, image = llava_hf
  params_dir, out = str(tmp_path / "params"), str(tmp_path / "export")
  for command in (["tools/import_hf.py", f"--hf_dir={directory}", f"--out={params_dir}"],
                  ["tools/export_hf.py", f"--checkpoint={params_dir}", f"--out={out}"]):
    result = subprocess.run([sys.executable, *command], cwd=ROOT, env=ENV, capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
  exported = transformers.LlavaForConditionalGeneration.from_pretrained(out).eval()
  image_id = transformers.AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("<image>")
  n, rng = num_image_tokens(cfg), np.random.RandomState(1)
  ids = np.array([[1] + [image_id] * n + list(rng.randint(3, fx.BASE_VOCAB, 7))], np.int32)
  pixels = rng.randn(1, 42, 42, 3).astype(np.float32)
  inputs = (ids, np.ones_like(ids), ids == image_id, pixels)
  np.testing.assert_allclose(fx.torch_llava_logits(exported, inputs),
                             fx.torch_llava_logits(model, inputs), atol=1e-5, rtol=0)

  processor = transformers.AutoProcessor.from_pretrained(out)
  assert processor.image_token == "<image>" and processor.vision_feature_select_strategy == "full"
  # [question, image]: predict's order (`question\n<image>`).
  prompt = processor.apply_chat_template([{"role": "user", "content": [
      {"type": "text", "text": QUESTION}, {"type": "image"}]}], add_generation_prompt=True)
  with PIL.Image.open(image) as pil:
    inputs = processor(images=pil.convert("RGB"), text=prompt, return_tensors="pt")
  assert int((inputs["input_ids"] == image_id).sum()) == n
  # transformers' stop-string matcher cannot index this word-level toy tokenizer (no
  # decoder); test_hf_export_usable.py covers the stop string with a real BPE tokenizer.
  generation = exported.generation_config
  assert generation.stop_strings == ["###"]
  generation.stop_strings = None
  with torch.no_grad():
    generated = exported.generate(**inputs, generation_config=generation,
                                  max_new_tokens=MAX_NEW_TOKENS)
  theirs = processor.decode(generated[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
  ours = single_question.answer_from_checkpoint(out, image, QUESTION, template="train",
                                                max_new_tokens=MAX_NEW_TOKENS)
  assert ours == generate.clean_answer(theirs, "###")


def test_a_run_in_another_style_is_refused(llava_hf, tmp_path):
  """Stage starts check the weights' style against config.model.image_tokens (the data
  pipeline writes images in the config's style)."""
  _, _, directory, _ = llava_hf
  params_dir = str(tmp_path / "params")
  imp = importer.import_model(directory)
  loading.save_params(params_dir, imp.params, imp.model_config,
                          tokenizer_dir=imp.tokenizer_dir)
  config = base.get_config()
  config.init.hf_dir = directory  # the tokenizer
  config.model = ml_collections.ConfigDict(imp.model_config.to_dict())
  assert loop.load_weights(config, params_dir, None)["llm"]["norm"]["scale"].shape == (40,)
  config.model.image_tokens = "im_start_end"
  with pytest.raises(ValueError, match="set config.model.image_tokens='image'"):
    loop.load_weights(config, params_dir, None)
  tok = text.load_tokenizer(directory, "image")  # stage 1 trains <image> and <pad> only
  assert loop.new_token_ids(tok, "image") == (tok.convert_tokens_to_ids("<image>"),
                                              tok.pad_token_id)
