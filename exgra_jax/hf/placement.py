"""Where loaded parameters go: the model's abstract tree, target shardings, placement.

Shared by the HF importer and `weights/loading.py`. Nothing here allocates the
model: the expected tree comes from `jax.eval_shape` of `LlavaModel.init` (with the
logical axis names that `models/partitioning.py` turns into NamedShardings), a host array is
placed with `jax.make_array_from_callback` (each device gets only its shard, on any
number of hosts), and parameters a checkpoint lacks are initialised by a jitted init that
returns only them (XLA drops the rest of the model's initialisers).
"""
from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from flax import traverse_util

from exgra_jax.models.config import LlavaConfig
from exgra_jax.models.llava import init_boxed_params
from exgra_jax.models.partitioning import param_shardings

Path = tuple[str, ...]


def expected_params(cfg: LlavaConfig, mesh: jax.sharding.Mesh | None = None,
                    rules: Sequence[Sequence[Any]] | None = None
                    ) -> tuple[dict[Path, jax.ShapeDtypeStruct], dict[Path, jax.sharding.Sharding]]:
  """-> ({flat path: abstract leaf}, {flat path: target sharding}) of the model's params.

  With a mesh, shardings follow the logical axis names through `rules`; without one,
  every leaf goes to this process's first device.
  """
  boxed = jax.eval_shape(functools.partial(init_boxed_params, cfg), jax.random.key(0))
  abstract = traverse_util.flatten_dict(nn.unbox(boxed))
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return abstract, {path: device for path in abstract}
  if rules is None:
    raise ValueError("a mesh needs the logical axis rules (config.logical_axis_rules)")
  shardings = traverse_util.flatten_dict(param_shardings(boxed, mesh, rules))
  return abstract, shardings


def place(host: np.ndarray, sharding: jax.sharding.Sharding, path: Path) -> jax.Array:
  """A host array (the same on every process) -> a global jax.Array laid out as `sharding`."""
  try:
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
  except ValueError as e:  # e.g. a vocabulary that the mesh axis does not divide
    raise ValueError(f"cannot place {path_name(path)} {host.shape} with {sharding}: {e}. "
                     "Change the mesh or config.logical_axis_rules (or pad the vocabulary)"
                     ) from None


def init_leaves(cfg: LlavaConfig, paths: Iterable[Path],
                shardings: dict[Path, jax.sharding.Sharding], seed: int
                ) -> dict[Path, jax.Array]:
  """Fresh values of `paths` (as `LlavaModel.init` with PRNGKey(seed) makes them), sharded."""
  names = {"/".join(path): path for path in paths}
  if not names:
    return {}

  def subset(key: jax.Array) -> dict[str, jax.Array]:
    flat = traverse_util.flatten_dict(nn.unbox(init_boxed_params(cfg, key)))
    return {name: flat[path] for name, path in names.items()}

  out = jax.jit(subset, out_shardings={n: shardings[p] for n, p in names.items()})(
      jax.random.key(seed))
  return {names[name]: value for name, value in out.items()}


def path_name(path: Path) -> str:
  return "/".join(path)


def typed_config(model_config: ml_collections.ConfigDict | Mapping[str, Any]) -> LlavaConfig:
  """`config.model` (ConfigDict, or the JSON dict a checkpoint stores) -> LlavaConfig."""
  if not isinstance(model_config, ml_collections.ConfigDict):
    model_config = ml_collections.ConfigDict(dict(model_config))
  return LlavaConfig.from_config(model_config)
