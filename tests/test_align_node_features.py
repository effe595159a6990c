"""Alignment node features (f_S, f_L, f_I) of explicit records, both text modes, against an
independent PyTorch reference (docs/align.md).

The reference is written from the release's description, not from our code: its texts
follow `merge_sentences_preprocess` (every second turn, `<image>` expanded and then deleted
with the other image tokens, "\\n" deleted, ". " join), its ids come from the tokenizer's
Python call with truncation, padded on the right to the longest text of the batch with the
pad id, attention mask = ids != pad; transformers' `LlamaModel` runs them, with flash
attention's unpad / pad emulated by zeroing the attention output at the padded query
positions (a hook on every attention module), and the mean runs over every position.
The default mode's reference is the masked mean of the plain `LlamaModel`.

Tiny random models (fp32, CPU, wide init so features are O(1)): a plain LLaMA directory
(text only, no CLIP), a transformers LLaVA directory and a params-only checkpoint of it.
"""
import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import data_fixtures
import hf_fixtures
from models_torch_weights import stack_layers
from exgra_jax.data import pipeline, text
from exgra_jax.data.records import Turn
from exgra_jax.eval.node_features import node_features
from exgra_jax.hf import hf_configs
from exgra_jax.hf.placement import typed_config
from exgra_jax.models.config import LlmConfig, num_image_tokens
from exgra_jax.models.llava import LlavaModel
from exgra_jax.train import step
from exgra_jax.weights import loading

TOL = 1e-5
MAX_LENGTH = 96
Q = "what is this image ?\n<image>"
RECORDS = [  # several rounds, newlines in answers, an <image> in an answer, lengths differ
    # (the conversations keep one image each: training tokenises them too)
    {"id": "r0",
     "conversations": [
         {"from": "human", "value": Q},
         {"from": "gpt", "value": "it shows a lung ct scan .\nnormal findings"},
         {"from": "human", "value": "left or right ?"},
         {"from": "gpt", "value": "left"}],
     "conversations_long": [
         {"from": "human", "value": Q},
         {"from": "gpt", "value": "it shows a ct scan of the chest .\nthe findings are normal"},
         {"from": "human", "value": "left or right ?"},
         {"from": "gpt", "value": "the left lung"}]},
    {"id": "r1",
     "conversations": [{"from": "human", "value": Q}, {"from": "gpt", "value": "mri brain"}],
     "conversations_long": [
         {"from": "human", "value": Q},
         {"from": "gpt", "value": "mri of the brain\nwith a large tumor"}]},
    {"id": "r2",  # no extended captions: the long text is the short one
     "conversations": [
         {"from": "human", "value": Q},
         {"from": "gpt", "value": "x ray of chest ."},
         {"from": "human", "value": "is it normal ?"},
         {"from": "gpt", "value": "no\nabnormal"},
         {"from": "human", "value": "large ?"},
         {"from": "gpt", "value": "yes\nlarge tumor"}]},
    {"id": "r3",
     "conversations": [{"from": "human", "value": Q}, {"from": "gpt", "value": "yes"}],
     "conversations_long": [
         {"from": "human", "value": Q},
         {"from": "gpt",
          "value": "yes , a small tumor <image> in the left lung\n\nfindings : abnormal"}]},
]


# --- the independent reference ------------------------------------------------------------

def reference_text(turns: list[dict], mode: str, num_image_tokens: int = 4) -> str:
  if mode == "release":  # merge_sentences_preprocess, non-v1 branch
    image = "<im_start>" + "<im_patch>" * num_image_tokens + "<im_end>"
    source = [t["value"].replace("<image>", image) for t in turns]
    sentences = []
    for i in range(0, len(source), 2):
      sentence = source[i + 1].replace("\n", "")
      for token in ("<im_patch>", "<im_end>", "<im_start>"):
        sentence = sentence.replace(token, "")
      sentences.append(sentence)
    return ". ".join(sentences)
  answers = [" ".join(t["value"].replace("<image>", "").replace("\n", " ").split())
             for t in turns if t["from"] == "gpt"]
  return ". ".join(a for a in answers if a)


def reference_batch(tok, records, key: str, mode: str, max_length: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
  """(ids, mask) [B, longest]: the release's `_tokenize_fn` + collator."""
  texts = [reference_text(r.get(key) or r["conversations"], mode) for r in records]
  rows = [torch.tensor(tok(t, truncation=True, max_length=max_length)["input_ids"])
          for t in texts]
  ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True,
                                        padding_value=tok.pad_token_id)
  if mode == "release":
    return ids, ids.ne(tok.pad_token_id).long()
  lengths = torch.tensor([len(r) for r in rows])
  return ids, (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()


@contextlib.contextmanager
def flash_unpad_pad(llama: transformers.LlamaModel, mask: torch.Tensor):
  """flash-attn's unpad -> varlen attention -> pad_input puts zeros at the padded query
  positions, so o_proj (no bias) outputs zero there: zero each attention module's output."""
  keep = mask[..., None].to(torch.float32)
  hooks = [layer.self_attn.register_forward_hook(
      lambda module, args, out: (out[0] * keep,) + tuple(out[1:])) for layer in llama.layers]
  try:
    yield
  finally:
    for hook in hooks:
      hook.remove()


def reference_features(llama: transformers.LlamaModel, tok, records, key: str, mode: str,
                       *, flash: bool = True, max_length: int = MAX_LENGTH
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  ids, mask = reference_batch(tok, records, key, mode, max_length)
  unpad = flash_unpad_pad(llama, mask) if mode == "release" and flash else (
      contextlib.nullcontext())
  with torch.no_grad(), unpad:
    hidden = llama(input_ids=ids, attention_mask=mask).last_hidden_state
  if mode == "release":
    pooled = hidden.mean(1)
  else:
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
  return ids.numpy(), mask.numpy(), pooled.numpy()


# --- fixtures ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  return data_fixtures.make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok(tok_dir):
  return text.load_tokenizer(tok_dir)


@pytest.fixture(scope="module")
def ref_tok(tok_dir):
  """The reference's own tokenizer object (a truncating call changes the backend's state)."""
  return transformers.AutoTokenizer.from_pretrained(tok_dir)


def _llm(vocab: int) -> LlmConfig:
  return LlmConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_layers=2,
                   num_heads=4, num_kv_heads=2, max_position_embeddings=128)


@pytest.fixture(scope="module")
def plain(tmp_path_factory, tok_dir, tok):
  """A plain LlamaForCausalLM directory (its tokenizer has the pipeline's tokens), no CLIP."""
  directory = tmp_path_factory.mktemp("plain")
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(
      hf_configs.llama_hf_config(_llm(len(tok)), initializer_range=0.2)).eval()
  model.save_pretrained(directory)
  transformers.AutoTokenizer.from_pretrained(tok_dir).save_pretrained(directory)
  return str(directory), model.model


@pytest.fixture(scope="module")
def llava(tmp_path_factory, tok_dir, tok):
  """A transformers LLaVA directory (tower included) and a params-only checkpoint of it."""
  root = tmp_path_factory.mktemp("llava")
  cfg = hf_fixtures.tiny_config(vocab=len(tok))
  torch.manual_seed(1)
  model = transformers.LlavaForConditionalGeneration(hf_configs.llava_hf_config(
      cfg, tok.convert_tokens_to_ids(text.IM_PATCH), initializer_range=0.2)).eval()
  model.save_pretrained(root / "hf")
  transformers.AutoTokenizer.from_pretrained(tok_dir).save_pretrained(root / "hf")
  loaded = loading.load(str(root / "hf"))
  loading.save_params(str(root / "params"), loaded.params, loaded.model_config,
                               tokenizer_dir=loaded.tokenizer_dir)
  return str(root / "hf"), str(root / "params"), model, loaded


# --- tests -------------------------------------------------------------------------------

def test_alignment_texts_hand_worked():
  turns = (Turn("human", "what ?\n<image>"), Turn("gpt", "a lung.\nct scan"),
           Turn("human", "and ?"), Turn("gpt", "yes <image> no"), Turn("human", "more ?"),
           Turn("gpt", ""))
  assert text.alignment_text(turns) == "a lung. ct scan. yes no"
  assert text.alignment_text(turns, "release") == "a lung.ct scan. yes  no. "
  raw = [{"from": t.role, "value": t.value} for t in turns]
  for mode in ("default", "release"):
    assert text.alignment_text(turns, mode) == reference_text(raw, mode)


@pytest.mark.parametrize("mode", ["default", "release"])
def test_plain_llama_features_match_the_torch_reference(plain, ref_tok, mode):
  model_dir, llama = plain
  out = node_features(model_dir, RECORDS, text_mode=mode, max_length=MAX_LENGTH)
  assert "f_image" not in out
  for key, name in (("conversations", "short"), ("conversations_long", "long")):
    ids, mask, expected = reference_features(llama, ref_tok, RECORDS, key, mode)
    np.testing.assert_array_equal(out[f"{name}_ids"], ids)
    np.testing.assert_array_equal(out[f"{name}_mask"], mask)
    assert len(set(mask.sum(1))) > 2, "the texts should pad differently"
    assert out[f"f_{name}"].dtype == np.float32
    np.testing.assert_allclose(out[f"f_{name}"], expected, atol=TOL, rtol=0)
    if mode == "release":  # the padded positions matter, and their attention does
      _, _, attending = reference_features(llama, ref_tok, RECORDS, key, mode, flash=False)
      assert np.abs(attending - expected).max() > 1e-2
      default = reference_features(llama, ref_tok, RECORDS, key, "default")[2]
      assert np.abs(default - expected).max() > 1e-2


def test_release_padding_spans_a_group(plain, ref_tok):
  model_dir, llama = plain
  out = node_features(model_dir, RECORDS, text_mode="release", max_length=MAX_LENGTH,
                      group_size=2)
  for start in (0, 2):  # each pair is one release batch, padded to its own longest text
    group = RECORDS[start:start + 2]
    expected = reference_features(llama, ref_tok, group, "conversations", "release")[2]
    np.testing.assert_allclose(out["f_short"][start:start + 2], expected, atol=TOL, rtol=0)


def test_truncation_keeps_the_first_tokens(plain, ref_tok):
  model_dir, llama = plain
  out = node_features(model_dir, RECORDS, text_mode="release", max_length=7)
  ids, _, expected = reference_features(llama, ref_tok, RECORDS, "conversations", "release",
                                        max_length=7)
  assert ids.shape[1] == 7 and (ids[:, -1] == ref_tok.pad_token_id).any()
  np.testing.assert_array_equal(out["short_ids"], ids)
  np.testing.assert_allclose(out["f_short"], expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("mode", ["default", "release"])
def test_the_training_loss_sees_the_same_features(llava, tok_dir, tok, mode):
  """node_features == what train/step.py hands the alignment loss, from the pipeline's
  full-width arrays (text_max_length wide, not cut to the longest text)."""
  model_dir, _, _, loaded = llava
  cfg = hf_fixtures.tiny_config(vocab=len(tok))
  spec = pipeline.ExampleSpec(str(tok_dir), image_size=cfg.vision.image_size,
                              num_image_tokens=num_image_tokens(cfg), max_length=256,
                              text_max_length=MAX_LENGTH, label_mode="per_turn", align=True,
                              text_mode=mode)
  examples = [pipeline.tokenize_example(tok, r, spec) for r in RECORDS]
  batch = pipeline.collate_text(examples, len(RECORDS), (256,), tok.pad_token_id, MAX_LENGTH)
  batch["pixel_values"] = np.random.RandomState(0).randn(
      len(RECORDS), cfg.vision.image_size, cfg.vision.image_size, 3).astype(np.float32)
  seen = {}

  def capture(gnn_params, f_image, f_short, f_long, key):
    del gnn_params, key
    seen.update(f_image=f_image[0], f_short=f_short[0], f_long=f_long[0])
    return jnp.zeros(()), {}

  loss_fn = step.make_loss_fn(LlavaModel(cfg), align_fn=capture, text_mode=mode)
  loss_fn({**loaded.params, "gnn": {}}, {k: jnp.asarray(v) for k, v in batch.items()},
          1.0, 1.0, jax.random.key(0))
  out = node_features(model_dir, RECORDS, text_mode=mode, max_length=MAX_LENGTH,
                      pixel_values=batch["pixel_values"])
  for name in ("f_image", "f_short", "f_long"):
    np.testing.assert_allclose(out[name], seen[name], atol=1e-6, rtol=0)
  assert batch["short_ids"].shape[1] == MAX_LENGTH > out["short_ids"].shape[1]


def test_image_features_and_checkpoint_formats(llava, ref_tok):
  hf_dir, params_dir, model, _ = llava
  size = model.config.vision_config.image_size
  pixels = np.random.RandomState(1).randn(len(RECORDS), size, size, 3).astype(np.float32)
  from_hf = node_features(hf_dir, RECORDS, text_mode="release", max_length=MAX_LENGTH,
                          pixel_values=pixels)
  with torch.no_grad():
    projected = model.model.get_image_features(
        pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2)).pooler_output
  projected = torch.stack(projected).numpy()  # [B, N, d]
  np.testing.assert_allclose(from_hf["f_image"], projected.mean(1), atol=TOL, rtol=0)
  given = node_features(hf_dir, RECORDS, text_mode="release", max_length=MAX_LENGTH,
                        image_features=projected)
  np.testing.assert_allclose(given["f_image"], projected.mean(1), atol=1e-6, rtol=0)
  # The text side against the LLaVA's own language model.
  expected = reference_features(model.model.language_model, ref_tok, RECORDS, "conversations",
                                "release")[2]
  np.testing.assert_allclose(from_hf["f_short"], expected, atol=TOL, rtol=0)
  from_params = node_features(params_dir, RECORDS, text_mode="release",
                              max_length=MAX_LENGTH, pixel_values=pixels)
  for name, value in from_hf.items():
    np.testing.assert_allclose(from_params[name], value, atol=1e-6, rtol=0)


def test_release_mode_scanned_and_rematerialised(llava):
  """The zeroed padded attention goes through nn.scan and remat like the other inputs."""
  _, _, _, loaded = llava
  cfg = typed_config(loaded.model_config)
  ids = np.random.RandomState(2).randint(8, cfg.llm.vocab_size, (4, 12))
  mask = (np.arange(12)[None] < np.array([12, 5, 3, 9])[:, None]).astype(np.int32)
  apply = lambda c, p: LlavaModel(c).apply({"params": p}, ids, mask, mode="release",
                                           group_size=2, method="text_features")
  expected = apply(cfg, loaded.params)
  stacked = {**loaded.params, "llm": stack_layers(loaded.params["llm"], cfg.llm.num_layers)}
  for remat in ("none", "full"):
    scanned = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, scan_layers=True,
                                                               remat=remat))
    np.testing.assert_allclose(apply(scanned, stacked), expected, atol=1e-6, rtol=0)


def test_bad_inputs_are_named(plain):
  model_dir, _ = plain
  with pytest.raises(ValueError, match="alignment text mode 'flash'"):
    node_features(model_dir, RECORDS, text_mode="flash")
  with pytest.raises(ValueError, match="3 images for 4 records"):
    node_features(model_dir, RECORDS, image_features=np.zeros((3, 16, 32), np.float32))
  with pytest.raises(ValueError, match="4 texts do not split into groups of 3"):
    node_features(model_dir, RECORDS, text_mode="release", group_size=3)
