"""Extended captions (`conversations_long`) for a record file via an LLM (docs/data.md).

Each assistant answer is sent with its question as JSON `{"question", "answer"}`; the
reply must be JSON `{"revision": str}` holding one paragraph no longer than twice the
input JSON (characters). Invalid replies are asked again; a record whose turns cannot all
be rewritten is listed in the failures file with the reason, never dropped in silence.
Finished records are appended to a progress jsonl as they complete (a rerun skips them),
and the output record file is written atomically (temp file + rename) at the end with
the records in input order.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import re
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import tqdm

from exgra_jax.llm_clients.chat_client import ChatClient, ChatError
from exgra_jax.eval.jsonl_store import JsonlStore

SYSTEM_PROMPT = (
    "You rewrite answers from a biomedical image conversation into extended captions. "
    "The user sends JSON {\"question\": ..., \"answer\": ...}. Rewrite the answer so that "
    "it is a richer, self-contained description that stays faithful to the answer and "
    "adds no new findings. Reply with JSON only: {\"revision\": \"...\"}. The revision is "
    "a single paragraph (no line breaks) at most twice as long as the input JSON.")
_FENCE = re.compile(r"^```(?:json)?\s*|\s*```$")


class InvalidRevision(ValueError):
  """The endpoint replied, but not with a usable {"revision": ...}."""


@dataclasses.dataclass(frozen=True)
class ExtensionSettings:
  """Concurrency (worker threads), requests_per_minute (0 = unlimited), attempts per turn."""
  concurrency: int = 4
  requests_per_minute: float = 0.0
  attempts: int = 3

  def __post_init__(self):
    if self.concurrency < 1 or self.attempts < 1 or self.requests_per_minute < 0:
      raise ValueError(f"invalid extension settings: {self}")


class RateLimiter:
  """Spaces request starts at least 60 / requests_per_minute seconds apart (all threads)."""

  def __init__(self, requests_per_minute: float):
    self._interval = 60.0 / requests_per_minute if requests_per_minute else 0.0
    self._lock = threading.Lock()
    self._next = 0.0

  def wait(self) -> None:
    with self._lock:
      now = time.monotonic()
      start = max(now, self._next)
      self._next = start + self._interval
    time.sleep(max(0.0, start - now))


def strip_image_token(text: str) -> str:
  return " ".join(text.replace("<image>", " ").split())


def parse_revision(reply: str, request: str) -> str:
  """The revision in `reply`, or InvalidRevision naming what is wrong."""
  try:
    parsed = json.loads(_FENCE.sub("", reply.strip()))
  except json.JSONDecodeError as e:
    raise InvalidRevision(f"reply is not JSON: {reply[:80]!r}") from e
  revision = parsed.get("revision") if isinstance(parsed, dict) else None
  if not isinstance(revision, str) or not revision.strip():
    raise InvalidRevision(f"reply has no non-empty string 'revision': {reply[:80]!r}")
  revision = revision.strip()
  if "\n" in revision:
    raise InvalidRevision("revision is more than one paragraph")
  if len(revision) > 2 * len(request):
    raise InvalidRevision(f"revision has {len(revision)} characters, limit "
                          f"{2 * len(request)}")
  return revision


def extend_turn(client: ChatClient, limiter: RateLimiter, question: str, answer: str,
                attempts: int) -> str:
  """One answer -> its extended caption; raises the last error after `attempts` tries."""
  request = json.dumps({"question": strip_image_token(question), "answer": answer},
                       ensure_ascii=False)
  messages = [{"role": "system", "content": SYSTEM_PROMPT},
              {"role": "user", "content": request}]
  error: Exception = InvalidRevision("no attempt made")
  for _ in range(attempts):
    limiter.wait()
    try:
      return parse_revision(client.complete(messages), request)
    except (ChatError, InvalidRevision) as e:
      error = e
  raise error


def extend_record(client: ChatClient, limiter: RateLimiter, record: Mapping[str, Any],
                  attempts: int) -> dict[str, Any]:
  """A record -> a copy with `conversations_long` (each gpt turn rewritten)."""
  turns = record.get("conversations")
  if not isinstance(turns, list) or not turns:
    raise ValueError(f"record {record.get('id')!r} has no conversations")
  long_turns, question = [], ""
  for turn in turns:
    if turn.get("from") == "human":
      question = turn["value"]
      long_turns.append(dict(turn))
    else:
      long_turns.append({**turn, "value": extend_turn(client, limiter, question,
                                                      turn["value"], attempts)})
  return {**record, "conversations_long": long_turns}


def write_json_atomically(path: str, value: Any) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(value, f, ensure_ascii=False, indent=1)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def extend_records(records: Sequence[Mapping[str, Any]], client: ChatClient, output_path: str,
                   settings: ExtensionSettings = ExtensionSettings(), *,
                   progress: bool = True) -> dict[str, Any]:
  """Extends every record; writes `output_path`, `.progress.jsonl` and `.failures.jsonl`.

  Returns {"done": n, "failed": [{"id", "error"}]}. The output holds the records done so
  far (this run and earlier ones) in input order; failures are retried by a rerun.
  """
  ids = [str(r.get("id")) for r in records]
  if len(set(ids)) != len(ids):
    raise ValueError("record ids must be unique to resume extension")
  store = JsonlStore(output_path + ".progress.jsonl", key="id")
  limiter = RateLimiter(settings.requests_per_minute)
  todo = [r for r, i in zip(records, ids) if i not in store]
  failures = []
  with concurrent.futures.ThreadPoolExecutor(settings.concurrency) as pool, \
      tqdm.tqdm(total=len(records), initial=len(records) - len(todo), disable=not progress,
                desc="extend captions") as bar:
    futures = {pool.submit(extend_record, client, limiter, r, settings.attempts): r
               for r in todo}
    for future in concurrent.futures.as_completed(futures):
      record_id = str(futures[future].get("id"))
      try:
        store.add(future.result())
      except (ChatError, InvalidRevision, ValueError) as e:
        failures.append({"id": record_id, "error": str(e)})
      bar.update(1)
  write_json_atomically(output_path, [store.records[i] for i in ids if i in store])
  failures_path = output_path + ".failures.jsonl"
  with open(failures_path, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(failure) + "\n" for failure in failures)
  return {"done": sum(i in store for i in ids), "failed": failures}
