"""Append-only JSONL results keyed by item id: what makes judge and caption runs resumable.

Each finished item is appended as one complete line and flushed + fsynced before the next
starts, so an interrupted run loses at most the item in flight; a torn last line (killed
mid-write) is ignored on reading and that item is simply done again.
"""
from __future__ import annotations

import json
import os
import threading
from typing import Any


class JsonlStore:
  """{key: record} persisted at `path`; `add` is thread-safe (caption workers share it).

  `persist=False` keeps added records in memory only: the store of a process that is not
  the writer of a file every process reads.
  """

  def __init__(self, path: str, key: str, persist: bool = True):
    self.path, self.key, self.persist = path, key, persist
    self._lock = threading.Lock()
    self.records: dict[str, dict[str, Any]] = {}
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        for line in f:
          try:
            record = json.loads(line)
          except json.JSONDecodeError:
            continue
          self.records[str(record[key])] = record

  def __contains__(self, item_id: object) -> bool:
    return str(item_id) in self.records

  def add(self, record: dict[str, Any]) -> None:
    line = json.dumps(record, ensure_ascii=False) + "\n"
    with self._lock:
      if self.persist:
        with open(self.path, "a", encoding="utf-8") as f:
          if f.tell() and not self._ends_with_newline():
            f.write("\n")  # a torn line from a killed run must not swallow this record
          f.write(line)
          f.flush()
          os.fsync(f.fileno())
      self.records[str(record[self.key])] = record

  def _ends_with_newline(self) -> bool:
    with open(self.path, "rb") as f:
      f.seek(-1, os.SEEK_END)
      return f.read(1) == b"\n"
