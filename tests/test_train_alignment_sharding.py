"""The alignment runs where its samples are (train/alignment_sharding.py), with the same
results as the unsharded loss; the sharded stage-2 step honours the models' logical
constraints and calls the host solver once per device with that device's groups only."""
import json
import os
import subprocess
import sys

import pytest

from exgra_jax.train import alignment_sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELPER = os.path.join(ROOT, "tests", "alignment_sharded_run.py")


@pytest.fixture(scope="module")
def run() -> dict:
  out = subprocess.run([sys.executable, HELPER], capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, PYTHONPATH=ROOT), check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])


def test_group_span_lays_groups_on_whole_shards():
  assert alignment_sharding.group_span(8, 32, 4) == 1      # 8 per shard: one group each
  assert alignment_sharding.group_span(4, 32, 4) == 1      # two groups per shard
  assert alignment_sharding.group_span(16, 16, 16) == 16   # 1 sample per chip, 16 chips
  assert alignment_sharding.group_span(12, 24, 4) == 2
  with pytest.raises(ValueError, match="cannot be laid on devices"):
    alignment_sharding.group_span(6, 32, 4)                # 8 per shard, groups of 6
  with pytest.raises(ValueError, match="does not split"):
    alignment_sharding.group_span(8, 30, 4)


def test_sharded_alignment_equals_the_unsharded_loss(run):
  spans = sorted({case["span"] for case in run["cases"]})
  assert spans == [1, 2, 4]                     # per-device groups and groups over 2 / 4 chips
  for case in run["cases"]:
    a, b = case["loss"]
    assert a == pytest.approx(b, abs=1e-6), case
    assert case["matchings_equal"], case
    assert case["aux_diff"] <= 1e-6, case
    assert case["grad_scale"] > 0 and case["grad_diff"] <= 1e-6 * max(1.0, case["grad_scale"]), case


def test_each_device_solves_only_its_groups(run):
  for case in run["cases"]:
    groups_per_device = max(1, case["batch"] // 4 // case["group"])
    g = case["group"]
    # forward solve and IMLE re-solve, each of this device's groups only (S=1, 6 problems)
    assert case["callback_shapes"] == [f"f32[1,6,{groups_per_device},{g},{g}]"] * 2, case


def test_sharded_step_holds_constraints_and_solves_per_device(run):
  for program in run["steps"]:
    assert program["constraints"] > 20, program          # the models' logical constraints
    assert not program["maximal"], program               # nothing pinned to one device
    g = program["group_size"]
    local = 8 // g if g <= 8 else 1
    assert program["callback_shapes"] == [f"f32[1,6,{local},{g},{g}]"] * 2, program
