"""Random-access grain sources: validated records + an image folder.

The source only reads bytes (cheap, runs in the grain worker that asks for the element);
decoding and tokenisation are the pipeline's transform. A missing image becomes a
marked element rather than an exception, so a worker never dies on bad input.
"""
from etils import epath

from exgra_jax.data import bad_records as bad
from exgra_jax.data.records import Record


class RecordImageSource:
  """Element i = `{"record": Record.to_json(), "image": bytes}` or a bad-record marker.

  Image paths were normalised and checked not to escape the root when the records were
  parsed (`records.safe_relative_path`).
  """

  def __init__(self, records: list[Record], image_root: str | epath.Path):
    self._records = list(records)
    self._root = epath.Path(image_root)

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict:
    record = self._records[index]
    path = self._root / record.image
    try:
      data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError):
      return {"bad_reason": bad.MISSING_IMAGE, "record_id": record.id}
    return {"record": record.to_json(), "image": data}

  def __repr__(self) -> str:
    return f"RecordImageSource(records={len(self._records)}, image_root={str(self._root)!r})"
