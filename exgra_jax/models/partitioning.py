"""Logical axis names -> mesh shardings, for the params the models declare.

Why here: the models name their parameters' axes (`nn.with_logical_partitioning`); turning
those names into `NamedSharding`s is needed both by `train/` (the train state) and by the
weights layer (restoring a checkpoint straight into its target layout), which sits below
`train/`. Pure: no mesh or rules of its own, only what the caller passes.
"""
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax


def logical_rules(rules: Sequence[Sequence[Any]]) -> tuple[tuple[str, Any], ...]:
  """`config.logical_axis_rules` as the tuple of pairs flax expects (lists -> tuples)."""
  out = []
  for rule in rules:
    if len(rule) != 2:
      raise ValueError(f"logical axis rule {rule!r} is not a (logical, mesh axes) pair")
    name, axes = rule
    out.append((name, tuple(axes) if isinstance(axes, list) else axes))
  return tuple(out)


def param_shardings(boxed_params: Any, mesh: jax.sharding.Mesh,
                    rules: Sequence[Sequence[Any]]) -> Any:
  """Tree of NamedShardings for a tree of `nn.LogicallyPartitioned` (or abstract) params.

  Leaves without logical names are replicated.
  """
  specs = nn.get_partition_spec(boxed_params)
  return nn.logical_to_mesh_sharding(specs, mesh, logical_rules(rules))
