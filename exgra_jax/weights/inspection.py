"""Reads a checkpoint without a model: step, parameter shapes, parameter checksum.

Why without a model: a checkpoint written on a TPU slice must be inspectable on a laptop
(host numpy on any topology; the writer's devices need not exist). Takes a train step
(`checkpoints/<stage>/<step>`), a stage directory (its newest step) or a params-only
checkpoint (`checkpoints/finetune_best`, tools/import_hf.py output). The checksum is
`weights.checksum.parameter_checksum`, the one the training and evaluation reports print.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from exgra_jax.weights import loading
from exgra_jax.weights.checksum import parameter_checksum


def _restore_numpy(item_dir: str) -> Any:
  with ocp.PyTreeCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(item_dir).item_metadata.tree
    as_numpy = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                      metadata)
    return checkpointer.restore(item_dir, restore_args=as_numpy)


def read_checkpoint(path: str) -> dict[str, Any]:
  """-> dict(kind, path, step, skipped, shapes, checksum, model_config); step and skipped
  are None for a params-only checkpoint."""
  path = os.path.abspath(path)
  kind = loading.checkpoint_kind(path)
  if kind == loading.HF:
    raise ValueError(f"{path} is a Hugging Face directory, not an exgra-jax checkpoint: "
                     "import it with tools/import_hf.py first")
  path = loading.resolve_step(path, kind)
  step = skipped = None
  if kind == loading.PARAMS:
    params = _restore_numpy(os.path.join(path, "params"))
  else:
    state = _restore_numpy(os.path.join(path, "state"))
    params, step, skipped = state["params"], int(state["step"]), int(state.get("skipped", 0))
  config_path = os.path.join(path, "model_config", "metadata")
  model_config = None
  if os.path.exists(config_path):
    with open(config_path) as f:
      model_config = json.load(f)
  shapes = {"/".join(str(getattr(p, "key", p)) for p in leaf_path):
            (tuple(np.shape(leaf)), str(np.asarray(leaf).dtype))
            for leaf_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
  return {"kind": kind, "path": path, "step": step, "skipped": skipped, "shapes": shapes,
          "checksum": parameter_checksum(params), "model_config": model_config}
