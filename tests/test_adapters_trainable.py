"""`<stage>.lora.train_also` (models/adapters.LoraSettings, train/optimizer.trainable_labels):
LLM leaves that train beside the LoRA adapters (PEFT's `modules_to_save`). A step moves
exactly the adapters, the projector and those leaves; merging keeps the trained leaves; a
bf16 base keeps them float32; a regex that matches nothing or a quantized kernel is refused,
and so is a PEFT adapter export (it would hold the adapters without those leaves); adapters
on the LM head itself (`lora.modules`) export to PEFT and give the adapted logits. The
adapters' gradients are the chain rule of the merged model's kernel gradients (docs/train.md,
"LoRA versus full fine-tuning on the demo": why adapters alone stall there)."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import transformers
from flax import linen as nn

from configs import base
from exgra_jax.hf import exporter, peft_adapter
from exgra_jax.models import adapters
from exgra_jax.models.llava import LlavaModel, init_boxed_params
from exgra_jax.train import optimizer, state, step
from test_adapters import CFG
from test_adapters_train import _batch
from hf_fixtures import batch, real, tiny_config, torch_llava_logits, write_tokenizer

HEAD_AND_EMBEDDINGS = "llm/(embed_tokens/embedding|lm_head/kernel)"


def _settings(train_also: str, lora_base: str = "float32") -> adapters.LoraSettings:
  return adapters.LoraSettings(rank=4, alpha=8.0, base=lora_base, train_also=train_also)


def _setup(settings: adapters.LoraSettings):
  """(fresh params of the adapted model, tx, jitted step) as train/loop.build_stage builds them."""
  stage = base.stage_config("finetune")
  stage.warmup_ratio, stage.lr = 0.0, 1e-2
  for key, value in (("rank", settings.rank), ("alpha", settings.alpha),
                     ("base", settings.base), ("train_also", settings.train_also)):
    stage.lora[key] = value
  model = adapters.lora_model(LlavaModel(CFG), settings, train=True)
  params = nn.unbox(jax.jit(lambda: adapters.frozen_base_dtype(
      init_boxed_params(CFG, jax.random.key(1), model), settings))())
  tx, schedule = optimizer.build_optimizer(params, base.get_config().optim, stage, 10)
  frozen = optimizer.frozen_leaves(params, stage.trainable, settings)
  return params, tx, jax.jit(step.make_train_step(model, tx, schedule, frozen=frozen))


def _moved(old: dict, new: dict) -> set:
  return {p for p, v in new.items() if not np.array_equal(v, old[p])}


def test_a_step_moves_the_adapters_the_projector_and_the_train_also_leaves():
  settings = _settings(HEAD_AND_EMBEDDINGS)
  params, tx, fn = _setup(settings)
  st = state.create_train_state(params, tx, 0)
  new = fn(fn(st, _batch())[0], _batch())[0]  # B starts at zero: A moves in the second step
  old = flax.traverse_util.flatten_dict(params)
  new_flat = flax.traverse_util.flatten_dict(new.params)
  adapter_paths = {p for p in old if adapters.is_adapter(p)}
  assert len(adapter_paths) == 2 * 7 * 2
  also = {optimizer.EMBEDDING_PATH, optimizer.LM_HEAD_PATH}
  projector = {p for p in old if p[0] == "projector"}
  assert _moved(old, new_flat) == adapter_paths | projector | also
  # Adam moments (mu and nu) exist for exactly those leaves.
  trainable = sum(np.size(old[p]) for p in adapter_paths | projector | also)
  moments = sum(np.size(x) for x in jax.tree_util.tree_leaves(st.opt_state) if np.ndim(x) > 0)
  assert moments == 2 * trainable
  # Merging the adapters keeps the trained leaves as trained and adds the adapters' delta.
  merged = flax.traverse_util.flatten_dict(adapters.merge_adapters(new.params, settings.scale))
  for path in also:
    np.testing.assert_array_equal(merged[path], new_flat[path])
  q = ("llm", "layers_1", "self_attn", "q_proj", "kernel")
  delta = adapters.lora_delta(new_flat[(*q[:-1], "kernel_lora_a")],
                              new_flat[(*q[:-1], "kernel_lora_b")], settings.scale, old[q].shape)
  np.testing.assert_allclose(merged[q], old[q] + delta, rtol=1e-6, atol=1e-7)


def test_without_train_also_the_llm_trains_only_its_adapters():
  params, _, _ = _setup(_settings(""))
  labels = flax.traverse_util.flatten_dict(
      optimizer.trainable_labels(params, "all_but_vision", _settings("")))
  assert {p for p, label in labels.items() if p[0] == "llm" and label == "train"} == \
      {p for p in labels if adapters.is_adapter(p)}


def test_a_bfloat16_base_keeps_the_train_also_leaves_in_float32():
  params, _, _ = _setup(_settings("llm/lm_head/kernel", lora_base="bf16"))
  assert params["llm"]["lm_head"]["kernel"].dtype == jnp.float32
  assert params["llm"]["embed_tokens"]["embedding"].dtype == jnp.bfloat16


@pytest.mark.parametrize("train_also, lora_base, message", [
    ("llm/lm_heads/kernel", "float32", "matches no LLM parameter"),
    ("llm/layers_0/self_attn/q_proj/.*", "int4", "quantized"),
])
def test_train_also_must_name_floating_point_llm_leaves(train_also, lora_base, message):
  settings = _settings(train_also, lora_base)
  model = adapters.lora_model(LlavaModel(CFG), settings, train=True)
  abstract = nn.unbox(jax.eval_shape(lambda: adapters.init_params(model, jax.random.key(0))))
  with pytest.raises(ValueError, match=message):
    optimizer.trainable_labels(abstract, "all_but_vision", settings)


def test_train_also_must_be_a_regular_expression():
  with pytest.raises(ValueError, match="lora.train_also='llm/\\(' is not a regular expression"):
    _settings("llm/(")


def test_the_peft_adapter_export_refuses_train_also(tmp_path):
  params, _, _ = _setup(_settings(HEAD_AND_EMBEDDINGS))
  with pytest.raises(ValueError, match="export the merged model instead"):
    peft_adapter.write_peft_adapter(params, CFG.to_dict(), str(tmp_path / "adapter"), rank=4,
                                    alpha=8.0, train_also=HEAD_AND_EMBEDDINGS)
  assert not (tmp_path / "adapter").exists()


def test_adapter_gradients_are_the_chain_rule_of_the_merged_kernel_gradients():
  """dL/dA = s dL/dW B^T and dL/dB = s A^T dL/dW (s = alpha / r, W = base + s A B, the
  kernel flattened to [prod(in), prod(out)]); the projector's gradient is the merged model's."""
  settings = _settings("")
  params, _, _ = _setup(settings)
  flat = flax.traverse_util.flatten_dict(params)
  rng = np.random.RandomState(0)  # B != 0, so that dL/dA is not zero
  flat = {p: jnp.asarray(0.1 * rng.randn(*v.shape), jnp.float32) if p[-1] == "kernel_lora_b"
          else v for p, v in flat.items()}
  params = flax.traverse_util.unflatten_dict(flat)
  batch = _batch()
  tokens = step.step_token_count(batch["labels"], batch["sample_weight"])

  def grads(model, p):
    loss = step.make_loss_fn(model)
    return flax.traverse_util.flatten_dict(jax.jit(jax.grad(
        lambda q: loss(q, batch, tokens, 1.0, jax.random.key(0))[0]))(p))
  adapted = grads(adapters.lora_model(LlavaModel(CFG), settings, train=True), params)
  merged = grads(LlavaModel(CFG), adapters.merge_adapters(params, settings.scale))
  kernels = [p[:-1] + ("kernel",) for p in flat if p[-1] == "kernel_lora_a"]
  assert len(kernels) == 2 * 7

  def close(actual, desired):
    """Equal to float32 rounding: the two paths sum the same terms in different orders,
    so an entry near zero may differ by a few ulps of the array's largest (a CI run found
    1.6e-7 at an entry of 1.2e-4 beside entries of 0.5)."""
    desired = np.asarray(desired)
    np.testing.assert_allclose(actual, desired, rtol=1e-4, atol=1e-6 * np.abs(desired).max())

  for kernel in kernels:
    a, b = flat[kernel[:-1] + ("kernel_lora_a",)], flat[kernel[:-1] + ("kernel_lora_b",)]
    dw = merged[kernel].reshape(a.shape[0], b.shape[1])
    close(adapted[kernel[:-1] + ("kernel_lora_a",)], settings.scale * dw @ b.T)
    close(adapted[kernel[:-1] + ("kernel_lora_b",)], settings.scale * a.T @ dw)
  for path in (p for p in flat if p[0] == "projector"):
    close(adapted[path], merged[path])


def test_adapters_on_the_lm_head_export_to_peft(tmp_path):
  """lora.modules with the LM head: PEFT's adapter over the export without the adapters
  gives the adapted exgra-jax logits (the head's adapter included, `lm_head`)."""
  cfg = tiny_config()
  settings = adapters.LoraSettings(rank=4, alpha=8.0, modules=f"({adapters.LLM_PROJECTIONS})"
                                   "|llm/lm_head")
  model = adapters.lora_model(LlavaModel(cfg), settings, train=False)
  fresh = flax.traverse_util.flatten_dict(nn.unbox(jax.jit(
      lambda: adapters.init_params(model, jax.random.key(1)))()))
  rng = np.random.RandomState(0)
  params = flax.traverse_util.unflatten_dict(
      {p: jnp.asarray(0.3 * rng.randn(*v.shape), jnp.float32) if p[-1].endswith("_lora_b")
       else v for p, v in fresh.items()})
  assert "kernel_lora_a" in params["llm"]["lm_head"]
  write_tokenizer(str(tmp_path / "tok"), image_tokens=True)
  exporter.export(adapters.merge_adapters(params, 0.0), cfg.to_dict(), str(tmp_path / "base"),
                  tokenizer_dir=str(tmp_path / "tok"))
  summary = peft_adapter.write_peft_adapter(params, cfg.to_dict(), str(tmp_path / "adapter"),
                                            rank=settings.rank, alpha=settings.alpha)
  assert summary["modules"] == 2 * 7 + 1
  hf = transformers.LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "base")).eval()
  with_adapter = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
  inputs = batch(cfg)
  want = np.asarray(jax.jit(model.apply)({"params": params}, *inputs)["logits"])
  np.testing.assert_allclose(real(torch_llava_logits(with_adapter, inputs), inputs[1]),
                             real(want, inputs[1]), atol=1e-4, rtol=0)
