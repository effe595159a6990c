"""LLaVA-Med record files (JSON list or JSONL) validated into typed records, and subsets.

Formats (docs/data.md): stage-1 captions and stage-2 instructions are
`{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}...],
"conversations_long": [...]}`; VQA items add `"answer_type": "OPEN"|"CLOSED"`. A record
that breaks the format is skipped and counted in a `BadRecordLog` (never dropped
silently), and so is a JSONL line that is not UTF-8 or not JSON: one bad byte must not
reject a whole file. A JSON list cannot be read in part, so there it raises
`RecordFileError`, which says where and how to convert the file to JSONL.

Subsets are nested by construction: records are ranked by a keyed hash of their id and
the first `fraction` of the ranking is taken, so the 10 % subset lies inside the 40 %
subset inside the whole set, independent of file order and of the training seed.
"""
import dataclasses
import hashlib
import json
import posixpath

from etils import epath

from exgra_jax.data import bad_records as bad

IMAGE_TOKEN = "<image>"
ROLES = ("human", "gpt")
ANSWER_TYPES = ("OPEN", "CLOSED")
_SUBSET_KEY = "exgra-jax-subset-v1"


@dataclasses.dataclass(frozen=True)
class Turn:
  role: str   # "human" | "gpt"
  value: str


@dataclasses.dataclass(frozen=True)
class Record:
  """One validated sample. `image` is a normalised path relative to the image root."""
  id: str
  image: str
  conversations: tuple[Turn, ...]
  conversations_long: tuple[Turn, ...] = ()
  answer_type: str = ""

  def to_json(self) -> dict:
    out = {"id": self.id, "image": self.image,
           "conversations": [{"from": t.role, "value": t.value} for t in self.conversations]}
    if self.conversations_long:
      out["conversations_long"] = [
          {"from": t.role, "value": t.value} for t in self.conversations_long]
    if self.answer_type:
      out["answer_type"] = self.answer_type
    return out


def _turns(raw, record_id: str, key: str) -> tuple[Turn, ...]:
  if not isinstance(raw, list) or not raw:
    raise bad.BadRecordError(bad.EMPTY_CONVERSATION, record_id, f"{key} is empty or not a list")
  turns = []
  for i, t in enumerate(raw):
    if not isinstance(t, dict) or "from" not in t or "value" not in t:
      raise bad.BadRecordError(bad.MISSING_KEYS, record_id, f"{key}[{i}] needs 'from' and 'value'")
    if t["from"] not in ROLES or not isinstance(t["value"], str):
      raise bad.BadRecordError(bad.MISSING_KEYS, record_id,
                               f"{key}[{i}]: role {t['from']!r} not in {ROLES} or value not str")
    turns.append(Turn(t["from"], t["value"]))
  if not any(t.role == "gpt" and t.value.strip() for t in turns):
    raise bad.BadRecordError(bad.EMPTY_CONVERSATION, record_id, f"{key} has no answer")
  count = sum(t.value.count(IMAGE_TOKEN) for t in turns)
  if count == 0:
    raise bad.BadRecordError(bad.IMAGE_TOKEN_MISSING, record_id, key)
  if count > 1 or any(IMAGE_TOKEN in t.value for t in turns if t.role == "gpt"):
    raise bad.BadRecordError(bad.IMAGE_TOKEN_REPEATED, record_id,
                             f"{key} has {count} {IMAGE_TOKEN} (or one in an answer)")
  return tuple(turns)


def safe_relative_path(path: str, record_id: str) -> str:
  """Normalised relative path; absolute paths and `..` escaping the root are bad records."""
  norm = posixpath.normpath(path.replace("\\", "/"))
  if posixpath.isabs(norm) or norm == ".." or norm.startswith("../") or norm == ".":
    raise bad.BadRecordError(bad.PATH_ESCAPES_ROOT, record_id, path)
  return norm


def parse_record(raw, position: int) -> Record:
  """A decoded JSON object -> Record, or BadRecordError (id falls back to `#position`)."""
  record_id = str(raw.get("id", f"#{position}")) if isinstance(raw, dict) else f"#{position}"
  if not isinstance(raw, dict):
    raise bad.BadRecordError(bad.MISSING_KEYS, record_id, "record is not a JSON object")
  missing = [k for k in ("id", "image", "conversations") if k not in raw]
  if missing or not isinstance(raw["image"], str):
    raise bad.BadRecordError(bad.MISSING_KEYS, record_id, f"missing {missing or ['image (str)']}")
  conversations = _turns(raw["conversations"], record_id, "conversations")
  long = ()
  if "conversations_long" in raw:
    long = _turns(raw["conversations_long"], record_id, "conversations_long")
  answer_type = raw.get("answer_type", "")
  if answer_type and answer_type not in ANSWER_TYPES:
    raise bad.BadRecordError(bad.MISSING_KEYS, record_id,
                             f"answer_type {answer_type!r} not in {ANSWER_TYPES}")
  return Record(record_id, safe_relative_path(raw["image"], record_id), conversations,
                long, answer_type)


class RecordFileError(ValueError):
  """A record file that cannot be read at all (not one bad record): names the file."""


def _json_list(path: str | epath.Path, text: str) -> list:
  try:
    items = json.loads(text)
  except json.JSONDecodeError as e:
    raise RecordFileError(f"{path}: record file is not a valid JSON list: {e}") from e
  if not isinstance(items, list):
    raise RecordFileError(f"{path}: record file is not a JSON list")
  return items


def _raw_items(path: epath.Path, data: bytes, log: bad.BadRecordLog
               ) -> list[tuple[int, object]]:
  if data.lstrip().startswith(b"["):
    try:
      text = data.decode("utf-8")
    except UnicodeDecodeError as e:
      line = data.count(b"\n", 0, e.start) + 1
      raise RecordFileError(
          f"{path}: byte offset {e.start} (line {line}) is not UTF-8, so the JSON list cannot "
          f"be read. Convert it to JSONL, where such a record is skipped and counted: python "
          f"tools/check_data.py --records={path} --images=IMAGE_ROOT --to_jsonl=OUT.jsonl"
      ) from e
    return list(enumerate(_json_list(path, text)))
  items = []
  for line_no, line in enumerate(data.split(b"\n"), start=1):
    if not line.strip():
      continue
    try:
      items.append((line_no, json.loads(line.decode("utf-8"))))
    except UnicodeDecodeError:
      log.seen += 1
      log.add(bad.NOT_UTF8, f"line {line_no}")
    except json.JSONDecodeError:
      log.seen += 1
      log.add(bad.MALFORMED_JSON, f"line {line_no}")
  return items


def load_records(path: str | epath.Path, log: bad.BadRecordLog | None = None
                 ) -> tuple[list[Record], bad.BadRecordLog]:
  """Reads a JSON list or JSONL file; bad records are counted in the returned log.

  A JSONL line that is not UTF-8 or not JSON is a bad record named by its line number; a
  JSON list that cannot be decoded raises `RecordFileError` (with the byte offset).
  """
  log = log if log is not None else bad.BadRecordLog()
  path = epath.Path(path)
  records = []
  for position, raw in _raw_items(path, path.read_bytes(), log):
    log.seen += 1
    try:
      records.append(parse_record(raw, position))
    except bad.BadRecordError as e:
      log.add_error(e)
  return records, log


def list_to_jsonl(source: str | epath.Path, target: str | epath.Path) -> int:
  """Rewrites a JSON list record file as JSONL, one item per line; returns the count.

  Undecodable bytes inside strings are carried through unchanged (surrogateescape), so
  each lands in its own line, where `load_records` skips and counts that record alone.
  """
  items = _json_list(source, epath.Path(source).read_bytes().decode("utf-8", "surrogateescape"))
  lines = [json.dumps(item, ensure_ascii=False) + "\n" for item in items]
  epath.Path(target).write_bytes("".join(lines).encode("utf-8", "surrogateescape"))
  return len(items)


def _subset_rank(record_id: str) -> bytes:
  return hashlib.sha256(f"{_SUBSET_KEY}:{record_id}".encode()).digest()


def select_fraction(records: list[Record], fraction: float) -> list[Record]:
  """The deterministic nested subset: first round(fraction * n) records by keyed hash.

  The order of the input is kept (only membership is decided by the hash).
  """
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"subset fraction must be in (0, 1], got {fraction}")
  if fraction == 1.0:
    return list(records)
  keep = round(fraction * len(records))
  chosen = set(sorted(range(len(records)), key=lambda i: _subset_rank(records[i].id))[:keep])
  return [r for i, r in enumerate(records) if i in chosen]


def select_ids(records: list[Record], ids_file: str | epath.Path) -> list[Record]:
  """Records whose id is listed (one per line) in `ids_file`; unknown ids raise."""
  wanted = [line.strip() for line in epath.Path(ids_file).read_text().splitlines()
            if line.strip()]
  by_id = {r.id: r for r in records}
  unknown = [i for i in wanted if i not in by_id]
  if unknown:
    raise ValueError(f"{len(unknown)} ids in {ids_file} are not in the records "
                     f"(e.g. {unknown[:5]})")
  wanted_set = set(wanted)
  return [r for r in records if r.id in wanted_set]
