r"""Stage-2 train step: where the time goes, and what alignment would cost at 7B.

    python benchmarks/bench_step.py [--batch=16] [--group=8] [--length=256]

Part 1 (tiny preset, measured): the LM-only and the LM + alignment steps are built by
`train.loop.build_stage` from the demo config (the real sharded step) on the same random
batch, compiled once, then timed alternately (`--rounds` rounds of `--steps` steps) so that
machine load hits both alike. The split: LM step; alignment on device (the two extra text
passes, GNN, costs: the difference of the steps minus the host time); host callbacks
(forward solve + IMLE re-solve, from `align.imle.SOLVER_CLOCK`). Model-FLOPs utilisation
is XLA's FLOP count of each compiled step over its time, against an fp32 matmul timed in
the same run.

Part 2 (7B, measured + paper estimate): the alignment module alone at the release's
shapes (features of width 4096, one group of 16, GNN width 4096, the twelve solves) is
timed here, its host solves taken as measured and its device FLOPs (XLA count) priced at
40 % of an H100's bf16 peak (about 400 TFLOP/s), against the 7B stage-2 step's FLOPs per
device (6 N per trained token for the conversation and both alignment texts, 2 N per
vision token) at the same rate.
"""
import functools
import statistics
import time

import flax.linen as nn
import jax
import numpy as np
from absl import app
from absl import flags

from exgra_jax import run_config
from exgra_jax.align import imle
from exgra_jax.align import loss as align_loss
from exgra_jax.models.config import LlavaConfig, num_image_tokens
from exgra_jax.models import llava
from exgra_jax.train import loop, mesh as mesh_lib, sharded_state, sharding

_BATCH = flags.DEFINE_integer("batch", 16, "Global batch.")
_GROUP = flags.DEFINE_integer("group", 8, "Samples per alignment graph.")
_LENGTH = flags.DEFINE_integer("length", 256, "Tokens per sample.")
_TEXT = flags.DEFINE_integer("text_length", 64, "Tokens of each alignment text.")
_STEPS = flags.DEFINE_integer("steps", 5, "Steps per timed round.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Alternating rounds.")
_H100_FLOPS = 400e12  # 40 % of an H100's ~990 TFLOP/s dense bf16 peak


def random_batch(config, batch: int, length: int, text_length: int, vocab: int) -> dict:
  rng = np.random.default_rng(0)
  n = num_image_tokens(config.model)
  size = config.model.vision.image_size
  ids = rng.integers(8, vocab, (batch, length)).astype(np.int32)
  image_mask = np.zeros((batch, length), bool)
  image_mask[:, 2:2 + n] = True
  labels = np.where(np.arange(length) > n + 2, ids, -100).astype(np.int32)
  return {"pixel_values": rng.normal(size=(batch, size, size, 3)).astype(np.float32),
          "input_ids": ids, "attention_mask": np.ones((batch, length), np.int32),
          "image_mask": image_mask, "labels": labels,
          "short_ids": rng.integers(8, vocab, (batch, text_length)).astype(np.int32),
          "short_mask": np.ones((batch, text_length), np.int32),
          "long_ids": rng.integers(8, vocab, (batch, text_length)).astype(np.int32),
          "long_mask": np.ones((batch, text_length), np.int32),
          "sample_weight": np.ones((batch,), np.float32)}


def compiled_step(config, align: bool, mesh, batch):
  config = config.copy_and_resolve_references()
  config.stage2.align = align
  config.stage2.global_batch = batch["input_ids"].shape[0]
  stage = loop.build_stage(config, "stage2", mesh, 10_000, tuple(range(5)))
  state = sharded_state.init_sharded_state(stage.init_boxed_params, stage.tx, 0,
                                           stage.shardings, mesh, config.logical_axis_rules)
  keys = tuple(k for k in batch if align or not k.startswith(("short", "long")))
  step = sharded_state.jit_train_step(stage.step_fn, stage.shardings, mesh,
                                      config.logical_axis_rules, keys)
  device_batch = sharding.global_batch({k: batch[k] for k in keys}, mesh)
  flops = step.lower(state, device_batch).compile().cost_analysis()["flops"]
  state, metrics = step(state, device_batch)   # compile + first run
  jax.block_until_ready(metrics)
  return step, state, device_batch, flops


def matmul_flops_per_s(size: int = 1024, repeats: int = 20) -> float:
  a = jax.random.normal(jax.random.key(0), (size, size))
  matmul = jax.jit(lambda x: x @ x)
  jax.block_until_ready(matmul(a))
  start = time.perf_counter()
  for _ in range(repeats):
    out = matmul(a)
  jax.block_until_ready(out)
  return 2 * size ** 3 * repeats / (time.perf_counter() - start)


def timed(step, state, batch, steps: int):
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  return state, (time.perf_counter() - start) / steps


def tiny_split() -> None:
  config = run_config.load("configs/demo.py", [])
  config.align.grouping, config.align.group_size = "fixed", _GROUP.value
  mesh = mesh_lib.build_mesh(config.mesh)
  batch = random_batch(config, _BATCH.value, _LENGTH.value, _TEXT.value,
                       config.model.llm.vocab_size)
  lm = list(compiled_step(config, False, mesh, batch))
  al = list(compiled_step(config, True, mesh, batch))
  lm_times, al_times, solver, matmul = [], [], [], []
  for _ in range(_ROUNDS.value):
    matmul.append(matmul_flops_per_s())
    lm[1], t = timed(lm[0], lm[1], lm[2], _STEPS.value)
    lm_times.append(t)
    imle.SOLVER_CLOCK.take()
    al[1], t = timed(al[0], al[1], al[2], _STEPS.value)
    al_times.append(t)
    solver.append(imle.SOLVER_CLOCK.take()["solver_seconds"] / _STEPS.value)
  lm_s, al_s = statistics.median(lm_times), statistics.median(al_times)
  host_s, rate = statistics.median(solver), statistics.median(matmul)
  groups = _BATCH.value // _GROUP.value
  print(f"tiny stage 2: devices={jax.device_count()} batch={_BATCH.value} "
        f"length={_LENGTH.value} texts={_TEXT.value} groups={groups}x{_GROUP.value} "
        f"solves/step={2 * 6 * groups}; fp32 matmul {rate / 1e9:.1f} GFLOP/s")
  print("| part | median ms | share of the alignment step | FLOP/s vs matmul |")
  print("|---|---|---|---|")
  print(f"| LM step | {lm_s * 1e3:.1f} | {lm_s / al_s:.2f} | {lm[3] / lm_s / rate:.2f} |")
  device_s = al_s - lm_s - host_s
  print(f"| alignment on device | {device_s * 1e3:.1f} | {device_s / al_s:.2f} | |")
  print(f"| host callbacks | {host_s * 1e3:.1f} | {host_s / al_s:.2f} | |")
  print(f"| LM + alignment step | {al_s * 1e3:.1f} | 1.00 | {al[3] / al_s / rate:.2f} |")


def parameter_counts(model_config) -> dict[str, int]:
  """Parameters per top-level collection of the model, from shapes alone (nothing allocated)."""
  shapes = jax.eval_shape(functools.partial(llava.init_boxed_params,
                                            LlavaConfig.from_config(model_config)),
                          jax.random.key(0))
  return {name: sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(nn.unbox(tree)))
          for name, tree in shapes.items()}


def seven_b_estimate() -> None:
  settings = align_loss.AlignSettings(gnn_width=4096)
  d, g = 4096, 16
  feats = jax.random.normal(jax.random.key(0), (3, 1, g, d))
  params = nn.unbox(align_loss.init_gnn_params(jax.random.key(1), settings, d))
  fn = jax.jit(jax.value_and_grad(lambda p, f: align_loss.multi_graph_alignment_loss(
      p, *f, jax.random.key(2), settings)[0], argnums=(0, 1)))
  flops = fn.lower(params, feats).compile().cost_analysis()["flops"]
  jax.block_until_ready(fn(params, feats))
  imle.SOLVER_CLOCK.take()
  start = time.perf_counter()
  for _ in range(_STEPS.value):
    out = fn(params, feats)
  jax.block_until_ready(out)
  cpu_s = (time.perf_counter() - start) / _STEPS.value
  host_s = imle.SOLVER_CLOCK.take()["solver_seconds"] / _STEPS.value
  m = run_config.load("configs/pmc10.py", []).model
  counts = parameter_counts(m)
  samples, length, text = 16, 512, 128
  step_flops = samples * (6 * counts["llm"] * (length + 2 * text) + 2 * counts["vision"]
                          * (m.vision.image_size // m.vision.patch_size) ** 2)
  step_s = step_flops / _H100_FLOPS
  align_s = flops / _H100_FLOPS + host_s
  print(f"\n7B stage 2 per device (16 samples x {length} tokens + 2 x {text}-token texts): "
        f"{step_flops / 1e12:.0f} TFLOP -> {step_s:.2f} s at 400 TFLOP/s")
  print("| alignment module (d=4096, g=16, 12 solves) | value |")
  print("|---|---|")
  print(f"| measured here on CPU, whole module | {cpu_s * 1e3:.1f} ms |")
  print(f"| of which host solves (measured) | {host_s * 1e3:.1f} ms |")
  print(f"| device FLOPs (XLA count) at 400 TFLOP/s | {flops / _H100_FLOPS * 1e3:.3f} ms |")
  print(f"| overhead vs the 7B step, solves not overlapped | {align_s / step_s * 100:.2f} % |")


def main(argv):
  del argv
  tiny_split()
  seven_b_estimate()


if __name__ == "__main__":
  app.run(main)
