"""An exported directory works with transformers as any LLaVA does (issue 13, item 2):
`AutoProcessor` + `apply_chat_template` + `processor(images=..., text=...)` + `generate`
give the answer `exgra_jax.predict` gives, on a tiny random model over the demo world.

docs/hf.md's snippet is run as written (its paths and question replaced) on every image
kind of the demo world: JPEG, 8-bit and 16-bit PNG, DICOM (issue 26, item 1). A random,
unsteered model answers with image-dependent tokens, so a snippet that fed the processor
other pixels than `data/images.py` decodes (e.g. `convert("RGB")` on a 16-bit scan) would
give another answer.
"""
import json
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import PIL.Image
import pytest
import torch
import transformers

from exgra_jax import run_config
from exgra_jax.data import images, text
from exgra_jax.inference import prompts, single_question
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
  config = run_config.load(os.path.join(REPO, "configs", "demo.py:small"),
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


# Every image kind the demo world writes, as PIL reports it (DICOM: pydicom's files).
DEMO_KINDS = {("JPEG", "RGB"), ("PNG", "L"), ("PNG", "I;16"), "DICOM"}
SNIPPET_TOKENS = 8  # new tokens, for predict and the snippet (the export's default is 1024)


def _kind(path: str):
  if path.endswith(".dcm"):
    return "DICOM"
  with PIL.Image.open(path) as image:
    return image.format, image.mode


@pytest.fixture(scope="module")
def random_export(demo_world, tmp_path_factory):
  """(export directory, {kind: first image of that kind}) of a random, unsteered model."""
  config = run_config.load(os.path.join(REPO, "configs", "demo.py:small"),
                              [f"data.root={demo_world}"])
  params = nn.unbox(llava.init_boxed_params(LlavaConfig.from_config(config.model),
                                            jax.random.key(5)))
  out = str(tmp_path_factory.mktemp("export_random") / "llava")
  exporter.export(params, config.model, out,
                  tokenizer_dir=os.path.join(demo_world, "tokenizer"))
  generation = os.path.join(out, "generation_config.json")
  with open(generation) as f:
    settings = json.load(f)
  with open(generation, "w") as f:
    json.dump({**settings, "max_new_tokens": SNIPPET_TOKENS}, f)
  kinds = {}
  for folder in ("vqa/images", "images"):
    for name in sorted(os.listdir(os.path.join(demo_world, folder))):
      path = os.path.join(demo_world, folder, name)
      kinds.setdefault(_kind(path), path)
  assert set(kinds) == DEMO_KINDS, sorted(map(str, kinds))
  return out, kinds


def _docs_snippet() -> str:
  with open(os.path.join(REPO, "docs", "hf.md")) as f:
    docs = f.read()
  (snippet,) = re.findall(r"runs this snippet as written.*?```python\n(.*?)```", docs, re.S)
  return snippet


def _with(snippet: str, model_dir: str, image_path: str, question: str) -> str:
  """The snippet with its three settings replaced (each must be found exactly once)."""
  for pattern, value in ((r'^model_dir = ".*"$', f"model_dir = {model_dir!r}"),
                         (r'^image = load_rgb\(".*"\)', f"image = load_rgb({image_path!r})"),
                         (r'^question = ".*"$', f"question = {question!r}")):
    snippet, count = re.subn(pattern, lambda _, v=value: v, snippet, flags=re.M)
    assert count == 1, pattern
  return snippet


def test_load_rgb_gives_the_pixels_predict_feeds_the_model(random_export):
  """The processor on `load_rgb`'s image computes predict's CLIP input for every kind; on
  the 16-bit PNG `convert("RGB")` does not (the defect the snippet avoids)."""
  out, kinds = random_export
  processor = transformers.AutoProcessor.from_pretrained(out)
  size = processor.image_processor.crop_size["height"]
  for kind, path in kinds.items():
    image = images.load_rgb(path)
    assert image.mode == "RGB", kind
    pixels = processor.image_processor(image, return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(pixels.transpose(1, 2, 0),
                               single_question.load_pixels(path, size), atol=1e-5,
                               err_msg=str(kind))
  with PIL.Image.open(kinds["PNG", "I;16"]) as image:
    clipped = processor.image_processor(image.convert("RGB"), return_tensors="np")
  assert np.abs(clipped["pixel_values"][0].transpose(1, 2, 0) - single_question.load_pixels(
      kinds["PNG", "I;16"], size)).max() > 1.0


def test_docs_snippet_answers_as_predict_on_every_image_kind(random_export, capsys):
  out, kinds = random_export
  snippet = _docs_snippet()
  model, params, tokenizer = single_question.load_for_generation(out)
  answers = {}
  for kind, path in kinds.items():
    ours = single_question.answer_question(model, params, tokenizer, path, QUESTION,
                                           template="train", max_new_tokens=SNIPPET_TOKENS)
    exec(compile(_with(snippet, out, path, QUESTION), "docs/hf.md", "exec"), {})  # pylint: disable=exec-used
    printed = capsys.readouterr().out
    assert printed == ours + "\n", (kind, printed, ours)
    answers[kind] = ours
  assert len(set(answers.values())) > 1, answers  # the answers depend on the image


def test_load_rgb_imports_no_jax():
  """transformers users get the training pixels without JAX (docs/hf.md)."""
  code = ("import sys; from exgra_jax.data.images import load_rgb; "
          "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax')))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True, timeout=120)
  assert out.stdout == "[]\n", out.stdout
