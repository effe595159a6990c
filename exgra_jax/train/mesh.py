"""Device mesh from `config.mesh`: axes (data, fsdp, tensor), one of them may be -1.

Built with `jax.sharding.Mesh` so the axes are Auto: the logical-axis rules of
`config.logical_axis_rules` expect Auto axes (`jax.make_mesh` now defaults to Explicit).
"""
import math
from collections.abc import Mapping, Sequence

import jax
import ml_collections
import numpy as np

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the sample axis of every batch is split over these


def data_parallel_size(shape: Mapping[str, int]) -> int:
  """Batch shards of a mesh (`mesh.shape` or `mesh_shape`'s dict): data x fsdp."""
  return math.prod(shape[a] for a in BATCH_AXES)


def resolve_mesh_shape(sizes: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """(data, fsdp, tensor) with at most one -1 filled so the product is `num_devices`."""
  sizes = tuple(int(s) for s in sizes)
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))} must be positive or -1")
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"{num_devices} devices cannot fill mesh "
                       f"{dict(zip(MESH_AXES, sizes))}: {known} does not divide it")
    sizes = tuple(num_devices // known if s == -1 else s for s in sizes)
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} "
                     f"devices, have {num_devices}")
  return sizes


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
  """{axis: size} of `config.mesh` on `num_devices` devices (ValueError: why not)."""
  sizes = (mesh_config.data, mesh_config.fsdp, mesh_config.tensor)
  return dict(zip(MESH_AXES, resolve_mesh_shape(sizes, num_devices)))


def build_mesh(mesh_config: ml_collections.ConfigDict,
               devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """Mesh over `devices` (default: all global devices) shaped by `config.mesh`."""
  devices = list(jax.devices() if devices is None else devices)
  shape = tuple(mesh_shape(mesh_config, len(devices)).values())
  return jax.sharding.Mesh(np.asarray(devices).reshape(shape), MESH_AXES)
