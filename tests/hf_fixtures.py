"""Tiny HF checkpoints of the three import layouts, built locally with transformers (torch).

Shapes: CLIP 56 px / patch 14 (16 patches, so `sti` pools to 20 tokens), width 32, 3
layers; LLaMA width 32, 2 layers, 4 heads / 2 KV heads, a word-level tokenizer of 44
entries (48 with `<pad>`, `<im_patch>`, `<im_start>`, `<im_end>`; both even, so that a
2-way mesh axis divides the vocabulary). Weights are drawn with
initializer_range 0.2 so that logits are O(1) and parity checks mean something.
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import torch
import transformers
from flax import traverse_util
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers

from exgra_jax.hf import hf_configs
from exgra_jax.models.config import (LlavaConfig, LlmConfig, VisionConfig, num_image_tokens,
                                     projector_input_width)
from exgra_jax.models.connector import projector_depth
from exgra_jax.models.llava import LlavaModel

WORDS = tuple(f"w{i}" for i in range(41))
BASE_VOCAB = 3 + len(WORDS)        # <unk> <s> </s> + words
FULL_VOCAB = BASE_VOCAB + 4        # + <pad> <im_patch> <im_start> <im_end>
INIT = 0.2


def tiny_config(connector: str = "none", projector: str = "mlp2x_gelu", *,
                vocab: int = FULL_VOCAB, scan: bool = False, tie: bool = False,
                feature_select: str = "default") -> LlavaConfig:
  vision = VisionConfig(image_size=56, patch_size=14, hidden_size=32, num_layers=3,
                        num_heads=4, intermediate_size=64, select_layer=-2,
                        feature_select=feature_select)
  llm = LlmConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_layers=2,
                  num_heads=4, num_kv_heads=2, rms_norm_eps=1e-6, max_position_embeddings=128,
                  tie_word_embeddings=tie, scan_layers=scan)
  return LlavaConfig(vision=vision, llm=llm, connector=connector, connector_layers=(1, 2),
                     projector=projector, name="hf_tiny")


def write_tokenizer(directory: str, *, image_tokens: bool) -> transformers.PreTrainedTokenizerFast:
  """Word-level LLaMA-like tokenizer; with `image_tokens`, also <pad> and the image tokens."""
  vocab = {t: i for i, t in enumerate(("<unk>", "<s>", "</s>") + WORDS)}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                              bos_token="<s>", eos_token="</s>")
  if image_tokens:
    fast.add_special_tokens({"pad_token": "<pad>"})
    fast.add_tokens(["<im_patch>", "<im_start>", "<im_end>"], special_tokens=True)
  fast.save_pretrained(directory)
  return fast


def _clip(directory: str, vision: VisionConfig) -> transformers.CLIPVisionModel:
  torch.manual_seed(1)
  clip = transformers.CLIPVisionModel(
      hf_configs.clip_hf_config(vision, initializer_range=INIT)).eval()
  clip.save_pretrained(directory)
  return clip


def _llama(llm: LlmConfig) -> transformers.LlamaForCausalLM:
  torch.manual_seed(2)
  return transformers.LlamaForCausalLM(
      hf_configs.llama_hf_config(llm, initializer_range=INIT)).eval()


def llava_dir(directory: str, cfg: LlavaConfig) -> transformers.LlavaForConditionalGeneration:
  """(a) transformers-native LLaVA (connector none or sci, mlp2x_gelu), with its tokenizer."""
  tok = write_tokenizer(directory, image_tokens=True)
  torch.manual_seed(0)
  model = transformers.LlavaForConditionalGeneration(hf_configs.llava_hf_config(
      cfg, tok.convert_tokens_to_ids("<im_patch>"), initializer_range=INIT)).eval()
  model.save_pretrained(directory)
  return model


def release_dir(directory: str, clip_directory: str, cfg: LlavaConfig, *,
                save_connector: bool = False
                ) -> tuple[transformers.LlamaForCausalLM, transformers.CLIPVisionModel,
                           torch.nn.Module]:
  """(b) the LLaVA-Med release layout: LLaMA + mm_projector tensors + mm_* keys; CLIP apart.

  Like the authors' release, the connector type is not saved unless `save_connector`.
  """
  os.makedirs(directory, exist_ok=True)
  write_tokenizer(directory, image_tokens=True)
  llama = _llama(cfg.llm)
  width, d = projector_input_width(cfg), cfg.llm.hidden_size
  torch.manual_seed(3)
  if cfg.projector == "linear":
    projector = torch.nn.Linear(width, d)
  else:
    layers = [torch.nn.Linear(width, d)]
    for _ in range(projector_depth(cfg.projector) - 1):
      layers += [torch.nn.GELU(), torch.nn.Linear(d, d)]
    projector = torch.nn.Sequential(*layers)
  for p in projector.parameters():
    torch.nn.init.normal_(p, std=INIT)
  tensors = {k: v.contiguous() for k, v in llama.state_dict().items()}
  tensors.update({f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()})
  save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
  config = hf_configs.llama_hf_config(cfg.llm).to_dict()
  config.update(architectures=["LlavaLlamaForCausalLM"], model_type="llava",
                mm_vision_tower="openai/clip-vit-large-patch14", mm_hidden_size=width,
                mm_projector_type=cfg.projector, mm_vision_select_layer=cfg.vision.select_layer,
                mm_use_im_start_end=True)
  if save_connector:
    config.update(exgra_connector=cfg.connector,
                  exgra_connector_layers=list(cfg.connector_layers))
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f)
  return llama, _clip(clip_directory, cfg.vision), projector.eval()


def plain_dirs(llm_directory: str, clip_directory: str, cfg: LlavaConfig
               ) -> tuple[transformers.LlamaForCausalLM, transformers.CLIPVisionModel]:
  """(c) a plain LlamaForCausalLM directory (tokenizer without image tokens) + a CLIP one."""
  llama = _llama(cfg.llm)
  llama.save_pretrained(llm_directory)
  write_tokenizer(llm_directory, image_tokens=False)
  return llama, _clip(clip_directory, cfg.vision)


PAD, IM_PATCH, IM_START, IM_END = range(BASE_VOCAB, BASE_VOCAB + 4)  # write_tokenizer's order


def batch(cfg: LlavaConfig, seed: int = 0) -> tuple[np.ndarray, ...]:
  """(ids, attention_mask, image_mask, pixels NHWC): 2 samples, the second right-padded."""
  rng = np.random.RandomState(seed)
  n = num_image_tokens(cfg)
  rows = []
  for words in (9, 5):
    row = [1, IM_START] + [IM_PATCH] * n + [IM_END] + list(rng.randint(3, BASE_VOCAB, words))
    rows.append(row)
  length = max(len(r) for r in rows)
  ids = np.full((2, length), PAD, np.int32)
  mask = np.zeros((2, length), np.int32)
  for i, row in enumerate(rows):
    ids[i, :len(row)], mask[i, :len(row)] = row, 1
  pixels = rng.randn(2, cfg.vision.image_size, cfg.vision.image_size, 3).astype(np.float32)
  return ids, mask, ids == IM_PATCH, pixels


def flax_logits(cfg: LlavaConfig, params, inputs) -> np.ndarray:
  ids, mask, image_mask, pixels = inputs
  out = jax.jit(LlavaModel(cfg).apply)({"params": params}, ids, mask, image_mask, pixels)
  return np.asarray(out["logits"])


def torch_llava_logits(model: transformers.LlavaForConditionalGeneration, inputs) -> np.ndarray:
  ids, mask, _, pixels = inputs
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask),
                 pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2)).logits.numpy()


def torch_connector(hidden_states, cfg: LlavaConfig) -> torch.Tensor:
  """Reference connector (docs/models.md) on transformers' CLIP hidden states, CLS dropped."""
  patches = [h[:, 1:] for h in hidden_states]
  layers, selected = cfg.vision.num_layers, patches[cfg.vision.select_layer]
  a, b = cfg.connector_layers
  if cfg.connector == "dci":
    low = torch.stack(patches[:layers // 2]).mean(0)
    high = torch.stack(patches[layers // 2:layers]).mean(0)
    return torch.cat([selected, low, high], -1)
  if cfg.connector == "sci":
    return torch.cat([selected, patches[a], patches[b]], -1)
  if cfg.connector == "sti":
    pool = lambda x: x.reshape(x.shape[0], -1, 8, x.shape[-1]).mean(2)
    return torch.cat([selected, pool(patches[a]), pool(patches[b])], 1)
  return selected


def torch_composed_logits(llama: transformers.LlamaForCausalLM,
                          clip: transformers.CLIPVisionModel, projector: torch.nn.Module,
                          cfg: LlavaConfig, inputs) -> np.ndarray:
  """CLIP -> reference connector -> projector -> image rows of the LLaMA input embeddings."""
  ids, mask, image_mask, pixels = inputs
  with torch.no_grad():
    hidden = clip(pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2),
                  output_hidden_states=True).hidden_states
    features = projector(torch_connector(hidden, cfg))
    embeds = llama.model.embed_tokens(torch.tensor(ids).long()).clone()
    embeds[torch.tensor(image_mask)] = features.reshape(-1, features.shape[-1])
    return llama(inputs_embeds=embeds, attention_mask=torch.tensor(mask)).logits.numpy()


def torch_projector(params, cfg: LlavaConfig) -> torch.nn.Module:
  """Our projector params as LLaVA's nn.Linear / nn.Sequential(Linear, GELU, Linear, ...)."""
  linears = []
  for i in range(projector_depth(cfg.projector)):
    p = params["projector"][f"linear_{i}"]
    kernel = np.asarray(p["kernel"])
    linear = torch.nn.Linear(*kernel.shape)
    linear.weight.data = torch.tensor(kernel.T.copy())
    linear.bias.data = torch.tensor(np.asarray(p["bias"]).copy())
    linears.append(linear)
  if cfg.projector == "linear":
    return linears[0]
  layers = [linears[0]]
  for linear in linears[1:]:
    layers += [torch.nn.GELU(), linear]
  return torch.nn.Sequential(*layers)


def real(logits: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Logits at the real (non-padding) positions, [n_real, V]."""
  return logits[mask.astype(bool)]


def assert_same_params(a, b) -> None:
  """Same tree, bit-identical leaves."""
  fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
  assert fa.keys() == fb.keys()
  for key in fa:
    x, y = np.asarray(fa[key]), np.asarray(fb[key])
    assert x.dtype == y.dtype and np.array_equal(x, y), key
