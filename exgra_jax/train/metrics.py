"""Dashboards: CLU TensorBoard writer, throughput, matching-matrix images, progress, profiling.

Written by process 0 only (CLU's default writer is a no-op elsewhere). The matching image
puts a step's predicted matching (one group, one modality pair, [g, g]) next to the identity
it should equal, so a glance tells whether alignment is learnt.
"""
import time

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
