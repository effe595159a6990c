"""Test helper: copy transformers' PyTorch weights into the Flax parameter trees.

Only the parity tests use this (the production HF name maps live in `exgra_jax/hf/`). It
handles the unscanned layout; tests of the scanned layout stack the per-layer trees.
"""
from __future__ import annotations

import numpy as np
import torch


def _np(t: torch.Tensor) -> np.ndarray:
  return t.detach().to(torch.float32).cpu().numpy()


def _heads_in(w: torch.Tensor, heads: int) -> np.ndarray:
  """torch Linear weight [H*hd, D] -> DenseGeneral kernel [D, H, hd]."""
  w = _np(w)
  return w.T.reshape(w.shape[1], heads, -1)


def _heads_out(w: torch.Tensor, heads: int) -> np.ndarray:
  """torch Linear weight [D, H*hd] -> DenseGeneral kernel [H, hd, D]."""
  w = _np(w)
  return w.T.reshape(heads, -1, w.shape[0])


def llama_params(sd: dict[str, torch.Tensor], cfg, prefix: str = "model.",
                 head: str = "lm_head.weight") -> dict:
  """LlamaForCausalLM state dict -> `Llama` params (unscanned)."""
  p = {"embed_tokens": {"embedding": _np(sd[prefix + "embed_tokens.weight"])},
       "norm": {"scale": _np(sd[prefix + "norm.weight"])}}
  if not cfg.tie_word_embeddings:
    p["lm_head"] = {"kernel": _np(sd[head]).T}
  for i in range(cfg.num_layers):
    s = f"{prefix}layers.{i}."
    p[f"layers_{i}"] = {
        "input_layernorm": {"scale": _np(sd[s + "input_layernorm.weight"])},
        "post_attention_layernorm": {"scale": _np(sd[s + "post_attention_layernorm.weight"])},
        "self_attn": {
            "q_proj": {"kernel": _heads_in(sd[s + "self_attn.q_proj.weight"], cfg.num_heads)},
            "k_proj": {"kernel": _heads_in(sd[s + "self_attn.k_proj.weight"],
                                           cfg.num_kv_heads)},
            "v_proj": {"kernel": _heads_in(sd[s + "self_attn.v_proj.weight"],
                                           cfg.num_kv_heads)},
            "o_proj": {"kernel": _heads_out(sd[s + "self_attn.o_proj.weight"], cfg.num_heads)},
        },
        "mlp": {n: {"kernel": _np(sd[s + f"mlp.{n}.weight"]).T}
                for n in ("gate_proj", "up_proj", "down_proj")},
    }
  return p


def _linear(sd, name):
  return {"kernel": _np(sd[name + ".weight"]).T, "bias": _np(sd[name + ".bias"])}


def _norm(sd, name):
  return {"scale": _np(sd[name + ".weight"]), "bias": _np(sd[name + ".bias"])}


def clip_params(sd: dict[str, torch.Tensor], cfg, prefix: str = "vision_model.") -> dict:
  """CLIPVisionModel state dict -> `ClipVisionTower` params."""
  e = prefix + "embeddings."
  p = {"patch_embedding": {"kernel": _np(sd[e + "patch_embedding.weight"]).transpose(2, 3, 1, 0)},
       "class_embedding": _np(sd[e + "class_embedding"]),
       "position_embedding": _np(sd[e + "position_embedding.weight"]),
       "pre_layrnorm": _norm(sd, prefix + "pre_layrnorm"),
       "post_layernorm": _norm(sd, prefix + "post_layernorm")}
  for i in range(cfg.num_layers):
    s = f"{prefix}encoder.layers.{i}."
    attn = {}
    for n in ("q_proj", "k_proj", "v_proj"):
      attn[n] = {"kernel": _heads_in(sd[s + f"self_attn.{n}.weight"], cfg.num_heads),
                 "bias": _np(sd[s + f"self_attn.{n}.bias"]).reshape(cfg.num_heads, -1)}
    attn["out_proj"] = {"kernel": _heads_out(sd[s + "self_attn.out_proj.weight"], cfg.num_heads),
                        "bias": _np(sd[s + "self_attn.out_proj.bias"])}
    p[f"layers_{i}"] = {"self_attn": attn,
                        "layer_norm1": _norm(sd, s + "layer_norm1"),
                        "layer_norm2": _norm(sd, s + "layer_norm2"),
                        "mlp": {"fc1": _linear(sd, s + "mlp.fc1"),
                                "fc2": _linear(sd, s + "mlp.fc2")}}
  return p


def llava_params(sd: dict[str, torch.Tensor], cfg) -> dict:
  """LlavaForConditionalGeneration state dict (mlp2x_gelu projector) -> `LlavaModel` params."""
  return {
      "vision": clip_params(sd, cfg.vision, "model.vision_tower."),
      "projector": {"linear_0": _linear(sd, "model.multi_modal_projector.linear_1"),
                    "linear_1": _linear(sd, "model.multi_modal_projector.linear_2")},
      "llm": llama_params(sd, cfg.llm, "model.language_model."),
  }
