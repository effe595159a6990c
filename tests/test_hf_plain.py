"""Layout (c): a plain LlamaForCausalLM + a CLIP directory (start of stage 1).

The pipeline's tokens are added (tokenizer written, embedding and LM-head rows = the mean
of the existing rows, bit-exact), the projector is freshly initialised (reported,
deterministic per seed), the text logits equal transformers' (fp32, 1e-4), and every
connector / projector pair round-trips through the release export bit-identically.
"""
import numpy as np
import pytest
import torch

import hf_fixtures as fx
from exgra_jax.data import text as text_lib
from exgra_jax.hf import exporter, importer
from exgra_jax.hf.placement import typed_config

TOL = 1e-4
CASES = [("none", "mlp2x_gelu"), ("dci", "linear"), ("sci", "mlp2x_gelu"), ("sti", "linear")]


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
  root = tmp_path_factory.mktemp("plain")
  cfg = fx.tiny_config(vocab=fx.BASE_VOCAB)
  llama, clip = fx.plain_dirs(str(root / "llama"), str(root / "clip"), cfg)
  return cfg, llama, str(root / "llama"), str(root / "clip"), root


def test_new_tokens_get_mean_rows_and_the_projector_starts_fresh(plain):
  cfg, llama, llm_dir, clip_dir, root = plain
  imp = importer.import_model(llm_dir, clip_dir, add_tokens=True,
                              tokenizer_out=str(root / "tokenizer"))
  assert imp.layout == "plain"
  assert imp.report["added_tokens"] == ["<pad>", "<im_patch>", "<im_start>", "<im_end>"]
  assert imp.report["initialised"] == [f"projector/linear_{i}/{n}" for i in (0, 1)
                                       for n in ("bias", "kernel")]
  assert imp.report["missing"] == imp.report["unexpected"] == []
  tok = text_lib.load_tokenizer(imp.tokenizer_dir)  # has what the pipeline needs
  assert len(tok) == imp.model_config.llm.vocab_size == fx.FULL_VOCAB
  assert [tok.convert_tokens_to_ids(t) for t in ("<pad>", "<im_patch>", "<im_start>",
                                                 "<im_end>")] == [fx.PAD, fx.IM_PATCH,
                                                                  fx.IM_START, fx.IM_END]

  embed = np.asarray(imp.params["llm"]["embed_tokens"]["embedding"])
  head = np.asarray(imp.params["llm"]["lm_head"]["kernel"]).T
  for ours, theirs in ((embed, llama.model.embed_tokens.weight.detach().numpy()),
                       (head, llama.lm_head.weight.detach().numpy())):
    np.testing.assert_array_equal(ours[:fx.BASE_VOCAB], theirs)
    np.testing.assert_array_equal(ours[fx.BASE_VOCAB:],
                                  np.repeat(theirs.mean(axis=0, keepdims=True), 4, axis=0))

  again = importer.import_model(llm_dir, clip_dir, add_tokens=True,
                                tokenizer_out=str(root / "tokenizer2"))
  fx.assert_same_params(again.params, imp.params)
  other_seed = importer.import_model(llm_dir, clip_dir, seed=1)
  assert not np.array_equal(other_seed.params["projector"]["linear_0"]["kernel"],
                            imp.params["projector"]["linear_0"]["kernel"])

  # Text only (no image rows): the first BASE_VOCAB logits are transformers'.
  got = typed_config(imp.model_config)
  ids, mask, _, pixels = fx.batch(got)
  ids = np.where(ids >= fx.BASE_VOCAB, 7, ids)
  ours = fx.flax_logits(got, imp.params, (ids, mask, np.zeros_like(mask, bool), pixels))
  with torch.no_grad():
    ref = llama(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask)).logits
  assert abs(fx.real(ours[..., :fx.BASE_VOCAB] - ref.numpy(), mask)).max() < TOL


@pytest.mark.parametrize("connector,projector", CASES)
def test_every_connector_round_trips_through_the_release_layout(plain, tmp_path, connector,
                                                                 projector):
  _, _, llm_dir, clip_dir, _ = plain
  imp = importer.import_model(llm_dir, clip_dir, add_tokens=True,
                              tokenizer_out=str(tmp_path / "tokenizer"),
                              overrides={"connector": connector, "projector": projector})
  cfg = typed_config(imp.model_config)
  assert (cfg.connector, cfg.projector) == (connector, projector)
  width = 96 if connector in ("dci", "sci") else 32
  assert imp.params["projector"]["linear_0"]["kernel"].shape == (width, 32)
  out = str(tmp_path / "export")
  exporter.export(imp.params, imp.model_config, out, tokenizer_dir=imp.tokenizer_dir,
                  layout="release")
  again = importer.import_model(out)
  assert again.model_config == imp.model_config and again.report["initialised"] == []
  fx.assert_same_params(again.params, imp.params)
