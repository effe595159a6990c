"""Ahead-of-time plan of a stage's train step on a mesh, with no weights allocated.

The step is the one training runs (`train.loop.build_stage`): in stage 2 it holds the two
alignment-text LLM passes, the GNN and the host-solver callbacks (per device, in a
`shard_map`), traced under the mesh and the logical-axis rules.

The state is abstract (`jax.eval_shape` of the boxed init, shardings from the logical axes),
the batch is `ShapeDtypeStruct`s with the batch sharding; the step is lowered and compiled
for a mesh over either
- fake CPU devices (set by the caller through XLA_FLAGS before jax starts): XLA:CPU's
  buffer assignment, a guide to an accelerator's but not identical; or
- the abstract chips of a TPU slice (`topology_devices("v5p:4x4x4")`, libtpu needed, no TPU):
  the real TPU compiler, whose peak per chip is what the slice would need, and which
  refuses programs that do not fit its HBM; or
- compile-only NVIDIA GPUs (`gpu_targets.topology_devices`, jax's CUDA plugin needed, no
  GPU): the real CUDA compiler with the project's GPU flags (`gpu_flags`), whose buffer
  assignment is what each GPU would need; it does not refuse what does not fit, the plan
  compares.
`plan_generation_memory` plans answering instead (the greedy decode every answering command
runs, weights as stored or weight-only int8 / int4 as `--quantize` loads them) on one device.
The compiled program is also read for what the partitioner made of it: collectives per kind
and where the host callbacks run (`callback_placement`).
"""
import collections
import contextlib
import dataclasses
import functools
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from exgra_jax.inference import generate
from exgra_jax.models import adapters, llava
from exgra_jax.models.config import LlavaConfig, num_image_tokens
from exgra_jax.models.llava import LlavaModel
from exgra_jax.train import gpu_flags, gpu_targets, loop, sharded_state, sharding, stage_checkpoints
from exgra_jax.train import mesh as mesh_lib


# HBM per chip by the device kind the TPU compiler reports (public chip specifications).
HBM_GIB = {"TPU v4": 32.0, "TPU v5 lite": 16.0, "TPU v5": 95.0, "TPU v5p": 95.0,
           "TPU v6 lite": 32.0, "TPU v6e": 32.0}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all",
               "collective-permute")


class LibtpuMissing(RuntimeError):
  """The TPU compiler (libtpu) is not installed in this environment."""


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
  """Per-device bytes and the shape of the compiled step.

  compiler_peak_bytes: the compiler's own peak per device (TPU reports it; None on CPU).
  collectives: count per kind in the compiled (partitioned) program.
  callback: "per_device" (every host transfer runs on its own device), "device0" (some
  pinned to one device) or "none" (no host callback in the step).
  cudnn_attention: fused cuDNN attention calls in the program (GPU; 0 elsewhere).
  """
  devices: int
  mesh: dict[str, int]
  samples_per_device: int
  sequence_length: int
  parameters: int
  argument_bytes: int
  output_bytes: int
  temp_bytes: int
  alias_bytes: int
  device_kind: str
  compiler_peak_bytes: int | None
  collectives: dict[str, int]
  callback: str
  cudnn_attention: int
  compile_seconds: float

  @property
  def peak_bytes(self) -> int:
    """The compiler's peak where it reports one, else arguments + outputs + temporaries
    minus outputs aliased onto donated arguments."""
    if self.compiler_peak_bytes:
      return self.compiler_peak_bytes
    return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes

  @property
  def device_memory_bytes(self) -> int | None:
    """Memory per chip of a known TPU kind (HBM_GIB) or per card of a known GPU kind
    (XLA's target files), else None."""
    if self.device_kind in HBM_GIB:
      return int(HBM_GIB[self.device_kind] * 2 ** 30)
    return gpu_targets.device_memory_bytes().get(self.device_kind)

  @property
  def usable_bytes(self) -> int | None:
    """What the step may use: a TPU's HBM; on a GPU the share jax preallocates
    (gpu_flags.MEMORY_FRACTION), the rest being CUDA's and its libraries'."""
    memory = self.device_memory_bytes
    if memory is None or self.device_kind in HBM_GIB:
      return memory
    return int(memory * gpu_flags.MEMORY_FRACTION)


def topology_devices(name: str) -> list:
  """The abstract chips of TPU slice `name` ("v5p:4x4x4", "v5e:4x4", ...), for compiling
  without a TPU. LibtpuMissing when the TPU compiler is not installed."""
  from jax.experimental import topologies
  try:
    return list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
  except (RuntimeError, ValueError) as e:
    message = str(e).lower()
    # jax 0.10 says "JAX TPU support not installed"; older ones named the missing plugin.
    if "tpu" in message and any(s in message for s in ("not installed", "plugin", "not found",
                                                        "unknown backend")):
      raise LibtpuMissing("the TPU compiler (libtpu) is not installed: "
                          "pip install -e '.[tpu]'") from e
    raise


def collective_counts(hlo: str) -> dict[str, int]:
  """Collective ops per kind in a compiled HLO text (async starts counted once)."""
  counts = collections.Counter(
      m.group(1) for m in re.finditer(r" (" + "|".join(COLLECTIVES) + r")(?:-start)?\(", hlo))
  return {kind: counts.get(kind, 0) for kind in COLLECTIVES}


def callback_placement(hlo: str) -> str:
  """Where the compiled program's host callbacks run (see MemoryPlan.callback).

  TPU lowers a callback to host send / recv ops (`is_host_transfer=true`), CPU and GPU to
  a python-callback custom call; either pinned to one device carries `maximal device=`.
  """
  transfers = [line for line in hlo.splitlines()
               if "is_host_transfer=true" in line
               or ("custom-call(" in line and "callback" in line)]
  if not transfers:
    return "none"
  return "device0" if any("maximal device=" in line for line in transfers) else "per_device"


def abstract_batch(config: ml_collections.ConfigDict, batch_size: int, length: int,
                   mesh: jax.sharding.Mesh, *, align: bool) -> dict[str, jax.ShapeDtypeStruct]:
  """ShapeDtypeStructs of a global batch (docs/interfaces.md) on the batch sharding; with
  `align` the two alignment texts of `data.text_max_length` tokens too."""
  size = config.model.vision.image_size
  text = config.data.text_max_length
  s = sharding.batch_sharding(mesh)
  shapes = {"pixel_values": ((batch_size, size, size, 3), jnp.float32),
            "input_ids": ((batch_size, length), jnp.int32),
            "attention_mask": ((batch_size, length), jnp.int32),
            "image_mask": ((batch_size, length), jnp.bool_),
            "labels": ((batch_size, length), jnp.int32),
            "sample_weight": ((batch_size,), jnp.float32)}
  if align:
    shapes.update({key: ((batch_size, text), jnp.int32)
                   for key in ("short_ids", "short_mask", "long_ids", "long_mask")})
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=s) for k, (shape, dtype) in
          shapes.items()}


def compile_step(config: ml_collections.ConfigDict, stage_name: str, samples_per_device: int,
                 length: int, devices: list | None = None):
  """(compiled step, its stage, mesh) of `stage_name`'s real step (`train.loop.build_stage`:
  the alignment branch with its GNN and host callbacks included when the stage aligns) for
  `config.mesh` over `devices` (default: all devices). GPU devices compile with the
  project's GPU flags, compile-only ones through `gpu_targets.compile_only_callbacks`.
  Settings that cannot work (a group size or batch the mesh does not divide) raise
  ValueError before anything is compiled."""
  n = num_image_tokens(config.model)
  if length <= n:
    raise ValueError(f"sequence length {length} must exceed the {n} image tokens")
  mesh = mesh_lib.build_mesh(config.mesh, devices)
  batch_size = samples_per_device * mesh_lib.data_parallel_size(mesh.shape)
  config = config.copy_and_resolve_references()
  config[stage_name].global_batch = batch_size * config[stage_name].micro_batches
  vocab = config.model.llm.vocab_size
  stage = loop.build_stage(config, stage_name, mesh, 1000 * batch_size,
                           tuple(range(vocab - 5, vocab)))
  batch = abstract_batch(config, config[stage_name].global_batch, length, mesh,
                         align=bool(stage.cfg.align))
  train_step = sharded_state.jit_train_step(stage.step_fn, stage.shardings, mesh,
                                            config.logical_axis_rules, batch)
  state_arg = stage_checkpoints.abstract_with_shardings(stage.abstract_state, stage.shardings)
  gpu = mesh.devices.flat[0].platform == "gpu"
  with gpu_targets.compile_only_callbacks() if gpu else contextlib.nullcontext():
    compiled = train_step.lower(state_arg, batch).compile(
        gpu_flags.XLA_GPU_FLAGS if gpu else None)
  return compiled, stage, mesh


def _plan(compiled, mesh: jax.sharding.Mesh, samples_per_device: int, length: int,
          parameters: int, seconds: float, hlo_out: str) -> MemoryPlan:
  """The MemoryPlan of a compiled program on `mesh`; `hlo_out` also writes its HLO text."""
  analysis = compiled.memory_analysis()
  hlo = compiled.as_text()
  if hlo_out:
    with open(hlo_out, "w") as f:
      f.write(hlo)
  return MemoryPlan(
      devices=mesh.size, mesh=dict(mesh.shape), samples_per_device=samples_per_device,
      sequence_length=length, parameters=parameters,
      argument_bytes=analysis.argument_size_in_bytes, output_bytes=analysis.output_size_in_bytes,
      temp_bytes=analysis.temp_size_in_bytes, alias_bytes=analysis.alias_size_in_bytes,
      device_kind=mesh.devices.flat[0].device_kind,
      compiler_peak_bytes=getattr(analysis, "peak_memory_in_bytes", None) or None,
      collectives=collective_counts(hlo), callback=callback_placement(hlo),
      cudnn_attention=gpu_targets.cudnn_attention_count(hlo), compile_seconds=seconds)


def _count(tree: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def plan_step_memory(config: ml_collections.ConfigDict, stage_name: str,
                     samples_per_device: int, length: int, devices: list | None = None,
                     hlo_out: str = "") -> MemoryPlan:
  """Compiles the step (`compile_step`) and returns its plan; `hlo_out` also writes the
  compiled HLO text there. With `<stage>.lora` the step is the adapter step training runs
  (`build_stage`: adapters, a bf16 / int8 / int4 frozen base, optimizer state for the
  trainable leaves only); `parameters` then counts the base, the adapters and the GNN."""
  start = time.perf_counter()
  compiled, stage, mesh = compile_step(config, stage_name, samples_per_device, length,
                                       devices)
  return _plan(compiled, mesh, samples_per_device, length,
               _count(stage.abstract_state.params), time.perf_counter() - start, hlo_out)


def compile_generation(config: ml_collections.ConfigDict, quantize: str, batch: int,
                       length: int, max_new_tokens: int, device: Any):
  """(compiled answering program, float parameter count, one-device mesh): the greedy
  `eval.generate.decode_batch` every answering command runs (prefill of `batch` prompts of
  `length` tokens with their images [batch, S, S, 3], then `max_new_tokens` decode steps on
  a KV cache of length + max_new_tokens) for `config.model`, with its weights as the
  answering loader holds them: `config.model.param_dtype`, and with `quantize` (int8 | int4)
  the LLM's projections weight-only quantized (`models.adapters.quantized_model` +
  `quantize_params`, traced abstractly: nothing is allocated), all on `device`."""
  model = LlavaModel(LlavaConfig.from_config(config.model))
  params = jax.eval_shape(lambda: nn.unbox(llava.init_boxed_params(model.cfg,
                                                                   jax.random.key(0))))
  parameters = _count(params)
  if quantize:
    model = adapters.quantized_model(model, quantize)
    params = jax.eval_shape(functools.partial(adapters.quantize_params, model), params)
  size = config.model.vision.image_size
  args = (params, jax.ShapeDtypeStruct((batch, length), jnp.int32),
          jax.ShapeDtypeStruct((batch, length), jnp.int32),
          jax.ShapeDtypeStruct((batch, length), jnp.bool_),
          jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32),
          jax.eval_shape(lambda: jax.random.key(0)))
  mesh = jax.sharding.Mesh(np.array([device]), ("replica",))
  on_device = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  vocab = config.model.llm.vocab_size
  answer = jax.jit(functools.partial(generate.decode_batch, model,
                                     max_new_tokens=max_new_tokens, temperature=0.0,
                                     eos_id=vocab - 1, pad_id=vocab - 2),
                   in_shardings=on_device, out_shardings=on_device)
  gpu = device.platform == "gpu"
  compiled = answer.lower(*args).compile(gpu_flags.XLA_GPU_FLAGS if gpu else None)
  return compiled, parameters, mesh


def plan_generation_memory(config: ml_collections.ConfigDict, quantize: str, batch: int,
                           length: int, max_new_tokens: int, device: Any,
                           hlo_out: str = "") -> MemoryPlan:
  """Compiles answering on one device (`compile_generation`) and returns its plan
  (samples_per_device = batch, sequence_length = prompt length)."""
  start = time.perf_counter()
  compiled, parameters, mesh = compile_generation(config, quantize, batch, length,
                                                  max_new_tokens, device)
  return _plan(compiled, mesh, batch, length, parameters, time.perf_counter() - start,
               hlo_out)
