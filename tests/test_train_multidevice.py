"""Sharded step on 4 devices (1 process, and 2 processes x 2 devices over gloo) equals the
1-device step; checkpoints move between meshes and from 2 processes to 1."""
import json
import os
import socket
import subprocess
import sys

import pytest

from exgra_jax.weights import inspection

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELPER = os.path.join(ROOT, "tests", "train_sharded_run.py")
ENV = dict(os.environ, PYTHONPATH=ROOT)


def _last_json(stdout: str) -> dict:
  return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


@pytest.fixture(scope="module")
def single(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("single")
  out = subprocess.run([sys.executable, HELPER, "single", str(workdir)], capture_output=True,
                       text=True, env=ENV, timeout=600, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  return _last_json(out.stdout)


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("multi")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  out = subprocess.run(["bash", os.path.join(ROOT, "launch", "local_multiprocess.sh"), "2",
                        str(port), "--", sys.executable, HELPER, "multi", str(workdir)],
                       capture_output=True, text=True, env=ENV, timeout=600, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  return _last_json(out.stdout), workdir


def test_fsdp_data_mesh_losses_match_one_device(single):
  one, four = single["losses"]["one"], single["losses"]["four"]
  assert len(one) == 2 and one[0] != one[1]
  for a, b in zip(one, four):
    assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (one, four)


def test_checkpoint_from_four_devices_restores_on_one(single):
  assert single["restored_devices"] == [0]
  assert single["restore_max_diff"] == 0.0


def test_two_processes_match_one_process(single, multi):
  result, workdir = multi
  assert result["processes"] == 2 and result["devices"] == 4
  for a, b in zip(single["losses"]["four"], result["losses"]):
    assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (single["losses"], result["losses"])
  info = inspection.read_checkpoint(str(workdir / "2"))
  assert info["step"] == 2


def test_plan_memory_tool_compiles_the_tiny_step_on_fake_devices():
  out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "plan_memory.py"),
                        "--config=" + os.path.join(ROOT, "configs", "demo.py"), "--stage=stage2",
                        "--devices=4", "--mesh=data=2,fsdp=2", "--samples_per_device=2",
                        "--length=72"], capture_output=True, text=True, env=ENV, timeout=600,
                       check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 1}" in out.stdout
  peak_mib = float(out.stdout.split("peak")[1].split("MiB")[0])
  assert 1.0 < peak_mib < 1024.0
