"""Shared fixtures: `demo_world` builds the small demo world once per test session."""
import pytest

from exgra_jax.data import demo_world as demo_world_lib


@pytest.fixture(scope="session")
def demo_world(tmp_path_factory) -> str:
  """Path of a small demo world (seed 0), built once per session (a few seconds)."""
  root = tmp_path_factory.mktemp("demo") / "world"
  demo_world_lib.make_demo_world(str(root), size="small", seed=0)
  return str(root)
