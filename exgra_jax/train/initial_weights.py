"""Where a stage's starting weights come from, and how they are laid onto its fresh state.

Order (first that applies), for a stage that has no checkpoint of its own yet:
1. `config.<stage>.init_from`: an exgra-jax checkpoint (train, params-only) or HF directory;
2. the previous stage of `config.stages`: its final parameters;
3. for the first stage: `config.init.checkpoint`, then `config.init.hf_dir` (LLaVA /
   LLaVA-Med / ExGra-Med), then `config.init.llm_dir` (+ `clip_dir`: the start of stage 1);
4. random weights, only when `config.init.random` says so (demo, tests); with
   `config.vision_pretrain.steps` the tower of that random start is first pre-trained
   contrastively (train/vision_pretrain.py).

Loaded parameters replace the matching leaves of the freshly initialised (sharded) tree.
Only the projector (a plain LLaMA + CLIP start has none) and the GNN (created fresh in
stage 2) may be absent from a source; anything else missing, or any shape that differs,
is an error naming the parameters.
"""
from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from exgra_jax import run_paths
from exgra_jax.models import adapters

MAY_BE_FRESH = ("projector", "gnn")


class InitialWeightsError(ValueError):
  """The configured weights cannot start this stage (missing, wrong shapes, none given)."""


def source_for(config: ml_collections.ConfigDict, stage_name: str, workdir: epath.Path
               ) -> tuple[str, str]:
  """-> (kind, path) with kind in {"checkpoint", "previous_stage", "hf", "vision_pretrain",
  "random"}; "vision_pretrain": the whole-model checkpoint `vision_pretrain` writes (or
  wrote) at `path`, a random start whose tower was pre-trained contrastively."""
  stage = config[stage_name]
  if stage.init_from:
    return "checkpoint", stage.init_from
  index = list(config.stages).index(stage_name)
  if index > 0:
    return "previous_stage", str(run_paths.RunDir(workdir).stage(config.stages[index - 1]))
  if config.init.checkpoint:
    return "checkpoint", config.init.checkpoint
  if config.init.hf_dir:
    return "hf", config.init.hf_dir
  if config.init.llm_dir:
    if not config.init.clip_dir:
      raise InitialWeightsError("config.init.llm_dir starts from a plain LLaMA: it needs "
                                "config.init.clip_dir (the CLIP vision tower)")
    return "hf", config.init.llm_dir
  if config.init.random and config.vision_pretrain.steps:
    return "vision_pretrain", str(run_paths.RunDir(workdir).stage(run_paths.VISION_PRETRAIN))
  if config.init.random:
    return "random", ""
  raise InitialWeightsError(
      f"no weights to start stage {stage_name!r}: set config.init.hf_dir, config.init.llm_dir "
      "(+ config.init.clip_dir), config.init.checkpoint or config.<stage>.init_from, or "
      "config.init.random=True for a random start")


def _flat(tree: Any) -> dict[tuple[str, ...], Any]:
  return {tuple(str(getattr(k, "key", k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def merge_loaded(fresh: Any, loaded: Any, shardings: Any, source: str) -> Any:
  """`fresh` (the state's params) with every leaf `loaded` has, placed with `shardings`.

  Raises InitialWeightsError for loaded leaves of another shape, and for fresh leaves the
  source lacks outside MAY_BE_FRESH and the LoRA adapters. Leaves the model does not have
  are ignored (the checkpoint loader reports them).
  """
  fresh_flat, loaded_flat = _flat(fresh), _flat(loaded)
  missing = [p for p in fresh_flat if p not in loaded_flat and p[0] not in MAY_BE_FRESH
             and not adapters.is_adapter(p)]
  if missing:
    raise InitialWeightsError(f"{source} lacks {len(missing)} parameters the model needs, "
                              f"e.g. {['/'.join(p) for p in missing[:6]]}")
  wrong = [f"{'/'.join(p)}: model {tuple(fresh_flat[p].shape)}, source "
           f"{tuple(np.shape(loaded_flat[p]))}"
           for p in fresh_flat if p in loaded_flat
           and tuple(np.shape(loaded_flat[p])) != tuple(fresh_flat[p].shape)]
  if wrong:
    raise InitialWeightsError(f"{source} has parameters of other shapes than config.model "
                              f"(check the model preset): {wrong[:6]}")
  shard_flat = _flat(shardings)

  def pick(path, leaf):
    key = tuple(str(getattr(k, "key", k)) for k in path)
    if key not in loaded_flat:
      return leaf
    value = loaded_flat[key]
    return jax.device_put(value if value.dtype == leaf.dtype else value.astype(leaf.dtype),
                          shard_flat[key])
  return jax.tree_util.tree_map_with_path(pick, fresh)
