"""Sharded import / reload / export on a 4-device mesh (subprocess: fake CPU devices), and
the command-line tools import_hf.py -> export_hf.py."""
import json
import os
import subprocess
import sys

import pytest

import hf_fixtures as fx
from exgra_jax.hf import importer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")


def _run(*args: str) -> str:
  out = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=ENV,
                       cwd=ROOT, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("llava"))
  fx.llava_dir(directory, fx.tiny_config("sci"))
  return directory


def test_sharded_import_reload_and_export(llava, tmp_path):
  stdout = _run(os.path.join(ROOT, "tests", "hf_sharded_run.py"), llava, str(tmp_path))
  result = json.loads(stdout.strip().splitlines()[-1])
  assert result["devices"] == 4
  expected = {"q_proj": [None, "fsdp", "tensor", None], "embed": ["tensor", "fsdp"],
              "lm_head": ["fsdp", "tensor"], "vision_fc1": [None, "tensor"]}
  for stage in ("import", "reload"):
    assert {k: v["spec"] for k, v in result[stage].items()} == expected
    assert result[stage]["q_proj"]["shard_fraction"] == 0.25  # no device holds it whole
  assert result["import_equal"] and result["reload_equal"] and result["export_equal"]


def test_command_line_import_then_export(tmp_path):
  cfg = fx.tiny_config("dci", "linear")
  fx.release_dir(str(tmp_path / "release"), str(tmp_path / "clip"), cfg)
  ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "export")
  report = json.loads(_run("tools/import_hf.py", f"--hf_dir={tmp_path / 'release'}",
                           f"--clip_dir={tmp_path / 'clip'}", "--connector=dci",
                           "--connector_layers=1,2", f"--out={ckpt}"))
  assert report["layout"] == "release" and report["report"]["missing"] == []
  assert report["model"]["connector"] == "dci"
  exported = json.loads(_run("tools/export_hf.py", f"--checkpoint={ckpt}", f"--out={out}",
                             "--layout=release", "--shard_size_gb=0.0001"))
  assert exported["files"] > 1
  again = importer.import_model(out)
  direct = importer.import_model(str(tmp_path / "release"), str(tmp_path / "clip"),
                                 overrides={"connector": "dci", "connector_layers": (1, 2)})
  fx.assert_same_params(again.params, direct.params)
  assert again.model_config.connector == "dci"
