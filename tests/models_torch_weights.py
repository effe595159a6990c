"""Test helper: transformers' PyTorch state dicts -> Flax parameter trees, and HF configs.

A thin wrapper over the library's name table (`exgra_jax/hf/layouts.py`) and config
builders (`exgra_jax/hf/hf_configs.py`), so that the parity tests exercise the same
mapping the importer uses. Handles the unscanned layout; tests of the scanned layout
stack the per-layer trees with `stack_layers`.
"""
from __future__ import annotations

import jax
import numpy as np
import torch
from flax import traverse_util

from exgra_jax.hf import layouts
from exgra_jax.hf.hf_configs import clip_hf_config as hf_clip_config
from exgra_jax.hf.hf_configs import llama_hf_config as hf_llama_config
from exgra_jax.hf.hf_configs import llava_hf_config as hf_llava_config

__all__ = ["clip_params", "hf_clip_config", "hf_llama_config", "hf_llava_config",
           "llama_params", "llava_params", "stack_layers"]


def _tree(sd: dict[str, torch.Tensor], entries: list[layouts.Entry], rename=lambda n: n,
          drop_root: bool = False) -> dict:
  """Applies `entries` to the state dict `sd` (names mapped by `rename`) -> nested numpy tree."""
  flat = {}
  for e in entries:
    x = sd[rename(e.name)].detach().to(torch.float32).cpu().numpy()
    flat[e.path[1:] if drop_root else e.path] = e.to_flax(x)
  return traverse_util.unflatten_dict(flat)


def llama_params(sd: dict[str, torch.Tensor], cfg, prefix: str = "model.",
                 head: str = "lm_head.weight") -> dict:
  """LlamaForCausalLM state dict -> `Llama` params (unscanned)."""
  return _tree(sd, layouts.llama_entries(cfg, prefix, head), drop_root=True)


def clip_params(sd: dict[str, torch.Tensor], cfg, prefix: str = "") -> dict:
  """CLIPVisionModel state dict (transformers 5 names: no `vision_model.`) -> tower params."""
  return _tree(sd, layouts.clip_entries(cfg, prefix, layouts.MAIN), drop_root=True)


def llava_params(sd: dict[str, torch.Tensor], cfg) -> dict:
  """LlavaForConditionalGeneration state dict (in-memory names) -> `LlavaModel` params."""
  in_memory = {layouts.canonical_name("llava", layouts.MAIN, k): k for k in sd}
  return _tree(sd, layouts.layout_entries("llava", cfg), in_memory.__getitem__)


def stack_layers(params: dict, num_layers: int) -> dict:
  """Unscanned `layers_i` subtrees -> one `layers` subtree stacked on axis 0 (scan layout)."""
  out = {k: v for k, v in params.items() if not k.startswith("layers_")}
  per_layer = [params[f"layers_{i}"] for i in range(num_layers)]
  out["layers"] = jax.tree.map(lambda *xs: np.stack(xs), *per_layer)
  return out
