"""Ahead-of-time memory plan of a stage's train step on a mesh, with no weights allocated.

The state is abstract (`jax.eval_shape` of the boxed init, shardings from the logical axes),
the batch is `ShapeDtypeStruct`s with the batch sharding; the step is lowered and compiled
for the mesh (fake CPU devices set by the caller through XLA_FLAGS before jax starts) and
`compiled.memory_analysis()` gives per-device bytes. CPU compilation plans CPU buffers:
the figures are the XLA buffer assignment for that partitioning, a close guide to an
accelerator's but not identical (different fusion and layout).
"""
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from exgra_jax.models.config import LlavaConfig, num_image_tokens
from exgra_jax.models.llava import LlavaModel
from exgra_jax.train import mesh as mesh_lib, optimizer, sharded_state, sharding, step


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
  """Per-device bytes of the compiled step."""
  devices: int
  mesh: dict[str, int]
  samples_per_device: int
  sequence_length: int
  parameters: int
  argument_bytes: int
  output_bytes: int
  temp_bytes: int
  alias_bytes: int

  @property
  def peak_bytes(self) -> int:
    """Arguments + outputs + temporaries, minus outputs aliased onto donated arguments."""
    return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes


def abstract_batch(config: ml_collections.ConfigDict, batch_size: int, length: int,
                   mesh: jax.sharding.Mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """ShapeDtypeStructs of a global LM batch (docs/interfaces.md) on the batch sharding."""
  size = config.model.vision.image_size
  s = sharding.batch_sharding(mesh)
  shapes = {"pixel_values": ((batch_size, size, size, 3), jnp.float32),
            "input_ids": ((batch_size, length), jnp.int32),
            "attention_mask": ((batch_size, length), jnp.int32),
            "image_mask": ((batch_size, length), jnp.bool_),
            "labels": ((batch_size, length), jnp.int32),
            "sample_weight": ((batch_size,), jnp.float32)}
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=s) for k, (shape, dtype) in
          shapes.items()}


def plan_step_memory(config: ml_collections.ConfigDict, stage_name: str,
                     samples_per_device: int, length: int) -> MemoryPlan:
  """Compiles `stage_name`'s LM step for `config.mesh` over all devices; returns the plan."""
  stage = config[stage_name]
  model = LlavaModel(LlavaConfig.from_config(config.model))
  n = num_image_tokens(config.model)
  if length <= n:
    raise ValueError(f"sequence length {length} must exceed the {n} image tokens")
  mesh = mesh_lib.build_mesh(config.mesh)
  batch_size = samples_per_device * mesh.size
  image_size = config.model.vision.image_size

  def init():
    ids = jnp.zeros((1, length), jnp.int32)
    image_mask = jnp.zeros((1, length), bool).at[:, 1:1 + n].set(True)
    return model.init(jax.random.key(0), ids, ids, image_mask,
                      jnp.zeros((1, image_size, image_size, 3)))["params"]

  abstract_params = nn.unbox(jax.eval_shape(init))
  vocab = config.model.llm.vocab_size
  tx, schedule = optimizer.build_optimizer(abstract_params, config.optim, stage, 1000,
                                           tuple(range(vocab - 5, vocab)))
  abstract_state, shardings = sharded_state.state_shardings(init, tx, mesh,
                                                            config.logical_axis_rules)
  batch = abstract_batch(config, batch_size, length, mesh)
  train_step = sharded_state.jit_train_step(
      step.make_train_step(model, tx, schedule, micro_batches=stage.micro_batches),
      shardings, mesh, batch)
  state_arg = jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, shardings)
  analysis = train_step.lower(state_arg, batch).compile().memory_analysis()
  return MemoryPlan(
      devices=mesh.size, mesh=dict(mesh.shape), samples_per_device=samples_per_device,
      sequence_length=length,
      parameters=int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(abstract_params))),
      argument_bytes=analysis.argument_size_in_bytes, output_bytes=analysis.output_size_in_bytes,
      temp_bytes=analysis.temp_size_in_bytes, alias_bytes=analysis.alias_size_in_bytes)
