"""HF `config.json` <-> our `config.model` tree, for the three layouts of `layouts.py`.

Import derives the model config from the checkpoint's own configs (LLaMA-family text
config with GQA, head_dim, rope_theta / rope_scaling or transformers 5's rope_parameters,
tied embeddings; the CLIP vision config; the feature layer). Export writes configs that
transformers reads with no custom code, plus `exgra_*` keys that transformers ignores
(connector type and layers, preset name) so that export -> import gives back the same
`config.model` (the release lost its connector type; we do not).

Only what our model computes is accepted: LLaMA (SiLU, no attention / MLP biases, no
sliding window) and CLIP (quick-GELU) towers, patch features without CLS. Anything else
is an error that names the key, never a silent approximation.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import transformers
from absl import logging

from exgra_jax.models.config import (FEATURE_SELECTS, LlavaConfig, LlmConfig, VisionConfig,
                                     num_image_tokens, projector_input_width)

LAYOUT_ARCHITECTURES = {
    "llava": "LlavaForConditionalGeneration",  # transformers-native LLaVA
    "release": "LlavaLlamaForCausalLM",         # LLaVA-Med / ExGra-Med release (+ CLIP dir)
    "plain": "LlamaForCausalLM",                # start of stage 1 (+ CLIP dir)
}
# Top-level `config.model` keys an import may set (the rest comes from the checkpoint).
# `image_tokens` chooses the style of a plain LLaMA start; a LLaVA checkpoint's own style
# must agree with it (the importer reads the style from the checkpoint's tokenizer).
OVERRIDABLE = ("name", "connector", "connector_layers", "projector", "dtype", "param_dtype",
               "remat", "scan_layers", "attention", "image_tokens")
RELEASE_CLIP_SUBDIR = "vision_tower"  # where the release export writes its CLIP tower


class UnsupportedCheckpointError(ValueError):
  """The checkpoint's config describes something this model does not compute."""


def read_json(path: str) -> dict[str, Any]:
  with open(path) as f:
    return json.load(f)


def detect_layout(config: Mapping[str, Any], directory: str) -> str:
  """`config.json` of `directory` -> "llava" | "release" | "plain", or an explained error."""
  architectures = list(config.get("architectures") or [])
  for layout, architecture in LAYOUT_ARCHITECTURES.items():
    if architecture in architectures:
      return layout
  model_type = config.get("model_type")
  if "mm_vision_tower" in config or "mm_hidden_size" in config:
    return "release"
  if model_type == "llava" and "text_config" in config:
    return "llava"
  if model_type == "llama" and not architectures:
    return "plain"
  known = "; ".join(f"{a} ({layout})" for layout, a in LAYOUT_ARCHITECTURES.items())
  raise UnsupportedCheckpointError(
      f"{directory}: unknown checkpoint layout (architectures={architectures}, "
      f"model_type={model_type!r}); supported: {known}. A CLIP directory goes in clip_dir, "
      "next to a LLaMA or release directory.")


def _require(config: Mapping[str, Any], key: str, allowed: tuple[Any, ...], default: Any,
             what: str) -> None:
  value = config.get(key, default)
  if value not in allowed:
    raise UnsupportedCheckpointError(f"{what}: {key}={value!r} is not supported "
                                     f"(supported: {list(allowed)})")


def normalized_rope_scaling(scaling: Mapping[str, Any] | None) -> str:
  """An HF rope_scaling / rope_parameters dict (theta removed) -> our JSON string ("" = none)."""
  scaling = dict(scaling or {})
  scaling.pop("rope_theta", None)
  kind = scaling.pop("rope_type", scaling.pop("type", "default"))
  if kind == "default" and not scaling:
    return ""
  return json.dumps({"rope_type": kind, **scaling}, sort_keys=True)


def llm_config_from_hf(text: Mapping[str, Any]) -> LlmConfig:
  """LLaMA-family text config dict -> LlmConfig (runtime fields at their defaults)."""
  what = "LLM config"
  _require(text, "model_type", ("llama", "llava", "llava_llama"), "llama", what)
  _require(text, "hidden_act", ("silu",), "silu", what)
  _require(text, "attention_bias", (False,), False, what)
  _require(text, "mlp_bias", (False,), False, what)
  heads, hidden = text["num_attention_heads"], text["hidden_size"]
  head_dim = text.get("head_dim") or 0
  rope = text.get("rope_parameters")
  if rope:
    theta = rope.get("rope_theta", text.get("rope_theta", 10000.0))
  else:
    theta, rope = text.get("rope_theta", 10000.0), text.get("rope_scaling")
  return LlmConfig(
      vocab_size=text["vocab_size"], hidden_size=hidden,
      intermediate_size=text["intermediate_size"], num_layers=text["num_hidden_layers"],
      num_heads=heads, num_kv_heads=text.get("num_key_value_heads") or heads,
      head_dim=0 if head_dim == hidden // heads else head_dim,
      rms_norm_eps=text.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
      rope_scaling=normalized_rope_scaling(rope),
      max_position_embeddings=text.get("max_position_embeddings", 2048),
      tie_word_embeddings=bool(text.get("tie_word_embeddings", False)))


def clip_vision_dict(clip_config: Mapping[str, Any]) -> dict[str, Any]:
  """The vision part of a CLIPVisionModel or CLIPModel config.json."""
  if clip_config.get("model_type") == "clip" or "vision_config" in clip_config:
    return dict(clip_config["vision_config"])
  return dict(clip_config)


# The release's mm_vision_select_feature -> vision.feature_select (transformers' names).
RELEASE_SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}


def vision_config_from_hf(vision: Mapping[str, Any], select_layer: int,
                          feature_select: str = "default") -> VisionConfig:
  what = "CLIP vision config"
  _require(vision, "model_type", ("clip_vision_model",), "clip_vision_model", what)
  _require(vision, "hidden_act", ("quick_gelu",), "quick_gelu", what)
  _require(vision, "num_channels", (3,), 3, what)
  return VisionConfig(
      image_size=vision["image_size"], patch_size=vision["patch_size"],
      hidden_size=vision["hidden_size"], num_layers=vision["num_hidden_layers"],
      num_heads=vision["num_attention_heads"], intermediate_size=vision["intermediate_size"],
      layer_norm_eps=vision.get("layer_norm_eps", 1e-5), select_layer=select_layer,
      feature_select=feature_select)


def default_connector_layers(num_layers: int) -> tuple[int, int]:
  """(7, 15) of the 24-layer CLIP-L, scaled to other depths (used by sci / sti only)."""
  return 7 * num_layers // 24, 15 * num_layers // 24


def _llava_connector(config: Mapping[str, Any]) -> dict[str, Any]:
  """Connector fields of a transformers LLaVA config (vision_feature_layer int or [s, a, b])."""
  what = "LLaVA config"
  _require(config, "vision_feature_select_strategy", FEATURE_SELECTS, "default", what)
  _require(config, "projector_hidden_act", ("gelu",), "gelu", what)
  _require(config, "multimodal_projector_bias", (True,), True, what)
  layer = config.get("vision_feature_layer", -2)
  if isinstance(layer, int):
    fields = {"connector": "none", "select_layer": layer}
  elif len(layer) == 3:  # transformers concatenates the listed layers on channels: sci
    fields = {"connector": "sci", "select_layer": layer[0], "connector_layers": tuple(layer[1:])}
  else:
    raise UnsupportedCheckpointError(
        f"{what}: vision_feature_layer={layer} concatenates {len(layer)} layers; only one "
        "layer (connector none) or [select, a, b] (connector sci) is supported")
  stored = config.get("exgra_connector")
  if stored is not None and stored != fields["connector"]:
    raise UnsupportedCheckpointError(
        f"{what}: exgra_connector={stored!r} disagrees with vision_feature_layer={layer}")
  fields["feature_select"] = config.get("vision_feature_select_strategy", "default")
  return fields


def _release_connector(config: Mapping[str, Any], vision: Mapping[str, Any],
                       overrides: Mapping[str, Any]) -> dict[str, Any]:
  """Connector fields of a release config; the release did not save dci / sci (SPEC 1)."""
  what = "release config"
  _require(config, "mm_vision_select_feature", tuple(RELEASE_SELECT_FEATURE), "patch", what)
  if not config.get("mm_use_im_start_end", True):
    logging.warning("release config has mm_use_im_start_end=False; this model always wraps "
                    "the image in <im_start> ... <im_end>")
  fields = {"select_layer": config.get("mm_vision_select_layer", -1),
            "projector": config.get("mm_projector_type", "linear"),
            "feature_select": RELEASE_SELECT_FEATURE[
                config.get("mm_vision_select_feature", "patch")]}
  connector = config.get("exgra_connector") or overrides.get("connector")
  width, mm_hidden = vision["hidden_size"], config.get("mm_hidden_size", vision["hidden_size"])
  if connector is None:
    if mm_hidden != width:
      raise UnsupportedCheckpointError(
          f"{what}: mm_hidden_size={mm_hidden} is {mm_hidden / width:g}x the CLIP width "
          f"{width}: a dense connector whose type the release did not save; pass "
          "connector='dci' (the -dci checkpoints) or 'sci' (tools/import_hf.py --connector)")
    connector = "none"
  fields["connector"] = connector
  return fields


def model_config_from_hf(layout: str, config: Mapping[str, Any],
                         clip_config: Mapping[str, Any] | None, *, name: str,
                         overrides: Mapping[str, Any] | None = None) -> LlavaConfig:
  """The model config of an HF checkpoint (`config.json` + the CLIP one for release / plain).

  Without the CLIP config, a release or plain checkpoint is imported for its text side
  only (`importer.import_model(text_only=True)`): the vision part is a stand-in (CLIP-L
  defaults, connector none) that no imported parameter uses.
  `overrides` sets top-level `config.model` keys (OVERRIDABLE): runtime choices (dtype,
  scan_layers, ...) and what a checkpoint does not say (projector of a plain LLaMA
  start, connector of a release dense-connector checkpoint).
  """
  overrides = dict(overrides or {})
  unknown = set(overrides) - set(OVERRIDABLE)
  if unknown:
    raise ValueError(f"cannot override {sorted(unknown)}; allowed: {OVERRIDABLE}")
  if layout == "llava":
    text, vision = dict(config["text_config"]), clip_vision_dict(config["vision_config"])
    text.setdefault("tie_word_embeddings", config.get("tie_word_embeddings", False))
    fields = _llava_connector(config)
  elif layout == "release" and clip_config is not None:
    text, vision = dict(config), clip_vision_dict(clip_config)
    fields = _release_connector(config, vision, overrides)
  else:  # plain, or text only (the stand-in tower)
    text = dict(config)
    vision = (clip_vision_dict(clip_config) if clip_config is not None
              else clip_hf_config(VisionConfig()).to_dict())
    fields = {"connector": "none", "select_layer": -2, "projector": "mlp2x_gelu"}
  fields.setdefault("projector", "mlp2x_gelu")
  fields["connector_layers"] = tuple(config.get("exgra_connector_layers") or fields.get(
      "connector_layers") or default_connector_layers(vision["num_hidden_layers"]))
  fields["name"] = config.get("exgra_name") or name
  fields.update(overrides)
  runtime = {k: fields.pop(k) for k in ("dtype", "param_dtype") if k in fields}
  llm_runtime = {k: fields.pop(k) for k in ("remat", "scan_layers", "attention")
                 if k in fields}
  vision_cfg = vision_config_from_hf(vision, fields.pop("select_layer"),
                                     fields.pop("feature_select", "default"))
  return LlavaConfig(
      vision=dataclasses.replace(vision_cfg, **runtime),
      llm=dataclasses.replace(llm_config_from_hf(text), **runtime, **llm_runtime),
      connector=fields["connector"], connector_layers=tuple(fields["connector_layers"]),
      projector=fields["projector"], name=fields["name"])


def llama_hf_config(llm: LlmConfig, **extra: Any) -> transformers.LlamaConfig:
  """transformers LlamaConfig with the shapes of `llm` (extra: token ids, init range, ...)."""
  return transformers.LlamaConfig(
      vocab_size=llm.vocab_size, hidden_size=llm.hidden_size,
      intermediate_size=llm.intermediate_size, num_hidden_layers=llm.num_layers,
      num_attention_heads=llm.num_heads, num_key_value_heads=llm.num_kv_heads,
      head_dim=llm.resolved_head_dim, max_position_embeddings=llm.max_position_embeddings,
      rms_norm_eps=llm.rms_norm_eps, rope_theta=llm.rope_theta,
      rope_scaling=llm.rope_scaling_dict() or None,
      tie_word_embeddings=llm.tie_word_embeddings, **extra)


def clip_hf_config(vision: VisionConfig, **extra: Any) -> transformers.CLIPVisionConfig:
  """transformers CLIPVisionConfig with the shapes of `vision`."""
  return transformers.CLIPVisionConfig(
      hidden_size=vision.hidden_size, intermediate_size=vision.intermediate_size,
      num_hidden_layers=vision.num_layers, num_attention_heads=vision.num_heads,
      image_size=vision.image_size, patch_size=vision.patch_size,
      layer_norm_eps=vision.layer_norm_eps, hidden_act="quick_gelu", **extra)


def transformers_llava_problem(cfg: LlavaConfig) -> str | None:
  """Why transformers' LLaVA cannot compute `cfg` (None when it can)."""
  if cfg.connector not in ("none", "sci"):
    return (f"connector {cfg.connector!r} has no transformers equivalent (none and sci "
            "have: vision_feature_layer int or [select, a, b])")
  if cfg.projector != "mlp2x_gelu":
    return f"projector {cfg.projector!r}: transformers' LLaVA only has mlp2x_gelu"
  return None


def llava_hf_config(cfg: LlavaConfig, image_token_id: int, *, text_extra: Mapping[str, Any]
                    | None = None, **extra: Any) -> transformers.LlavaConfig:
  """transformers LlavaConfig computing what our model computes (connector none / sci).

  `image_token_id` is the `<im_patch>` id: transformers replaces the embeddings at that
  token's positions by the projector output, as our `image_mask` does.
  """
  problem = transformers_llava_problem(cfg)
  if problem:
    raise ValueError(f"cannot write a transformers LLaVA config: {problem}; use the release "
                     "layout")
  select = cfg.vision.select_layer
  layer = [select, *cfg.connector_layers] if cfg.connector == "sci" else select
  return transformers.LlavaConfig(
      vision_config=clip_hf_config(cfg.vision, **extra),
      text_config=llama_hf_config(cfg.llm, **extra, **(text_extra or {})),
      image_token_index=image_token_id, projector_hidden_act="gelu",
      vision_feature_layer=layer, vision_feature_select_strategy=cfg.vision.feature_select,
      image_seq_length=num_image_tokens(cfg), multimodal_projector_bias=True,
      tie_word_embeddings=cfg.llm.tie_word_embeddings, **extra)


def exgra_keys(cfg: LlavaConfig) -> dict[str, Any]:
  """Keys transformers ignores that make the export self-describing (connector included)."""
  return {"exgra_connector": cfg.connector, "exgra_connector_layers": list(cfg.connector_layers),
          "exgra_name": cfg.name}


def release_config_dict(cfg: LlavaConfig, **text_extra: Any) -> dict[str, Any]:
  """config.json of the release layout (LLaMA keys + LLaVA's mm_* keys)."""
  config = llama_hf_config(cfg.llm, **text_extra).to_dict()
  config.update(
      architectures=[LAYOUT_ARCHITECTURES["release"]], model_type="llava",
      mm_vision_tower=RELEASE_CLIP_SUBDIR, mm_hidden_size=projector_input_width(cfg),
      mm_projector_type=cfg.projector, mm_vision_select_layer=cfg.vision.select_layer,
      mm_vision_select_feature={v: k for k, v in RELEASE_SELECT_FEATURE.items()}[
          cfg.vision.feature_select], mm_use_im_start_end=True, use_mm_proj=True,
      **exgra_keys(cfg))
  return config


def release_clip_dir(config: Mapping[str, Any], hf_dir: str) -> str | None:
  """The release's CLIP directory named by `mm_vision_tower`, when it exists locally."""
  tower = config.get("mm_vision_tower")
  if not tower:
    return None
  for candidate in (os.path.join(hf_dir, tower), tower):
    if os.path.isfile(os.path.join(candidate, "config.json")):
      return os.path.abspath(candidate)
  return None
