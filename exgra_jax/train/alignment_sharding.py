"""The alignment loss computed where its samples are: one `shard_map` around GNN + solver.

Traced as a plain function inside the sharded step, the alignment's `pure_callback` is
lowered by the SPMD partitioner as one host call pinned to device 0: the costs of every
group on every chip are gathered there, one host solves the whole slice's problems and
the result is broadcast back, and every chip runs the GNN for all groups. Here the
alignment runs per device instead, in a `shard_map` over the training mesh:

- The micro-batch's samples are split over the batch axes (data x fsdp) as the batch is.
  A group of g samples lives on `span = max(1, g / per_shard)` consecutive batch shards
  (per_shard = samples per shard).
- span = 1: each device embeds its own groups with the GNN and solves their six problems
  (and the IMLE re-solves) in its own host callback; nothing leaves the device.
- span > 1: the group's samples are gathered among its `span` devices only, by span - 1
  collective permutes inside the group (an all-gather with device groups, which shard_map
  does not offer), and every one of those devices computes the group (a group is never
  split, so per-chip work is one group's whatever the slice size). Only the first device's
  copy enters the loss, so the gradient reaches each sample once, through the permutes.
- Every host thus solves the problems of its own chips: per-host work does not grow with
  the number of hosts. Tensor-parallel replicas compute the same groups.
- The noise and the dropout keys are drawn for all groups outside the `shard_map`
  (`align.loss.draw_noise`, `dropout_keys`) and handed to the devices of each group, so
  every group gets the same noise as in the unsharded loss and the results are the same
  (tested against `align.loss.multi_graph_alignment_loss`).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from exgra_jax.align import loss as align_loss
from exgra_jax.train.mesh import BATCH_AXES as BATCH, data_parallel_size


def group_span(group_size: int, micro_batch: int, batch_shards: int) -> int:
  """Batch shards that hold one group of `group_size` samples (1 = per-device groups).

  ValueError when groups cannot be laid on whole shards: a group must either fit a shard
  a whole number of times or cover a whole number of shards.
  """
  if micro_batch % batch_shards:
    raise ValueError(f"a micro-batch of {micro_batch} samples does not split over the "
                     f"{batch_shards} data x fsdp shards")
  per_shard = micro_batch // batch_shards
  if per_shard % group_size == 0:
    return 1
  if group_size % per_shard == 0 and micro_batch % group_size == 0:
    return group_size // per_shard
  raise ValueError(f"alignment groups of {group_size} samples cannot be laid on devices "
                   f"holding {per_shard} samples each ({batch_shards} shards): the group "
                   f"size must divide {per_shard} or be a multiple of it that divides "
                   f"{micro_batch}")


def gather_within_groups(x: jax.Array, span: int, shards: int) -> jax.Array:
  """Inside a shard_map over the batch axes: [b, ...] on each shard -> [span * b, ...], the
  blocks of the `span` consecutive shards of this shard's group, in shard order.

  Shift s brings each shard the block of the shard s places before it in its group
  (cyclically); shard m of a group then puts that block at position (m - s) mod span.
  """
  member = jax.lax.axis_index(BATCH) % span
  blocks = [x]
  for shift in range(1, span):
    perm = [(first + m, first + (m + shift) % span)
            for first in range(0, shards, span) for m in range(span)]
    blocks.append(jax.lax.ppermute(x, BATCH, perm))
  stacked = jnp.stack(blocks)                                # [span, b, ...] by shift
  order = (member - jnp.arange(span)) % span                 # shift holding position p
  return jnp.take(stacked, order, axis=0).reshape(span * x.shape[0], *x.shape[1:])


def make_sharded_alignment(settings: align_loss.AlignSettings, mesh: Mesh, group_size: int,
                           micro_batch: int):
  """An `AlignFn` (train/step.py) equal to `align.loss.multi_graph_alignment_loss` whose
  GNN and host solves run on the devices that hold each group (module doc)."""
  shards = data_parallel_size(mesh.shape)
  span = group_span(group_size, micro_batch, shards)

  def local(gnn_params, f_image, f_short, f_long, node, edge, dropout):
    def group(f):  # this shard's samples [b, d] -> its groups [G_local, g, d]
      if span > 1:
        f = gather_within_groups(f, span, shards)
      return f.reshape(-1, group_size, f.shape[-1])
    # Per-device code: the GNN's logical constraints (mesh-wide names) do not apply.
    with nn.logical_axis_rules(()):
      return align_loss.group_alignment(gnn_params, settings, group(f_image), group(f_short),
                                        group(f_long), node, edge, dropout)

  def per_shard(x: jax.Array, axis: int) -> jax.Array:
    """Group-indexed inputs [..., G, ...] -> one copy per device of its group's slice."""
    return jnp.repeat(x, span, axis=axis) if span > 1 else x

  def align_fn(gnn_params: Any, f_image: jax.Array, f_short: jax.Array, f_long: jax.Array,
               key: jax.Array, deterministic: bool = False
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    groups, g, width = f_image.shape
    if g != group_size or groups * g != micro_batch:
      raise ValueError(f"features {f_image.shape} are not [{micro_batch // group_size}, "
                       f"{group_size}, d] as this alignment was built for")
    noise_key, dropout_key = jax.random.split(key)
    node, edge = align_loss.draw_noise(noise_key, settings, groups, g)
    flat = lambda f: f.astype(jnp.float32).reshape(groups * g, width)
    by_group = lambda lead: P(*([None] * lead), BATCH)
    in_specs = (P(), P(BATCH), P(BATCH), P(BATCH), by_group(1), by_group(2))
    args = (gnn_params, flat(f_image), flat(f_short), flat(f_long), per_shard(node, 1),
            per_shard(edge, 2))
    if deterministic:
      fn = lambda *a: local(*a, None)
    else:
      fn, in_specs = local, in_specs + (by_group(2),)
      args += (per_shard(align_loss.dropout_keys(dropout_key, groups), 2),)
    per_modality, matchings = jax.shard_map(
        fn, mesh=mesh, in_specs=in_specs, out_specs=(by_group(1), by_group(2)))(*args)
    # With span > 1 each group came out of its `span` devices: keep the first copy.
    return align_loss.summarize(per_modality[:, ::span], matchings[:, :, ::span])

  return align_fn
