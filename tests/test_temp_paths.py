"""Temporaries of a killed writer are removed at the next start; a live writer's are kept."""
import os
import subprocess
import sys

from exgra_jax import temp_paths
from exgra_jax.data import demo_world


def _dead_pid() -> int:
  child = subprocess.Popen([sys.executable, "-c", "pass"])
  child.wait()
  return child.pid


def _as_written_by(path: str, pid: int) -> str:
  """`path` renamed as if process `pid` had made it."""
  parent, name = os.path.split(path)
  head, _, rest = name.partition(f".{os.getpid()}.")
  moved = os.path.join(parent, f"{head}.{pid}.{rest}")
  os.rename(path, moved)
  return moved


def test_only_temporaries_of_ended_writers_are_removed(tmp_path):
  dead = _dead_pid()
  killed_dir = _as_written_by(temp_paths.new_dir(str(tmp_path), "llava"), dead)
  (tmp_path / os.path.basename(killed_dir) / "model.safetensors").write_bytes(b"x" * 10)
  killed_file = _as_written_by(temp_paths.new_file(str(tmp_path / "protocol.json")), dead)
  live = temp_paths.new_dir(str(tmp_path), "llava")
  (tmp_path / ".hidden").mkdir()
  (tmp_path / "llava").mkdir()
  assert sorted(temp_paths.remove_stale(str(tmp_path))) == sorted([killed_dir, killed_file])
  assert sorted(os.listdir(tmp_path)) == sorted([".hidden", "llava", os.path.basename(live)])
  assert temp_paths.remove_stale(str(tmp_path / "absent")) == []


def test_next_demo_world_build_removes_a_killed_builds_folder(tmp_path):
  killed = _as_written_by(temp_paths.new_dir(str(tmp_path), "world"), _dead_pid())
  demo_world.make_demo_world(str(tmp_path / "world"), size="small", seed=0)
  assert sorted(os.listdir(tmp_path)) == ["world"] and not os.path.exists(killed)
