"""Reads a stage checkpoint without a model: step, parameter shapes, parameter checksum.

The checksum (SHA-256 over each parameter's path, dtype, shape and bytes, in path order)
identifies parameters bit-for-bit, so two runs can be compared (e.g. exact resume).
"""
import hashlib
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


def _path_name(path) -> str:
  return "/".join(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path)


def parameter_checksum(params: Any) -> str:
  digest = hashlib.sha256()
  for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(params)[0],
                           key=lambda item: _path_name(item[0])):
    array = np.asarray(leaf)
    digest.update(f"{_path_name(path)}|{array.dtype}|{array.shape}|".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()


def read_checkpoint(step_dir: str) -> dict[str, Any]:
  """`workdir/checkpoints/<stage>/<step>` -> dict(step, skipped, shapes, checksum, model_config)."""
  state_dir = os.path.join(step_dir, "state")
  if not os.path.isdir(state_dir):
    raise FileNotFoundError(f"{step_dir} is not a stage checkpoint (no 'state' item); "
                            "pass workdir/checkpoints/<stage>/<step>")
  state_dir = os.path.abspath(state_dir)
  with ocp.PyTreeCheckpointer() as checkpointer:
    # Host numpy on any topology (the writer's devices need not exist here).
    metadata = checkpointer.metadata(state_dir).item_metadata.tree
    as_numpy = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                      metadata)
    state = checkpointer.restore(state_dir, restore_args=as_numpy)
  config_path = os.path.join(step_dir, "model_config", "metadata")
  model_config = None
  if os.path.exists(config_path):
    with open(config_path) as f:
      model_config = json.load(f)
  params = state["params"]
  shapes = {_path_name(path): (tuple(np.shape(leaf)), str(np.asarray(leaf).dtype))
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
  return {"step": int(state["step"]), "skipped": int(state.get("skipped", 0)), "shapes": shapes,
          "checksum": parameter_checksum(params), "model_config": model_config}
