"""NamedShardings of the train state (from the params' logical axis names) and the batch,
and the context under which the models' activation constraints take effect.

`nn.with_logical_constraint` is a no-op unless it is traced with a mesh and logical-axis
rules in context: without them XLA picks activation layouts by itself and, on a large
slice, keeps the whole global batch on every chip (the 7B stage-2 step compiled for
v5p:4x4x4 needed 72.5 GiB per chip that way, 12.8 GiB with the constraints honoured).
Every jitted program of the project (init, train step, generation) is therefore traced
inside `mesh_and_rules` (`traced_under`).
"""
import contextlib
from collections.abc import Callable, Iterator, Sequence
import functools
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import NamedSharding, PartitionSpec

from exgra_jax.models.partitioning import logical_rules, param_shardings  # noqa: F401 (re-exported)
from exgra_jax.train.mesh import BATCH_AXES, data_parallel_size


@contextlib.contextmanager
def mesh_and_rules(mesh: jax.sharding.Mesh, rules: Sequence[Sequence[Any]]) -> Iterator[None]:
  """Traces inside this context see `mesh` (as the abstract mesh flax reads) and `rules`.

  The abstract mesh (not `jax.set_mesh`, which is refused inside `jax.jit`) so that it can
  be entered from within a trace.
  """
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(
      logical_rules(rules)):
    yield


def traced_under(fn: Callable, mesh: jax.sharding.Mesh, rules: Sequence[Sequence[Any]]
                 ) -> Callable:
  """`fn` whose body runs inside `mesh_and_rules`: jit it, and its trace holds the
  models' logical sharding constraints whoever calls it and wherever."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with mesh_and_rules(mesh, rules):
      return fn(*args, **kwargs)
  return wrapped


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (sample) axis split over data x fsdp; the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def global_batch(host_batch: dict[str, Any], mesh: jax.sharding.Mesh
                 ) -> dict[str, jax.Array]:
  """This process's numpy rows (data/ hands out numpy) -> global `jax.Array`s whose sample
  axis is split over the batch axes; the other axes replicated. The global leading
  dimension is the sum over processes; it must divide over the data x fsdp shards."""
  size = data_parallel_size(mesh.shape)
  out = {}
  for key, value in host_batch.items():
    rows = value.shape[0] * jax.process_count()
    if rows % size:
      raise ValueError(f"batch[{key!r}] has {rows} samples, not divisible by the "
                       f"{size} data x fsdp shards")
    spec = PartitionSpec(BATCH_AXES, *([None] * (value.ndim - 1)))
    out[key] = jax.make_array_from_process_local_data(NamedSharding(mesh, spec), value)
  return out
