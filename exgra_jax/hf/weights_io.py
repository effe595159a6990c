"""Reading and writing HF weight files one tensor at a time, without running any code.

Reading: safetensors (one file, several, or sharded with `model.safetensors.index.json`)
through `safetensors.safe_open` (memory-mapped; a tensor is read when asked for). PyTorch
`.bin` files only through `torch.load(weights_only=True, mmap=True)`, which refuses any
pickle that holds more than tensors and plain containers; torch is imported only then.
Anything else (`.pt`, `.ckpt`, `.pkl`, `.msgpack`, `.h5`, ...) is refused: a pickle can
execute code when loaded. An index may only name files inside its directory (a weight
map pointing at `../x.safetensors` or an absolute path is refused), and every error names
the file it is about. Arrays come back as numpy in the file's dtype (bfloat16 through
ml_dtypes), so nothing is upcast before the caller casts to the parameter dtype.

Writing: `write_shards` streams (name, array) pairs into safetensors shards of at most
`max_shard_bytes` (a larger tensor gets a shard of its own, as transformers does) plus
`model.safetensors.index.json`, with the `{"format": "pt"}` metadata transformers checks.
`replace_directory` moves a finished temporary directory into place, so that a reader
sees the old directory or the new one, never a half-written one.
"""
from __future__ import annotations

import glob
import json
import os
import pickle
import shutil
from collections.abc import Iterable
from typing import Any

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from exgra_jax import temp_paths

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
# Weights formats that are refused (loading them can run code), named in the error.
REFUSED_SUFFIXES = (".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".msgpack", ".h5", ".npz")
# How a Hugging Face repository is fetched whole (README step 2), for the messages.
DOWNLOAD = "`hf download REPO --local-dir DIR`"


class UnsupportedWeightsError(ValueError):
  """The directory holds no weights this reader accepts, or a pickle that is not weights-only."""


def _torch_load(path: str) -> dict[str, Any]:
  """A `.bin` state dict, weights-only (tensors and containers; no code), memory-mapped."""
  import torch  # pylint: disable=g-import-not-at-top  (only needed for .bin checkpoints)
  try:
    try:
      state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:  # pre-1.6 (non-zip) files cannot be memory-mapped
      if "mmap" not in str(e):
        raise
      state = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    raise UnsupportedWeightsError(
        f"{path} is not a weights-only PyTorch checkpoint and is refused (loading it could "
        f"run code): {str(e).splitlines()[0]}") from None
  if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
    raise UnsupportedWeightsError(f"{path} does not hold a flat state dict of tensors")
  return state


def _torch_to_numpy(tensor: Any) -> np.ndarray:
  import torch  # pylint: disable=g-import-not-at-top
  tensor = tensor.detach().contiguous()
  if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: same bits, ml_dtypes view
    return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return tensor.numpy()


def _index_files(index_path: str) -> dict[str, str]:
  """{tensor name: file path} of an index; refuses files outside the index's directory."""
  # Lexical (not realpath): a hub cache's shards are symlinks to blobs elsewhere.
  directory = os.path.normpath(os.path.abspath(os.path.dirname(index_path)))
  try:
    with open(index_path) as f:
      weight_map = json.load(f)["weight_map"]
  except (ValueError, KeyError, TypeError) as e:
    raise UnsupportedWeightsError(f"{index_path}: not a weights index ({e!r})") from None
  files = {}
  for name, file in weight_map.items():
    path = os.path.normpath(os.path.join(directory, str(file)))
    if os.path.commonpath([directory, path]) != directory:
      raise UnsupportedWeightsError(
          f"{index_path}: tensor {name} is mapped to {file!r}, outside {directory}; an "
          "index may only name files in its own directory")
    files[name] = path
  return files


class TensorReader:
  """The tensors of one HF directory by name; files open lazily, tensors read on demand."""

  def __init__(self, directory: str):
    self.directory = directory
    self._open: dict[str, Any] = {}
    self.kind, self._files = self._find_weights()

  def _find_weights(self) -> tuple[str, dict[str, str]]:
    """-> (kind "safetensors" | "bin", {tensor name: file path})."""
    for kind, index_name, pattern in (("safetensors", SAFETENSORS_INDEX, "*.safetensors"),
                                      ("bin", BIN_INDEX, "*.bin")):
      self.kind = kind
      index_path = os.path.join(self.directory, index_name)
      if os.path.exists(index_path):
        return kind, _index_files(index_path)
      files = sorted(glob.glob(os.path.join(self.directory, pattern)))
      if files:
        return kind, {name: path for path in files for name in self._opened(path).keys()}
    present = sorted(os.listdir(self.directory)) if os.path.isdir(self.directory) else []
    refused = [f for f in present if f.endswith(REFUSED_SUFFIXES)]
    raise UnsupportedWeightsError(
        f"no safetensors or .bin weights in {self.directory} (it holds {present[:12]}); " + (
            f"{refused[:4]}: other formats are refused because loading them can run code: "
            "convert them to safetensors with a tool you trust" if refused else
            f"the weights were not downloaded: fetch the whole repository ({DOWNLOAD})"))

  def _opened(self, path: str) -> Any:
    if path not in self._open:
      if not os.path.isfile(path):
        raise UnsupportedWeightsError(f"{path}: weights file missing")
      if self.kind == "safetensors":
        try:
          self._open[path] = safetensors.safe_open(path, framework="np")
        except Exception as e:  # safetensors raises its own error types
          raise UnsupportedWeightsError(
              f"{path}: unreadable safetensors file ({e}): the file is damaged or was not "
              "downloaded completely; download it again") from None
      else:
        self._open[path] = _torch_load(path)
    return self._open[path]

  def _handle(self, name: str) -> Any:
    return self._opened(self._files[name])

  def file_of(self, name: str) -> str:
    """The file that holds tensor `name` (for error messages)."""
    return self._files[name]

  def names(self) -> list[str]:
    return list(self._files)

  def shape(self, name: str) -> tuple[int, ...]:
    """The stored shape, without reading the data."""
    handle = self._handle(name)
    if self.kind == "safetensors":
      return tuple(handle.get_slice(name).get_shape())
    return tuple(handle[name].shape)

  def read(self, name: str) -> np.ndarray:
    """One tensor as a host numpy array in its stored dtype."""
    handle = self._handle(name)
    try:
      if self.kind == "safetensors":
        return handle.get_tensor(name)
      return _torch_to_numpy(handle[name])
    except Exception as e:  # a name the index promises but the file lacks, a bad file
      raise UnsupportedWeightsError(f"{self.file_of(name)}: cannot read tensor {name}: "
                                    f"{e}") from None

  def close(self) -> None:
    for handle in self._open.values():
      if hasattr(handle, "__exit__"):
        handle.__exit__(None, None, None)
    self._open.clear()

  def __enter__(self) -> TensorReader:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def write_shards(tensors: Iterable[tuple[str, np.ndarray]], directory: str,
                 max_shard_bytes: int) -> dict[str, int]:
  """Writes `model-0000i-of-0000N.safetensors` + the index; -> counts of tensors, bytes, files.

  Holds at most one shard's tensors in memory. Names must be unique.
  """
  if max_shard_bytes <= 0:
    raise ValueError(f"max_shard_bytes={max_shard_bytes} must be positive")
  weight_map: dict[str, int] = {}
  pending: dict[str, np.ndarray] = {}
  pending_bytes = total = 0
  shards = 0

  def flush() -> None:
    nonlocal pending, pending_bytes, shards
    safetensors.numpy.save_file(pending, os.path.join(directory, f"shard-{shards}.tmp"),
                                metadata={"format": "pt"})
    shards += 1
    pending, pending_bytes = {}, 0

  for name, array in tensors:
    if name in weight_map:
      raise ValueError(f"tensor {name} written twice")
    size = array.nbytes
    if pending and pending_bytes + size > max_shard_bytes:
      flush()
    pending[name] = np.ascontiguousarray(array)
    pending_bytes += size
    total += size
    weight_map[name] = shards
  if pending or not shards:
    flush()
  files = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
  for i, file in enumerate(files):
    os.replace(os.path.join(directory, f"shard-{i}.tmp"), os.path.join(directory, file))
  index = {"metadata": {"total_size": total},
           "weight_map": {name: files[i] for name, i in weight_map.items()}}
  with open(os.path.join(directory, SAFETENSORS_INDEX), "w") as f:
    json.dump(index, f, indent=2, sort_keys=True)
  return {"tensors": len(weight_map), "bytes": total, "files": shards}


def replace_directory(tmp: str, out_dir: str) -> None:
  """Puts the finished `tmp` at `out_dir` by rename (an older `out_dir` is removed after)."""
  os.chmod(tmp, 0o755)
  old = None
  if os.path.exists(out_dir):
    old = temp_paths.new_dir(os.path.dirname(out_dir), f"{os.path.basename(out_dir)}.old")
    os.replace(out_dir, os.path.join(old, "previous"))
  os.replace(tmp, out_dir)
  if old:
    shutil.rmtree(old)
