"""Helper run in subprocesses by test_train_multidevice.py (fake CPU devices need a fresh jax).

`python train_sharded_run.py single WORKDIR`: one process, 4 fake devices; trains two steps
of a 1-layer tiny model on a 1-device mesh and on a data=2 x fsdp=2 mesh, saves the 4-device
state, restores it onto 1 device, prints JSON.
`python train_sharded_run.py multi WORKDIR --config.distributed.…` (via
launch/local_multiprocess.sh): one of 2 processes x 2 devices, same data=2 x fsdp=2 run
over gloo, saves its checkpoint; process 0 prints the losses as JSON.
"""
import json
import os
import sys

MODE = sys.argv[1]
os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count="
                           + ("4" if MODE == "single" else "2"))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import base  # noqa: E402
from exgra_jax.models.config import LlavaConfig, num_image_tokens  # noqa: E402
from exgra_jax.models.llava import LlavaModel  # noqa: E402
from exgra_jax.train import (distributed, mesh as mesh_lib, optimizer,  # noqa: E402
                             sharded_state, sharding, stage_checkpoints, step)


def build(config):
  config.model.vision.num_layers = 1
  config.model.llm.num_layers = 1
  model = LlavaModel(LlavaConfig.from_config(config.model))
  n = num_image_tokens(config.model)
  rng = np.random.default_rng(1)
  b, t = 8, n + 6
  ids = rng.integers(1, 1000, (b, t)).astype(np.int32)
  image_mask = np.zeros((b, t), bool)
  image_mask[:, 2:2 + n] = True
  batch = {"pixel_values": rng.normal(size=(b, 112, 112, 3)).astype(np.float32),
           "input_ids": ids, "attention_mask": np.ones((b, t), np.int32),
           "image_mask": image_mask, "labels": np.where(image_mask, -100, ids).astype(np.int32),
           "sample_weight": np.ones((b,), np.float32)}

  def init():
    return model.init(jax.random.key(0), ids[:1], batch["attention_mask"][:1], image_mask[:1],
                      batch["pixel_values"][:1])["params"]

  stage = config.stage2
  stage.warmup_ratio = 0.0
  tx, schedule = optimizer.build_optimizer(nn.unbox(jax.eval_shape(init)), config.optim, stage, 4)
  return model, batch, init, tx, schedule


def train(config, sizes, devices, model, batch, init, tx, schedule):
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = sizes
  mesh = mesh_lib.build_mesh(config.mesh, devices)
  _, shardings = sharded_state.state_shardings(init, tx, mesh, config.logical_axis_rules)
  state = sharded_state.init_sharded_state(init, tx, 0, shardings, mesh,
                                           config.logical_axis_rules)
  train_step = sharded_state.jit_train_step(
      step.make_train_step(model, tx, schedule, micro_batches=2), shardings, mesh,
      config.logical_axis_rules, batch)
  losses = []
  for _ in range(2):
    state, metrics = train_step(state, sharding.global_batch(batch, mesh))
    losses.append(float(metrics["loss"]))
  return losses, state


def save(workdir, state, config):
  ckpt = stage_checkpoints.StageCheckpointer(workdir, every=1, keep=1, async_save=False)
  ckpt.save(2, state, {}, config.model.to_dict())
  ckpt.wait()
  return ckpt


def single(workdir: str) -> None:
  config = base.get_config()
  parts = build(config)
  one, _ = train(config, (1, 1, 1), jax.devices()[:1], *parts)
  four, state4 = train(config, (2, 2, 1), jax.devices(), *parts)
  ckpt = save(workdir, state4, config)
  config.mesh.data, config.mesh.fsdp = 1, 1
  mesh1 = mesh_lib.build_mesh(config.mesh, jax.devices()[:1])
  _, _, init, tx, _ = parts
  abstract, shardings1 = sharded_state.state_shardings(init, tx, mesh1, config.logical_axis_rules)
  restored, _, _ = ckpt.restore(2, stage_checkpoints.abstract_with_shardings(abstract, shardings1))
  ckpt.close()
  max_diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                 for a, b in zip(jax.tree_util.tree_leaves(restored.params),
                                 jax.tree_util.tree_leaves(state4.params)))
  restored_devices = {d.id for leaf in jax.tree_util.tree_leaves(restored.params)
                      for d in leaf.sharding.device_set}
  print(json.dumps({"losses": {"one": one, "four": four}, "restore_max_diff": max_diff,
                    "restored_devices": sorted(restored_devices)}))


def multi(workdir: str, flags: list[str]) -> None:
  config = base.get_config()
  for flag in flags:
    key, value = flag.removeprefix("--config.distributed.").split("=", 1)
    config.distributed[key] = type(config.distributed[key])(value)
  distributed.initialize(config)
  parts = build(config)
  losses, state = train(config, (2, 2, 1), jax.devices(), *parts)
  save(workdir, state, config).close()
  if jax.process_index() == 0:
    print(json.dumps({"losses": losses, "processes": jax.process_count(),
                      "devices": jax.device_count()}))


if __name__ == "__main__":
  if MODE == "single":
    single(sys.argv[2])
  else:
    multi(sys.argv[2], sys.argv[3:])
