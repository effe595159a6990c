"""Orbax checkpoints of one stage: train state + data-iterator state + model config.

Layout (docs/interfaces.md): `workdir/checkpoints/<stage>/<step>/` with items
`state` (params, opt_state, step, rng, skipped), `data` (the grain iterator state, JSON)
and `model_config` (JSON of `config.model`). Orbax writes each step to a temporary
directory and renames it when complete, so `latest_step` only ever sees whole checkpoints
(a run killed mid-write resumes from the previous one). Restoring takes an abstract state
whose leaves carry the *target* shardings, which is how a checkpoint moves to another mesh.
"""
import os
import signal
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp


class StageCheckpointer:
  """Save every `every` steps, keep the newest `keep`, optionally asynchronously."""

  def __init__(self, directory: str, *, every: int, keep: int, async_save: bool):
    if every <= 0 or keep <= 0:
      raise ValueError(f"checkpoint every={every} and keep={keep} must be positive")
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=every, max_to_keep=keep, create=True,
        enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

  def save(self, step: int, state: Any, data_state: dict, model_config: dict, *,
           force: bool = False) -> bool:
    """Writes the checkpoint of `step` if due (or `force`); True when one was started."""
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        model_config=ocp.args.JsonSave(model_config)), force=force)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
    """-> (state placed with `abstract_state`'s shardings, data state, model config)."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
        model_config=ocp.args.JsonRestore()))
    return restored.state, restored.data, restored.model_config

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
