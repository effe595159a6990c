"""Drops the CUDA plugin's start-up lines on a machine without an NVIDIA driver.

Why: the test extra installs jax's CUDA plugin (the GPU compiler that
`tools/plan_memory.py --gpu` and tests/test_gpu_compile.py run on a CPU host), and a user
may install `.[cuda]` on a CPU login node to plan. On such a machine `import jax` loads the
plugin's kernel libraries, and later jax's plugin discovery loads its PJRT library; each
library's CUDA runtime stub logs `cudart_stub.cc:31] Could not find cuda drivers on your
machine, GPU will not be used.` through its own copy of absl's C++ logging, headed by `All
log messages before absl::InitializeLog() is called are written to STDERR`. Nothing can
switch those off (no environment variable reaches a library's private absl before its
first message), and they buried the one-line `error:` of every command line. So the two
moments are run with the process's stderr (file descriptor 2) captured, and every captured
line except those is written back in order: Python warnings and real errors still show.

`install()` (called by `exgra_jax/__init__.py`) arranges it for the first `import jax`
of the process, if jax is not imported yet: a command line that imports exgra_jax first
(every entry point and tool does) gets it; a program that imported jax before is left
as it is. On a machine with a driver the plugin prints none of this and nothing is dropped.
"""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

DROPPED = (
    "cudart_stub.cc",                                 # "Could not find cuda drivers ..."
    "All log messages before absl::InitializeLog()",  # the header of any such line
)


@contextlib.contextmanager
def dropping_native_lines(dropped: tuple[str, ...] = DROPPED) -> Iterator[None]:
  """Runs the block with file descriptor 2 captured, then writes back every line that
  contains none of `dropped` (C++ libraries write to the descriptor, not sys.stderr)."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      kept = [line for line in captured.read().decode(errors="replace").splitlines(True)
              if not any(text in line for text in dropped)]
      if kept:
        sys.stderr.write("".join(kept))
        sys.stderr.flush()


def _quietly(function: Callable[..., Any]) -> Callable[..., Any]:
  def wrapped(*args: Any, **kwargs: Any) -> Any:
    with dropping_native_lines():
      return function(*args, **kwargs)
  return wrapped


class _QuietJaxImport(importlib.abc.MetaPathFinder):
  """Finds `jax` as usual, once, and runs its module body and its later plugin discovery
  under `dropping_native_lines`."""

  def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
    if fullname != "jax":
      return None
    sys.meta_path.remove(self)  # the real finders answer from here on
    spec = importlib.util.find_spec("jax")
    if spec is None or spec.loader is None:
      return spec
    execute = spec.loader.exec_module

    def exec_module(module: Any) -> None:
      with dropping_native_lines():
        execute(module)
      from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top  (jax is in)
      xla_bridge.discover_pjrt_plugins = _quietly(xla_bridge.discover_pjrt_plugins)

    spec.loader.exec_module = exec_module
    return spec


def install() -> None:
  """Arranges the quiet first import of jax (see the module docstring)."""
  if "jax" not in sys.modules and not any(
      isinstance(finder, _QuietJaxImport) for finder in sys.meta_path):
    sys.meta_path.insert(0, _QuietJaxImport())
