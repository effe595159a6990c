"""LoRA adapters (models/adapters.py, qwix) -> a PEFT LoRA adapter for the `llava` export.

`peft.PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(base), dir)`
then computes what the adapted exgra-jax model does, `base` being the `llava` export of the
same params without the adapters. The directory holds:
- `adapter_model.safetensors`: for each adapted projection (and the LM head, `lm_head`,
  when `lora.modules` names it),
  `base_model.model.<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r], where
  `<module>` is transformers' in-memory name (`model.language_model.layers.0.self_attn.
  q_proj`; layouts.py lists the hub names `language_model.model.*`);
- `adapter_config.json`: `LORA`, r, lora_alpha (PEFT scales by lora_alpha / r as qwix by
  alpha / rank) and `target_modules`, a regex over exactly those modules.
qwix's A [prod(in), r] contracts the kernel's input axes flattened in order and B [r,
prod(out)] yields its output axes flattened; the HF weight [out, in] flattens both the
same way (heads-major, `layouts.Kind.HEADS_*`), so lora_A = A.T and lora_B = B.T.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import safetensors.numpy
from flax import traverse_util

from exgra_jax import temp_paths
from exgra_jax.hf import layouts, placement
from exgra_jax.hf.weights_io import replace_directory

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
_HUB_LLM, _IN_MEMORY_LLM = "language_model.model.", "model.language_model."
_HUB_HEAD, _IN_MEMORY_HEAD = "language_model.lm_head", "lm_head"  # the LM head (lora.modules)


def _module_name(hub_weight_name: str) -> str:
  """`language_model.model.layers.0.self_attn.q_proj.weight` (or the LM head's
  `language_model.lm_head.weight`) -> the in-memory module name."""
  module = hub_weight_name[:-len(".weight")]
  if module == _HUB_HEAD:
    return _IN_MEMORY_HEAD
  return _IN_MEMORY_LLM + module[len(_HUB_LLM):]


def peft_tensors(params: Mapping[str, Any], model_config: Mapping[str, Any]
                 ) -> dict[str, np.ndarray]:
  """PEFT tensor name -> host array of every adapter in `params` (see the module doc)."""
  cfg = placement.typed_config(model_config)
  flat = traverse_util.flatten_dict(dict(params))
  out = {}
  for entry in layouts.layout_entries("llava", cfg):
    path, index = layouts.param_location(entry.path, cfg.llm)
    a_path, b_path = (path[:-1] + (path[-1] + suffix,) for suffix in ("_lora_a", "_lora_b"))
    if a_path not in flat:
      continue
    a, b = (np.asarray(flat[p]) if index is None else np.asarray(flat[p][index])
            for p in (a_path, b_path))
    module = f"base_model.model.{_module_name(entry.name)}"
    out[f"{module}.lora_A.weight"] = np.ascontiguousarray(a.T)
    out[f"{module}.lora_B.weight"] = np.ascontiguousarray(b.T)
  return out


def write_peft_adapter(params: Mapping[str, Any], model_config: Mapping[str, Any], out_dir: str,
                       *, rank: int, alpha: float, dropout: float = 0.0,
                       base_model: str = "", train_also: str = "") -> dict[str, Any]:
  """Writes the adapters of `params` as a PEFT LoRA directory (replaced whole); -> summary.

  train_also: the run's `<stage>.lora.train_also`. LLM leaves trained beside the adapters
  would be PEFT `modules_to_save`, which this writer does not produce: it refuses (a
  ValueError) rather than write an adapter that silently answers with the old leaves.
  """
  if train_also:
    raise ValueError(f"lora.train_also={train_also!r}: those LLM weights trained beside the "
                     "adapters and a PEFT adapter from this exporter holds the adapters only; "
                     "export the merged model instead (without --adapter_only)")
  tensors = peft_tensors(params, model_config)
  if not tensors:
    raise ValueError("the params hold no LoRA adapters (a checkpoint of <stage>.lora.rank > 0)")
  modules = sorted({name[len("base_model.model."):].rsplit(".lora_", 1)[0] for name in tensors})
  config = {"peft_type": "LORA", "task_type": None, "r": rank, "lora_alpha": alpha,
            "lora_dropout": dropout, "bias": "none", "fan_in_fan_out": False,
            "target_modules": "|".join(re.escape(m) for m in modules),
            "base_model_name_or_path": base_model, "inference_mode": True}
  out_dir = os.path.abspath(out_dir)
  tmp = temp_paths.new_dir(os.path.dirname(out_dir), os.path.basename(out_dir))
  safetensors.numpy.save_file(tensors, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
  with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
    json.dump(config, f, indent=2)
  replace_directory(tmp, out_dir)
  return {"out_dir": out_dir, "modules": len(modules), "tensors": len(tensors)}
