"""Typed, frozen model configuration built from `config.model` (configs/model_presets.py).

Flax modules are dataclasses compared and hashed by value, so they take these frozen
dataclasses rather than a mutable `ConfigDict`. `to_dict()` gives back the `config.model`
tree (connector type included), which is what checkpoints save to be self-describing.
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import ml_collections

CONNECTORS = ("none", "dci", "sci", "sti")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
ATTENTIONS = ("auto", "xla", "splash", "cudnn")  # models/attention.py
REMATS = ("none", "full", "dots")
DTYPES = ("float32", "bfloat16")
# Fields that say how the model runs, not what it computes: set by config.model's top level.
RUNTIME = ("dtype", "param_dtype", "remat", "scan_layers", "attention")
STI_POOL = 8  # tokens averaged per pooled token by the `sti` connector (window = stride)
# Which CLIP tokens feed the connector (transformers' vision_feature_select_strategy):
# "default" drops the CLS token (LLaVA-Med, docs/models.md), "full" keeps it (some llava-hf models).
FEATURE_SELECTS = ("default", "full")
# How an image appears in the token sequence (data/text.py): im_start_end = <im_start> +
# N x <im_patch> + <im_end> (LLaVA v1 / LLaVA-Med), image = N x <image> (llava-hf).
IMAGE_TOKEN_STYLES = ("im_start_end", "image")
_PROJECTOR = re.compile(r"^(linear|identity|mlp(\d+)x_gelu)$")


class ModelConfigError(ValueError):
  """A model config that cannot be built; `problems` lists every reason (start-up
  validation reports them beside the other settings' problems, `model.` prefixed)."""

  def __init__(self, problems: list[str]):
    super().__init__("invalid model config: " + "; ".join(problems))
    self.problems = problems


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """CLIP vision tower (ViT with quick-GELU, pre-LN and a pre-layernorm)."""
  image_size: int = 224
  patch_size: int = 14
  hidden_size: int = 1024
  num_layers: int = 24
  num_heads: int = 16
  intermediate_size: int = 4096
  layer_norm_eps: float = 1e-5
  select_layer: int = -2
  feature_select: str = "default"  # FEATURE_SELECTS
  dtype: str = "float32"
  param_dtype: str = "float32"

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def num_features(self) -> int:
    """Tokens per image the connector sees: the patches, plus CLS with "full"."""
    return self.num_patches + (self.feature_select == "full")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class LlmConfig:
  """LLaMA-family decoder. `rope_scaling` is "" or the JSON of an HF rope_scaling dict;
  `attention` is the implementation without a KV cache (ATTENTIONS, models/attention.py)."""
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_layers: int = 32
  num_heads: int = 32
  num_kv_heads: int = 32
  head_dim: int = 0
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: str = ""
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "none"
  scan_layers: bool = False
  attention: str = "auto"

  @property
  def resolved_head_dim(self) -> int:
    """Width of one attention head (`head_dim`, or hidden_size // num_heads when 0)."""
    return self.head_dim or self.hidden_size // self.num_heads

  def rope_scaling_dict(self) -> dict[str, Any]:
    """The parsed rope_scaling dict with its type under `rope_type` ({} when unset)."""
    if not self.rope_scaling:
      return {}
    scaling = json.loads(self.rope_scaling)
    scaling.setdefault("rope_type", scaling.get("type", "default"))
    return scaling


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
  """Vision tower + connector + projector + LLM, as `config.model` describes them."""
  vision: VisionConfig = VisionConfig()
  llm: LlmConfig = LlmConfig()
  connector: str = "none"
  connector_layers: tuple[int, int] = (7, 15)
  projector: str = "mlp2x_gelu"
  name: str = "custom"
  image_tokens: str = "im_start_end"  # IMAGE_TOKEN_STYLES

  def __post_init__(self):
    problems = self.vision_problems() + self.llm_problems() + self.connector_problems()
    if problems:
      raise ModelConfigError(problems)

  def vision_problems(self) -> list[str]:
    v = self.vision
    out = []
    if v.image_size % v.patch_size:
      out.append(f"vision.image_size={v.image_size} is not a multiple of "
                 f"patch_size={v.patch_size}")
    if v.hidden_size % v.num_heads:
      out.append(f"vision.hidden_size={v.hidden_size} does not divide into "
                 f"num_heads={v.num_heads}")
    if not -(v.num_layers + 1) <= v.select_layer <= v.num_layers:  # a Python index of them
      out.append(f"vision.select_layer={v.select_layer} outside the "
                 f"{v.num_layers + 1} hidden states")
    if v.feature_select not in FEATURE_SELECTS:
      out.append(f"vision.feature_select={v.feature_select!r} is not one of "
                 f"{FEATURE_SELECTS}")
    return out

  def llm_problems(self) -> list[str]:
    l = self.llm
    out = []
    if l.num_heads % l.num_kv_heads:
      out.append(f"llm.num_heads={l.num_heads} is not a multiple of "
                 f"num_kv_heads={l.num_kv_heads}")
    if not l.head_dim and l.hidden_size % l.num_heads:
      out.append(f"llm.hidden_size={l.hidden_size} does not divide into "
                 f"num_heads={l.num_heads} (set model.llm.head_dim)")
    try:
      kind = l.rope_scaling_dict().get("rope_type", "default")
      if kind not in ROPE_TYPES:
        out.append(f"llm.rope_scaling type {kind!r} is not one of {ROPE_TYPES}")
    except (json.JSONDecodeError, AttributeError):
      out.append(f"llm.rope_scaling={l.rope_scaling!r} is not a JSON object")
    if l.remat not in REMATS:
      out.append(f"remat={l.remat!r} is not one of {REMATS}")
    for name in ("dtype", "param_dtype"):
      if getattr(l, name) not in DTYPES:
        out.append(f"{name}={getattr(l, name)!r} is not one of {DTYPES}")
    if l.attention not in ATTENTIONS:
      out.append(f"attention={l.attention!r} is not one of {ATTENTIONS}")
    elif l.attention == "cudnn" and l.dtype == "float32":
      out.append("attention='cudnn' needs dtype bfloat16 (cuDNN flash attention has no "
                 "float32 kernel; 'auto' uses xla for float32 on GPU)")
    return out

  def connector_problems(self) -> list[str]:
    """The image-token style, connector and projector, and how they fit the tower."""
    out = []
    if self.image_tokens not in IMAGE_TOKEN_STYLES:
      out.append(f"image_tokens={self.image_tokens!r} is not one of {IMAGE_TOKEN_STYLES}")
    if self.connector not in CONNECTORS:
      out.append(f"connector={self.connector!r} is not one of {CONNECTORS}")
    if not _PROJECTOR.match(self.projector):
      out.append(f"projector={self.projector!r}: expected linear, identity or mlpNx_gelu")
    elif self.projector == "identity" and projector_input_width(self) != self.llm.hidden_size:
      out.append(f"projector='identity' needs the connector width "
                 f"({projector_input_width(self)} with connector={self.connector!r}) to "
                 f"equal llm.hidden_size={self.llm.hidden_size}")
    if self.connector in ("sci", "sti") and any(
        not 0 <= i <= self.vision.num_layers for i in self.connector_layers):
      out.append(f"connector_layers={self.connector_layers} outside hidden states "
                 f"0..{self.vision.num_layers} of the vision tower")
    if self.vision.feature_select == "full" and self.connector == "sti":
      out.append("connector='sti' pools patch tokens only: it needs "
                 "vision.feature_select='default'")
    if self.connector == "sti" and self.vision.num_patches % STI_POOL:
      out.append(f"connector='sti' pools {STI_POOL} tokens at a time; "
                 f"{self.vision.num_patches} patches do not divide")
    return out

  @classmethod
  def from_config(cls, model: ml_collections.ConfigDict) -> LlavaConfig:
    """Builds the typed config from the `config.model` sub-tree."""
    dtypes = dict(dtype=model.dtype, param_dtype=model.param_dtype)
    vision = VisionConfig(**_fields(VisionConfig, model.vision), **dtypes)
    # A checkpoint's config written before `attention` existed gets the default.
    llm = LlmConfig(**_fields(LlmConfig, model.llm), **dtypes, remat=model.remat,
                    scan_layers=bool(model.scan_layers),
                    attention=model.get("attention", "auto"))
    return cls(vision=vision, llm=llm, connector=model.connector,
               connector_layers=tuple(int(i) for i in model.connector_layers),
               projector=model.projector, name=model.name,
               # Checkpoints from before the field existed are LLaVA-Med style.
               image_tokens=model.get("image_tokens", "im_start_end"))

  def to_dict(self) -> dict[str, Any]:
    """The `config.model` tree (plain JSON-able dict) this config was built from."""
    vision = {k: v for k, v in dataclasses.asdict(self.vision).items() if k not in RUNTIME}
    llm = {k: v for k, v in dataclasses.asdict(self.llm).items() if k not in RUNTIME}
    return dict(name=self.name, vision=vision, llm=llm, connector=self.connector,
                connector_layers=list(self.connector_layers), projector=self.projector,
                dtype=self.llm.dtype, param_dtype=self.llm.param_dtype,
                remat=self.llm.remat, scan_layers=self.llm.scan_layers,
                attention=self.llm.attention, image_tokens=self.image_tokens)


def _fields(kind: type, node: ml_collections.ConfigDict) -> dict[str, Any]:
  """The entries of `node` that are fields of the dataclass `kind` (runtime ones excluded)."""
  names = {f.name for f in dataclasses.fields(kind)} - set(RUNTIME)
  unknown = set(node.keys()) - names
  if unknown:
    raise ValueError(f"unknown {kind.__name__} fields in config: {sorted(unknown)}")
  return {k: node[k] for k in node.keys()}


def num_image_tokens(cfg: LlavaConfig | ml_collections.ConfigDict) -> int:
  """Image tokens per image fed to the LLM: 256 at 224px/14 (257 with feature_select
  "full"), 320 with `sti`."""
  cfg = _typed(cfg)
  patches = cfg.vision.num_patches
  if cfg.connector == "sti":
    return patches + 2 * patches // STI_POOL
  return cfg.vision.num_features


def projector_input_width(cfg: LlavaConfig | ml_collections.ConfigDict) -> int:
  """Channels entering the projector: 3x the ViT width for dci / sci, else the ViT width."""
  cfg = _typed(cfg) if isinstance(cfg, ml_collections.ConfigDict) else cfg
  width = cfg.vision.hidden_size
  return 3 * width if cfg.connector in ("dci", "sci") else width


def _typed(cfg: LlavaConfig | ml_collections.ConfigDict) -> LlavaConfig:
  return LlavaConfig.from_config(cfg) if isinstance(cfg, ml_collections.ConfigDict) else cfg
