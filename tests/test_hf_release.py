"""Layout (b): the LLaVA-Med / ExGra-Med release (LlavaLlamaForCausalLM + a CLIP directory).

Every connector (none, dci, sci, sti) and both projectors (linear, mlp2x_gelu): the import
computes what the composed torch model computes (transformers CLIP -> reference connector
-> LLaVA's projector -> LLaMA inputs_embeds; fp32, 1e-4 max-abs); export -> import is
bit-identical with the same `config.model`; the transformers layout refuses what it
cannot compute.
"""
import pytest

import hf_fixtures as fx
from exgra_jax.hf import exporter, hf_configs, importer
from exgra_jax.hf.placement import typed_config

TOL = 1e-4
CASES = [("none", "linear"), ("dci", "mlp2x_gelu"), ("sci", "linear"), ("sti", "mlp2x_gelu")]


@pytest.fixture(scope="module", params=CASES, ids=[f"{c}-{p}" for c, p in CASES])
def release(request, tmp_path_factory):
  connector, projector = request.param
  cfg = fx.tiny_config(connector, projector)
  root = tmp_path_factory.mktemp(f"release_{connector}")
  model_dir, clip_dir = str(root / "model"), str(root / "clip")
  torch_parts = fx.release_dir(model_dir, clip_dir, cfg)
  # The release does not save the connector: say it, as a user of a -dci checkpoint must.
  overrides = {} if connector == "none" else {"connector": connector,
                                              "connector_layers": cfg.connector_layers}
  imported = importer.import_model(model_dir, clip_dir, overrides=overrides)
  return cfg, torch_parts, model_dir, clip_dir, imported


def test_import_matches_the_composed_torch_model(release):
  cfg, (llama, clip, projector), _, _, imp = release
  assert imp.layout == "release" and imp.report["missing"] == imp.report["unexpected"] == []
  got = typed_config(imp.model_config)
  assert (got.connector, got.projector, got.vision, got.llm) == (
      cfg.connector, cfg.projector, cfg.vision, cfg.llm)
  inputs = fx.batch(got)
  ours = fx.real(fx.flax_logits(got, imp.params, inputs), inputs[1])
  ref = fx.real(fx.torch_composed_logits(llama, clip, projector, cfg, inputs), inputs[1])
  assert abs(ref).max() > 1.0
  assert abs(ours - ref).max() < TOL


def test_unsaved_dense_connector_must_be_named(release):
  """dci / sci widen the projector input: without the connector type the import stops."""
  cfg, _, model_dir, clip_dir, _ = release
  if cfg.connector in ("dci", "sci"):
    with pytest.raises(hf_configs.UnsupportedCheckpointError, match="pass connector='dci'"):
      importer.import_model(model_dir, clip_dir)
  else:  # same width as the CLIP tower: read as connector none (documented in docs/hf.md)
    assert importer.import_model(model_dir, clip_dir).model_config.connector == "none"


def test_round_trip_keeps_tensors_and_connector(release, tmp_path):
  cfg, _, _, _, imp = release
  out = str(tmp_path / "export")
  result = exporter.export(imp.params, imp.model_config, out, tokenizer_dir=imp.tokenizer_dir,
                           layout="release")
  assert result["layout"] == "release" and result["tensors"] > 0
  # No clip_dir, no overrides: the CLIP tower is in vision_tower/ and the connector saved.
  again = importer.import_model(out)
  assert again.report["missing"] == again.report["unexpected"] == []
  assert again.model_config == imp.model_config
  fx.assert_same_params(again.params, imp.params)
  with pytest.raises(ValueError, match="layout 'llava' cannot hold this model"):
    exporter.export(imp.params, imp.model_config, str(tmp_path / "llava"),
                    tokenizer_dir=imp.tokenizer_dir, layout="llava")
  assert not (tmp_path / "llava").exists()

