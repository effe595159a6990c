"""Helper run in a subprocess by test_train_alignment_sharding.py (4 fake CPU devices need a
fresh jax): the per-device alignment against the unsharded loss, and the compiled stage-2
step's sharding constraints and host callbacks. Prints one JSON object."""
import json
import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from configs import base, demo  # noqa: E402
from exgra_jax.align import loss  # noqa: E402
from exgra_jax.train import (alignment_sharding, loop, memory_plan,  # noqa: E402
                             mesh as mesh_lib, sharded_state, sharding, stage_checkpoints)

WIDTH = 16


def compare(mesh, rules, settings, params, batch: int, group: int, deterministic: bool) -> dict:
  """Loss, matchings and gradients of the sharded alignment vs the unsharded one."""
  rng = np.random.default_rng(batch + group)
  feats = [jnp.asarray(rng.normal(size=(batch, WIDTH)).astype(np.float32)) for _ in range(3)]
  grouped = lambda f: [x.reshape(batch // group, group, WIDTH) for x in f]
  sharded_fn = alignment_sharding.make_sharded_alignment(settings, mesh, group, batch)

  def reference(p, f):
    return loss.multi_graph_alignment_loss(p, *grouped(f), jax.random.key(7), settings,
                                           deterministic=deterministic)

  def sharded(p, f):
    f = [jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(sharding.BATCH_AXES)))
         for x in f]
    return sharded_fn(p, *grouped(f), jax.random.key(7), deterministic=deterministic)

  with sharding.mesh_and_rules(mesh, rules):
    (l1, a1), g1 = jax.jit(jax.value_and_grad(reference, (0, 1), has_aux=True))(params, feats)
    fn = jax.jit(jax.value_and_grad(sharded, (0, 1), has_aux=True))
    (l2, a2), g2 = fn(params, feats)
    hlo = fn.lower(params, feats).compile().as_text()
  grad_diff = max(float(jnp.max(jnp.abs(x - y))) for x, y in
                  zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)))
  grad_scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree_util.tree_leaves(g1))
  return {"batch": batch, "group": group, "deterministic": deterministic,
          "span": alignment_sharding.group_span(group, batch, 4),
          "loss": [float(l1), float(l2)],
          "matchings_equal": bool(np.array_equal(a1["matchings"], a2["matchings"])),
          "aux_diff": max(abs(float(a1[k]) - float(a2[k])) for k in a1 if np.ndim(a1[k]) == 0),
          "grad_diff": grad_diff, "grad_scale": grad_scale,
          "callback_shapes": callback_shapes(hlo)}


def callback_shapes(hlo: str) -> list[str]:
  """Result shapes of the host callbacks of a compiled (per-device) program."""
  return [line.split("= ", 1)[1].split(" custom-call")[0].strip("() ").split("{")[0]
          for line in hlo.splitlines() if "custom-call(" in line and "callback" in line]


def step_program(grouping: str, group_size: int) -> dict:
  """The demo's stage-2 step on data=2 x fsdp=2, 8 samples per device, lowered + compiled."""
  config = demo.get_config()
  config.mesh.data, config.mesh.fsdp = 2, 2
  config.stage2.micro_batches = 1
  config.stage2.global_batch = 32
  config.align.grouping, config.align.group_size = grouping, group_size
  mesh = mesh_lib.build_mesh(config.mesh)
  vocab = config.model.llm.vocab_size
  stage = loop.build_stage(config, "stage2", mesh, 1000, tuple(range(vocab - 5, vocab)))
  batch = memory_plan.abstract_batch(config, 32, 72, mesh, align=True)
  fn = sharded_state.jit_train_step(stage.step_fn, stage.shardings, mesh,
                                    config.logical_axis_rules, batch)
  lowered = fn.lower(stage_checkpoints.abstract_with_shardings(stage.abstract_state,
                                                           stage.shardings), batch)
  hlo = lowered.compile().as_text()
  return {"grouping": grouping, "group_size": group_size,
          "constraints": lowered.as_text().count("sharding_constraint"),
          "callback_shapes": callback_shapes(hlo), "maximal": "maximal" in hlo}


def main() -> None:
  config = base.get_config()
  config.mesh.data, config.mesh.fsdp = 2, 2
  mesh = mesh_lib.build_mesh(config.mesh)
  settings = loss.AlignSettings.from_config(config.align)
  params = loss.init_gnn_params(jax.random.key(3), settings, WIDTH)
  cases = [compare(mesh, config.logical_axis_rules, settings, params, batch, group, det)
           for batch, group, det in ((32, 8, False), (24, 12, False), (8, 8, False),
                                     (24, 12, True))]
  steps = [step_program("per_device", 8), step_program("fixed", 16)]
  print(json.dumps({"cases": cases, "steps": steps}))


if __name__ == "__main__":
  main()
