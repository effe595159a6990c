"""Layout (a): transformers-native LlavaForConditionalGeneration, connector none and sci,
and vision_feature_select_strategy "full" (CLS token kept: `vision.feature_select`).

Import gives transformers' logits (fp32, 1e-4 max-abs); the export loads in
`LlavaForConditionalGeneration.from_pretrained` with the same logits; export -> import is
bit-identical in both export layouts; the scanned import holds the same tensors.
"""
import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import transformers

import hf_fixtures as fx
from exgra_jax.hf import exporter, importer, weights_io
from exgra_jax.hf.placement import typed_config
from exgra_jax.models.config import num_image_tokens

TOL = 1e-4  # fp32 logits max-abs (logits are O(1..10))


@pytest.fixture(scope="module", params=["none", "sci", "full"])
def imported(request, tmp_path_factory):
  cfg = (fx.tiny_config(feature_select="full") if request.param == "full"
         else fx.tiny_config(request.param))
  directory = str(tmp_path_factory.mktemp(f"llava_{request.param}"))
  model = fx.llava_dir(directory, cfg)
  return cfg, model, directory, importer.import_model(directory)


def test_import_matches_transformers_logits(imported):
  cfg, model, _, imp = imported
  assert imp.layout == "llava"
  assert imp.report == {"missing": [], "unexpected": [], "initialised": [], "added_tokens": []}
  got = typed_config(imp.model_config)
  assert (got.connector, got.connector_layers, got.vision, got.llm) == (
      cfg.connector, cfg.connector_layers if cfg.connector == "sci" else (0, 1), cfg.vision,
      cfg.llm)
  inputs = fx.batch(cfg)
  ours = fx.real(fx.flax_logits(got, imp.params, inputs), inputs[1])
  ref = fx.real(fx.torch_llava_logits(model, inputs), inputs[1])
  assert np.abs(ref).max() > 1.0
  np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)


def test_export_loads_in_transformers_and_round_trips(imported, tmp_path):
  _, _, _, imp = imported
  out = str(tmp_path / "llava")
  result = exporter.export(imp.params, imp.model_config, out, tokenizer_dir=imp.tokenizer_dir,
                           shard_size_gb=60e3 / 2**30)
  with open(os.path.join(out, weights_io.SAFETENSORS_INDEX)) as f:
    index = json.load(f)
  files = sorted(n for n in os.listdir(out) if n.endswith(".safetensors"))
  assert result["files"] == len(files) > 2 and sorted(set(index["weight_map"].values())) == files
  assert result["tensors"] == len(index["weight_map"])
  assert index["metadata"]["total_size"] == result["bytes"]
  assert {"config.json", "preprocessor_config.json", "tokenizer.json"} <= set(os.listdir(out))
  assert transformers.AutoImageProcessor.from_pretrained(out).crop_size["height"] == 56
  cfg = typed_config(imp.model_config)
  processor = transformers.AutoProcessor.from_pretrained(out)
  assert processor.vision_feature_select_strategy == cfg.vision.feature_select
  ids = processor(images=np.zeros((56, 56, 3), np.uint8), text="<im_patch>")["input_ids"][0]
  assert ids.count(processor.image_token_id) == num_image_tokens(cfg)

  inputs = fx.batch(cfg, seed=1)
  reloaded = transformers.LlavaForConditionalGeneration.from_pretrained(out).eval()
  np.testing.assert_allclose(fx.real(fx.torch_llava_logits(reloaded, inputs), inputs[1]),
                             fx.real(fx.flax_logits(cfg, imp.params, inputs), inputs[1]),
                             atol=TOL, rtol=0)
  again = importer.import_model(out)
  fx.assert_same_params(again.params, imp.params)
  assert again.model_config == imp.model_config

  release = str(tmp_path / "release")
  exporter.export(imp.params, imp.model_config, release, tokenizer_dir=imp.tokenizer_dir,
                  layout="release")
  from_release = importer.import_model(release)
  assert from_release.layout == "release" and from_release.report["missing"] == []
  fx.assert_same_params(from_release.params, imp.params)
  assert from_release.model_config == imp.model_config


def test_scanned_bfloat16_import_holds_the_same_tensors(imported, tmp_path):
  _, _, directory, imp = imported
  scanned = importer.import_model(directory, overrides={"scan_layers": True,
                                                        "param_dtype": "bfloat16"})
  cfg = typed_config(scanned.model_config)
  assert cfg.llm.scan_layers and cfg.llm.param_dtype == "bfloat16"
  layers = scanned.params["llm"]["layers"]["mlp"]["up_proj"]["kernel"]
  assert layers.dtype == jnp.bfloat16 and layers.shape[0] == cfg.llm.num_layers
  for i in range(cfg.llm.num_layers):
    np.testing.assert_array_equal(
        np.asarray(layers[i]),
        np.asarray(imp.params["llm"][f"layers_{i}"]["mlp"]["up_proj"]["kernel"]).astype(
            jnp.bfloat16))
  out = str(tmp_path / "scanned")
  exporter.export(scanned.params, scanned.model_config, out, tokenizer_dir=imp.tokenizer_dir)
  again = importer.import_model(out, overrides={"scan_layers": True,
                                                "param_dtype": "bfloat16"})
  fx.assert_same_params(again.params, scanned.params)
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["dtype"] == "bfloat16"


def test_336_px_and_last_layer_import_with_transformers_logits(tmp_path):
  """llava-1.5's geometry: 336 px / 14 (576 image tokens), any vision_feature_layer."""
  cfg = fx.tiny_config()
  cfg = dataclasses.replace(
      cfg, vision=dataclasses.replace(cfg.vision, image_size=336, select_layer=-1),
      llm=dataclasses.replace(cfg.llm, max_position_embeddings=1024))
  model = fx.llava_dir(str(tmp_path), cfg)
  imp = importer.import_model(str(tmp_path))
  got = typed_config(imp.model_config)
  assert (got.vision.image_size, got.vision.select_layer, num_image_tokens(got)) == (336, -1, 576)
  inputs = fx.batch(got)
  np.testing.assert_allclose(fx.real(fx.flax_logits(got, imp.params, inputs), inputs[1]),
                             fx.real(fx.torch_llava_logits(model, inputs), inputs[1]),
                             atol=TOL, rtol=0)
