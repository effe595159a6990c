"""Tensor name maps between Hugging Face checkpoints and the Flax parameter tree.

One table, both directions: `layout_entries(layout, cfg)` lists every tensor of a layout
as an `Entry` (HF name, Flax path, layout transform, which directory holds it). The
importer reads `Entry.name` and writes `Entry.to_flax(x)` at `Entry.path`; the exporter
does the reverse with `Entry.to_hf`. The tests' torch converter uses the same table.

Layouts (docs/hf.md has the full name table):
- `llava`: transformers' `LlavaForConditionalGeneration`, hub names (`language_model.model.*`,
  `language_model.lm_head.weight`, `vision_tower.vision_model.*`, `multi_modal_projector.
  linear_{1,2}.*`). transformers >= 4.52 in-memory names (`model.language_model.*`,
  `lm_head.*`, `model.vision_tower.*` without `vision_model.`) are accepted on import.
- `release`: LLaVA-Med / ExGra-Med `LlavaLlamaForCausalLM` (`model.layers.*`, `lm_head`,
  `model.mm_projector.{0,2}` or `model.mm_projector` for `linear`); the CLIP tower comes
  from a separate CLIP directory (`vision_model.*`, source CLIP).
- `plain`: a `LlamaForCausalLM` directory plus a CLIP directory; no projector tensors (the
  projector starts fresh in stage 1).
The dense connectors (dci / sci / sti) have no parameters: they only select and mix CLIP
hidden states, so they change the projector's input width and no tensor name.

Flax paths are given in the unscanned form (`llm/layers_3/...`); `param_location` maps
them to the scanned leaf (`llm/layers/...`, index 3 on the leading axis) when
`llm.scan_layers` is set.
"""
from __future__ import annotations

import dataclasses
import enum
import re

import numpy as np

from exgra_jax.models.config import LlavaConfig, LlmConfig, VisionConfig
from exgra_jax.models.connector import projector_depth

LAYOUTS = ("llava", "release", "plain")
MAIN, CLIP = "main", "clip"  # Entry.source: the model directory / the separate CLIP one
Path = tuple[str, ...]
# Flax leaves whose axis `v` indexes the vocabulary (rows appended for new tokens).
VOCAB_AXES: dict[Path, int] = {("llm", "embed_tokens", "embedding"): 0,
                               ("llm", "lm_head", "kernel"): 1}


class Kind(enum.Enum):
  """How a torch tensor becomes a Flax leaf (shapes: torch -> Flax)."""
  COPY = "copy"              # same shape (norm scales, biases, embeddings)
  LINEAR = "linear"          # nn.Linear weight [out, in] -> Dense kernel [in, out]
  HEADS_IN = "heads_in"      # [H*hd, D] -> DenseGeneral kernel [D, H, hd] (q/k/v)
  HEADS_OUT = "heads_out"    # [D, H*hd] -> DenseGeneral kernel [H, hd, D] (o_proj, out_proj)
  HEADS_BIAS = "heads_bias"  # [H*hd] -> [H, hd] (CLIP q/k/v biases)
  CONV = "conv"              # Conv2d weight [D, 3, p, p] -> Conv kernel [p, p, 3, D]


@dataclasses.dataclass(frozen=True)
class Entry:
  """One HF tensor <-> one Flax leaf (or one layer of a scanned leaf).

  `heads`: the head count that splits H*hd for the HEADS_* kinds (0 otherwise).
  """
  name: str
  path: Path
  kind: Kind
  source: str = MAIN
  heads: int = 0

  def hf_shape(self, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The torch shape that maps onto a Flax leaf of `flax_shape`."""
    s = tuple(flax_shape)
    if self.kind is Kind.LINEAR:
      return s[::-1]
    if self.kind is Kind.HEADS_IN:
      return (s[1] * s[2], s[0])
    if self.kind is Kind.HEADS_OUT:
      return (s[2], s[0] * s[1])
    if self.kind is Kind.HEADS_BIAS:
      return (s[0] * s[1],)
    if self.kind is Kind.CONV:
      return (s[3], s[2], s[0], s[1])
    return s

  def to_flax(self, x: np.ndarray) -> np.ndarray:
    """torch-layout array -> Flax layout (the caller checks shapes against `hf_shape`)."""
    if self.kind is Kind.CONV:
      return x.transpose(2, 3, 1, 0)
    if self.kind is Kind.LINEAR:
      return x.T
    if self.kind is Kind.HEADS_IN:
      return x.T.reshape(x.shape[1], self.heads, -1)
    if self.kind is Kind.HEADS_OUT:
      return x.T.reshape(self.heads, -1, x.shape[0])
    if self.kind is Kind.HEADS_BIAS:
      return x.reshape(self.heads, -1)
    return x

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    """Flax leaf -> contiguous torch-layout array (the inverse of `to_flax`)."""
    if self.kind is Kind.CONV:
      x = x.transpose(3, 2, 0, 1)
    elif self.kind is Kind.LINEAR:
      x = x.T
    elif self.kind is Kind.HEADS_IN:
      x = x.reshape(x.shape[0], -1).T
    elif self.kind is Kind.HEADS_OUT:
      x = x.reshape(-1, x.shape[-1]).T
    elif self.kind is Kind.HEADS_BIAS:
      x = x.reshape(-1)
    return np.ascontiguousarray(x)


def llama_entries(llm: LlmConfig, model_prefix: str, head_name: str) -> list[Entry]:
  """LlamaForCausalLM tensors under `model_prefix` (e.g. "model.") and the LM head."""
  p = ("llm",)
  entries = [Entry(f"{model_prefix}embed_tokens.weight", p + ("embed_tokens", "embedding"),
                   Kind.COPY)]
  for i in range(llm.num_layers):
    s, layer = f"{model_prefix}layers.{i}.", p + (f"layers_{i}",)
    entries += [
        Entry(s + "input_layernorm.weight", layer + ("input_layernorm", "scale"), Kind.COPY),
        Entry(s + "post_attention_layernorm.weight",
              layer + ("post_attention_layernorm", "scale"), Kind.COPY),
        *(Entry(f"{s}self_attn.{n}.weight", layer + ("self_attn", n, "kernel"),
                Kind.HEADS_IN, heads=h) for n, h in (("q_proj", llm.num_heads),
                                                     ("k_proj", llm.num_kv_heads),
                                                     ("v_proj", llm.num_kv_heads))),
        Entry(s + "self_attn.o_proj.weight", layer + ("self_attn", "o_proj", "kernel"),
              Kind.HEADS_OUT, heads=llm.num_heads),
        *(Entry(f"{s}mlp.{n}.weight", layer + ("mlp", n, "kernel"), Kind.LINEAR)
          for n in ("gate_proj", "up_proj", "down_proj")),
    ]
  entries.append(Entry(f"{model_prefix}norm.weight", p + ("norm", "scale"), Kind.COPY))
  if not llm.tie_word_embeddings:
    entries.append(Entry(head_name, p + ("lm_head", "kernel"), Kind.LINEAR))
  return entries


def _with_bias(name: str, path: Path, kind: Kind, source: str, heads: int = 0) -> list[Entry]:
  """`name.weight` -> `path/kernel|scale` and `name.bias` -> `path/bias`."""
  leaf = "scale" if kind is Kind.COPY else "kernel"
  bias = Kind.HEADS_BIAS if kind is Kind.HEADS_IN else Kind.COPY
  return [Entry(name + ".weight", path + (leaf,), kind, source, heads),
          Entry(name + ".bias", path + ("bias",), bias, source,
                heads if bias is Kind.HEADS_BIAS else 0)]


def clip_entries(vision: VisionConfig, prefix: str, source: str) -> list[Entry]:
  """CLIPVisionModel tensors under `prefix` (e.g. "vision_model.")."""
  p, e = ("vision",), prefix + "embeddings."
  entries = [Entry(e + "class_embedding", p + ("class_embedding",), Kind.COPY, source),
             Entry(e + "patch_embedding.weight", p + ("patch_embedding", "kernel"), Kind.CONV,
                   source),
             Entry(e + "position_embedding.weight", p + ("position_embedding",), Kind.COPY,
                   source),
             *_with_bias(prefix + "pre_layrnorm", p + ("pre_layrnorm",), Kind.COPY, source)]
  for i in range(vision.num_layers):
    s, layer = f"{prefix}encoder.layers.{i}.", p + (f"layers_{i}",)
    for n in ("q_proj", "k_proj", "v_proj"):
      entries += _with_bias(f"{s}self_attn.{n}", layer + ("self_attn", n), Kind.HEADS_IN,
                            source, vision.num_heads)
    entries += _with_bias(s + "self_attn.out_proj", layer + ("self_attn", "out_proj"),
                          Kind.HEADS_OUT, source, vision.num_heads)
    for n in ("layer_norm1", "layer_norm2"):
      entries += _with_bias(s + n, layer + (n,), Kind.COPY, source)
    for n in ("fc1", "fc2"):
      entries += _with_bias(f"{s}mlp.{n}", layer + ("mlp", n), Kind.LINEAR, source)
  entries += _with_bias(prefix + "post_layernorm", p + ("post_layernorm",), Kind.COPY, source)
  return entries


def projector_names(layout: str, projector: str) -> list[str]:
  """HF module names of the projector's Linear layers, in order (linear_0, linear_1, ...)."""
  depth = projector_depth(projector)
  if layout == "llava":
    return [f"multi_modal_projector.linear_{i + 1}" for i in range(depth)]
  if layout == "release":
    # LLaVA builds `linear` as one nn.Linear and mlpNx_gelu as nn.Sequential(Linear, GELU,
    # Linear, ...), whose Linear layers sit at the even indices.
    if projector == "linear":
      return ["model.mm_projector"]
    return [f"model.mm_projector.{2 * i}" for i in range(depth)]
  return []


def layout_entries(layout: str, cfg: LlavaConfig) -> list[Entry]:
  """Every tensor of `layout` for a model shaped like `cfg`, in the order files list them."""
  projector = [e for i, name in enumerate(projector_names(layout, cfg.projector))
               for e in _with_bias(name, ("projector", f"linear_{i}"), Kind.LINEAR, MAIN)]
  if layout == "llava":
    return (llama_entries(cfg.llm, "language_model.model.", "language_model.lm_head.weight")
            + projector + clip_entries(cfg.vision, "vision_tower.vision_model.", MAIN))
  if layout in ("release", "plain"):
    return (llama_entries(cfg.llm, "model.", "lm_head.weight") + projector
            + clip_entries(cfg.vision, "vision_model.", CLIP))
  raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


# Raw names of other transformers versions -> the names `layout_entries` uses, in order.
_RENAMES = {
    ("llava", MAIN): (
        (re.compile(r"^model\.language_model\."), "language_model.model."),
        (re.compile(r"^lm_head\."), "language_model.lm_head."),
        (re.compile(r"^model\.vision_tower\."), "vision_tower."),
        (re.compile(r"^model\.multi_modal_projector\."), "multi_modal_projector."),
        (re.compile(r"^vision_tower\.(?!vision_model\.)"), "vision_tower.vision_model."),
    ),
    # transformers 5 saves CLIPVisionModel without the `vision_model.` prefix.
    ("release", CLIP): (
        (re.compile(r"^(?=(embeddings|encoder|pre_layrnorm|post_layernorm)\.)"),
         "vision_model."),),
}
_RENAMES[("plain", CLIP)] = _RENAMES[("release", CLIP)]
# Buffers and the text half of a full CLIPModel: not parameters of this model, skipped.
_IGNORED = re.compile(r"(^|\.)(rotary_emb\.inv_freq|position_ids)$"
                      r"|^(text_model\.|visual_projection\.|text_projection\.|logit_scale$)")


def canonical_name(layout: str, source: str, raw: str) -> str | None:
  """A file's tensor name -> the name `layout_entries` uses; None for tensors to skip."""
  if _IGNORED.search(raw):
    return None
  for pattern, replacement in _RENAMES.get((layout, source), ()):
    raw = pattern.sub(replacement, raw)
  return raw


def param_location(path: Path, llm: LlmConfig) -> tuple[Path, int | None]:
  """Unscanned Flax path -> (leaf path, layer index on its leading axis or None)."""
  if llm.scan_layers and path[0] == "llm" and path[1].startswith("layers_"):
    return ("llm", "layers") + path[2:], int(path[1][len("layers_"):])
  return path, None
