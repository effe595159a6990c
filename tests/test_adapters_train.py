"""Training with LoRA / QLoRA adapters (train/optimizer.py labels, train/step.py) on a tiny
LlavaModel: the step moves only the adapters and the stage's trainable leaves outside the
LLM, Adam moments exist only for those, and a QLoRA (int4 base) fine-tune lowers the loss."""
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from configs import base
from exgra_jax.models import adapters
from exgra_jax.models.llava import LlavaModel, init_boxed_params
from exgra_jax.train import optimizer, state, step
from test_adapters import CFG, _inputs


def _batch():
  ids, mask, image_mask, pixels = _inputs()
  labels = np.where(image_mask | (mask == 0), -100, ids).astype(np.int32)
  return {"input_ids": jnp.asarray(ids, jnp.int32), "attention_mask": jnp.asarray(mask),
          "image_mask": jnp.asarray(image_mask), "pixel_values": jnp.asarray(pixels),
          "labels": jnp.asarray(labels), "sample_weight": jnp.ones((2,), jnp.float32)}


def _stage(lora_base: str, dropout: float) -> ml_collections.ConfigDict:
  s = base.stage_config("finetune")
  s.warmup_ratio, s.lr = 0.0, 1e-2
  s.lora.rank, s.lora.alpha, s.lora.base, s.lora.dropout = 4, 8.0, lora_base, dropout
  return s


def _setup(lora_base: str, dropout: float = 0.0):
  """(params of the adapted model: fresh, a quantized base for int8 / int4; tx; jitted step)."""
  stage = _stage(lora_base, dropout)
  model = adapters.lora_model(LlavaModel(CFG), adapters.LoraSettings.from_config(stage.lora),
                              train=True)
  params = nn.unbox(jax.jit(lambda: init_boxed_params(CFG, jax.random.key(1), model))())
  tx, schedule = optimizer.build_optimizer(params, base.get_config().optim, stage, 10)
  frozen = optimizer.frozen_leaves(params, stage.trainable, lora=True)
  return params, tx, jax.jit(step.make_train_step(model, tx, schedule, frozen=frozen))


def test_a_lora_step_moves_only_the_adapters_and_the_projector():
  params, tx, fn = _setup("float32")
  st = state.create_train_state(params, tx, 0)
  new, _ = fn(st, _batch())
  new, _ = fn(new, _batch())  # B starts at zero, so A first moves in the second step
  old = flax.traverse_util.flatten_dict(params)
  moved = set()
  for path, value in flax.traverse_util.flatten_dict(new.params).items():
    if not np.array_equal(value, old[path]):
      moved.add(path)
  adapter_paths = {p for p in old if adapters.is_adapter(p)}
  assert len(adapter_paths) == 2 * 7 * 2
  projector = {p for p in old if p[0] == "projector"}
  assert moved == adapter_paths | projector
  # Adam moments exist for the trainable leaves only (mu and nu: twice their size).
  trainable = sum(np.size(old[p]) for p in adapter_paths | projector)
  moments = sum(np.size(x) for x in jax.tree_util.tree_leaves(st.opt_state)
                if np.ndim(x) > 0)
  assert moments == 2 * trainable


def test_a_qlora_int4_fine_tune_lowers_the_loss():
  params, tx, fn = _setup("int4")
  kernel = params["llm"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
  assert kernel.array.qvalue.dtype == jnp.int4
  st = state.create_train_state(params, tx, 0)
  losses = []
  for _ in range(6):
    st, metrics = fn(st, _batch())
    losses.append(float(metrics["loss"]))
  assert int(st.skipped) == 0
  assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.85 * losses[0], \
      losses
  # The quantized base is frozen: bit-identical after the steps.
  np.testing.assert_array_equal(st.params["llm"]["layers_0"]["self_attn"]["q_proj"][
      "kernel"].array.qvalue, kernel.array.qvalue)


def test_lora_dropout_draws_from_the_step_key():
  params, tx, fn = _setup("float32", dropout=0.5)
  st = state.create_train_state(params, tx, 0)
  first, again = fn(st, _batch())[0], fn(st, _batch())[0]
  other_seed = fn(state.create_train_state(params, tx, 1), _batch())[0]
  moved = lambda new: new.params["llm"]["layers_0"]["mlp"]["up_proj"]["kernel_lora_b"]
  np.testing.assert_array_equal(moved(first), moved(again))  # the same key: the same masks
  assert not np.array_equal(moved(first), moved(other_seed))
