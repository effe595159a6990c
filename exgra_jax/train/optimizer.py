"""AdamW with warm-up + cosine schedule, global-norm clipping and per-stage trainable masks.

Stages (configs/base.py `stage_config.trainable`):
- `projector_and_new_tokens` (stage 1): the projector, plus only the rows of the embedding
  table and the columns of the LM head that belong to the tokens added for images
  (`<image>`, `<im_start>`, `<im_patch>`, `<im_end>`, `<pad>`). The other rows get neither
  gradient nor update, so they stay bit-for-bit unchanged.
- `all_but_vision` (stage 2, finetune): everything except the `vision` tower (the GNN of
  stage 2 included).
With `<stage>.lora.rank` > 0 the LLM trains only its LoRA adapters, plus the leaves
`<stage>.lora.train_also` names (`trainable_labels`).
Frozen leaves get `optax.set_to_zero` through `optax.multi_transform`, so they hold no Adam
moments; clipping is over the trainable gradients only.
"""
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from exgra_jax.models import adapters

TRAINABLE_KINDS = ("projector_and_new_tokens", "all_but_vision")
EMBEDDING_PATH = ("llm", "embed_tokens", "embedding")   # [vocab, embed]: token rows
LM_HEAD_PATH = ("llm", "lm_head", "kernel")             # [embed, vocab]: token columns


class TrainAlsoError(ValueError):
  """`<stage>.lora.train_also` names no LLM leaf, or a quantized one (a user's mistake)."""


def _keys(path) -> tuple[str, ...]:
  return tuple(str(getattr(p, "key", getattr(p, "name", p))) for p in path)


def trainable_labels(params: Any, trainable: str,
                     lora: adapters.LoraSettings | bool = False) -> Any:
  """Tree of "train" / "frozen" labels, one per parameter leaf.

  lora: with adapters (settings with rank > 0, or True: the adapters alone) the LLM trains
  only its adapters and the floating-point leaves `lora.train_also` matches; its other
  leaves, a quantized base's included, are frozen whatever `trainable` says. A train_also
  that matches no LLM leaf, or matches a quantized one, is a TrainAlsoError.
  """
  if trainable not in TRAINABLE_KINDS:
    raise ValueError(f"trainable={trainable!r} is not one of {TRAINABLE_KINDS}")
  settings = lora if isinstance(lora, adapters.LoraSettings) else None
  with_adapters = settings.enabled if settings else bool(lora)
  also = []

  def label(path, leaf):
    keys = _keys(path)
    if with_adapters and keys[0] == "llm":
      if adapters.is_adapter(keys):
        return "train"
      if settings is None or not settings.trains_also(keys):
        return "frozen"
      # A QLoRA kernel is a qwix WithAux(QArray): leaves kernel/array/{qvalue, scale}.
      if keys[-2] == "array" or not jnp.issubdtype(leaf.dtype, jnp.floating):
        raise TrainAlsoError(f"lora.train_also={settings.train_also!r} matches "
                         f"{'/'.join(keys)}, a leaf of a quantized (lora.base) kernel: "
                         "only floating-point leaves can train")
      also.append(keys)
      return "train"
    if trainable == "all_but_vision":
      return "frozen" if keys[0] == "vision" else "train"
    return "train" if keys[0] == "projector" or keys in (EMBEDDING_PATH, LM_HEAD_PATH) \
        else "frozen"
  labels = jax.tree_util.tree_map_with_path(label, params)
  if with_adapters and settings is not None and settings.train_also and not also:
    raise TrainAlsoError(f"lora.train_also={settings.train_also!r} matches no LLM parameter (paths "
                     f"such as {'/'.join(EMBEDDING_PATH)}, {'/'.join(LM_HEAD_PATH)})")
  return labels


def frozen_leaves(params: Any, trainable: str,
                  lora: adapters.LoraSettings | bool = False) -> Any:
  """Tree of bools, True where `trainable_labels` says "frozen" (no gradient is taken)."""
  return jax.tree_util.tree_map(lambda label: label == "frozen",
                                trainable_labels(params, trainable, lora))


def mask_token_rows(new_token_ids: Sequence[int]) -> optax.GradientTransformation:
  """Zeroes the embedding rows / LM-head columns of every token not in `new_token_ids`.

  Applied both to the gradients (so clipping sees only trainable entries) and to the final
  updates (so weight decay cannot move a frozen row).
  """
  ids = jnp.asarray(sorted(set(int(i) for i in new_token_ids)), jnp.int32)

  def mask_leaf(path, update):
    keys = _keys(path)
    if keys == EMBEDDING_PATH:
      keep = jnp.zeros((update.shape[0],), bool).at[ids].set(True)
      return jnp.where(keep[:, None], update, 0)
    if keys == LM_HEAD_PATH:
      keep = jnp.zeros((update.shape[1],), bool).at[ids].set(True)
      return jnp.where(keep[None, :], update, 0)
    return update

  def update_fn(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(mask_leaf, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def learning_rate_schedule(peak_lr: float, total_steps: int, warmup_ratio: float,
                           kind: str = "cosine") -> optax.Schedule:
  """Linear warm-up from 0 over ceil(warmup_ratio * total) steps, then cosine to 0 (or flat)."""
  if total_steps <= 0:
    raise ValueError(f"total_steps={total_steps} must be positive")
  if not 0.0 <= warmup_ratio < 1.0:
    raise ValueError(f"warmup_ratio={warmup_ratio} must be in [0, 1)")
  warmup = int(-(-warmup_ratio * total_steps // 1))
  decay_steps = max(total_steps - warmup, 1)
  if kind == "cosine":
    after = optax.cosine_decay_schedule(peak_lr, decay_steps)
  elif kind == "constant":
    after = optax.constant_schedule(peak_lr)
  else:
    raise ValueError(f"optim.schedule={kind!r} is not one of ('cosine', 'constant')")
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak_lr, warmup), after], [warmup])


def build_optimizer(params: Any, optim: ml_collections.ConfigDict, stage: ml_collections.ConfigDict,
                    total_steps: int, new_token_ids: Sequence[int] = ()
                    ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The stage's optimizer (clip -> AdamW, frozen leaves zeroed) and its lr schedule."""
  schedule = learning_rate_schedule(stage.lr, total_steps, stage.warmup_ratio, optim.schedule)
  adamw = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                      weight_decay=optim.weight_decay)
  steps = [optax.clip_by_global_norm(optim.clip_norm), adamw]
  if stage.trainable == "projector_and_new_tokens":
    if not new_token_ids:
      raise ValueError("stage trains projector_and_new_tokens but no new token ids were given")
    row_mask = mask_token_rows(new_token_ids)
    steps = [row_mask, *steps, row_mask]
  tx = optax.multi_transform({"train": optax.chain(*steps), "frozen": optax.set_to_zero()},
                             trainable_labels(params, stage.trainable,
                                              adapters.LoraSettings.from_config(stage.lora)))
  return tx, schedule
