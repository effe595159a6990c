"""LoRA / QLoRA adapters and weight-only quantization (models/adapters.py, qwix) on a tiny
LlavaModel: which leaves the adapters add, merged = base + (alpha / rank) * A @ B computed
by hand, merged logits = adapted logits, PTQ and QLoRA bases close to full precision."""
import dataclasses
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from exgra_jax.models import adapters
from exgra_jax.models.config import LlavaConfig
from exgra_jax.models.llava import LlavaModel, init_boxed_params

from test_models_llava import CFG, IMAGE_TOKEN  # the tiny LLaVA the model tests check

PROJECTIONS = ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj",
               "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")
SETTINGS = adapters.LoraSettings(rank=4, alpha=8.0, base="float32")


def _cfg(scan: bool) -> LlavaConfig:
  return dataclasses.replace(CFG, llm=dataclasses.replace(CFG.llm, scan_layers=scan))


def _inputs():
  rng = np.random.RandomState(0)
  ids = rng.randint(0, IMAGE_TOKEN - 1, (2, 24))
  ids[:, 3:3 + CFG.vision.num_patches] = IMAGE_TOKEN
  mask = (np.arange(24) < np.array([24, 21])[:, None]).astype(np.int32)
  pixels = rng.randn(2, 28, 28, 3).astype(np.float32)
  return ids * mask, mask, ids == IMAGE_TOKEN, pixels


def _init(cfg, model):
  """Unboxed params of LlavaModel(cfg) (model None, key 0) or of a wrapped `model` (key 1)."""
  key = jax.random.key(0 if model is None else 1)
  return nn.unbox(jax.jit(lambda: init_boxed_params(cfg, key, model))())


def _logits(model, params):
  return np.asarray(jax.jit(model.apply)({"params": params}, *_inputs())["logits"])


@functools.cache
def _adapted(scan: bool, settings=SETTINGS):
  """(LoRA model, its params with random non-zero B, the base params it started from)."""
  cfg = _cfg(scan)
  base = _init(cfg, None)
  model = adapters.lora_model(LlavaModel(cfg), settings, train=False)
  fresh = _init(cfg, model)
  flat, base_flat = flax.traverse_util.flatten_dict(fresh), flax.traverse_util.flatten_dict(base)
  rng = np.random.RandomState(2)
  for path, value in flat.items():
    if path[-1].endswith("_lora_b"):
      flat[path] = jnp.asarray(0.3 * rng.randn(*value.shape), jnp.float32)
    elif not adapters.is_adapter(path):
      flat[path] = base_flat[path]
  return model, flax.traverse_util.unflatten_dict(flat), base


@pytest.mark.parametrize("scan", [False, True])
def test_adapters_sit_on_the_llm_projections_and_start_as_the_identity(scan):
  cfg = _cfg(scan)
  model = adapters.lora_model(LlavaModel(cfg), SETTINGS, train=False)
  params = _init(cfg, model)
  found = {"/".join(p) for p in flax.traverse_util.flatten_dict(params)
           if adapters.is_adapter(p)}
  layers = ["layers"] if scan else [f"layers_{i}" for i in range(2)]
  assert found == {f"llm/{layer}/{proj}/kernel{suffix}" for layer in layers
                   for proj in PROJECTIONS for suffix in ("_lora_a", "_lora_b")}
  plain = {p: v for p, v in flax.traverse_util.flatten_dict(params).items()
           if not adapters.is_adapter(p)}
  assert plain.keys() == flax.traverse_util.flatten_dict(
      jax.eval_shape(lambda: init_boxed_params(cfg, jax.random.key(1)))).keys()
  # B starts at zero: the adapted model computes the base model.
  np.testing.assert_array_equal(_logits(model, params), _logits(
      LlavaModel(cfg), flax.traverse_util.unflatten_dict(plain)))


@pytest.mark.parametrize("scan", [False, True])
def test_merged_kernel_is_base_plus_scale_times_a_b(scan):
  _, params, base = _adapted(scan)
  merged = adapters.merge_adapters(params, SETTINGS.scale)
  flat, merged_flat = (flax.traverse_util.flatten_dict(t) for t in (params, merged))
  assert merged_flat.keys() == flax.traverse_util.flatten_dict(base).keys()
  checked = 0
  for path, kernel in merged_flat.items():
    a = flat.get((*path[:-1], "kernel_lora_a"))
    if path[-1] != "kernel" or a is None:
      np.testing.assert_array_equal(kernel, flat[path])
      continue
    w, a, b = (np.asarray(x, np.float64) for x in (flat[path], a, flat[(*path[:-1],
                                                                         "kernel_lora_b")]))
    layers = w.shape[:1] if scan else ()
    want = np.stack([wi + 2.0 * (ai @ bi).reshape(wi.shape) for wi, ai, bi in
                     zip(w.reshape(-1, *w.shape[len(layers):]), a.reshape(-1, *a.shape[-2:]),
                         b.reshape(-1, *b.shape[-2:]))]).reshape(w.shape)
    np.testing.assert_allclose(kernel, want, rtol=1e-6, atol=1e-6)
    checked += 1
  assert checked == len(PROJECTIONS) * (1 if scan else 2)


@pytest.mark.parametrize("scan", [False, True])
def test_merged_model_computes_the_adapted_model(scan):
  model, params, _ = _adapted(scan)
  adapted = _logits(model, params)
  merged = _logits(LlavaModel(_cfg(scan)), adapters.merge_adapters(params, SETTINGS.scale))
  assert np.abs(adapted - _logits(LlavaModel(_cfg(scan)), _adapted(scan)[2])).max() > 0.1
  np.testing.assert_allclose(merged, adapted, atol=2e-5, rtol=0)


@pytest.mark.parametrize("qtype,tolerance,scan", [("int8", 0.02, True), ("int4", 0.3, False)])
def test_weight_only_quantized_model_stays_close_to_full_precision(qtype, tolerance, scan):
  cfg = _cfg(scan)
  base = _init(cfg, None)
  model = adapters.quantized_model(LlavaModel(cfg), qtype)
  params = adapters.quantize_params(model, base)
  kernels = [v for p, v in flax.traverse_util.flatten_dict(params).items()
             if p[0] == "llm" and p[-1] == "kernel" and p[-2] != "lm_head"]
  assert len(kernels) == len(PROJECTIONS) * (1 if scan else 2)
  assert all(k.array.qvalue.dtype == jnp.dtype(qtype) for k in kernels)
  full = _logits(LlavaModel(cfg), base)
  error = np.abs(_logits(model, params) - full).max() / np.abs(full).max()
  assert 0 < error < tolerance


def test_qlora_merges_into_the_dequantized_base():
  settings = dataclasses.replace(SETTINGS, base="int4")
  model, params, _ = _adapted(False, settings)
  params = adapters.quantize_params(model, params)  # the adapters pass through unchanged
  assert params["llm"]["layers_0"]["mlp"]["up_proj"]["kernel"].array.qvalue.dtype == jnp.int4
  merged = adapters.merge_adapters(params, settings.scale)
  np.testing.assert_allclose(_logits(LlavaModel(CFG), merged), _logits(model, params),
                             atol=2e-5, rtol=0)


def test_lora_on_a_bfloat16_model_keeps_the_compute_dtype():
  """The 7B presets compute in bfloat16 with scanned layers: the float32 adapters' update
  must not turn a projection's output into float32 (it broke the scan's carry type, found
  by planning the 7B LoRA step). Adapted logits of a random B stay within bfloat16 rounding
  of the merged model's."""
  cfg = dataclasses.replace(_cfg(True), llm=dataclasses.replace(_cfg(True).llm,
                                                                dtype="bfloat16"))
  cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, dtype="bfloat16"))
  model = adapters.lora_model(LlavaModel(cfg), SETTINGS, train=False)
  params = _init(cfg, model)
  flat = flax.traverse_util.flatten_dict(params)
  rng = np.random.RandomState(1)
  flat = {k: (rng.randn(*v.shape).astype(np.float32) * 0.1 if k[-1].endswith("_lora_b")
              else v) for k, v in flat.items()}
  params = flax.traverse_util.unflatten_dict(flat)
  adapted = _logits(model, params)
  merged = _logits(LlavaModel(cfg), adapters.merge_adapters(params, SETTINGS.scale))
  untouched = _logits(LlavaModel(cfg), adapters.merge_adapters(
      flax.traverse_util.unflatten_dict({k: v for k, v in flat.items()
                                         if not adapters.is_adapter(k)}), SETTINGS.scale))
  assert np.abs(adapted - untouched).max() > 10 * np.abs(adapted - merged).max()
