"""Helper run in a subprocess by test_models_attention.py (fake CPU devices need a fresh
jax): the decoder with `attention="splash"` (interpret mode) under a data=2 x tensor=2 mesh
of 4 devices and the base logical rules, against the `xla` choice on the same mesh.
Prints JSON: devices, manual computations in the lowered step (the kernel's shard_map
regions), relative loss and worst gradient differences."""
import dataclasses
import functools
import json
import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import linen as nn  # noqa: E402

from configs import base  # noqa: E402
from exgra_jax.models.llama import Llama  # noqa: E402
from exgra_jax.train import mesh as mesh_lib  # noqa: E402
from exgra_jax.train import sharding  # noqa: E402
from test_models_attention import CFG, model_loss  # noqa: E402


def main() -> None:
  config = base.get_config()
  config.mesh.data, config.mesh.tensor = 2, 2
  mesh = mesh_lib.build_mesh(config.mesh)
  rng = np.random.RandomState(0)
  ids = rng.randint(0, CFG.vocab_size, (4, 136))
  mask = np.ones_like(ids)
  mask[1, 100:] = 0
  mask[3, 7:] = 0
  splash = dataclasses.replace(CFG, attention="splash")

  params = jax.jit(lambda key: Llama(CFG).init(key, ids[:1], mask[:1])["params"])(
      jax.random.key(0))
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.logical_rules(
      config.logical_axis_rules)):
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(
        functools.partial(model_loss, CFG, ids, mask)))(params)
    step = jax.jit(jax.value_and_grad(functools.partial(model_loss, splash, ids, mask)))
    manual = step.lower(params).as_text().count("manual_computation")
    got_loss, got_grads = step(params)
  rel = lambda a, b: float(jnp.abs(a - b).max() / jnp.abs(b).max())
  print(json.dumps({
      "devices": jax.device_count(), "manual_computations": manual,
      "loss_rel": abs(float(got_loss) - float(ref_loss)) / abs(float(ref_loss)),
      "grad_rel": max(jax.tree.leaves(jax.tree.map(rel, got_grads, ref_grads)))}))


if __name__ == "__main__":
  main()
