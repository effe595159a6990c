"""`weights/loading`: params from a train checkpoint (no optimizer structure needed,
`gnn` dropped), a stage directory (newest step), a params-only checkpoint and an HF
directory, with the missing / unexpected report; `loading.export_from_workdir`."""
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import hf_fixtures as fx
from configs import base
from exgra_jax.hf import exporter, importer
from exgra_jax.train.stage_checkpoints import StageCheckpointer
from exgra_jax.train.state import create_train_state
from exgra_jax.weights import inspection, loading
from exgra_jax.weights.checksum import parameter_checksum

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("hf"))
  fx.llava_dir(directory, fx.tiny_config())
  return directory, importer.import_model(directory)


def _write_stage(stage_dir: str, steps: dict[int, dict], model_config: dict) -> None:
  """Train checkpoints as the loop writes them: TrainState (AdamW, + a `gnn`) per step."""
  checkpointer = StageCheckpointer(stage_dir, every=1, keep=5, async_save=False)
  for step, params in steps.items():
    params = dict(params, gnn={"dense": {"kernel": jnp.ones((4, 4))}})
    state = create_train_state(params, optax.adamw(1e-3), seed=step)
    checkpointer.save(step, state, {"position": step}, model_config, force=True)
  checkpointer.wait()
  checkpointer.close()


def test_train_checkpoint_and_stage_directory(hf, tmp_path):
  _, imp = hf
  later = jax.tree.map(lambda x: x + 1, imp.params)
  stage_dir = str(tmp_path / "checkpoints" / "stage2")
  _write_stage(stage_dir, {3: imp.params, 7: later}, imp.model_config.to_dict())

  step = loading.load(os.path.join(stage_dir, "3"))
  assert step.kind == loading.TRAIN_STEP and step.tokenizer_dir is None
  assert step.report == {"missing": [], "unexpected": [], "initialised": []}
  assert "gnn" not in step.params and step.model_config == imp.model_config
  fx.assert_same_params(step.params, imp.params)

  newest = loading.load(stage_dir, tokenizer_dir=imp.tokenizer_dir)
  assert newest.path == os.path.join(stage_dir, "7") and newest.tokenizer_dir == imp.tokenizer_dir
  fx.assert_same_params(newest.params, later)


def test_missing_and_unexpected_parameters(hf, tmp_path):
  _, imp = hf
  params = jax.tree.map(lambda x: x, imp.params)
  del params["projector"]["linear_1"]["bias"]
  params["llm"]["extra"] = {"scale": jnp.ones(3)}
  stage_dir = str(tmp_path / "stage1")
  _write_stage(stage_dir, {1: params}, imp.model_config.to_dict())
  with pytest.raises(importer.MissingTensorsError, match="projector/linear_1/bias"):
    loading.load(stage_dir)
  loaded = loading.load(stage_dir, allow_missing=True)
  assert loaded.report == {"missing": ["projector/linear_1/bias"],
                           "unexpected": ["llm/extra/scale"],
                           "initialised": ["projector/linear_1/bias"]}
  np.testing.assert_array_equal(loaded.params["projector"]["linear_1"]["bias"], 0.0)
  assert "extra" not in loaded.params["llm"]


def test_params_checkpoint_round_trip_and_replacement(hf, tmp_path):
  directory, imp = hf
  out = str(tmp_path / "params")
  loading.save_params(out, dict(imp.params, gnn={"w": jnp.ones(2)}), imp.model_config,
                               tokenizer_dir=imp.tokenizer_dir)
  loaded = loading.load(out)
  assert loaded.kind == loading.PARAMS and loaded.model_config == imp.model_config
  assert loaded.tokenizer_dir == os.path.join(out, loading.TOKENIZER_SUBDIR)
  assert loaded.report["missing"] == loaded.report["unexpected"] == []
  fx.assert_same_params(loaded.params, imp.params)

  later = jax.tree.map(lambda x: x * 2, imp.params)
  loading.save_params(out, later, imp.model_config.to_dict())  # replaces it whole
  fx.assert_same_params(loading.load(out).params, later)
  assert sorted(os.listdir(tmp_path)) == ["params"]

  from_hf = loading.load(directory)
  assert from_hf.kind == loading.HF and from_hf.tokenizer_dir == directory
  fx.assert_same_params(from_hf.params, imp.params)
  with pytest.raises(FileNotFoundError, match="is not a checkpoint"):
    loading.load(str(tmp_path))


def test_export_from_workdir(hf, tmp_path):
  _, imp = hf
  config = base.get_config()
  config.model = ml_collections.ConfigDict(imp.model_config.to_dict())
  config.stages = ("stage1", "finetune")
  config.data.root = str(tmp_path / "data")
  config.data.tokenizer_dir = "tokenizer"  # relative to data.root
  config.export.shard_size_gb = 0.0001
  shutil.copytree(imp.tokenizer_dir, os.path.join(config.data.root, "tokenizer"))
  workdir = tmp_path / "run"
  _write_stage(str(workdir / "checkpoints" / "finetune"), {4: imp.params},
               imp.model_config.to_dict())
  result = loading.export_from_workdir(config, workdir)
  assert result["out_dir"] == str(workdir / "export" / "llava") and result["layout"] == "llava"
  again = importer.import_model(result["out_dir"])
  fx.assert_same_params(again.params, imp.params)


def test_one_checksum_for_every_checkpoint_kind(hf, tmp_path):
  """The training summary, the eval report and inspect_checkpoint print this one number."""
  _, imp = hf
  expected = parameter_checksum(imp.params)
  assert parameter_checksum(dict(imp.params, gnn={"w": jnp.ones(2)})) == expected
  stage_dir = str(tmp_path / "checkpoints" / "stage2")
  _write_stage(stage_dir, {5: imp.params}, imp.model_config.to_dict())  # with a gnn
  best = str(tmp_path / "checkpoints" / "finetune_best")
  loading.save_params(best, imp.params, imp.model_config, tokenizer_dir=imp.tokenizer_dir)
  step_info = inspection.read_checkpoint(stage_dir)
  assert step_info["kind"] == loading.STAGE and step_info["path"].endswith("stage2/5")
  best_info = inspection.read_checkpoint(best)
  assert (best_info["kind"], best_info["step"]) == (loading.PARAMS, None)
  assert step_info["checksum"] == best_info["checksum"] == expected
  assert parameter_checksum(loading.load(best).params) == expected
  out = subprocess.run([sys.executable, "tools/inspect_checkpoint.py", f"--checkpoint={best}"],
                       capture_output=True, text=True, cwd=ROOT, check=True,
                       env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"))
  assert f"checksum {expected}" in out.stdout


def test_export_tool_finds_the_run_tokenizer(hf, tmp_path, monkeypatch):
  """`tools/export_hf.py --checkpoint=WORKDIR/checkpoints/finetune --out=DIR`, as the README
  writes it: the tokenizer is the run's (WORKDIR/config.json), relative paths included."""
  _, imp = hf
  config = base.get_config()
  config.data.root = "data"  # relative to the directory the run started in
  config.data.tokenizer_dir = "tokenizer"
  shutil.copytree(imp.tokenizer_dir, str(tmp_path / "data" / "tokenizer"))
  workdir = tmp_path / "run"
  stage_dir = workdir / "checkpoints" / "finetune"
  _write_stage(str(stage_dir), {2: imp.params}, imp.model_config.to_dict())
  (workdir / "config.json").write_text(config.to_json_best_effort())
  monkeypatch.chdir(tmp_path)
  assert loading.load(str(stage_dir)).tokenizer_dir == "data/tokenizer"
  out = tmp_path / "export"
  subprocess.run([sys.executable, os.path.join(ROOT, "tools/export_hf.py"),
                  f"--checkpoint={stage_dir}", f"--out={out}"], capture_output=True,
                 text=True, cwd=tmp_path, check=True,
                 env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"))
  fx.assert_same_params(importer.import_model(str(out)).params, imp.params)
