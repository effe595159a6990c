"""What a person sees on the terminal: our own log lines, everyone's real warnings, a summary.

Why: the demo printed ~460 lines on stderr, ~400 of them INFO chatter of the libraries
underneath (Orbax's checkpoint internals, CLU's writers, jax probing for a TPU, TensorFlow's
C++ start-up notes, transformers' "PyTorch was not found"), which buried the few lines that
say how training goes. The libraries log through three channels (absl logging, Python
logging, their own handlers / C++ logs), so `quiet_third_party` sets one filter on the
absl handler (every Python log record passes it) and the libraries' own switches.
absl's `--verbosity=1` (or higher) keeps everything, as before.

`setup` is the one console setup of every command line (main, predict, serve, chat and
the tools): the filters above, and on a machine with no TPU and no GPU attached, jax's
platform fixed to the CPU, so that jax does not try a TPU through libtpu (installed by the
test extra): that attempt printed libtpu's "could not determine TPU accelerator type", an
`E0000 ... INVALID_ARGUMENT` about TPU worker hostnames and "Unable to initialize backend
'tpu'", and took libtpu's one-process lock. A platform the user chose (`JAX_PLATFORMS`,
`--jax_platforms`) is kept.

`summary_table` is the end-of-run overview for people (numbers to 4 decimals); the full
result stays JSON (stdout, and `summary.json` in the workdir).
"""
from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

from absl import logging as absl_logging
import jax

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
# Warnings of the libraries that are harmless here, dropped unless --verbosity >= 1.
HARMLESS = (
    "Unable to initialize backend",       # jax looking for a TPU / GPU on a CPU host
    "PyTorch was not found",              # transformers: we use its tokenizers only
    "torchvision",                        # transformers' image-processor fallback notice
    "_CHECKPOINT_METADATA",               # Orbax: params-only checkpoints carry none
    "All log messages before absl::InitializeLog()",
)


HEADLINE = ("selection_score", "open_recall", "closed_accuracy")


class ThirdPartyFilter(logging.Filter):
  """Passes every record of exgra_jax and the other libraries' real warnings and errors."""

  def filter(self, record: logging.LogRecord) -> bool:
    if os.path.abspath(record.pathname).startswith(_PACKAGE):
      return True
    return record.levelno >= logging.WARNING and not any(
        text in record.getMessage() for text in HARMLESS)


def quiet_third_party(verbosity: int) -> None:
  """Silences the libraries' INFO chatter and known-harmless warnings for verbosity < 1.

  Call it before the libraries are imported (TensorFlow and transformers read their
  switches at import time).
  """
  if verbosity >= 1:
    return
  absl_logging.get_absl_handler().addFilter(ThirdPartyFilter())
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")          # TensorFlow's C++ INFO/WARNING
  # TensorFlow only writes TensorBoard files here: without its oneDNN CPU kernels it also
  # drops the start-up notice about them (printed before its log level applies).
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
  os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
  if "transformers" in sys.modules:
    sys.modules["transformers"].logging.set_verbosity_error()


def accelerator_attached() -> bool:
  """Whether a TPU (PCI ids jax itself checks before it starts libtpu) or a GPU (an
  NVIDIA device node, or ROCm's /dev/kfd) is attached to this machine."""
  from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top  (jax's own probe)
  return (hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
          or hardware_utils.has_visible_nvidia_gpu() or os.path.exists("/dev/kfd"))


def cpu_unless_accelerator() -> None:
  """Fixes jax to the CPU when the user chose no platform and no accelerator is attached.

  Must run before jax's first computation (the backends start then); every entry point
  calls it through `setup`, first thing in its main().
  """
  if not os.environ.get("JAX_PLATFORMS") and not jax.config.jax_platforms and (
      not accelerator_attached()):
    jax.config.update("jax_platforms", "cpu")


def setup(verbosity: int) -> None:
  """The console setup of every command line (see the module docstring); entry points
  that take no positional arguments reach it through `run_config.start_command`."""
  cpu_unless_accelerator()
  quiet_third_party(verbosity)


def _number(value: Any) -> str:
  if isinstance(value, float):
    return f"{value:.4f}"
  return "-" if value is None else str(value)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
  cells = [header] + [[_number(v) for v in row] for row in rows]
  widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
  return ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]


def summary_table(result: Mapping[str, Any]) -> str:
  """A few lines for people: per trained stage its steps, final losses, steps per second
  after the first (compiling) step and seconds from its first step to its end (validation
  and test included; loading weights and the vision pre-training not); the test (or
  evaluation) metrics. `result` is what `--mode=train` or `--mode=eval` returns."""
  stages = {name: r for name, r in result.items()
            if isinstance(r, Mapping) and "steps" in r and "status" in r}
  lines = []
  if stages:
    rows = []
    for name, r in stages.items():
      final = r.get("final_metrics") or {}
      rows.append([name, r["status"], r["steps"], final.get("loss"), final.get("lm_loss"),
                   final.get("align_loss"), r.get("steps_per_s"),
                   None if r.get("seconds") is None else round(r["seconds"])])
    lines += _table(["stage", "status", "steps", "loss", "lm_loss", "align_loss", "steps/s",
                     "seconds"], rows)
  tests = {f"{name} test": r["test"] for name, r in stages.items() if "test" in r}
  if not stages and "selection_score" in result:  # --mode=eval returns the metrics
    tests = {"evaluation": result}
    if "output_dir" in result:
      lines += [f"evaluated {result['checkpoint']}: answers.jsonl, protocol.json and "
                f"protocol.md in {result['output_dir']}"]
  for name, scores in tests.items():
    lines += ["", f"{name}: " + "  ".join(
        f"{k} {_number(scores.get(k))}" for k in HEADLINE)]
    types = [t for t in ("OPEN", "CLOSED", "overall") if isinstance(scores.get(t), Mapping)]
    if types:
      keys = list(scores[types[-1]])
      lines += ["  " + line for line in _table(
          ["answers"] + keys, [[t] + [scores[t].get(k) for k in keys] for t in types])]
  return "\n".join(lines).strip("\n")
