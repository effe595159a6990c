"""Train state laid out on a mesh: shardings from the params' logical axes, jitted init/step.

The state's shardings are derived without allocating anything: the boxed (logically
annotated) params are traced with `jax.eval_shape`, the optimizer state is initialised on
those boxes (Adam moments inherit their parameter's logical names), and
`nn.get_partition_spec` + the logical-axis rules turn the annotations into NamedShardings.
The same shardings serve `jax.jit(in_shardings/out_shardings)`, Orbax restore targets and
the memory planner.
"""
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import optax

from exgra_jax.train import sharding
from exgra_jax.train.state import TrainState, create_train_state


def _boxed_state(init_boxed_params: Callable[[], Any], tx: optax.GradientTransformation,
                 seed: int) -> TrainState:
  return create_train_state(init_boxed_params(), tx, seed)


def state_shardings(init_boxed_params: Callable[[], Any], tx: optax.GradientTransformation,
                    mesh: jax.sharding.Mesh, rules: Sequence[Sequence[Any]]
                    ) -> tuple[TrainState, TrainState]:
  """-> (abstract unboxed state, NamedSharding tree of the same structure)."""
  boxed = jax.eval_shape(lambda: _boxed_state(init_boxed_params, tx, 0))
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh,
                                          sharding.logical_rules(rules))
  return nn.unbox(boxed), shardings


def init_sharded_state(init_boxed_params: Callable[[], Any], tx: optax.GradientTransformation,
                       seed: int, shardings: TrainState, mesh: jax.sharding.Mesh,
                       rules: Sequence[Sequence[Any]]) -> TrainState:
  """Materialises the state directly in its shards (no full copy on any one device); the
  init is traced under the mesh and rules, so its activations are sharded too."""
  init = sharding.traced_under(lambda: nn.unbox(_boxed_state(init_boxed_params, tx, seed)),
                               mesh, rules)
  return jax.jit(init, out_shardings=shardings)()


def jit_train_step(step_fn: Callable, shardings: TrainState, mesh: jax.sharding.Mesh,
                   rules: Sequence[Sequence[Any]], batch_keys: Sequence[str]) -> Callable:
  """`step_fn` traced under the mesh and rules (`sharding.traced_under`) and jitted with
  the state sharded as given, the batch split along samples, metrics replicated, and the
  input state donated."""
  batch = {k: sharding.batch_sharding(mesh) for k in batch_keys}
  return jax.jit(sharding.traced_under(step_fn, mesh, rules), in_shardings=(shardings, batch),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
