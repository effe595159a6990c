"""One optimizer step: LM (+ alpha * alignment) loss, gradient accumulation, non-finite skip.

Loss semantics (identical for any number of micro-batches M):
- LM: token-mean cross-entropy over every supervised token of the *global* batch
  (sum of per-token losses / number of supervised tokens), not a mean of per-sample means.
  The token count comes from the labels alone, so it is computed once for the step and each
  micro-batch contributes `its token-loss sum / global count`; gradients then add exactly.
- Micro-batch i holds samples i, i + M, i + 2M, ... of the global batch (strided, so that
  with the batch sharded along its sample axis every device keeps working on its own shard).
- Alignment (stage 2): within a micro-batch, consecutive runs of `group_size` samples form
  the graphs (groups never span micro-batches); the alignment loss of the step is the mean
  over all groups of all micro-batches. Image features are the mean over the N image tokens
  of the projector output; short / long text features come from `LlavaModel.text_features`
  in `text_mode` (config.align.text_mode), whose `release` padding spans a group.
- total = LM + alpha * alignment. A non-finite loss or gradient norm leaves params and
  optimizer state unchanged and increments `skipped`.
- Gradients are taken for the trainable leaves only (`frozen` marks the others): stage 1
  would otherwise back-propagate into every LM weight and accumulate 7 B gradients only for
  the optimizer to discard them. `grad_norm` is the norm of the trainable gradients.
"""
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from exgra_jax.models.llava import image_node_features
from exgra_jax.train.state import TrainState

IGNORE_INDEX = -100
# (gnn_params, f_image, f_short, f_long [G, g, d], key) -> (mean loss over G groups, aux)
AlignFn = Callable[[Any, jax.Array, jax.Array, jax.Array, jax.Array], tuple[jax.Array, dict]]


def _is_none(x: Any) -> bool:
  return x is None


def partition(params: Any, frozen: Any) -> tuple[Any, Any]:
  """(trainable, fixed): `params` split by the boolean tree `frozen`, None in the other's
  place, so that `combine(trainable, fixed)` rebuilds it and gradients see only one side."""
  trainable = jax.tree_util.tree_map(lambda f, p: None if f else p, frozen, params)
  fixed = jax.tree_util.tree_map(lambda f, p: p if f else None, frozen, params)
  return trainable, fixed


def combine(first: Any, second: Any) -> Any:
  """Leaf-wise the one of two partitioned trees that is not None."""
  return jax.tree_util.tree_map(lambda a, b: b if a is None else a, first, second,
                                is_leaf=_is_none)


def model_params(params: dict[str, Any]) -> dict[str, Any]:
  """The model's parameter collections: everything but the alignment GNN (`gnn`)."""
  return {k: v for k, v in params.items() if k != "gnn"}


def supervised_token_mask(labels: jax.Array, sample_weight: jax.Array) -> jax.Array:
  """[B, T-1] bool: shifted targets that count (not -100, real sample)."""
  return (labels[:, 1:] != IGNORE_INDEX) & (sample_weight[:, None] > 0)


def step_token_count(labels: jax.Array, sample_weight: jax.Array) -> jax.Array:
  """The step's supervised-token count (at least 1), float32: the LM loss's denominator."""
  return jnp.maximum(supervised_token_mask(labels, sample_weight).sum(), 1).astype(jnp.float32)


def token_cross_entropy_sum(logits: jax.Array, labels: jax.Array, sample_weight: jax.Array
                            ) -> jax.Array:
  """Sum over supervised tokens of -log p(label); logits [B, T, V] predict labels[:, 1:]."""
  logits = logits[:, :-1].astype(jnp.float32)
  targets = labels[:, 1:]
  mask = supervised_token_mask(labels, sample_weight)
  safe = jnp.where(mask, targets, 0)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(mask, nll, 0.0))


def split_micro_batches(batch: dict[str, jax.Array], micro_batches: int
                        ) -> dict[str, jax.Array]:
  """[B, ...] -> [M, B/M, ...] with micro-batch i = samples i, i+M, ... (see module doc)."""
  out = {}
  for key, value in batch.items():
    if value.shape[0] % micro_batches:
      raise ValueError(f"batch[{key!r}] has {value.shape[0]} samples, not divisible by "
                       f"micro_batches={micro_batches}")
    value = value.reshape(value.shape[0] // micro_batches, micro_batches, *value.shape[1:])
    out[key] = jnp.swapaxes(value, 0, 1)
  return out


def make_loss_fn(model: nn.Module, *, align_fn: AlignFn | None = None, alpha: float = 0.0,
                 group_size: int = 0, text_mode: str = "default"):
  """loss(params, micro_batch, token_count, group_count, key) -> (scaled loss, parts).

  The scaled loss is this micro-batch's share of the step's total loss (see module doc).
  """
  def loss_fn(params, mb, token_count, group_count, key):
    variables = {"params": model_params(params)}
    # LoRA dropout (models/adapters.py) draws from "dropout"; a model without it ignores it.
    dropout = lambda i: {"dropout": jax.random.fold_in(key, i)}
    out = model.apply(variables, mb["input_ids"], mb["attention_mask"], mb["image_mask"],
                      mb["pixel_values"], deterministic=False, rngs=dropout(1))
    lm = token_cross_entropy_sum(out["logits"], mb["labels"], mb["sample_weight"]) / token_count
    parts = {"lm_loss": lm}
    total = lm
    if align_fn is not None:
      size = mb["input_ids"].shape[0]
      g = group_size or size
      if size % g:
        raise ValueError(f"micro-batch of {size} samples is not divisible by group_size={g}")
      f_image = image_node_features(out["image_features"])
      f_short, f_long = (model.apply(variables, mb[f"{name}_ids"], mb[f"{name}_mask"],
                                     mode=text_mode, group_size=g, method="text_features",
                                     rngs=dropout(i))
                         for i, name in enumerate(("short", "long"), 2))
      grouped = [f.reshape(size // g, g, f.shape[-1]) for f in (f_image, f_short, f_long)]
      align_mean, aux = align_fn(params["gnn"], *grouped, key)
      # Every alignment output is a mean over this micro-batch's groups: weighting it by
      # its share of the step's groups makes the accumulated sum the step's mean.
      share = (size // g) / group_count
      align = align_mean * share
      parts["align_loss"] = align
      parts.update({f"align/{k}": v * share for k, v in aux.items() if k != "matchings"})
      total = total + alpha * align
    return total, parts
  return loss_fn


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    *, micro_batches: int = 1, align_fn: AlignFn | None = None,
                    alpha: float = 0.0, group_size: int = 0, text_mode: str = "default",
                    frozen: Any = None) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """A pure `step(state, batch) -> (state, metrics)`; jit it with the state's shardings.

  frozen: a tree of bools shaped like the params (True: the optimizer never moves the leaf,
  see `optimizer.trainable_labels`); None: every leaf is trained.
  """
  loss_fn = make_loss_fn(model, align_fn=align_fn, alpha=alpha, group_size=group_size,
                         text_mode=text_mode)

  def trainable_loss(trainable, fixed, mb, token_count, group_count, key):
    return loss_fn(combine(trainable, fixed), mb, token_count, group_count, key)
  grad_fn = jax.value_and_grad(trainable_loss, has_aux=True)

  def step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict]:
    flags = frozen if frozen is not None else jax.tree_util.tree_map(lambda _: False,
                                                                      state.params)
    trainable, fixed = partition(state.params, flags)
    global_size = batch["input_ids"].shape[0]
    token_count = step_token_count(batch["labels"], batch["sample_weight"])
    micro_size = global_size // micro_batches
    group_count = float(micro_batches * (micro_size // (group_size or micro_size)))
    step_key = jax.random.fold_in(state.rng, state.step)
    micro = split_micro_batches(batch, micro_batches)

    def accumulate(carry, xs):
      grads, loss, parts = carry
      index, mb = xs
      (l, p), g = grad_fn(trainable, fixed, mb, token_count, group_count,
                          jax.random.fold_in(step_key, index))
      grads = jax.tree_util.tree_map(jnp.add, grads, g)
      parts = jax.tree_util.tree_map(jnp.add, parts, p)
      return (grads, loss + l, parts), None

    zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable)
    first = jax.tree_util.tree_map(lambda v: v[0], micro)
    parts_shape = jax.eval_shape(loss_fn, state.params, first, token_count, group_count,
                                 step_key)[1]
    zero_parts = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), parts_shape)
    (grads, loss, parts), _ = jax.lax.scan(
        accumulate, (zeros, jnp.zeros((), jnp.float32), zero_parts),
        (jnp.arange(micro_batches), micro))
    grads = jax.tree_util.tree_map(lambda g, p: g.astype(p.dtype), grads, trainable)
    grad_norm = optax.tree.norm(grads)
    # The optimizer zeroes the updates of frozen leaves whatever their gradient.
    grads = combine(grads, jax.tree_util.tree_map(jnp.zeros_like, fixed))
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = state.replace(
        step=state.step + 1, params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        skipped=state.skipped + (~finite).astype(jnp.int32))
    metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": schedule(state.step),
               "tokens": token_count, "skipped": new_state.skipped, **parts}
    return new_state, metrics
  return step
