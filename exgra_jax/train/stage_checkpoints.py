"""Orbax checkpoints of one stage: train state + data-iterator state + model config.

Layout (docs/interfaces.md): `workdir/checkpoints/<stage>/<step>/` with items
`state` (params, opt_state, step, rng, skipped), `data` (the grain iterator state, JSON),
`model_config` (JSON of `config.model`) and `validation` (JSON: the fine-tune's best score,
best step and validation history, which a resumed fine-tune needs to choose the same best
params; absent from checkpoints written before it existed). Orbax writes each step to a temporary
directory and renames it when complete, so `latest_step` only ever sees whole checkpoints
(a run killed mid-write resumes from the previous one). Restoring takes an abstract state
whose leaves carry the *target* shardings, which is how a checkpoint moves to another mesh.

A complete checkpoint can still be damaged afterwards (a file deleted, truncated or
overwritten on a shared disk). `restore_newest` then reports the step's path and reason,
moves it aside to `<stage>_unrestorable/` (never deleting it: it may be worth rescuing) and
resumes from the newest step that restores, so that one bad step does not stop the run
for good. When no step restores, which is also what a changed model looks like, nothing is
moved and one error names the directory and each step's reason.
"""
import os
import signal
import threading
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils


class Restored(NamedTuple):
  step: int
  state: Any          # placed with the abstract state's shardings
  data: dict          # the input pipeline's state
  model_config: dict
  validation: dict    # {} when the checkpoint has no `validation` item


class NoRestorableCheckpoint(RuntimeError):
  """Every step of a stage directory failed to restore; the message names each reason."""


def any_process(flag: bool) -> bool:
  """True on every process when any process has `flag` set (an agreement point)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.array(flag))))


def _reason(error: BaseException) -> str:
  lines = str(error).strip().splitlines()
  text = lines[0] if lines else ""
  return f"{type(error).__name__}: {text[:300]}"


class StageCheckpointer:
  """Save every `every` steps, keep the newest `keep`, optionally asynchronously."""

  def __init__(self, directory: str, *, every: int, keep: int, async_save: bool):
    if every <= 0 or keep <= 0:
      raise ValueError(f"checkpoint every={every} and keep={keep} must be positive")
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=every, max_to_keep=keep, create=True,
        enable_async_checkpointing=async_save)
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def save(self, step: int, state: Any, data_state: dict, model_config: dict, *,
           validation: dict | None = None, force: bool = False) -> bool:
    """Writes the checkpoint of `step` if due (or `force`); True when one was started."""
    items = {"state": ocp.args.StandardSave(state), "data": ocp.args.JsonSave(data_state),
             "model_config": ocp.args.JsonSave(model_config)}
    if validation is not None:
      items["validation"] = ocp.args.JsonSave(validation)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
    """-> (state placed with `abstract_state`'s shardings, data state, model config)."""
    return self._restore(step, abstract_state)[1:4]

  def _restore(self, step: int, abstract_state: Any) -> Restored:
    items = {"state": ocp.args.StandardRestore(abstract_state), "data": ocp.args.JsonRestore(),
             "model_config": ocp.args.JsonRestore()}
    has_validation = os.path.isdir(os.path.join(self._step_dir(step), "validation"))
    if has_validation:
      items["validation"] = ocp.args.JsonRestore()
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return Restored(step, restored.state, restored.data, restored.model_config,
                    restored.validation if has_validation else {})

  def restore_newest(self, abstract_state: Any) -> Restored | None:
    """The newest step that restores, or None when the stage has no checkpoint. Newer
    steps that fail are moved aside (module doc); NoRestorableCheckpoint when none
    restores."""
    failures: list[tuple[int, str]] = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        restored, reason = self._restore(step, abstract_state), ""
      except Exception as e:  # pylint: disable=broad-except (any damage: try an older step)
        restored, reason = None, _reason(e)
      if not any_process(restored is None):
        self._move_aside(failures)
        return restored
      reason = reason or "failed to restore on another process"
      logging.warning("checkpoint %s cannot be restored (%s); trying an older step",
                      self._step_dir(step), reason)
      failures.append((step, reason))
    if failures:
      raise NoRestorableCheckpoint(
          f"no checkpoint in {self.directory} can be restored (a changed config.model, or "
          "damaged files); nothing was moved:\n" + "\n".join(
              f"  {self._step_dir(step)}: {reason}" for step, reason in failures))
    return None

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _move_aside(self, failures: list[tuple[int, str]]) -> None:
    """Moves the failed steps to `<stage>_unrestorable/<step>[.n]` (process 0 moves)."""
    if not failures:
      return
    aside = f"{self.directory}_unrestorable"
    if jax.process_index() == 0:
      os.makedirs(aside, exist_ok=True)
      for step, reason in failures:
        target, n = os.path.join(aside, str(step)), 1
        while os.path.exists(target):
          target, n = os.path.join(aside, f"{step}.{n}"), n + 1
        os.rename(self._step_dir(step), target)
        logging.warning("moved unrestorable checkpoint %s to %s (%s)", self._step_dir(step),
                        target, reason)
    multihost_utils.sync_global_devices("exgra_jax.checkpoint.move_aside")
    self.manager.reload()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` (arrays or abstract) carrying `shardings` (same structure)."""
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class PreemptionFlag:
  """Set by SIGTERM; the loop checkpoints at the next step boundary and exits with status 0."""

  def __init__(self):
    self._event = threading.Event()
    self._previous = signal.signal(signal.SIGTERM, lambda signum, frame: self._event.set())

  @property
  def requested(self) -> bool:
    return self._event.is_set()

  def restore_handler(self) -> None:
    signal.signal(signal.SIGTERM, self._previous)
