"""One LLaMA training step (forward + backward, fp32, CPU): Flax vs transformers' PyTorch.

Same config, same batch, same process, steps interleaved. Prints step time of each, the throughput ratio,
the achieved model FLOP/s of each and its fraction of the FLOP/s of an XLA f32 matmul
measured in the same run (the largest matmul shape of the model: tokens x d x mlp).

Model FLOPs per step = 3 x forward (backward = 2x forward): 2 x tokens x (matmul
parameters) + 4 x layers x batch x T^2 x heads x head_dim (scores and values over all
T x T pairs, as both implementations compute them).

    python -m benchmarks.bench_model --layers=4 --hidden=512 --seq=512 --batch=4
"""
import os
import statistics
import time

from absl import app, flags

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import linen as nn

from exgra_jax.models.config import LlmConfig
from exgra_jax.models.llama import Llama

FLAGS = flags.FLAGS
flags.DEFINE_integer("layers", 4, "decoder layers")
flags.DEFINE_integer("hidden", 512, "model width")
flags.DEFINE_integer("heads", 8, "attention heads")
flags.DEFINE_integer("kv_heads", 8, "key/value heads")
flags.DEFINE_integer("mlp", 1376, "SwiGLU width")
flags.DEFINE_integer("vocab", 32000, "vocabulary")
flags.DEFINE_integer("seq", 512, "tokens per sample")
flags.DEFINE_integer("batch", 4, "samples per step")
flags.DEFINE_integer("steps", 5, "timed rounds, each runs every step once (median reported)")
flags.DEFINE_integer("warmup", 2, "untimed steps (compilation, allocator warm-up)")
flags.DEFINE_enum("remat", "none", ["none", "full", "dots"], "Flax remat policy")
flags.DEFINE_bool("scan", False, "scan the Flax decoder layers")


def _interleaved_median_seconds(steps: dict, rounds: int, warmup: int) -> dict:
  """Median seconds of each step function, run alternately so that load drift (the
  machine is shared) hits every implementation alike."""
  for _ in range(warmup):
    for fn in steps.values():
      fn()
  times = {name: [] for name in steps}
  for _ in range(rounds):
    for name, fn in steps.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def model_flops(cfg: LlmConfig, batch: int, seq: int) -> float:
  """Training FLOPs of one step (3 x forward), see module docstring."""
  hd = cfg.resolved_head_dim
  per_layer = cfg.hidden_size * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + (
      3 * cfg.hidden_size * cfg.intermediate_size)
  matmul_params = cfg.num_layers * per_layer + cfg.hidden_size * cfg.vocab_size
  tokens = batch * seq
  attention = 4 * cfg.num_layers * batch * seq * seq * cfg.num_heads * hd
  return 3.0 * (2.0 * tokens * matmul_params + attention)


def lm_loss(logits: jax.Array, ids: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy over the T-1 predicted positions (as HF's loss).

  Shifts the targets rather than slicing the [B, T, V] logits, which would copy them.
  """
  targets = jnp.concatenate([ids[:, 1:], ids[:, :1]], axis=1)
  nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(
      logits, targets[..., None], axis=-1)[..., 0]
  return nll[:, :-1].mean()


def flax_step(cfg: LlmConfig, params, ids: np.ndarray):
  """A callable running one jitted forward + backward of the Flax model to completion."""
  model = Llama(cfg)
  mask = jnp.ones_like(ids)

  @jax.jit
  def step(p, ids):
    return jax.value_and_grad(lambda q: lm_loss(model.apply({"params": q}, ids, mask), ids))(p)

  ids = jnp.asarray(ids)
  return lambda: jax.block_until_ready(step(params, ids))


def torch_step(model: torch.nn.Module, ids: np.ndarray):
  """A callable running one forward + backward of the PyTorch model."""
  ids = torch.tensor(ids)

  def step():
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()

  return step


def matmul_step(m: int, k: int, n: int, repeats: int = 10):
  """A callable running `repeats` jitted f32 [m, k] x [k, n] matmuls (long enough that one
  scheduling hiccup does not dominate); and their FLOPs."""
  a = jax.random.normal(jax.random.key(0), (m, k), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (k, n), jnp.float32)
  matmul = jax.jit(jnp.matmul)

  def run():
    for _ in range(repeats):
      matmul(a, b).block_until_ready()

  return run, 2.0 * m * k * n * repeats


def main(argv):
  del argv
  cfg = LlmConfig(vocab_size=FLAGS.vocab, hidden_size=FLAGS.hidden,
                  intermediate_size=FLAGS.mlp, num_layers=FLAGS.layers, num_heads=FLAGS.heads,
                  num_kv_heads=FLAGS.kv_heads, max_position_embeddings=max(FLAGS.seq, 2048),
                  remat=FLAGS.remat, scan_layers=FLAGS.scan)
  torch.manual_seed(0)
  torch_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
      intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      max_position_embeddings=cfg.max_position_embeddings)).train()
  ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (FLAGS.batch, FLAGS.seq))
  params = nn.unbox(Llama(cfg).init(jax.random.key(0), ids[:1, :8],
                                    np.ones((1, 8), np.int32))["params"])

  flops = model_flops(cfg, FLAGS.batch, FLAGS.seq)
  matmul, matmul_flops = matmul_step(FLAGS.batch * FLAGS.seq, cfg.hidden_size,
                                     cfg.intermediate_size)
  seconds = _interleaved_median_seconds(
      {"pytorch": torch_step(torch_model, ids), "flax": flax_step(cfg, params, ids),
       "matmul": matmul}, FLAGS.steps, FLAGS.warmup)
  matmul_rate = matmul_flops / seconds["matmul"]
  t_torch = seconds["pytorch"]
  load = os.getloadavg()[0]
  print(f"LLaMA train step (fwd+bwd, fp32, CPU): layers={cfg.num_layers} d={cfg.hidden_size} "
        f"heads={cfg.num_heads}/{cfg.num_kv_heads} mlp={cfg.intermediate_size} "
        f"vocab={cfg.vocab_size} batch={FLAGS.batch} seq={FLAGS.seq} remat={cfg.remat} "
        f"scan={cfg.scan_layers}")
  print(f"jax {jax.__version__} ({jax.device_count()} CPU device), torch "
        f"{torch.__version__} ({torch.get_num_threads()} threads), load avg {load:.2f}")
  print(f"model FLOPs / step: {flops / 1e9:.1f} G; XLA f32 matmul "
        f"[{FLAGS.batch * FLAGS.seq}x{cfg.hidden_size}]x[{cfg.hidden_size}x"
        f"{cfg.intermediate_size}]: {matmul_rate / 1e9:.1f} GFLOP/s")
  print(f"{'impl':<10}{'step s':>10}{'GFLOP/s':>10}{'of matmul':>11}{'speed vs torch':>16}")
  for name in ("pytorch", "flax"):
    rate = flops / seconds[name]
    print(f"{name:<10}{seconds[name]:>10.3f}{rate / 1e9:>10.1f}{rate / matmul_rate:>10.0%}"
          f"{t_torch / seconds[name]:>15.2f}x")


if __name__ == "__main__":
  app.run(main)
