"""`train/model_checkpoint`: params from a train checkpoint (no optimizer structure needed,
`gnn` dropped), a stage directory (newest step), a params-only checkpoint and an HF
directory, with the missing / unexpected report; `exporter.export_from_workdir`."""
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import hf_fixtures as fx
from configs import base
from exgra_jax.hf import exporter, importer
from exgra_jax.train import model_checkpoint
from exgra_jax.train.checkpointing import StageCheckpointer
from exgra_jax.train.state import create_train_state


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

  step = model_checkpoint.load(os.path.join(stage_dir, "3"))
  assert step.kind == model_checkpoint.TRAIN_STEP and step.tokenizer_dir is None
  assert step.report == {"missing": [], "unexpected": [], "initialised": []}
  assert "gnn" not in step.params and step.model_config == imp.model_config
  fx.assert_same_params(step.params, imp.params)

  newest = model_checkpoint.load(stage_dir, tokenizer_dir=imp.tokenizer_dir)
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
    model_checkpoint.load(stage_dir)
  loaded = model_checkpoint.load(stage_dir, allow_missing=True)
  assert loaded.report == {"missing": ["projector/linear_1/bias"],
                           "unexpected": ["llm/extra/scale"],
                           "initialised": ["projector/linear_1/bias"]}
  np.testing.assert_array_equal(loaded.params["projector"]["linear_1"]["bias"], 0.0)
  assert "extra" not in loaded.params["llm"]


def test_params_checkpoint_round_trip_and_replacement(hf, tmp_path):
  directory, imp = hf
  out = str(tmp_path / "params")
  model_checkpoint.save_params(out, dict(imp.params, gnn={"w": jnp.ones(2)}), imp.model_config,
                               tokenizer_dir=imp.tokenizer_dir)
  loaded = model_checkpoint.load(out)
  assert loaded.kind == model_checkpoint.PARAMS and loaded.model_config == imp.model_config
  assert loaded.tokenizer_dir == os.path.join(out, model_checkpoint.TOKENIZER_SUBDIR)
  assert loaded.report["missing"] == loaded.report["unexpected"] == []
  fx.assert_same_params(loaded.params, imp.params)

  later = jax.tree.map(lambda x: x * 2, imp.params)
  model_checkpoint.save_params(out, later, imp.model_config.to_dict())  # replaces it whole
  fx.assert_same_params(model_checkpoint.load(out).params, later)
  assert sorted(os.listdir(tmp_path)) == ["params"]

  from_hf = model_checkpoint.load(directory)
  assert from_hf.kind == model_checkpoint.HF and from_hf.tokenizer_dir == directory
  fx.assert_same_params(from_hf.params, imp.params)
  with pytest.raises(FileNotFoundError, match="is not a checkpoint"):
    model_checkpoint.load(str(tmp_path))


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
  result = exporter.export_from_workdir(config, workdir)
  assert result["out_dir"] == str(workdir / "export" / "llava") and result["layout"] == "llava"
  again = importer.import_model(result["out_dir"])
  fx.assert_same_params(again.params, imp.params)
