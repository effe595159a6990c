"""LoRA / QLoRA adapters and weight-only quantization of `LlavaModel`, through qwix.

qwix (Google's JAX quantization library) rewrites a Linen model's matmuls by intercepting
them while chosen methods run; nothing in the model code names an adapter. Three uses:

- **LoRA** (`lora_model`): each matched projection y = x @ W gains y += (alpha / rank) *
  x @ A @ B, with `<name>_lora_a` [*batch, prod(in axes), rank] (he-uniform) and
  `<name>_lora_b` [*batch, rank, prod(out axes)] (zeros) stored beside `W`
  (`*batch` = the scanned `layers` axis). The adapters start as the identity update.
- **QLoRA** (`lora_model` with `base="int8" | "int4"`): the matched base kernels are
  frozen qwix `WithAux(QArray)` leaves (per-output-channel absmax scales), the adapters
  stay in floating point. `base="bf16"` keeps a plain base, held in bfloat16.
- **Weight-only PTQ** (`quantized_model` + `quantize_params`): the matched kernels become
  int8 / int4 with float scales; activations stay in floating point.

Matched modules: `LLM_PROJECTIONS` (the LLM's attention and MLP projections) unless a
regex is given; qwix matches it (re.fullmatch) against the module path, e.g.
`llm/layers_0/self_attn/q_proj` (or `llm/layers/...` with scanned layers).

Two qwix 0.1.8 behaviours shape this module:
- qwix wraps only the methods it is told to (`METHODS`, every `LlavaModel` method that
  `apply` calls); `apply(..., method=LlavaModel.prefill)` passes the unwrapped function, so
  callers of a wrapped model name methods by string (`method="prefill"`).
- LoRA dropout is applied whenever the rule's dropout is > 0, `deterministic` or not
  (qwix builds `nnx.Dropout(deterministic=False)`), so `lora_model(..., train=False)`
  builds the rule without dropout for answering.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import qwix
from flax import linen as nn

from exgra_jax.models.llava import LlavaModel, init_boxed_params

# The LLM's q/k/v/o and gate/up/down projections, unscanned (layers_3) or scanned (layers).
LLM_PROJECTIONS = r"llm/layers(_\d+)?/(self_attn/[qkvo]_proj|mlp/(gate|up|down)_proj)"
# Every LlavaModel method run through `apply` (training, alignment text, generation).
METHODS = ("__call__", "text_features", "image_features", "prefill", "decode_step")
LORA_BASES = ("float32", "bf16", "int8", "int4")  # <stage>.lora.base
QUANTIZED = ("int8", "int4")                       # weight-only types (--quantize)
ADAPTER_SUFFIXES = ("_lora_a", "_lora_b")          # qwix's names of the adapter leaves


@dataclasses.dataclass(frozen=True)
class LoraSettings:
  """`<stage>.lora` (configs/base.py): rank 0 = no adapters (full fine-tuning).

  train_also: a regex (re.fullmatch) over the "/"-joined paths of LLM leaves that train
  beside the adapters, e.g. `llm/(embed_tokens/embedding|lm_head/kernel)` (PEFT's
  `modules_to_save`); "" = the adapters alone. train/optimizer.py applies it.
  """
  rank: int = 0
  alpha: float = 16.0
  dropout: float = 0.0
  modules: str = LLM_PROJECTIONS
  base: str = "float32"
  train_also: str = ""

  def __post_init__(self):
    if self.rank < 0:
      raise ValueError(f"lora.rank={self.rank} must be >= 0 (0 = no adapters)")
    if self.alpha <= 0:
      raise ValueError(f"lora.alpha={self.alpha} must be > 0")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"lora.dropout={self.dropout} must be in [0, 1)")
    if self.base not in LORA_BASES:
      raise ValueError(f"lora.base={self.base!r} is not one of {LORA_BASES}")
    for field in ("modules", "train_also"):
      try:
        re.compile(getattr(self, field))
      except re.error as e:
        raise ValueError(f"lora.{field}={getattr(self, field)!r} is not a regular expression: "
                         f"{e}") from None

  @property
  def enabled(self) -> bool:
    return self.rank > 0

  @property
  def scale(self) -> float:
    """qwix's LoRA scale: the update is (alpha / rank) * x @ A @ B."""
    return self.alpha / self.rank

  def trains_also(self, path: tuple[str, ...]) -> bool:
    """Whether the LLM leaf at `path` (key names, "llm" first) trains beside the adapters."""
    return bool(self.train_also) and re.fullmatch(self.train_also, "/".join(path)) is not None

  @classmethod
  def from_config(cls, lora: ml_collections.ConfigDict) -> LoraSettings:
    # Run configs written before train_also existed hold no such field: the adapters alone.
    return cls(rank=int(lora.rank), alpha=float(lora.alpha), dropout=float(lora.dropout),
               modules=str(lora.modules) or LLM_PROJECTIONS, base=str(lora.base),
               train_also=str(lora.get("train_also", "")))


def lora_model(model: LlavaModel, settings: LoraSettings, *, train: bool) -> nn.Module:
  """`model` with adapters on `settings.modules` (and a quantized base for int8 / int4).

  train=False drops the LoRA dropout (see the module docstring). Params of the result:
  `init_params(result)` or a checkpoint of one.
  """
  if not settings.enabled:
    raise ValueError("lora.rank is 0: no adapters to apply")
  qtype = settings.base if settings.base in QUANTIZED else None
  rule = qwix.LoraRule(module_path=settings.modules, rank=settings.rank, alpha=settings.alpha,
                       dropout=settings.dropout if train else 0.0, weight_qtype=qtype)
  return qwix.apply_lora_to_model(model, qwix.LoraProvider([rule]), methods=METHODS)


def quantized_model(model: LlavaModel, qtype: str, modules: str = LLM_PROJECTIONS
                    ) -> nn.Module:
  """`model` whose `modules` kernels are int8 / int4 (weight-only PTQ; params from
  `quantize_params`)."""
  if qtype not in QUANTIZED:
    raise ValueError(f"quantize={qtype!r} is not one of {QUANTIZED}")
  rule = qwix.QuantizationRule(module_path=modules, weight_qtype=qtype)
  return qwix.quantize_model(model, qwix.PtqProvider([rule]), methods=METHODS)


def init_params(model: nn.Module, key: jax.Array) -> Any:
  """Fresh boxed params of a wrapped LlavaModel: adapters and quantized leaves included.

  Traced without logical-axis rules: qwix 0.1.8 (flax_util.update_boxed) puts an adapter
  into the base kernel's box and unboxes it before renaming its axes, so under the rules
  the kernel's rank-3 constraint (q/k/v/o: embed, heads, head_dim) meets a rank-2 adapter
  and fails. Without rules that unbox is a no-op; the axis names qwix then gives the
  adapters are right, and the caller's shardings (from those names) place the params.
  """
  with nn.logical_axis_rules(()):
    return init_boxed_params(model.cfg, key, model)


def abstract_params(model: nn.Module) -> Any:
  """Boxed abstract params (`jax.ShapeDtypeStruct` leaves) of a wrapped LlavaModel: what
  its checkpoints hold. A quantized (QLoRA / PTQ) kernel is a qwix `WithAux(QArray)` whose
  leaves are `qvalue` (int8 / int4, the kernel's shape) and `scale` (float32, 1 on the
  contracted axes); `leaf_paths` names them as Orbax stores them."""
  return jax.eval_shape(lambda: init_params(model, jax.random.key(0)))


def leaf_paths(tree: Any) -> tuple[list[tuple[str, ...]], list[Any], Any]:
  """(key-name paths, leaves, treedef) of a params tree, through qwix's containers:
  `("llm", "layers_0", "self_attn", "q_proj", "kernel", "array", "qvalue")` for a QLoRA
  kernel's int values, as in an Orbax checkpoint of the tree. `treedef` rebuilds the tree
  (`WithAux(QArray)` included) from leaves in that order."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  paths = [tuple(jax.tree_util.keystr((k,), simple=True) for k in path) for path, _ in flat]
  return paths, [leaf for _, leaf in flat], treedef


def frozen_base_dtype(params: Any, settings: LoraSettings) -> Any:
  """Params (boxed or not) with the frozen LLM held in bfloat16 for `lora.base="bf16"`.

  With adapters the LLM's own leaves never change, so they need no float32 master copy;
  the adapters (and the `train_also` leaves, which train) keep the param dtype. Other
  settings return `params` unchanged.
  """
  if not settings.enabled or settings.base != "bf16":
    return params

  def cast(path, leaf):
    keys = tuple(str(getattr(k, "key", k)) for k in path)
    if keys[0] != "llm" or is_adapter(keys) or settings.trains_also(keys):
      return leaf
    if isinstance(leaf, nn.meta.AxisMetadata):
      return leaf.replace_boxed(leaf.unbox().astype(jnp.bfloat16))
    return leaf.astype(jnp.bfloat16)
  return jax.tree_util.tree_map_with_path(
      cast, params, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def is_adapter(path: tuple[str, ...]) -> bool:
  """Whether a flattened parameter path (key names) is a LoRA adapter leaf."""
  return any(str(k).endswith(ADAPTER_SUFFIXES) for k in path)


def _is_scanned(path: tuple[str, ...]) -> bool:
  return len(path) > 1 and path[0] == "llm" and path[1] == "layers"


def quantize_params(model: nn.Module, params: Any) -> Any:
  """Float `params` (unboxed) -> the params of the quantized / QLoRA `model`.

  Matched kernels become qwix `WithAux(QArray)`; other leaves (adapters included) pass
  through. qwix.quantize_params takes the per-layer quantization axes that `nn.scan`'s
  init recorded and applies them to the stacked [layers, ...] kernel (scales over the
  wrong axes), so scanned layers are quantized one layer at a time under `jax.vmap`.
  """
  abstract = abstract_params(model)
  flat = flax.traverse_util.flatten_dict(nn.unbox(params))
  scanned = {p[2:]: v for p, v in flat.items() if _is_scanned(p)}
  rest = flax.traverse_util.unflatten_dict({p: v for p, v in flat.items()
                                            if not _is_scanned(p)})
  out = flax.traverse_util.flatten_dict(qwix.quantize_params(rest, abstract))
  if scanned:
    layer_abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype),
                                  nn.unbox(abstract["llm"]["layers"]))
    stacked = jax.vmap(lambda layer: qwix.quantize_params(layer, layer_abstract))(
        flax.traverse_util.unflatten_dict(scanned))
    out.update({("llm", "layers", *p): v
                for p, v in flax.traverse_util.flatten_dict(stacked).items()})
  return flax.traverse_util.unflatten_dict(out)


def _is_quantized(leaf: Any) -> bool:
  """Whether `leaf` is a qwix `WithAux(QArray)` kernel."""
  return isinstance(getattr(leaf, "array", None), qwix.QArray)


def dequantized(params: Any) -> Any:
  """Params (boxed or not) with every qwix `WithAux(QArray)` kernel replaced by its float
  value (float32: qwix's scale dtype); other leaves, adapters included, unchanged. For a
  QLoRA checkpoint this is the base the adapters were trained against."""
  return jax.tree.map(lambda leaf: qwix.dequantize(leaf.array) if _is_quantized(leaf) else leaf,
                      nn.unbox(params), is_leaf=_is_quantized)


def lora_delta(lora_a: jax.Array, lora_b: jax.Array, scale: float, shape: tuple[int, ...]
               ) -> jax.Array:
  """scale * A @ B in the kernel's shape [*batch, *in, *out] (float32).

  A [*batch, prod(in), rank], B [*batch, rank, prod(out)]: the kernel contracts its leading
  (non-batch) axes, as qwix's LoRA flattens them.
  """
  product = jnp.matmul(lora_a.astype(jnp.float32), lora_b.astype(jnp.float32))
  return scale * product.reshape(shape)


def merge_adapters(params: Any, scale: float) -> Any:
  """Params with adapters -> plain float params of `LlavaModel`: W + scale * A @ B.

  `scale` = alpha / rank (`LoraSettings.scale`). A quantized (QLoRA) base kernel is
  dequantized first, so the merged model computes what the adapted one did. The merged
  kernel keeps the base kernel's dtype (float32 for a quantized base).
  """
  flat = flax.traverse_util.flatten_dict(dequantized(params))
  out = {}
  for path, kernel in flat.items():
    if is_adapter(path):
      continue
    a = flat.get((*path[:-1], path[-1] + "_lora_a"))
    b = flat.get((*path[:-1], path[-1] + "_lora_b"))
    if a is not None and b is not None:
      merged = kernel.astype(jnp.float32) + lora_delta(a, b, scale, kernel.shape)
      kernel = merged.astype(kernel.dtype)
    out[path] = kernel
  return flax.traverse_util.unflatten_dict(out)


def without_adapters(params: Any) -> Any:
  """An adapted model's params less its adapters, a QLoRA base dequantized: the plain
  `LlavaModel` params that a PEFT export of the adapters (hf/peft_adapter.py) applies over."""
  flat = flax.traverse_util.flatten_dict(dequantized(params))
  return flax.traverse_util.unflatten_dict({p: v for p, v in flat.items() if not is_adapter(p)})


def adapter_paths(params: Any) -> list[tuple[str, ...]]:
  """Flattened paths of the adapter leaves in `params` (empty: a plain model's params)."""
  return [p for p in flax.traverse_util.flatten_dict(nn.unbox(params)) if is_adapter(p)]
