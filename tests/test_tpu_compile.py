"""The TPU compiler's view of the stage-2 step (tools/plan_memory.py --topology): the tiny
model's step, alignment and host callbacks included, compiled for a v5e:2x2 slice by libtpu
on this CPU host. The one test file that runs libtpu (its process lock)."""
import json
import re

import pytest

from plan_memory_cli import run_plan


def _plan(*flags: str):
  return run_plan("--stage=stage2", *flags)


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
  hlo = tmp_path_factory.mktemp("tpu") / "step.hlo"
  out = _plan("--topology=v5e:2x2", "--mesh=data=1,fsdp=4", "--samples_per_device=8",
              "--length=72", "--json", f"--hlo_out={hlo}")
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1]), hlo.read_text()


def test_tiny_stage2_step_fits_a_v5e_slice_and_solves_per_device(plan):
  result, _ = plan
  assert result["topology"] == "v5e:2x2" and result["chips"] == 4
  assert result["device_kind"] == "TPU v5 lite" and result["hbm_gib"] == 16.0
  assert result["fits"] and 0 < result["peak_gib"] < 1.0
  assert result["callback"] == "per_device"
  assert result["collectives"]["all-gather"] > 0       # FSDP gathers the sharded weights


def test_activations_are_sharded_by_batch(plan):
  """With the logical constraints honoured each chip holds its 8 samples' activations
  [8, 72, 128], never the global batch's 32."""
  _, hlo = plan
  assert re.search(r"\[8,72,128\]", hlo)
  assert not re.search(r"\[32,72,128\]", hlo)


def test_each_chip_solves_its_own_group(plan):
  _, hlo = plan
  transfers = [line for line in hlo.splitlines() if "is_host_transfer=true" in line]
  assert transfers and not any("maximal device=" in line for line in transfers)
  assert any("f32[1,6,1,8,8]" in line for line in transfers)  # one group of 8 per chip


def test_a_group_size_the_mesh_cannot_hold_is_refused_up_front():
  out = _plan("--topology=v5e:2x2", "--mesh=data=1,fsdp=4", "--samples_per_device=8",
              "--length=72", "--config.align.grouping=fixed", "--config.align.group_size=12")
  assert out.returncode == 2
  assert "alignment groups of 12 samples" in out.stderr and "Traceback" not in out.stderr


def test_a_missing_libtpu_is_one_line_with_the_install_command(tmp_path):
  """libtpu hidden from the tool's interpreter (a `sitecustomize` that blocks its import):
  one line naming the install command, exit status 2, no traceback."""
  out = run_plan("--topology=v5e:2x2", "--mesh=data=1,fsdp=4", "--samples_per_device=8",
                 "--length=72", hidden_module="libtpu", tmp_path=tmp_path)
  assert out.returncode == 2, out.stderr[-2000:]
  assert "libtpu" in out.stderr and "pip install -e '.[tpu]'" in out.stderr
  assert "Traceback" not in out.stderr
