"""LoRA adapters out to transformers (hf/peft_adapter.py, models/adapters.merge_adapters):
the merged `llava` export and PEFT's adapter over the plain base export both give the
logits of the adapted exgra-jax model (transformers + peft in torch, fp32, tiny model)."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import transformers
from flax import linen as nn

from exgra_jax.hf import exporter, peft_adapter
from exgra_jax.models import adapters
from exgra_jax.models.llava import LlavaModel, init_boxed_params
from hf_fixtures import batch, real, tiny_config, torch_llava_logits, write_tokenizer

SETTINGS = adapters.LoraSettings(rank=4, alpha=8.0, base="float32")
TOL = 1e-4


@pytest.fixture(scope="module", params=[False, True], ids=["layers", "scanned"])
def adapted(request, tmp_path_factory):
  """(cfg, adapted model, its params with random non-zero B, tokenizer dir, tmp dir)."""
  cfg = tiny_config(scan=request.param)
  tmp = tmp_path_factory.mktemp("peft")
  write_tokenizer(str(tmp / "tok"), image_tokens=True)
  model = adapters.lora_model(LlavaModel(cfg), SETTINGS, train=False)
  fresh = flax.traverse_util.flatten_dict(nn.unbox(jax.jit(
      lambda: adapters.init_params(model, jax.random.key(1)))()))
  base = flax.traverse_util.flatten_dict(nn.unbox(jax.jit(
      lambda: init_boxed_params(cfg, jax.random.key(0)))()))
  rng = np.random.RandomState(0)
  params = {p: (jnp.asarray(0.3 * rng.randn(*v.shape), jnp.float32) if p[-1].endswith("_lora_b")
                else v if adapters.is_adapter(p) else base[p]) for p, v in fresh.items()}
  return cfg, model, flax.traverse_util.unflatten_dict(params), str(tmp / "tok"), tmp


def _adapted_logits(model, params, inputs):
  return np.asarray(jax.jit(model.apply)({"params": params}, *inputs)["logits"])


def test_merged_export_gives_the_adapted_logits(adapted):
  cfg, model, params, tok, tmp = adapted
  inputs = batch(cfg)
  merged = adapters.merge_adapters(params, SETTINGS.scale)
  exporter.export(merged, cfg.to_dict(), str(tmp / "merged"), tokenizer_dir=tok)
  hf = transformers.LlavaForConditionalGeneration.from_pretrained(str(tmp / "merged")).eval()
  want = _adapted_logits(model, params, inputs)
  np.testing.assert_allclose(real(torch_llava_logits(hf, inputs), inputs[1]),
                             real(want, inputs[1]), atol=TOL, rtol=0)


def test_peft_adapter_over_the_base_export_gives_the_adapted_logits(adapted):
  cfg, model, params, tok, tmp = adapted
  inputs = batch(cfg)
  base = adapters.merge_adapters({k: v for k, v in params.items()}, 0.0)  # adapters dropped
  exporter.export(base, cfg.to_dict(), str(tmp / "base"), tokenizer_dir=tok)
  summary = peft_adapter.write_peft_adapter(params, cfg.to_dict(), str(tmp / "adapter"),
                                            rank=SETTINGS.rank, alpha=SETTINGS.alpha)
  assert summary["modules"] == 2 * 7
  hf = transformers.LlavaForConditionalGeneration.from_pretrained(str(tmp / "base")).eval()
  plain = torch_llava_logits(hf, inputs)
  with_adapter = peft.PeftModel.from_pretrained(hf, str(tmp / "adapter")).eval()
  got = real(torch_llava_logits(with_adapter, inputs), inputs[1])
  want = real(_adapted_logits(model, params, inputs), inputs[1])
  assert np.abs(real(plain, inputs[1]) - want).max() > 100 * TOL  # the adapters matter
  np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
