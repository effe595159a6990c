"""Dashboards: CLU TensorBoard writer, throughput, matching-matrix images, progress, profiling.

Written by process 0 only (CLU's default writer is a no-op elsewhere). The matching image
puts a step's predicted matching (one group, one modality pair, [g, g]) next to the identity
it should equal, so a glance tells whether alignment is learnt.
"""
import datetime
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from clu import metric_writers, periodic_actions


def create_writer(logdir: str) -> metric_writers.MetricWriter:
  return metric_writers.create_default_writer(logdir, just_logging=False)


def matching_image(matching: np.ndarray) -> np.ndarray:
  """[g, g] 0/1 matching -> [g, 2g + 1, 3] uint8 RGB: prediction | gap | identity."""
  matching = np.asarray(matching, np.float32)
  if matching.ndim != 2 or matching.shape[0] != matching.shape[1]:
    raise ValueError(f"matching must be square [g, g], got shape {matching.shape}")
  g = matching.shape[0]
  gap = np.full((g, 1), 0.5, np.float32)
  panel = np.concatenate([matching, gap, np.eye(g, dtype=np.float32)], axis=1)
  return np.repeat((panel * 255).astype(np.uint8)[..., None], 3, axis=-1)


class Throughput:
  """steps/s and tokens/s between two reports (wall clock on the host)."""

  def __init__(self):
    self._time = time.perf_counter()
    self._steps = 0
    self._tokens = 0.0

  def update(self, tokens: float) -> None:
    self._steps += 1
    self._tokens += tokens

  def report(self) -> dict[str, float]:
    now = time.perf_counter()
    elapsed = max(now - self._time, 1e-9)
    out = {"steps_per_s": self._steps / elapsed, "tokens_per_s": self._tokens / elapsed}
    self._time, self._steps, self._tokens = now, 0, 0.0
    return out


def progress_line(stage: str, done: int, total: int, scalars: Mapping[str, float]) -> str:
  """One human line per logging interval, e.g.
  `stage2 step 10/15 (67%)  loss 5.7753  lm_loss 5.0648  align_loss 0.7104  5.87 steps/s  ETA 0:00:01`
  (losses of the interval's mean; the rate of the interval sets the ETA)."""
  names = sorted((k for k in scalars if k.endswith("loss") and "/" not in k),
                 key=lambda k: (k != "loss", k))
  losses = "  ".join(f"{k} {scalars[k]:.4f}" for k in names)
  rate = scalars.get("steps_per_s", 0.0)
  eta = datetime.timedelta(seconds=round((total - done) / rate)) if rate > 0 else "?"
  return (f"{stage} step {done}/{total} ({100 * done // max(total, 1)}%)  {losses}  "
          f"{rate:.2f} steps/s  ETA {eta}")


def flat_scalars(prefix: str, values: Mapping[str, Any]) -> dict[str, float]:
  """Nested metrics -> TensorBoard scalars `prefix/key[/subkey]` (numbers only, None dropped),
  e.g. a VQA split's {"selection_score": .., "OPEN": {"recall": ..}} -> val/selection_score,
  val/OPEN/recall."""
  out = {}
  for key, value in values.items():
    if isinstance(value, Mapping):
      out.update(flat_scalars(f"{prefix}/{key}", value))
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
      out[f"{prefix}/{key}"] = float(value)
  return out


def parse_profile_steps(spec: str) -> tuple[int, int] | None:
  """`train.profile_steps` "start:stop" -> (start, stop); "" -> None."""
  if not spec:
    return None
  try:
    start, stop = (int(x) for x in spec.split(":"))
  except ValueError as e:
    raise ValueError(f"train.profile_steps={spec!r} is not 'start:stop'") from e
  if not 0 <= start < stop:
    raise ValueError(f"train.profile_steps={spec!r} needs 0 <= start < stop")
  return start, stop


def progress_hooks(num_steps: int, writer: metric_writers.MetricWriter, logdir: str,
                   profile: tuple[int, int] | None) -> list[periodic_actions.PeriodicAction]:
  """ReportProgress (steps/s and ETA in the logs) and, on request, a profiler trace."""
  hooks = [periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer)]
  if profile is not None:
    start, stop = profile
    hooks.append(periodic_actions.Profile(logdir=logdir, first_profile=start,
                                          num_profile_steps=stop - start,
                                          every_secs=None))
  return hooks
