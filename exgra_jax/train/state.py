"""The train state: fp32 master params, optimizer state, step, PRNG key, skipped-step count."""
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  """`params` holds `vision`, `projector`, `llm` (and `gnn` in stage 2), all fp32.

  `rng` is a raw uint32[2] key so checkpoints hold a plain array; `skipped` counts the
  optimizer steps dropped for a non-finite loss or gradient.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  skipped: jax.Array


def create_train_state(params: Any, tx: optax.GradientTransformation, seed: int) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=jax.random.PRNGKey(seed), skipped=jnp.zeros((), jnp.int32))
