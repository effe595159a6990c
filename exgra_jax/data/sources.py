"""Random-access grain sources: records + an image folder, or ArrayRecord shards.

The source only reads bytes (cheap, runs in the grain worker that asks for the element);
decoding and tokenisation are the pipeline's transform. A missing image becomes a
marked element rather than an exception, so a worker never dies on bad input.
"""
import json

import grain.python as grain
import numpy as np
from etils import epath

from exgra_jax.data import bad_records as bad
from exgra_jax.data.records import Record


class RecordImageSource:
  """Element i = `{"record": Record.to_json(), "image": bytes}` or a bad-record marker.

  The records are kept as one buffer of JSON rows plus offsets, not as Python objects:
  the source is pickled to every grain worker, and 500 k records as objects take ~12 s
  to pickle and unpickle per worker (and hundreds of MB each), as one buffer well under a
  second. Image paths were normalised and checked not to escape the root when the
  records were parsed (`records.safe_relative_path`).
  """

  def __init__(self, records: list[Record], image_root: str | epath.Path):
    rows = [json.dumps(r.to_json()).encode() for r in records]
    self._offsets = np.cumsum([0] + [len(row) for row in rows], dtype=np.int64)
    self._rows = b"".join(rows)
    self._root = epath.Path(image_root)

  def __len__(self) -> int:
    return len(self._offsets) - 1

  def __getitem__(self, index: int) -> dict:
    record = json.loads(self._rows[self._offsets[index]:self._offsets[index + 1]])
    path = self._root / record["image"]
    try:
      data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError):
      return {"bad_reason": bad.MISSING_IMAGE, "record_id": record["id"]}
    return {"record": record, "image": data}

  def __repr__(self) -> str:
    return f"RecordImageSource(records={len(self)}, image_root={str(self._root)!r})"


def encode_element(record: Record, image: bytes) -> bytes:
  """One ArrayRecord element: 4-byte little-endian JSON length, record JSON, image bytes."""
  header = json.dumps(record.to_json()).encode()
  return len(header).to_bytes(4, "little") + header + image


def decode_element(data: bytes) -> dict:
  """Inverse of `encode_element`, in the form the pipeline's transform reads."""
  size = int.from_bytes(data[:4], "little")
  return {"record": json.loads(data[4:4 + size]), "image": data[4 + size:]}


class ArrayRecordImageSource:
  """Shards written by `tools/to_array_record.py`: records with their encoded images.

  Reading a shard needs no image folder, so a training host reads a few large files
  (local or on a mounted bucket) instead of millions of small ones.
  """

  def __init__(self, paths: list[str]):
    if not paths:
      raise ValueError("no ArrayRecord shards given")
    self._source = grain.ArrayRecordDataSource([str(p) for p in paths])

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    return decode_element(self._source[index])

  def __repr__(self) -> str:
    return f"ArrayRecordImageSource({self._source!r})"


class ShardView:
  """Elements index, index + count, ... of the first floor(n / count) * count of `source`.

  Equal lengths on every process (so every host runs the same number of steps); the
  < count elements left out are logged by the pipeline.
  """

  def __init__(self, source, index: int, count: int):
    if not 0 <= index < count:
      raise ValueError(f"process index {index} not in [0, {count})")
    self._source, self._index, self._count = source, index, count
    self._length = len(source) // count
    if self._length == 0:
      raise ValueError(f"{len(source)} elements cannot be shared by {count} processes")

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> dict:
    return self._source[index * self._count + self._index]

  def __repr__(self) -> str:
    return f"ShardView({self._source!r}, {self._index}/{self._count})"
