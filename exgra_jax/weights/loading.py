"""Model weights from any checkpoint a user brings: train step, stage, params-only, HF.

    loaded = loading.load(path, mesh=mesh, rules=config.logical_axis_rules)
    require_complete_weights(loaded.report)   # inference and eval refuse missing weights

`path` may be:
- a train checkpoint step `workdir/checkpoints/<stage>/<step>/` (items `state`,
  `model_config`; train/stage_checkpoints.py): only `state.params` is restored, as a raw
  pytree without the optimizer's structure (partial restore: the optimizer moments are
  never read), the stage-2 `gnn` collection is dropped; its tokenizer is the run's
  (`data.tokenizer_dir` of `workdir/config.json`, which main.py writes); LoRA adapters
  are merged into their kernels (alpha / rank from the run's `<stage>.lora`), a QLoRA
  base's quantized kernels (qwix `WithAux(QArray)`: int8 / int4 values and float scales)
  dequantized first;
- a stage directory `workdir/checkpoints/<stage>/`: its newest step;
- a params-only checkpoint written by `save_params` (items `params`, `model_config`, and
  the tokenizer in `tokenizer/`): what tools/import_hf.py writes;
- a Hugging Face directory (`config.json`): imported on the fly (hf/importer.py).
Every leaf is restored straight into its target sharding (the model's logical axes under
`rules` on `mesh`; without a mesh, this process's first device). The report compares the
checkpoint with the tree `LlavaModel` expects: `missing` and `unexpected` Flax paths
(`llm/layers_0/mlp/up_proj/kernel`); for HF directories, HF tensor names. Every error
names the file or directory it is about.

`export_from_workdir` (--mode=export, and after training) is `load` + `hf.exporter.export`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
import transformers
from absl import logging
from etils import epath
from flax import linen as nn
from flax import traverse_util
from jax.experimental import multihost_utils

from exgra_jax import run_paths
from exgra_jax.hf import exporter, importer, placement
from exgra_jax.hf.weights_io import replace_directory
from exgra_jax.models import adapters, partitioning
from exgra_jax.models.llava import LlavaModel
from exgra_jax.weights.checksum import NOT_MODEL_WEIGHTS

TRAIN_STEP, STAGE, PARAMS, HF = "train_step", "stage", "params", "hf"
TOKENIZER_SUBDIR = "tokenizer"


@dataclasses.dataclass
class LoadedModel:
  """`params` ({vision, projector, llm}) of the model `model_config` (a `config.model`)."""
  model_config: ml_collections.ConfigDict
  params: dict[str, Any]
  tokenizer_dir: str | None
  report: dict[str, list[str]]
  kind: str
  path: str  # the directory read (a stage directory resolves to its newest step)


def _is_item(directory: str, *items: str) -> bool:
  return all(os.path.isdir(os.path.join(directory, item)) for item in items)


def _steps(stage_dir: str) -> list[int]:
  return sorted(int(name) for name in os.listdir(stage_dir)
                if name.isdigit() and _is_item(os.path.join(stage_dir, name), "state"))


def checkpoint_kind(path: str) -> str:
  """TRAIN_STEP | STAGE | PARAMS | HF, or a FileNotFoundError saying what `path` lacks."""
  if os.path.isfile(os.path.join(path, "config.json")):
    return HF
  if _is_item(path, "state", "model_config"):
    return TRAIN_STEP
  if _is_item(path, "params", "model_config"):
    return PARAMS
  if os.path.isdir(path) and _steps(path):
    return STAGE
  raise FileNotFoundError(
      f"{path} is not a checkpoint: expected a train step (state/, model_config/), a stage "
      "directory of steps, a params checkpoint (params/, model_config/) or a Hugging Face "
      "directory (config.json)")


def not_a_checkpoint(path: str) -> str | None:
  """`checkpoint_kind`'s message when the existing `path` is no kind `load` reads, else None:
  for command lines to say in one line, before anything loads."""
  try:
    checkpoint_kind(os.path.abspath(path))
  except FileNotFoundError as e:
    return str(e)
  return None


def resolve_step(path: str, kind: str) -> str:
  """A stage directory -> its newest step; any other checkpoint -> `path`."""
  return os.path.join(path, str(_steps(path)[-1])) if kind == STAGE else path


def _run_config_path(step_dir: str) -> str:
  """`workdir/config.json` of a train step `workdir/checkpoints/<stage>/<step>`."""
  return str(run_paths.RunDir.of_train_step(step_dir).config_json)


class IncompleteWeights(RuntimeError):
  """The loader reported parameters it could not fill: the model must not be evaluated."""


def require_complete_weights(load_report: Mapping[str, Any]) -> None:
  """Raises IncompleteWeights when the loader's report lists missing parameters.

  `load_report` is the loader's `{"missing": [names], "unexpected": [names]}`; unexpected
  names are tolerated (the release's checkpoints carry optimizer leftovers), missing are not.
  """
  if "missing" not in load_report:
    raise ValueError("load report must say which parameters are missing ('missing' key)")
  missing = list(load_report["missing"])
  if missing:
    raise IncompleteWeights(f"{len(missing)} parameters did not load, refusing to evaluate: "
                            f"{missing[:8]}")


def run_tokenizer_dir(step_dir: str) -> str | None:
  """The tokenizer a train step `workdir/checkpoints/<stage>/<step>` was trained with: the
  run's `data.tokenizer_dir` in `workdir/config.json`; None (with a warning naming what is
  missing) without that file or when its tokenizer is not there from here."""
  config_path = _run_config_path(step_dir)
  if not os.path.isfile(config_path):
    return None
  try:
    with open(config_path) as f:
      config = ml_collections.ConfigDict(json.load(f))
    found = run_paths.tokenizer_dir(config)
  except (ValueError, KeyError, AttributeError) as e:
    raise ValueError(f"{config_path}: cannot tell the run's tokenizer: {e}") from None
  if not os.path.isdir(found):
    logging.warning("%s names the tokenizer %s, which does not exist from here (a relative "
                    "data.root is relative to where the run started)", config_path, found)
    return None
  return found


def run_lora_settings(step_dir: str) -> adapters.LoraSettings:
  """The LoRA settings of a train step's adapters (`<stage>.lora` of the run config)."""
  config_path = _run_config_path(step_dir)
  stage = os.path.basename(os.path.dirname(step_dir))
  try:
    with open(config_path) as f:
      lora = ml_collections.ConfigDict(json.load(f))[stage].lora
    return adapters.LoraSettings.from_config(lora)
  except (OSError, ValueError, KeyError, AttributeError) as e:
    raise ValueError(f"{step_dir} holds LoRA adapters, and {config_path} does not tell their "
                     f"{stage}.lora settings: {e}") from None


def _read_model_config(item_dir: str) -> dict[str, Any]:
  try:
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as checkpointer:
      return checkpointer.restore(item_dir)
  except (OSError, ValueError) as e:
    raise ValueError(f"{item_dir}: unreadable model config: {e}") from None


def _expected(cfg, mesh, rules, lora: adapters.LoraSettings | None
              ) -> tuple[dict[placement.Path, jax.ShapeDtypeStruct],
                         dict[placement.Path, jax.sharding.Sharding], Any]:
  """({flat path: abstract leaf}, {flat path: target sharding}, rebuild) of the params a
  checkpoint holds; rebuild(flat leaves) -> the params tree.

  A plain model's are `placement.expected_params`. A LoRA train checkpoint holds the
  params of the run's adapted model (`adapters.lora_model` with `lora`, the run's
  `<stage>.lora`): its adapters and, for a QLoRA base (int8 / int4), the matched kernels as
  qwix `WithAux(QArray)` stored as `<kernel>/array/qvalue` and `<kernel>/array/scale`
  (adapters.abstract_params); shardings from the same logical axes as the training's.
  """
  if lora is None:
    abstract, shardings = placement.expected_params(cfg, mesh, rules)
    return abstract, shardings, traverse_util.unflatten_dict
  boxed = adapters.abstract_params(adapters.lora_model(LlavaModel(cfg), lora, train=False))
  paths, leaves, treedef = adapters.leaf_paths(nn.unbox(boxed))
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    placements = [device] * len(paths)
  elif rules is None:
    raise ValueError("a mesh needs the logical axis rules (config.logical_axis_rules)")
  else:
    placements = adapters.leaf_paths(partitioning.param_shardings(boxed, mesh, rules))[1]
  return (dict(zip(paths, leaves)), dict(zip(paths, placements)),
          lambda flat: jax.tree_util.tree_unflatten(treedef, [flat[p] for p in paths]))


def _restore_params(item_dir: str, key: str | None, cfg, mesh, rules, allow_missing: bool,
                    seed: int) -> tuple[Any, dict[str, list[str]], adapters.LoraSettings | None]:
  """Params of the Orbax item `item_dir` (under `key` of it when given), partially
  restored, and the LoRA settings of a train checkpoint that holds adapters (None without):
  its params are then the adapted model's (`_expected`), adapters apart, a QLoRA base still
  quantized."""
  with ocp.PyTreeCheckpointer() as checkpointer:
    try:
      stored = checkpointer.metadata(item_dir).item_metadata.tree
    except (OSError, ValueError) as e:
      raise ValueError(f"{item_dir}: unreadable checkpoint metadata: {e}") from None
    stored = traverse_util.flatten_dict(stored[key] if key else stored)
    # qwix's absent zero_point (symmetric quantization) is stored as None: no leaf.
    stored = {p: m for p, m in stored.items() if p[0] not in NOT_MODEL_WEIGHTS and m is not None}
    lora = (run_lora_settings(os.path.dirname(item_dir))
            if any(adapters.is_adapter(p) for p in stored) else None)
    abstract, shardings, rebuild = _expected(cfg, mesh, rules, lora)
    missing = [p for p in abstract if p not in stored]
    unexpected = sorted(placement.path_name(p) for p in stored if p not in abstract)
    # A LoRA checkpoint's tree comes from its run's <stage>.lora: a mismatch names it.
    source = f"the model config with the run's {lora}" if lora else "the model config"
    for path in abstract:  # in the tree's order: the same first mismatch every time
      if path in stored and tuple(stored[path].shape) != abstract[path].shape:
        raise importer.ShapeMismatchError(
            f"{placement.path_name(path)}: {source} gives shape "
            f"{abstract[path].shape}, the checkpoint {item_dir} holds {tuple(stored[path].shape)}")
    names = sorted(placement.path_name(p) for p in missing)
    # A train checkpoint of an adapted model holds every leaf of it: nothing to initialise.
    if missing and (lora or not allow_missing):
      raise importer.MissingTensorsError(
          f"{len(missing)} parameters missing from {item_dir}: {names[:8]}; " +
          (f"{source} makes them: is that the checkpoint's?" if lora else
           "allow_missing=True initialises them (and reports them)"))
    present = [p for p in abstract if p in stored]
    target = traverse_util.unflatten_dict({p: abstract[p] for p in present})
    restore_args = traverse_util.unflatten_dict({p: ocp.ArrayRestoreArgs(
        sharding=shardings[p], global_shape=abstract[p].shape, dtype=abstract[p].dtype)
        for p in present})
    if key:
      target, restore_args = {key: target}, {key: restore_args}
    restored = checkpointer.restore(item_dir, args=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=True))
  flat = traverse_util.flatten_dict(restored[key] if key else restored)
  flat.update(placement.init_leaves(cfg, missing, shardings, seed))
  return rebuild(flat), {"missing": names, "unexpected": unexpected, "initialised": names}, lora


def load(path: str, *, tokenizer_dir: str | None = None,
         mesh: jax.sharding.Mesh | None = None, rules: Sequence[Sequence[Any]] | None = None,
         clip_dir: str | None = None, allow_missing: bool = False,
         overrides: Mapping[str, Any] | None = None, seed: int = 0,
         text_only: bool = False, keep_adapters: bool = False) -> LoadedModel:
  """Loads the model weights of `path` (see the module docstring for the kinds).

  tokenizer_dir: overrides the tokenizer (default: a params checkpoint's `tokenizer/`, an
    HF directory itself, a train checkpoint's run tokenizer (`run_tokenizer_dir`)).
  clip_dir, overrides, text_only: for HF directories (importer.import_model; text_only:
    the LLM alone, so that a plain LLaMA needs no CLIP directory).
  allow_missing: initialise missing parameters (PRNGKey(seed), listed in the report)
    instead of raising MissingTensorsError (not for a LoRA train checkpoint: it holds
    every leaf of its adapted model, and one it lacks says the run config is not its own).
  keep_adapters: a LoRA train checkpoint's adapters stay apart (`*_lora_a/b` leaves)
    instead of merged into their kernels (`run_lora_settings` tells their scale); a QLoRA
    base (`lora.base` int8 / int4) comes dequantized either way (float32 kernels: the base
    the adapters were trained against, not the float weights the run started from).
  """
  path = os.path.abspath(path)
  kind = checkpoint_kind(path)
  if kind == HF:
    imported = importer.import_model(path, clip_dir, tokenizer_dir=tokenizer_dir,
                                     overrides=overrides, mesh=mesh, rules=rules,
                                     allow_missing=allow_missing, seed=seed,
                                     text_only=text_only)
    return LoadedModel(imported.model_config, imported.params, imported.tokenizer_dir,
                       imported.report, kind, path)
  path = resolve_step(path, kind)
  item, key = (("state", "params") if kind in (TRAIN_STEP, STAGE) else ("params", None))
  model_config = ml_collections.ConfigDict(
      _read_model_config(os.path.join(path, "model_config")))
  params, report, lora = _restore_params(os.path.join(path, item), key,
                                         placement.typed_config(model_config), mesh, rules,
                                         allow_missing, seed)
  if lora is not None:  # a LoRA train checkpoint
    params = (adapters.dequantized(params) if keep_adapters
              else adapters.merge_adapters(params, lora.scale))
  saved_tokenizer = os.path.join(path, TOKENIZER_SUBDIR)
  if tokenizer_dir is None and kind == PARAMS and os.path.isdir(saved_tokenizer):
    tokenizer_dir = saved_tokenizer
  elif tokenizer_dir is None and kind in (TRAIN_STEP, STAGE):
    tokenizer_dir = run_tokenizer_dir(path)
  return LoadedModel(model_config, params, tokenizer_dir, report, kind, path)


def save_params(directory: str, params: Mapping[str, Any],
                model_config: ml_collections.ConfigDict | Mapping[str, Any],
                tokenizer_dir: str | None = None) -> None:
  """Writes a params-only Orbax checkpoint: items `params`, `model_config` (JSON of
  `config.model`) and, when given, the tokenizer in `tokenizer/` (collections in
  NOT_MODEL_WEIGHTS are left out). Everything is written next to `directory` and renamed into
  place, so an existing checkpoint there (a fine-tune's best params) is replaced whole."""
  directory = os.path.abspath(directory)
  if isinstance(model_config, ml_collections.ConfigDict):
    model_config = model_config.to_dict()
  placement.typed_config(model_config)  # a checkpoint must describe a valid model
  params = {k: v for k, v in params.items() if k not in NOT_MODEL_WEIGHTS}
  tmp = directory + ".saving"  # the same name on every process (Orbax saves collectively)
  if jax.process_index() == 0 and os.path.exists(tmp):
    shutil.rmtree(tmp)  # left by an interrupted save
  multihost_utils.sync_global_devices("exgra_jax.save_params.start")
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    checkpointer.save(tmp, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        model_config=ocp.args.JsonSave(dict(model_config))))
  if jax.process_index() == 0:
    if tokenizer_dir:
      tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir,
                                                             local_files_only=True)
      tokenizer.save_pretrained(os.path.join(tmp, TOKENIZER_SUBDIR))
    replace_directory(tmp, directory)
  multihost_utils.sync_global_devices("exgra_jax.save_params.done")


class NoTokenizer(ValueError):
  """A checkpoint to export or answer with came with no tokenizer and none was given."""


class NoAdapters(ValueError):
  """An adapter export was asked of a checkpoint without LoRA adapters."""


def require_adapters(loaded: LoadedModel, wanted: str) -> None:
  """Raises NoAdapters, naming `wanted` (the flag asking), unless `loaded` (read with
  keep_adapters=True) holds LoRA adapters."""
  if not adapters.adapter_paths(loaded.params):
    raise NoAdapters(f"{loaded.path} holds no LoRA adapters: {wanted} needs a train "
                     "checkpoint of a stage with lora.rank > 0")


def export_checkpoint(path: str, out_dir: str, *, tokenizer_dir: str | None = None,
                      layout: str = "llava", shard_size_gb: float = 5.0,
                      dtype: str | None = None, lora_base: str = "") -> dict[str, Any]:
  """Any checkpoint `load` reads -> an HF directory `out_dir` (hf/exporter.py); the one
  export of `tools/export_hf.py` and `--mode=export`. Its result carries the load report.

  lora_base: when set (the flag asking, for its errors), a LoRA train checkpoint's model
  that its adapters apply over (`adapters.without_adapters`: a QLoRA base dequantized)
  instead of the merged one: the base of its PEFT adapter export.
  """
  loaded = load(path, tokenizer_dir=tokenizer_dir, keep_adapters=bool(lora_base))
  if not loaded.tokenizer_dir:
    raise NoTokenizer(f"{path}: no tokenizer found with it (no saved tokenizer/, no run "
                      "config.json): pass --tokenizer=DIR")
  params = loaded.params
  if lora_base:
    require_adapters(loaded, lora_base)
    params = adapters.without_adapters(params)
  result = exporter.export(params, loaded.model_config, out_dir,
                           tokenizer_dir=loaded.tokenizer_dir, layout=layout,
                           shard_size_gb=shard_size_gb, dtype=dtype)
  return {**result, "report": loaded.report}


def export_from_workdir(config: ml_collections.ConfigDict, workdir: str | epath.Path
                        ) -> dict[str, Any]:
  """--mode=export: `export_checkpoint` of the run's `RunDir.export_source` (the newest step
  of the last stage) to `RunDir.export(config.export.layout)`, with the run's tokenizer."""
  run = run_paths.RunDir(workdir)
  layout = config.export.layout
  result = export_checkpoint(str(run.export_source(config.stages)), str(run.export(layout)),
                             tokenizer_dir=run_paths.tokenizer_dir(config), layout=layout,
                             shard_size_gb=config.export.shard_size_gb)
  del result["report"]  # a run's own checkpoint: complete by construction
  return result
