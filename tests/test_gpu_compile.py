"""The CUDA compiler's view of the stage-2 step (tools/plan_memory.py --gpu): the tiny
model's step in bf16, alignment and host callbacks included, compiled for 4 H100s by jax's
CUDA plugin and cuDNN on this CPU host (no GPU), with the project's GPU flags."""
import json
import re

import pytest

from exgra_jax.train import gpu_flags, gpu_targets
from plan_memory_cli import run_plan

STEP = ("--stage=stage2", "--gpu=h100:4", "--samples_per_device=8", "--length=72",
        "--config.model.dtype=bfloat16", "--config.model.attention=auto")


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
  hlo = tmp_path_factory.mktemp("gpu") / "step.hlo"
  out = run_plan(*STEP, "--json", f"--hlo_out={hlo}")
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1]), hlo.read_text()


def test_tiny_stage2_step_fits_four_h100s_with_the_projects_flags(plan):
  result, _ = plan
  assert result["topology"] == "h100:1x1x4" and result["chips"] == 4
  assert result["device_kind"] == "NVIDIA H100 80GB HBM3"
  assert result["mesh"]["fsdp"] == 4
  assert result["device_memory_gib"] == pytest.approx(84942979072 / 2 ** 30)  # XLA's h100_sxm
  assert result["hbm_gib"] == pytest.approx(result["device_memory_gib"]
                                            * gpu_flags.MEMORY_FRACTION)
  assert result["fits"] and 0 < result["peak_gib"] < 1.0
  assert result["xla_flags"] == " ".join(gpu_flags.command_line())
  assert "--xla_gpu_enable_triton_gemm=false" in result["xla_flags"]
  assert result["collectives"]["all-gather"] > 0       # FSDP gathers the sharded weights


def test_one_host_callback_per_gpu_and_nothing_pinned(plan):
  """Each GPU's callbacks (the forward solve and the IMLE re-solve) take that GPU's own
  group: 4 groups of 8 over 4 GPUs, so one group [1, 6 problems, 1, 8, 8] per call."""
  result, hlo = plan
  callbacks = [line for line in hlo.splitlines()
               if 'custom_call_target="xla_ffi_python_gpu_callback"' in line]
  assert result["callback"] == "per_device"
  assert len(callbacks) == 2
  assert all(line.split("=", 1)[1].lstrip().startswith("(f32[1,6,1,8,8]")
             for line in callbacks)
  assert "maximal" not in hlo


def test_activations_are_sharded_by_batch(plan):
  """Each GPU holds its 8 samples' activations [8, 72, 128] (or their rows [576, 128]),
  never the global batch's 32."""
  _, hlo = plan
  assert re.search(r"\[8,72,128\]|\[576,128\]", hlo)
  assert not re.search(r"\[32,72,128\]|\[2304,128\]", hlo)


def test_bf16_auto_attention_is_cudnn_forward_and_backward(plan):
  result, hlo = plan
  assert result["cudnn_attention"] > 0
  assert '__cudnn$fmhaSoftmax"' in hlo and '__cudnn$fmhaSoftmaxBackward"' in hlo


def test_a_missing_cuda_plugin_is_one_line_with_the_install_command(tmp_path):
  out = run_plan(*STEP, hidden_module="jax_plugins.xla_cuda12", tmp_path=tmp_path)
  assert out.returncode == 2, out.stderr[-2000:]
  assert "CUDA" in out.stderr and "pip install -e '.[cuda]'" in out.stderr
  assert "Traceback" not in out.stderr


def test_the_gpu_flags_keep_a_users_choice_and_add_the_rest():
  environ = {"XLA_FLAGS": "--xla_gpu_enable_triton_gemm=true --xla_dump_to=/tmp/d"}
  gpu_flags.apply(environ)
  assert environ["XLA_FLAGS"].split() == [
      "--xla_gpu_enable_triton_gemm=true", "--xla_dump_to=/tmp/d",
      "--xla_gpu_enable_latency_hiding_scheduler=true"]
  assert environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.90"
  gpu_flags.apply(environ)  # idempotent: main and the launcher both apply them
  assert environ["XLA_FLAGS"].count("latency_hiding") == 1


def test_gpu_specs_name_the_accepted_forms():
  assert gpu_targets.parse_gpu("h100:8") == ("h100", 8, "1x1x8")
  assert gpu_targets.parse_gpu("a100-40:16", nodes=2) == ("a100-40", 16, "1x2x8")
  for spec, nodes in (("h100", 1), ("v100:8", 1), ("h100:0", 1), ("h100:12", 1),
                      ("h100:16", 3)):
    with pytest.raises(ValueError, match="--gpu="):
      gpu_targets.parse_gpu(spec, nodes)
