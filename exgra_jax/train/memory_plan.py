"""Ahead-of-time memory plan of a stage's train step on a mesh, with no weights allocated.

The step is the one training runs (`train.loop.build_stage`): in stage 2 it holds the two
alignment-text LLM passes, the GNN and the host-solver callback.

The state is abstract (`jax.eval_shape` of the boxed init, shardings from the logical axes),
the batch is `ShapeDtypeStruct`s with the batch sharding; the step is lowered and compiled
for the mesh (fake CPU devices set by the caller through XLA_FLAGS before jax starts) and
`compiled.memory_analysis()` gives per-device bytes. CPU compilation plans CPU buffers:
the figures are the XLA buffer assignment for that partitioning, a close guide to an
accelerator's but not identical (different fusion and layout).
"""
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from exgra_jax.models.config import num_image_tokens
from exgra_jax.train import checkpointing, loop, sharded_state, sharding
from exgra_jax.train import mesh as mesh_lib


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


def plan_step_memory(config: ml_collections.ConfigDict, stage_name: str,
                     samples_per_device: int, length: int) -> MemoryPlan:
  """Compiles `stage_name`'s real step (`train.loop.build_stage`: the alignment branch with
  its GNN and host callback included when the stage aligns) for `config.mesh` over all
  devices; returns the plan."""
  n = num_image_tokens(config.model)
  if length <= n:
    raise ValueError(f"sequence length {length} must exceed the {n} image tokens")
  mesh = mesh_lib.build_mesh(config.mesh)
  batch_size = samples_per_device * mesh.size
  config = config.copy_and_resolve_references()
  config[stage_name].global_batch = batch_size
  vocab = config.model.llm.vocab_size
  stage = loop.build_stage(config, stage_name, mesh, 1000 * batch_size,
                           tuple(range(vocab - 5, vocab)))
  batch = abstract_batch(config, batch_size, length, mesh, align=bool(stage.cfg.align))
  train_step = sharded_state.jit_train_step(stage.step_fn, stage.shardings, mesh,
                                            config.logical_axis_rules, batch)
  state_arg = checkpointing.abstract_with_shardings(stage.abstract_state, stage.shardings)
  analysis = train_step.lower(state_arg, batch).compile().memory_analysis()
  return MemoryPlan(
      devices=mesh.size, mesh=dict(mesh.shape), samples_per_device=samples_per_device,
      sequence_length=length,
      parameters=int(sum(np.prod(x.shape) for x in
                         jax.tree_util.tree_leaves(stage.abstract_state.params))),
      argument_bytes=analysis.argument_size_in_bytes, output_bytes=analysis.output_size_in_bytes,
      temp_bytes=analysis.temp_size_in_bytes, alias_bytes=analysis.alias_size_in_bytes)
