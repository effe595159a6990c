"""Parity of the Flax LLaMA with transformers' LlamaForCausalLM (fp32, CPU, tiny configs)."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import linen as nn

from configs import base
from exgra_jax.models.config import LlmConfig
from exgra_jax.models.llama import CAUSAL_BLOCK, Llama, attend, attention_mask_for, init_cache
from models_torch_weights import hf_llama_config, llama_params, stack_layers

LOGIT_TOL = 1e-4   # max-abs on logits of real tokens
GRAD_RTOL = 1e-4   # max-abs error / max-abs gradient
CFG = LlmConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                num_kv_heads=2, max_position_embeddings=16, rms_norm_eps=1e-6)
ROPE_SCALINGS = {
    "default": "",
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8},
    "yarn": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8},
}


def _torch_pair(cfg: LlmConfig, seed: int = 0):
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(hf_llama_config(cfg)).eval()
  return model, llama_params(model.state_dict(), cfg)


def _batch(vocab: int, length: int = 24):
  """Two rows, the second right-padded; 24 > max_position_embeddings exercises scaling."""
  rng = np.random.RandomState(0)
  ids = rng.randint(0, vocab, (2, length))
  mask = np.ones((2, length), np.int64)
  mask[1, 17:] = 0
  return ids, mask


def _torch_logits(model, ids, mask):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


@pytest.mark.parametrize("rope", list(ROPE_SCALINGS))
def test_logits_match_transformers_for_each_rope_scaling(rope):
  scaling = ROPE_SCALINGS[rope]
  cfg = dataclasses.replace(CFG, rope_scaling=json.dumps(scaling) if scaling else "")
  model, params = _torch_pair(cfg)
  ids, mask = _batch(cfg.vocab_size)
  ours = np.asarray(Llama(cfg).apply({"params": params}, ids, mask))
  real = mask.astype(bool)
  np.testing.assert_allclose(ours[real], _torch_logits(model, ids, mask)[real], atol=LOGIT_TOL,
                             rtol=0)
  if scaling:  # the scaling must actually change the result, or this test proves nothing
    unscaled = np.asarray(Llama(CFG).apply({"params": params}, ids, mask))
    assert np.abs(unscaled - ours).max() > 1e-3


@pytest.mark.parametrize("change", [
    dict(num_kv_heads=1),                              # multi-query
    dict(num_kv_heads=4, head_dim=24),                 # MHA with head_dim != hidden / heads
    dict(tie_word_embeddings=True),
])
def test_logits_match_transformers_for_head_layouts(change):
  cfg = dataclasses.replace(CFG, **change)
  model, params = _torch_pair(cfg, seed=1)
  ids, mask = _batch(cfg.vocab_size)
  ours = np.asarray(Llama(cfg).apply({"params": params}, ids, mask))
  real = mask.astype(bool)
  np.testing.assert_allclose(ours[real], _torch_logits(model, ids, mask)[real], atol=LOGIT_TOL,
                             rtol=0)


def test_logits_match_transformers_across_causal_query_blocks():
  """300 tokens = blocks of 128, 128 and 44 queries, with a padded row."""
  assert 2 * CAUSAL_BLOCK < 300 < 3 * CAUSAL_BLOCK
  model, params = _torch_pair(CFG, seed=5)
  ids, mask = _batch(CFG.vocab_size, length=300)
  mask[1, 150:] = 0
  ours = np.asarray(Llama(CFG).apply({"params": params}, ids, mask))
  real = mask.astype(bool)
  np.testing.assert_allclose(ours[real], _torch_logits(model, ids, mask)[real], atol=LOGIT_TOL,
                             rtol=0)


def lm_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """HF causal-LM loss: position t predicts labels[t + 1]; -100 ignored; token mean."""
  logits, labels = logits[:, :-1], labels[:, 1:]
  valid = labels != -100
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
  return (nll * valid).sum() / valid.sum()


def test_lm_loss_gradients_match_torch():
  model, params = _torch_pair(CFG, seed=2)
  ids, mask = _batch(CFG.vocab_size, length=CAUSAL_BLOCK + 32)  # two causal query blocks
  labels = np.where(mask == 1, ids, -100)
  labels[:, :5] = -100
  out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
              labels=torch.tensor(labels))
  out.loss.backward()
  sd = dict(model.named_parameters())
  loss, grads = jax.value_and_grad(
      lambda p: lm_loss(Llama(CFG).apply({"params": p}, ids, mask), labels))(params)
  np.testing.assert_allclose(float(loss), out.loss.item(), rtol=1e-5)
  pairs = {
      "embed": (grads["embed_tokens"]["embedding"], sd["model.embed_tokens.weight"].grad),
      "lm_head": (grads["lm_head"]["kernel"], sd["lm_head.weight"].grad.T),
      "q_proj": (grads["layers_0"]["self_attn"]["q_proj"]["kernel"].reshape(64, 64),
                 sd["model.layers.0.self_attn.q_proj.weight"].grad.T),
      "k_proj": (grads["layers_1"]["self_attn"]["k_proj"]["kernel"].reshape(64, 32),
                 sd["model.layers.1.self_attn.k_proj.weight"].grad.T),
      "down_proj": (grads["layers_1"]["mlp"]["down_proj"]["kernel"],
                    sd["model.layers.1.mlp.down_proj.weight"].grad.T),
      "norm": (grads["norm"]["scale"], sd["model.norm.weight"].grad),
  }
  for name, (ours, ref) in pairs.items():
    ref = ref.numpy()
    rel = np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max()
    assert rel < GRAD_RTOL, (name, rel)


def _reference_attention(q, k, v, mask, causal):
  """Masked softmax attention differentiated by JAX, q [B, T, H, hd]; with `causal`, the
  same query blocks as `attend` (a row seeing no real key is uniform over its block's keys)."""
  group = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
  length = q.shape[1]
  step = CAUSAL_BLOCK if causal else length
  outs = []
  for start in range(0, length, step):
    end = min(start + step, length)
    keys = end if causal else k.shape[1]
    scores = jnp.einsum("bthd,bshd->bhts", q[:, start:end], k[:, :keys]) * q.shape[-1] ** -0.5
    scores = jnp.where(mask[:, None, start:end, :keys], scores, jnp.finfo(jnp.float32).min)
    outs.append(jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, -1), v[:, :keys]))
  return jnp.concatenate(outs, axis=1)


@pytest.mark.parametrize("causal,length", [(True, CAUSAL_BLOCK * 2 + 44), (False, 40)])
def test_attention_backward_matches_autodiff(causal, length):
  """The hand-written attention VJP (blocked, GQA) against autodiff of the plain softmax:
  right padding, and a row that sees no real key (sample 1 masks key 0)."""
  rng = np.random.RandomState(0)
  q = jnp.asarray(rng.randn(2, length, 4, 16), jnp.float32)
  k, v = (jnp.asarray(rng.randn(2, length, 2, 16), jnp.float32) for _ in range(2))
  key_mask = np.ones((2, length), bool)
  key_mask[0, length - 30:] = False
  key_mask[1, 0] = False
  positions = jnp.broadcast_to(jnp.arange(length), (2, length))
  mask = attention_mask_for(positions, jnp.asarray(key_mask))
  cot = jnp.asarray(rng.randn(2, length, 4, 16), jnp.float32)
  ours, ours_vjp = jax.vjp(lambda *a: attend(*a, mask, causal=causal), q, k, v)
  ref, ref_vjp = jax.vjp(lambda *a: _reference_attention(*a, mask, causal), q, k, v)
  np.testing.assert_allclose(ours, ref, atol=1e-5)
  for name, a, b in zip("qkv", ours_vjp(cot), ref_vjp(cot)):
    rel = float(jnp.abs(a - b).max() / jnp.abs(b).max())
    assert rel < 1e-5, (name, rel)


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_scan_and_remat_give_the_unscanned_logits_and_gradients(remat):
  _, params = _torch_pair(CFG, seed=3)
  ids, mask = _batch(CFG.vocab_size)
  labels = np.where(mask == 1, ids, -100)

  def loss(cfg, p):
    return lm_loss(Llama(cfg).apply({"params": p}, ids, mask), labels)

  scanned = dataclasses.replace(CFG, scan_layers=True, remat=remat)
  ref_loss, ref_grads = jax.value_and_grad(lambda p: loss(CFG, p))(params)
  got_loss, got_grads = jax.value_and_grad(lambda p: loss(scanned, p))(
      stack_layers(params, CFG.num_layers))
  np.testing.assert_allclose(float(got_loss), float(ref_loss), rtol=1e-6)
  ref_grads = stack_layers(jax.tree.map(np.asarray, ref_grads), CFG.num_layers)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), got_grads, ref_grads)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_kv_cache_prefill_and_steps_match_the_full_forward(scan_layers):
  """Right-padded prompts of different lengths, then one token per step with fixed shapes."""
  cfg = dataclasses.replace(CFG, scan_layers=scan_layers)
  _, params = _torch_pair(CFG, seed=4)
  if scan_layers:
    params = stack_layers(params, CFG.num_layers)
  rng = np.random.RandomState(1)
  full = rng.randint(0, cfg.vocab_size, (2, 20))
  lengths = np.array([12, 9])
  model = Llama(cfg)
  variables = {"params": params}
  prompt = full[:, :12] * (np.arange(12) < lengths[:, None])
  cache = init_cache(cfg, batch=2, length=20)

  def run(ids, mask, positions, cache):
    def fn(m):
      hidden, cache_out = m.hidden_states(m.embed(ids), mask, positions, cache)
      return m.logits(hidden), cache_out
    return model.apply(variables, method=fn)

  logits, cache = run(prompt, (np.arange(12) < lengths[:, None]).astype(np.int32), None, cache)
  expected = np.asarray(model.apply(variables, full, np.ones_like(full)))
  for b in range(2):
    np.testing.assert_allclose(logits[b, :lengths[b]], expected[b, :lengths[b]], atol=1e-5)
  positions = lengths.copy()
  for _ in range(6):
    tokens = full[np.arange(2), positions][:, None]
    step_logits, cache = run(tokens, np.ones((2, 1), np.int32), positions[:, None], cache)
    np.testing.assert_allclose(step_logits[:, 0], expected[np.arange(2), positions], atol=1e-5)
    positions = positions + 1


def test_every_parameter_has_logical_axes_known_to_the_rules():
  cfg = dataclasses.replace(CFG, scan_layers=True, remat="full")
  ids = np.zeros((1, 4), np.int32)
  boxed = jax.eval_shape(Llama(cfg).init, jax.random.key(0), ids, np.ones_like(ids))["params"]
  known = {name for name, _ in base.get_config().logical_axis_rules} | {"layers", None}
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  for leaf in leaves:
    assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= known, leaf.names
