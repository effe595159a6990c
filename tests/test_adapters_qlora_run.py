"""A QLoRA fine-tune (finetune.lora.base=int4, rank 8) through whole runs of exgra_jax.main
on the small demo world, from random weights, 8 steps of 8, a checkpoint every 2 steps:

- a run stopped at step 4 (max_steps=4) and resumed to step 8 ends bit-identical to the
  uninterrupted 8-step run (the learning rate is constant, so a step's update does not
  depend on max_steps: what is compared is the state restored from the step-4 checkpoint,
  quantized base and Adam moments included, and the data position);
- the frozen int4 base held in the step-8 checkpoint is the one the run started with;
- the loader every answering / export command uses reads that train checkpoint (the int4
  kernels dequantized, the adapters merged); `tools/export_hf.py` writes from it a
  LlavaForConditionalGeneration whose logits on 6 demo prompts are predict's model's
  (atol 1e-4) and whose greedy answers are predict's. The logits are the measure: this
  8-step model from random weights writes eos first on those prompts (measured: 6 empty
  answers), so equal answers alone would say little;
- `keep_adapters=True` (the PEFT adapter export) gives the dequantized base and the
  adapters apart, and PEFT's adapter (`--adapter_only`) over `tools/export_hf.py
  --lora_base`'s export of that base computes the merged model;
- a run config.json whose `finetune.lora` no longer fits the checkpoint is an error naming it.

Measured: 6 passed in 170 s under a load of ~7 on 2 cores (the three runs: 116 s).
"""
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import traverse_util

import test_train_loop
from exgra_jax.data import text
from exgra_jax.hf import importer
from exgra_jax.inference import generate, prompts, single_question
from exgra_jax.models import adapters
from exgra_jax.models.config import LlavaConfig, num_image_tokens
from exgra_jax.models.llava import LlavaModel
from exgra_jax.weights import inspection, loading
from hf_fixtures import real, torch_llava_logits

REPO = test_train_loop.REPO
SETTINGS = adapters.LoraSettings(rank=8, alpha=16.0, base="int4")
QLORA = ("--config.stages=('finetune',)", "--config.finetune.global_batch=8",
         f"--config.finetune.lora.rank={SETTINGS.rank}",
         f"--config.finetune.lora.base={SETTINGS.base}",
         "--config.finetune.lr=1e-2", "--config.finetune.warmup_ratio=0.0",
         "--config.optim.schedule=constant", "--config.finetune.val_records=",
         "--config.finetune.test_records=", "--config.train.checkpoint_every=2",
         "--config.train.log_every=2", "--config.export.after_training=False")
QUESTIONS = 6  # demo test questions answered by predict and by the export
TOL = 1e-4
MAX_NEW_TOKENS = 8


def _trained(demo_world, workdir, max_steps):
  result = test_train_loop._run(demo_world, workdir,
                                overrides=(*QLORA, f"--config.finetune.max_steps={max_steps}"))
  assert result.returncode == 0, result.stderr[-4000:]
  return result


@pytest.fixture(scope="module")
def runs(demo_world, tmp_path_factory):
  """(uninterrupted workdir, resumed workdir, the resumed run's stderr). The three runs
  share a JAX compilation cache: the second and third load the first's programs."""
  with pytest.MonkeyPatch.context() as env:
    env.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path_factory.mktemp("qlora_jit_cache")))
    uninterrupted = str(tmp_path_factory.mktemp("qlora_uninterrupted"))
    _trained(demo_world, uninterrupted, 8)
    resumed = str(tmp_path_factory.mktemp("qlora_resumed"))
    _trained(demo_world, resumed, 4)
    return uninterrupted, resumed, _trained(demo_world, resumed, 8).stderr


def _step(workdir, step=8):
  return os.path.join(workdir, "checkpoints", "finetune", str(step))


def test_resumed_run_ends_as_the_uninterrupted_one(runs):
  uninterrupted, resumed, stderr = runs
  assert "resumes at step 4 of 8" in stderr
  want = inspection.read_checkpoint(_step(uninterrupted))
  got = inspection.read_checkpoint(_step(resumed))
  assert got["step"] == 8 and got["skipped"] == 0
  assert got["checksum"] == want["checksum"]
  kernel = "llm/layers_0/self_attn/q_proj/kernel/array"
  assert got["shapes"][f"{kernel}/qvalue"][1] == "int4"
  assert got["shapes"][f"{kernel}/scale"][1] == "float32"


def test_the_int4_base_stays_the_one_the_run_started_with(runs):
  """The run's start is the adapted model's init with the config's seed (0): a random
  base, quantized by qwix at init (train/loop.py build_stage). Through 8 steps the adapters
  moved and the dequantized base kernels stayed bit-identical to it."""
  kept = loading.load(_step(runs[1]), keep_adapters=True)
  flat = traverse_util.flatten_dict(kept.params)
  adapted = [p for p in flat if p[-1].endswith("_lora_b")]
  assert len(adapted) == 2 * 7 and all(np.abs(flat[p]).max() > 0 for p in adapted)
  bases = [(*p[:-1], "kernel") for p in adapted]
  model = adapters.lora_model(LlavaModel(LlavaConfig.from_config(kept.model_config)),
                              SETTINGS, train=False)

  def start():  # only the base kernels: XLA drops the rest of the init
    init = traverse_util.flatten_dict(adapters.dequantized(adapters.init_params(
        model, jax.random.key(0))))
    return [init[p] for p in bases]
  for path, value in zip(bases, jax.jit(start)()):
    assert flat[path].dtype == np.float32
    np.testing.assert_array_equal(flat[path], value, err_msg=str(path))
  merged = traverse_util.flatten_dict(loading.load(_step(runs[1])).params)
  expected = traverse_util.flatten_dict(adapters.merge_adapters(kept.params, SETTINGS.scale))
  assert merged.keys() == expected.keys()
  for path, value in merged.items():
    np.testing.assert_array_equal(value, expected[path], err_msg=str(path))


def _demo_prompts(world, tokenizer, cfg):
  """The first QUESTIONS demo test questions in the `train` template: (prompt texts,
  (ids, mask, image_mask, pixels) of them right-padded into one batch)."""
  with open(os.path.join(world, "vqa", "test_w_options_new.json")) as f:
    records = json.load(f)[:QUESTIONS]
  texts = [prompts.build_prompt(r["conversations"][0]["value"], "train", num_image_tokens(cfg),
                                cfg.image_tokens) for r in records]
  token_ids = [tokenizer(t).input_ids for t in texts]
  ids, mask = generate.pad_prompts(token_ids, max(map(len, token_ids)), tokenizer.pad_token_id)
  patch = tokenizer.convert_tokens_to_ids(text.patch_token(cfg.image_tokens))
  pixels = np.stack([single_question.load_pixels(
      os.path.join(world, "vqa", "images", r["image"]), cfg.vision.image_size) for r in records])
  return texts, (ids, mask, (ids == patch) & (mask == 1), pixels)


def _logits(model, params, inputs):
  return np.asarray(jax.jit(model.apply)({"params": params}, *inputs)["logits"])


def test_predict_and_the_hf_export_answer_alike(runs, demo_world, tmp_path):
  """Logits of the whole prompts, then greedy answers (MAX_NEW_TOKENS, stop "###"): predict's
  loader and decoding (batched) against transformers' generate on the export."""
  step_dir = _step(runs[1])
  model, params, tokenizer = single_question.load_for_generation(step_dir)
  out = str(tmp_path / "llava")
  export = subprocess.run([sys.executable, "tools/export_hf.py", f"--checkpoint={step_dir}",
                           f"--out={out}"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=False)
  assert export.returncode == 0, export.stderr[-3000:]
  hf = transformers.LlavaForConditionalGeneration.from_pretrained(out).eval()
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  texts, inputs = _demo_prompts(demo_world, tokenizer, model.cfg)
  ids, mask, _, pixels = inputs
  np.testing.assert_allclose(real(torch_llava_logits(hf, inputs), mask),
                             real(_logits(model, params, inputs), mask), atol=TOL, rtol=0)
  predicted = generate.answer_prompts(model, params, tokenizer, texts, pixels,
                                      generate.GenerationSettings(
                                          batch_size=QUESTIONS, length_buckets=(ids.shape[1],),
                                          max_new_tokens=MAX_NEW_TOKENS))
  for row, want in enumerate(predicted):
    length = int(mask[row].sum())
    with torch.no_grad():  # greedy, stopping at "###" (the export's generation config)
      generated = hf.generate(input_ids=torch.tensor(ids[row:row + 1, :length]).long(),
                              attention_mask=torch.tensor(mask[row:row + 1, :length]),
                              pixel_values=torch.tensor(pixels[row:row + 1]).permute(0, 3, 1, 2),
                              tokenizer=hf_tokenizer, max_new_tokens=MAX_NEW_TOKENS)
    answer = hf_tokenizer.decode(generated[0, length:], skip_special_tokens=True)
    assert generate.clean_answer(answer, "###") == want, texts[row]


def test_peft_adapter_of_the_checkpoint_over_its_dequantized_base(runs, demo_world, tmp_path):
  """`tools/export_hf.py --adapter_only`'s adapter applies over `--lora_base`'s export
  (the dequantized int4 base), not over the float weights the run started from."""
  step_dir = _step(runs[1])
  exports = {flag: subprocess.run(
      [sys.executable, "tools/export_hf.py", f"--checkpoint={step_dir}",
       f"--out={tmp_path / flag}", f"--{flag}"], cwd=REPO, capture_output=True, text=True,
      timeout=300, check=False) for flag in ("lora_base", "adapter_only")}
  for done in exports.values():
    assert done.returncode == 0, done.stderr[-3000:]
  assert json.loads(exports["adapter_only"].stdout)["modules"] == 2 * 7
  model, params, tokenizer = single_question.load_for_generation(step_dir)
  hf = transformers.LlavaForConditionalGeneration.from_pretrained(
      str(tmp_path / "lora_base")).eval()
  _, inputs = _demo_prompts(demo_world, tokenizer, model.cfg)
  want = real(_logits(model, params, inputs), inputs[1])
  plain = real(torch_llava_logits(hf, inputs), inputs[1])  # before PEFT wraps `hf` in place
  assert np.abs(plain - want).max() > 100 * TOL  # the adapters matter
  with_adapter = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter_only")).eval()
  np.testing.assert_allclose(real(torch_llava_logits(with_adapter, inputs), inputs[1]), want,
                             atol=TOL, rtol=0)


@pytest.mark.parametrize("setting, value, error, says", [
    ("base", "float32", importer.MissingTensorsError, "makes them: is that the checkpoint's?"),
    ("rank", 4, importer.ShapeMismatchError, "kernel_lora_a"),
])
def test_other_lora_settings_in_the_run_config_are_an_error_naming_the_file(
    runs, tmp_path, setting, value, error, says):
  """The loader builds the checkpoint's tree from the run's `finetune.lora`: a config.json
  that no longer describes the checkpoint is one error naming it, not a wrong model."""
  workdir = str(tmp_path / "run")
  shutil.copytree(runs[1], workdir)
  config_path = os.path.join(workdir, "config.json")
  with open(config_path) as f:
    config = json.load(f)
  config["finetune"]["lora"][setting] = value
  with open(config_path, "w") as f:
    json.dump(config, f)
  with pytest.raises(error, match=re.escape(os.path.join(_step(workdir), "state"))) as caught:
    loading.load(_step(workdir))
  assert says in str(caught.value)
