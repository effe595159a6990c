"""One stage-2 step of the ExGra-Med release replayed from explicit inputs (docs/align.md).

`release_step` takes what one device's step of the release consumed: its weights under
the release's names (`LlavaLlamaForCausalLM`, llava/model/llava_pre.py), the stage-2
collator's arrays, the CLIP features entering the projector, and the randomness the
release drew (numpy Gumbel noise, the GNN's dropout masks, optionally LPMP's matchings),
and returns the LM loss, the alignment loss, the six Hamming distances and the gradients
under the release's names, in torch layout.

Same code path as training, not a re-implementation: the loss is `step.make_loss_fn`'s
(LM cross-entropy, f_I / f_S / f_L, alpha), with `align.text_mode=release`, one alignment
group of the whole batch, and an `AlignFn` that is `align.loss.alignment_from_noise` (what
`multi_graph_alignment_loss` runs after drawing its noise) fed the given randomness
(`injected_alignment`). Only two things are swapped in from outside:
- the CLIP tower's output: the tower is frozen (no gradient) and the release's features
  come from its own tower, so `ClipVisionTower` is intercepted (`flax.linen.
  intercept_methods`) and returns the given patches; connector selection, projector and
  the splice into the `<im_patch>` positions are the model's;
- the noise and dropout masks: given instead of drawn from the step's key, and the
  matchings when `matchings` is given (`imle.differentiable_matching(replay=)`).

Replayed matchings fix the alignment gradients (-(M - M') / lambda whatever the
cotangent; alpha acts through M' only). Solving instead (`matchings=None`), alpha sets
the re-solve's perturbation: the release's gradient accumulation divides its loss by the
number of accumulation steps M before `backward`, so solve such a step with alpha / M
(the LM gradients are then M times the release's).

    out = release_step(state_dict, llm_config, batch, image_features=clip_patches,
                       image_token_ids=dict(im_patch=32001, im_start=32002, im_end=32003),
                       node_noise=g_n, edge_noise=g_e, dropout_keep=keep)
    out["lm_loss"], out["align_loss"]: float; out["hamming"]: [6]
    out["grads"]["model.mm_projector.0.weight"]: [d_llm, d_vision] (torch layout)
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from exgra_jax.align import equivalence, imle
from exgra_jax.align import loss as align_loss
from exgra_jax.hf import hf_configs, layouts, placement
from exgra_jax.models.config import LlavaConfig, VisionConfig
from exgra_jax.models.llava import LlavaModel
from exgra_jax.models.vit import ClipVisionTower
from exgra_jax.train import step

# The release's alignment constants (llava_pre.py: GDPModel1, build_graphs_main_1
# n_neighbors=5, F.dropout p=0.1; utils_graph/config.py: BB_GM lambda_val=80).
RELEASE_ALIGN = align_loss.AlignSettings(num_neighbors=5, gnn_layers=2, gnn_dropout=0.1,
                                         solver=imle.SolverSettings(imle_lambda=80.0))
BATCH_KEYS = ("input_ids", "labels", "attention_mask", "merge_sentence_id",
              "attention_mask_F", "merge_sentence_id_long", "attention_mask_F_long")
_PROJECTOR_PREFIX = "model.mm_projector."


def _projector_kind(state_dict: Mapping[str, Any]) -> str:
  """`linear` (one nn.Linear) or `mlp{N}x_gelu` (nn.Sequential) from the tensor names."""
  if _PROJECTOR_PREFIX + "weight" in state_dict:
    return "linear"
  depth = sum(1 for name in state_dict
              if name.startswith(_PROJECTOR_PREFIX) and name.endswith(".weight"))
  if depth == 0:
    raise ValueError(f"state_dict has no projector ({_PROJECTOR_PREFIX}*)")
  return f"mlp{depth}x_gelu"


def model_config(state_dict: Mapping[str, Any], llm_config: Mapping[str, Any],
                 image_features_shape: tuple[int, ...]) -> LlavaConfig:
  """The LlavaConfig of the replayed model: the LLM of `llm_config`, the state dict's
  projector, and a stand-in one-layer tower whose patches are the given features
  [B, N, d_vision] (N a square: the tower's grid)."""
  _, n, width = image_features_shape
  side = int(round(n ** 0.5))
  if side * side != n:
    raise ValueError(f"image_features has {n} patches per image: not a square grid")
  # Never run (intercepted): only its patch count, width and layer count are read.
  vision = VisionConfig(image_size=side, patch_size=1, hidden_size=width, num_layers=1,
                        num_heads=1, intermediate_size=width, select_layer=-2)
  llm = hf_configs.llm_config_from_hf({"model_type": "llama", **llm_config})
  return LlavaConfig(vision=vision, llm=llm, projector=_projector_kind(state_dict))


def _entries(cfg: LlavaConfig) -> list[layouts.Entry]:
  """The release layout's tensors held by the model directory (LLM + projector)."""
  return [e for e in layouts.layout_entries("release", cfg) if e.source == layouts.MAIN]


def params_from_release(state_dict: Mapping[str, Any], cfg: LlavaConfig) -> dict[str, Any]:
  """{release name: torch-layout array} -> {llm, projector, gnn} params, float32.

  ValueError naming every missing, unexpected or misshapen tensor.
  """
  entries = _entries(cfg)
  gnn_names = {name for name in state_dict if name.startswith(equivalence.RELEASE_GNN_PREFIX)}
  expected = {e.name for e in entries}
  missing = sorted(expected - set(state_dict))
  unexpected = sorted(set(state_dict) - expected - gnn_names)
  if missing or unexpected:
    raise ValueError(f"state_dict: missing {missing}, unexpected {unexpected}")
  abstract, _ = placement.expected_params(cfg)
  flat = {}
  for entry in entries:
    value = np.asarray(state_dict[entry.name], np.float32)
    shape = entry.hf_shape(abstract[entry.path].shape)
    if value.shape != shape:
      raise ValueError(f"state_dict[{entry.name!r}] has shape {value.shape}, the model "
                       f"needs {shape}")
    flat[entry.path] = jnp.asarray(entry.to_flax(value))
  params = traverse_util.unflatten_dict(flat)
  prefix = len(equivalence.RELEASE_GNN_PREFIX)
  params["gnn"] = equivalence.gnn_params_from_pyg(
      {name[prefix:]: state_dict[name] for name in gnn_names}, RELEASE_ALIGN.gnn_layers)
  return params


def grads_to_release(grads: Mapping[str, Any], cfg: LlavaConfig) -> dict[str, np.ndarray]:
  """{llm, projector, gnn} gradients -> {release name: torch-layout float32 array}."""
  flat = traverse_util.flatten_dict(dict(grads))
  out = {e.name: e.to_hf(np.asarray(flat[e.path], np.float32)) for e in _entries(cfg)}
  out.update({equivalence.RELEASE_GNN_PREFIX + name: value
              for name, value in equivalence.gnn_params_to_pyg(grads["gnn"]).items()})
  return out


def model_batch(batch: Mapping[str, Any], image_token_ids: Mapping[str, int],
                num_patches: int) -> dict[str, jnp.ndarray]:
  """The release collator's arrays -> the training batch (docs/interfaces.md "Batches").

  The release splices the N projected patches after each `<im_start>` (and checks that
  `<im_end>` follows them); the model puts them at the `<im_patch>` positions. They are
  the same positions exactly when every row holds one `<im_start>`, N `<im_patch>`,
  `<im_end>` in a row, which is checked.
  """
  missing = [k for k in BATCH_KEYS if k not in batch]
  if missing:
    raise ValueError(f"batch lacks {missing}")
  ids = np.asarray(batch["input_ids"])
  start, patch, end = (image_token_ids[k] for k in ("im_start", "im_patch", "im_end"))
  for row, tokens in enumerate(ids):
    starts = np.flatnonzero(tokens == start)
    expected = np.r_[start, np.full(num_patches, patch), end]
    if (len(starts) != 1 or (tokens == patch).sum() != num_patches
        or not np.array_equal(tokens[starts[0]:starts[0] + num_patches + 2], expected)):
      raise ValueError(f"input_ids row {row}: expected one <im_start>, {num_patches} "
                       "<im_patch>, <im_end> in a row")
  as_int = lambda k: jnp.asarray(np.asarray(batch[k]).astype(np.int32))
  return {"input_ids": as_int("input_ids"), "attention_mask": as_int("attention_mask"),
          "image_mask": jnp.asarray(ids == patch), "labels": as_int("labels"),
          "sample_weight": jnp.ones((ids.shape[0],), jnp.float32),
          "short_ids": as_int("merge_sentence_id"), "short_mask": as_int("attention_mask_F"),
          "long_ids": as_int("merge_sentence_id_long"),
          "long_mask": as_int("attention_mask_F_long")}


def injected_alignment(settings: align_loss.AlignSettings, given: Mapping[str, Any]
                       ) -> step.AlignFn:
  """An `AlignFn` (train/step.py) running `alignment_from_noise` on the given randomness
  (`equivalence.release_randomness`) instead of drawing it from the step's key.

  aux adds `hamming_pairs` [6]: the Hamming distance of each problem, in call order.
  """
  def align_fn(gnn_params, f_image, f_short, f_long, key):
    del key  # the randomness is given
    value, aux = align_loss.alignment_from_noise(
        gnn_params, settings, f_image, f_short, f_long, given["node_noise"],
        given["edge_noise"], None, dropout_keep=given["dropout_keep"], replay=given["replay"])
    aux["hamming_pairs"] = align_loss.hamming_to_identity(aux["matchings"]).mean(axis=(0, 2))
    return value, aux
  return align_fn


def intercepted_tower(features: jax.Array, cfg: LlavaConfig):
  """A context in which `ClipVisionTower` returns `features` [B, N, d] as its hidden
  states (a zero CLS row in front, the same array for every layer)."""
  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, ClipVisionTower) and context.method_name == "__call__":
      hidden = jnp.concatenate([jnp.zeros_like(features[:, :1]), features], axis=1)
      return (hidden,) * (cfg.vision.num_layers + 1)
    return next_fun(*args, **kwargs)
  return nn.intercept_methods(interceptor)


def release_step(state_dict: Mapping[str, Any], llm_config: Mapping[str, Any],
                 batch: Mapping[str, Any], *, image_features: Any,
                 image_token_ids: Mapping[str, int], node_noise: Any, edge_noise: Any,
                 dropout_keep: Any, matchings: Mapping[str, Any] | None = None,
                 alpha: float = 1.0) -> dict[str, Any]:
  """LM loss, alignment loss and gradients of one release stage-2 step (module doc).

  Args:
    state_dict: {release parameter name: array, torch layout [out, in]}: the LLM
      (`model.embed_tokens.weight`, `model.layers.{i}.*`, `model.norm.weight`,
      `lm_head.weight`), the projector (`model.mm_projector.{0,2}.*` for mlp2x_gelu) and
      the GNN (`model.message_pass_node_features.conv{1,2}.lin_{rel,root}.*`).
    llm_config: the HF LLaMA config dict (vocab_size, hidden_size, intermediate_size,
      num_hidden_layers, num_attention_heads, rms_norm_eps, max_position_embeddings,
      rope_theta).
    batch: the stage-2 collator's arrays [B, T] (`BATCH_KEYS`); labels -100 = ignored,
      used as they are.
    image_features: [B, N, d_vision] projector inputs (CLIP layer -2 patches, CLS dropped).
    image_token_ids: dict(im_patch=, im_start=, im_end=).
    node_noise: [B, B], one draw shared by the six problems; edge_noise: [6, E, E],
      E = 5 B, one per problem in call order. float64 as the release draws them (added
      with its rounding), or float32.
    dropout_keep: bool [6, 2B, width]: each problem's GNN dropout keep mask (rows: graph
      1's B nodes, then graph 2's).
    matchings: None (solve with the project's solver) or dict(forward=, backward=)
      [6, B, B] 0/1: LPMP's forward solutions and backward re-solves, replayed.
    alpha: the alignment loss weight.
  Returns:
    dict(lm_loss, align_loss: float, hamming: [6] in call order (image->c, c->image,
    short->c, c->short, long->c, c->long), grads: of lm + alpha * align, grads_lm: of the
    LM loss, grads_align: of alpha * align (grads - grads_lm: the LM loss does not reach
    the matchings, so the total's backward holds the alignment's exactly), each
    {release name: float32 array, torch layout} over every parameter of the state dict).
  """
  features = jnp.asarray(np.asarray(image_features, np.float32))
  if features.ndim != 3 or features.shape[0] != np.shape(batch["input_ids"])[0]:
    raise ValueError(f"image_features must be [B, N, d_vision] with B = "
                     f"{np.shape(batch['input_ids'])[0]}, got {features.shape}")
  cfg = model_config(state_dict, llm_config, features.shape)
  params = params_from_release(state_dict, cfg)
  mb = model_batch(batch, image_token_ids, features.shape[1])
  size = features.shape[0]
  width = int(params["gnn"]["conv1"]["lin_rel"]["kernel"].shape[1])
  settings = dataclasses.replace(RELEASE_ALIGN, gnn_width=width)
  given = equivalence.release_randomness(size, settings.num_neighbors, node_noise,
                                         edge_noise, dropout_keep, matchings)
  model = LlavaModel(cfg)
  loss_fn = step.make_loss_fn(model, align_fn=injected_alignment(settings, given),
                              alpha=alpha, group_size=size, text_mode="release")
  lm_only = step.make_loss_fn(model)
  mb["pixel_values"] = jnp.zeros((size, cfg.vision.image_size, cfg.vision.image_size, 3))
  token_count = step.step_token_count(mb["labels"], mb["sample_weight"])
  key = jax.random.key(0)  # unused: every random input is given

  def compute(p):
    (_, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, mb, token_count, 1.0,
                                                                  key)
    # The LM loss alone, from the loss without alignment: a pullback of the total's
    # lm_loss part would still run the replayed black-box backward (its M' is given).
    grads_lm = jax.grad(lambda q: lm_only(q, mb, token_count, 1.0, key)[0])(p)
    grads_align = jax.tree.map(jnp.subtract, grads, grads_lm)
    return parts, grads, grads_lm, grads_align

  with intercepted_tower(features, cfg):
    parts, grads, grads_lm, grads_align = jax.jit(compute)(params)
  return {"lm_loss": float(parts["lm_loss"]), "align_loss": float(parts["align_loss"]),
          "hamming": np.asarray(parts["align/hamming_pairs"]),
          "grads": grads_to_release(grads, cfg), "grads_lm": grads_to_release(grads_lm, cfg),
          "grads_align": grads_to_release(grads_align, cfg)}
