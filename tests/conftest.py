"""Shared fixtures: `demo_world` builds the small demo world once per test session.

The test extra installs libtpu (for the TPU-compiler test); jax would then try to open a
TPU in every test process and take libtpu's one-process lock. Tests run on the CPU: jax is
told so before anything imports it, and subprocesses inherit it.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

from exgra_jax.data import demo_world as demo_world_lib  # noqa: E402


@pytest.fixture(scope="session")
def demo_world(tmp_path_factory) -> str:
  """Path of a small demo world (seed 0), built once per session (a few seconds)."""
  root = tmp_path_factory.mktemp("demo") / "world"
  demo_world_lib.make_demo_world(str(root), size="small", seed=0)
  return str(root)
