"""Each `model.attention` choice against today's attention, `llama.attend` (fp32, CPU).

splash runs in Pallas interpret mode; cuDNN cannot run here, so its entry in
`attention.FUSED` is swapped for the same `jax.nn.dot_product_attention` call with
implementation="xla" (only that argument differs). Shapes are tiny but cover GQA (4 query
heads on 2 K/V heads), right padding, a sample without any real token, a length that is
not a multiple of the kernel's 128 (splash pads it) and two of today's causal query blocks.
"""
import dataclasses
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from configs import base
from exgra_jax.models import attention
from exgra_jax.models.config import LlavaConfig, LlmConfig
from exgra_jax.models.llama import (CAUSAL_BLOCK, Llama, attend, attention_mask_for,
                                    causal_attention)
from exgra_jax.train import sharding

TOL = 1e-5  # values: max-abs; gradients: max-abs error / max-abs gradient (both asserted)
CHOICES = ("xla", "splash", "cudnn")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = LlmConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                num_kv_heads=2, max_position_embeddings=256, scan_layers=True, remat="full")


@pytest.fixture(autouse=True)
def cudnn_call_on_xla(monkeypatch):
  """`cudnn` runs the cuDNN path's call with implementation="xla" (no GPU here)."""
  monkeypatch.setitem(attention.FUSED, "cudnn", functools.partial(
      attention.dot_product_attention, implementation="xla"))


def _rel(a, b) -> float:
  return float(jnp.abs(a - b).max() / jnp.abs(b).max())


def test_auto_is_todays_attention_on_cpu():
  assert attention.platform() == "cpu"
  for dtype in ("float32", "bfloat16"):
    assert attention.resolve("auto", dtype) == "xla"
    for choice in CHOICES:
      assert attention.resolve(choice, dtype) == choice
  model = base.get_config().model
  assert model.attention == "auto"
  assert LlavaConfig.from_config(model).llm.attention == "auto"


@pytest.mark.parametrize("choice", CHOICES)
def test_each_choice_equals_todays_attention(choice):
  """Values and q / k / v gradients vs `attend`; rows without a real key are zeros."""
  batch, length = 3, CAUSAL_BLOCK + 72
  rng = np.random.RandomState(0)
  q = jnp.asarray(rng.randn(batch, length, 4, 16), jnp.float32)
  k, v = (jnp.asarray(rng.randn(batch, length, 2, 16), jnp.float32) for _ in range(2))
  key_mask = np.ones((batch, length), bool)
  key_mask[1, 150:] = False
  key_mask[2] = False  # no real token: every row sees no real key
  mask = attention_mask_for(jnp.broadcast_to(jnp.arange(length), (batch, length)),
                            jnp.asarray(key_mask))
  sees = key_mask[:, :1, None, None]  # right padding: a row sees a real key iff key 0 is one
  cot = jnp.asarray(rng.randn(batch, length, 4, 16), jnp.float32)
  vjp = jax.jit(lambda f, cot, *a: (f(*a), jax.vjp(f, *a)[1](cot)), static_argnums=0)
  ours, ours_grads = vjp(lambda *a: causal_attention(*a, mask, choice), cot, q, k, v)
  ref, ref_grads = vjp(lambda *a: attend(*a, mask, causal=True), jnp.where(sees, cot, 0),
                       q, k, v)
  np.testing.assert_allclose(ours, jnp.where(sees, ref, 0), atol=TOL, rtol=0)
  for name, a, b in zip("qkv", ours_grads, ref_grads):
    assert _rel(a, b) < TOL, (name, _rel(a, b))


def model_loss(cfg: LlmConfig, ids: np.ndarray, mask: np.ndarray, params) -> jax.Array:
  logits = Llama(cfg).apply({"params": params}, ids, mask)
  return jnp.mean(jnp.where(mask[..., None] == 1, logits, 0) ** 2)


@pytest.fixture(scope="module")
def model_batch():
  """(ids, mask, params, loss and gradients of the xla choice): two rows, one padded."""
  rng = np.random.RandomState(1)
  ids = rng.randint(0, CFG.vocab_size, (2, 136))
  mask = np.ones_like(ids)
  mask[1, 90:] = 0
  params = jax.jit(lambda key: Llama(CFG).init(key, ids, mask)["params"])(jax.random.key(0))
  return ids, mask, params, jax.jit(jax.value_and_grad(
      functools.partial(model_loss, CFG, ids, mask)))(params)


@pytest.mark.parametrize("choice", ["splash", "cudnn"])
def test_model_loss_and_gradients_equal_the_xla_choice(choice, model_batch):
  """The whole decoder (scanned, rematerialised: the 7B layout) with each choice."""
  ids, mask, params, (ref_loss, ref_grads) = model_batch
  cfg = dataclasses.replace(CFG, attention=choice)
  loss, grads = jax.jit(jax.value_and_grad(functools.partial(model_loss, cfg, ids, mask)))(
      params)
  assert abs(float(loss) - float(ref_loss)) <= TOL * abs(float(ref_loss))
  rels = jax.tree_util.tree_leaves_with_path(jax.tree.map(_rel, grads, ref_grads))
  path, worst = max(rels, key=lambda item: item[1])
  assert worst < TOL, (jax.tree_util.keystr(path), worst)


def test_splash_on_a_mesh_runs_in_shard_map_and_equals_xla():
  """4 fake CPU devices (a subprocess), data=2 x tensor=2 under the base logical rules."""
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "tests", "models_attention_sharded_run.py")],
      capture_output=True, text=True, cwd=ROOT, timeout=300, check=False,
      env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["devices"] == 4 and result["manual_computations"] > 0
  assert result["loss_rel"] < TOL and result["grad_rel"] < TOL, result


def test_splash_shards_batch_and_heads_where_they_divide():
  mesh = jax.sharding.AbstractMesh((2, 1, 2), ("data", "fsdp", "tensor"))
  with nn.logical_axis_rules(sharding.logical_rules(base.get_config().logical_axis_rules)):
    assert attention.splash_specs(mesh, (4, 8, 4, 16), (4, 8, 2, 16)) == (
        P(("data", "fsdp"), None, "tensor", None),) * 2
    # one sample (init) and one K/V head (MQA) do not divide: left whole
    assert attention.splash_specs(mesh, (1, 8, 4, 16), (1, 8, 1, 16)) == (P(*[None] * 4),) * 2
  # no logical rules: replicated
  assert attention.splash_specs(mesh, (4, 8, 4, 16), (4, 8, 2, 16)) == (P(*[None] * 4),) * 2


def test_config_checks_the_choice():
  with pytest.raises(ValueError, match="attention='flash'"):
    LlavaConfig(llm=LlmConfig(attention="flash"))
  with pytest.raises(ValueError, match="cudnn' needs dtype bfloat16"):
    LlavaConfig(llm=LlmConfig(attention="cudnn"))
  model = base.get_config().model
  model.attention = "splash"
  saved = LlavaConfig.from_config(model).to_dict()
  assert saved["attention"] == "splash"
  del saved["attention"]  # a checkpoint written before the field existed
  assert LlavaConfig.from_config(ml_collections.ConfigDict(saved)).llm.attention == "auto"
