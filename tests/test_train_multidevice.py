"""Sharded step on 4 fake CPU devices equals the 1-device step; checkpoints move between meshes."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("ckpt")
  env = dict(os.environ, PYTHONPATH=ROOT)
  out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "train_sharded_run.py"),
                        str(workdir)], capture_output=True, text=True, env=env, timeout=600,
                       check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_fsdp_data_mesh_losses_match_one_device(run):
  one, four = run["losses"]["one"], run["losses"]["four"]
  assert len(one) == 2 and one[0] != one[1]
  for a, b in zip(one, four):
    assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (one, four)


def test_checkpoint_from_four_devices_restores_on_one(run):
  assert run["restored_devices"] == [0]
  assert run["restore_max_diff"] == 0.0
