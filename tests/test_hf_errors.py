"""Bad checkpoints: missing / unexpected / mis-shaped tensors, unknown or unsupported
configs, `.bin` only through weights-only torch.load, everything else refused."""
import json
import os
import pathlib
import shutil

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
from flax import traverse_util

import hf_fixtures as fx
from exgra_jax.weights import loading
from exgra_jax.hf import hf_configs, importer
from exgra_jax.hf.weights_io import UnsupportedWeightsError


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("errors")
  cfg = fx.tiny_config()
  fx.release_dir(str(root / "release"), str(root / "clip"), cfg)
  fx.plain_dirs(str(root / "llama"), str(root / "clip_plain"), cfg)
  return root


def _copy(dirs, name: str, tmp_path) -> str:
  out = str(tmp_path / name)
  shutil.copytree(str(dirs / name), out)
  return out


def _edit_tensors(directory: str, edit) -> None:
  path = os.path.join(directory, "model.safetensors")
  tensors = safetensors.numpy.load_file(path)
  edit(tensors)
  safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})


def _edit_config(directory: str, **changes) -> None:
  path = os.path.join(directory, "config.json")
  with open(path) as f:
    config = json.load(f)
  config.update(changes)
  with open(path, "w") as f:
    json.dump(config, f)


def test_missing_tensor_is_named_raised_and_reported(dirs, tmp_path):
  model = _copy(dirs, "release", tmp_path)
  name = "model.layers.1.mlp.up_proj.weight"
  _edit_tensors(model, lambda t: t.pop(name))
  with pytest.raises(importer.MissingTensorsError, match=name):
    importer.import_model(model, str(dirs / "clip"))
  imp = importer.import_model(model, str(dirs / "clip"), allow_missing=True)
  assert imp.report["missing"] == [name]
  assert imp.report["initialised"] == ["llm/layers_1/mlp/up_proj/kernel"]
  assert imp.params["llm"]["layers_1"]["mlp"]["up_proj"]["kernel"].shape == (32, 48)
  with pytest.raises(loading.IncompleteWeights):  # eval refuses such a model
    loading.require_complete_weights(imp.report)


def test_wrong_shape_names_the_tensor_and_both_shapes(dirs, tmp_path):
  model = _copy(dirs, "release", tmp_path)
  name = "model.mm_projector.2.weight"
  _edit_tensors(model, lambda t: t.update({name: np.zeros((32, 20), np.float32)}))
  with pytest.raises(importer.ShapeMismatchError,
                     match=rf"{model}/model.safetensors: tensor {name}: expected shape "
                           r"\(32, 32\).*found \(32, 20\)"):
    importer.import_model(model, str(dirs / "clip"))


def test_unexpected_and_ignored_tensors(dirs, tmp_path):
  model = _copy(dirs, "release", tmp_path)
  _edit_tensors(model, lambda t: t.update({
      "model.extra.weight": np.zeros(3, np.float32),
      "model.layers.0.self_attn.rotary_emb.inv_freq": np.zeros(4, np.float32)}))
  imp = importer.import_model(model, str(dirs / "clip"))
  assert imp.report["unexpected"] == ["model.extra.weight"] and imp.report["missing"] == []


def test_unknown_architecture_is_explained(dirs, tmp_path):
  model = _copy(dirs, "llama", tmp_path)
  _edit_config(model, architectures=["GPT2LMHeadModel"], model_type="gpt2")
  with pytest.raises(hf_configs.UnsupportedCheckpointError,
                     match="GPT2LMHeadModel.*supported: LlavaForConditionalGeneration"):
    importer.import_model(model, str(dirs / "clip_plain"))


def test_unsupported_config_value_is_named(dirs, tmp_path):
  model = _copy(dirs, "llama", tmp_path)
  _edit_config(model, hidden_act="gelu")
  with pytest.raises(hf_configs.UnsupportedCheckpointError, match="hidden_act='gelu'"):
    importer.import_model(model, str(dirs / "clip_plain"))


def test_bin_weights_load_through_weights_only_torch_load(dirs, tmp_path):
  model = _copy(dirs, "llama", tmp_path)
  path = os.path.join(model, "model.safetensors")
  tensors = {k: torch.from_numpy(v).to(torch.bfloat16)
             for k, v in safetensors.numpy.load_file(path).items()}
  os.remove(path)
  torch.save(tensors, os.path.join(model, "pytorch_model.bin"))
  from_bin = importer.import_model(model, str(dirs / "clip_plain"))
  reference = importer.import_model(str(dirs / "llama"), str(dirs / "clip_plain"))
  flat_bin = traverse_util.flatten_dict(from_bin.params)
  flat_ref = traverse_util.flatten_dict(reference.params)
  assert flat_bin.keys() == flat_ref.keys()
  for key, value in flat_ref.items():
    want = np.asarray(value)
    if key[0] == "llm":  # the .bin holds the LLaMA in bfloat16
      want = want.astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(flat_bin[key]), want, err_msg=str(key))


class _Payload:
  """Unpickling this would create `marker`: a stand-in for code a pickle can run."""

  def __init__(self, marker: str):
    self.marker = marker

  def __reduce__(self):
    return pathlib.Path.touch, (pathlib.Path(self.marker),)


def test_pickle_that_is_not_weights_only_is_refused_without_running(dirs, tmp_path):
  model = _copy(dirs, "llama", tmp_path)
  os.remove(os.path.join(model, "model.safetensors"))
  marker = tmp_path / "code_ran"
  path = os.path.join(model, "pytorch_model.bin")
  torch.save({"model.embed_tokens.weight": _Payload(str(marker))}, path)
  with pytest.raises(UnsupportedWeightsError, match="not a weights-only PyTorch checkpoint"):
    importer.import_model(model, str(dirs / "clip_plain"))
  assert not marker.exists()
  torch.load(path, weights_only=False)  # the payload is real: an unrestricted load runs it
  assert marker.exists()


def test_other_weight_formats_are_refused(dirs, tmp_path):
  model = _copy(dirs, "llama", tmp_path)
  os.replace(os.path.join(model, "model.safetensors"), os.path.join(model, "model.pt"))
  with pytest.raises(UnsupportedWeightsError, match="no safetensors or .bin weights"):
    importer.import_model(model, str(dirs / "clip_plain"))


def test_index_naming_a_file_outside_the_directory_is_refused(dirs, tmp_path):
  model = _copy(dirs, "llama", tmp_path)
  outside = str(tmp_path / "elsewhere.safetensors")
  os.replace(os.path.join(model, "model.safetensors"), outside)
  names = safetensors.numpy.load_file(outside).keys()
  index = os.path.join(model, "model.safetensors.index.json")
  for target in ("../elsewhere.safetensors", outside):
    with open(index, "w") as f:
      json.dump({"weight_map": {name: target for name in names}}, f)
    with pytest.raises(UnsupportedWeightsError, match=rf"{index}: tensor .* outside"):
      importer.import_model(model, str(dirs / "clip_plain"))


def test_weights_errors_name_the_file(dirs, tmp_path):
  model = _copy(dirs, "llama", tmp_path)
  path = os.path.join(model, "model.safetensors")
  pathlib.Path(path).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
  with pytest.raises(UnsupportedWeightsError, match=f"{path}: unreadable safetensors"):
    importer.import_model(model, str(dirs / "clip_plain"))
  index = os.path.join(model, "model.safetensors.index.json")
  pathlib.Path(index).write_text("{not json")
  with pytest.raises(UnsupportedWeightsError, match=f"{index}: not a weights index"):
    importer.import_model(model, str(dirs / "clip_plain"))
