"""One checksum of model parameters, the same wherever they are printed.

Why: the training report, the evaluation protocol report and tools/inspect_checkpoint.py
must agree bit for bit on the same parameters, whatever the checkpoint kind or layout
(sharded over any number of hosts, restored as numpy). SHA-256 over each leaf's path
(`llm/layers_0/mlp/up_proj/kernel`), dtype, shape and bytes, in path order. For a params
tree ({vision, projector, llm[, gnn]}) the collections that are not model weights (the
stage-2 `gnn`) are left out, so a stage-2 train state and its exported params agree.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

NOT_MODEL_WEIGHTS = ("gnn",)  # train-state collections that are not model weights


def _path_name(path: tuple[Any, ...]) -> str:
  return "/".join(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path)


def _host(leaf: Any) -> np.ndarray:
  """A (possibly multi-host sharded) array -> the whole array on this host."""
  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
  return np.asarray(leaf)


def parameter_checksum(tree: Any) -> str:
  """Hex SHA-256 of `tree` (params, or any pytree such as an optimizer state).

  Collective when leaves span hosts: every process must call it.
  """
  if isinstance(tree, Mapping):
    tree = {k: v for k, v in tree.items() if k not in NOT_MODEL_WEIGHTS}
  digest = hashlib.sha256()
  for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(tree)[0],
                           key=lambda item: _path_name(item[0])):
    array = _host(leaf)
    digest.update(f"{_path_name(path)}|{array.dtype}|{array.shape}|".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()
