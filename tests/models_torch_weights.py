"""Test helper: copy transformers' PyTorch weights into the Flax parameter trees.

Only the parity tests use this (the production HF name maps live in `exgra_jax/hf/`). It
handles the unscanned layout; tests of the scanned layout stack the per-layer trees.
"""
from __future__ import annotations

import jax
import numpy as np
import torch
import transformers


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


def clip_params(sd: dict[str, torch.Tensor], cfg, prefix: str = "") -> dict:
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


def hf_llama_config(cfg, **extra) -> transformers.LlamaConfig:
  """The transformers LlamaConfig with the same shapes as our `LlmConfig`."""
  return transformers.LlamaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
      intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      head_dim=cfg.resolved_head_dim, max_position_embeddings=cfg.max_position_embeddings,
      rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
      rope_scaling=cfg.rope_scaling_dict() or None,
      tie_word_embeddings=cfg.tie_word_embeddings, **extra)


def hf_clip_config(cfg, **extra) -> transformers.CLIPVisionConfig:
  """The transformers CLIPVisionConfig with the same shapes as our `VisionConfig`."""
  return transformers.CLIPVisionConfig(
      hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      image_size=cfg.image_size, patch_size=cfg.patch_size, layer_norm_eps=cfg.layer_norm_eps,
      hidden_act="quick_gelu", **extra)


def hf_llava_config(cfg, image_token_id: int, **extra) -> transformers.LlavaConfig:
  """transformers LlavaConfig matching our `LlavaConfig` (connector none, mlp2x_gelu)."""
  if cfg.connector != "none" or cfg.projector != "mlp2x_gelu":
    raise ValueError("transformers' Llava has no dense connector and an mlp2x_gelu projector")
  return transformers.LlavaConfig(
      vision_config=hf_clip_config(cfg.vision, **extra),
      text_config=hf_llama_config(cfg.llm, **extra), image_token_index=image_token_id,
      projector_hidden_act="gelu", vision_feature_layer=cfg.vision.select_layer,
      vision_feature_select_strategy="default", image_seq_length=cfg.vision.num_patches,
      multimodal_projector_bias=True)


def stack_layers(params: dict, num_layers: int) -> dict:
  """Unscanned `layers_i` subtrees -> one `layers` subtree stacked on axis 0 (scan layout)."""
  out = {k: v for k, v in params.items() if not k.startswith("layers_")}
  per_layer = [params[f"layers_{i}"] for i in range(num_layers)]
  out["layers"] = jax.tree.map(lambda *xs: np.stack(xs), *per_layer)
  return out
