"""Bookkeeping of skipped records: every bad record is counted with its id and reason.

Why a log rather than exceptions: one unreadable image among millions must not stop a
multi-day run, yet nothing may vanish silently. Workers turn a problem into a
`BadRecordError`; the pipeline records it here; the training loop logs `counts()` and the
run stops with `TooManyBadRecords` (and a summary) once the bad fraction exceeds
`config.data.max_bad_fraction`.
"""
import collections
import dataclasses

# Reasons, as they appear in logs and in tools/check_data.py.
MALFORMED_JSON = "malformed_json"
NOT_UTF8 = "not_utf8"                    # a JSONL line whose bytes do not decode
MISSING_KEYS = "missing_keys"
EMPTY_CONVERSATION = "empty_conversation"
IMAGE_TOKEN_MISSING = "image_token_missing"
IMAGE_TOKEN_REPEATED = "image_token_repeated"
PATH_ESCAPES_ROOT = "path_escapes_root"
MISSING_IMAGE = "missing_image"
CORRUPT_IMAGE = "corrupt_image"
TEXT_TOO_LONG = "text_too_long"          # image tokens would be cut: skipped
TRUNCATED = "truncated"                  # text cut at max_length: kept, counted
NO_LONG_CAPTION = "no_long_caption"      # stage 2 without conversations_long: kept, counted
KEPT_REASONS = (TRUNCATED, NO_LONG_CAPTION)

_EXAMPLES_PER_REASON = 5


class BadRecordError(ValueError):
  """A record that cannot be used; carries the record id and a reason from this module."""

  def __init__(self, reason: str, record_id: str, detail: str = ""):
    super().__init__(f"record {record_id!r}: {reason}" + (f" ({detail})" if detail else ""))
    self.reason = reason
    self.record_id = record_id
    self.detail = detail


class TooManyBadRecords(RuntimeError):
  """More records than `data.max_bad_fraction` were bad; the message is the summary."""


@dataclasses.dataclass
class BadRecordLog:
  """Counts per reason with a few example ids, and the number of records seen."""
  seen: int = 0
  by_reason: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  examples: dict = dataclasses.field(default_factory=dict)

  def add(self, reason: str, record_id: str) -> None:
    self.by_reason[reason] += 1
    ids = self.examples.setdefault(reason, [])
    if len(ids) < _EXAMPLES_PER_REASON:
      ids.append(str(record_id))

  def add_error(self, error: BadRecordError) -> None:
    self.add(error.reason, error.record_id)

  @property
  def skipped(self) -> int:
    """Records dropped (KEPT_REASONS keep the record, so they are not counted here)."""
    return sum(n for r, n in self.by_reason.items() if r not in KEPT_REASONS)

  def counts(self) -> dict[str, int]:
    """Scalars for the training logs: `data/bad/<reason>`, `data/seen`, `data/skipped`."""
    out = {f"data/bad/{r}": n for r, n in sorted(self.by_reason.items())}
    out["data/seen"] = self.seen
    out["data/skipped"] = self.skipped
    return out

  def summary(self) -> str:
    lines = [f"{self.skipped} of {self.seen} records skipped"]
    for reason, n in sorted(self.by_reason.items()):
      lines.append(f"  {reason}: {n} (e.g. {', '.join(self.examples.get(reason, []))})")
    return "\n".join(lines)

  def check(self, max_bad_fraction: float) -> None:
    """Raises TooManyBadRecords when skipped / seen exceeds `max_bad_fraction`."""
    if self.seen and self.skipped / self.seen > max_bad_fraction:
      raise TooManyBadRecords(
          f"bad record fraction {self.skipped / self.seen:.4f} exceeds "
          f"data.max_bad_fraction={max_bad_fraction}:\n{self.summary()}")

  def to_json(self) -> dict:
    return {"seen": self.seen, "by_reason": dict(self.by_reason),
            "examples": {k: list(v) for k, v in self.examples.items()}}

  @classmethod
  def from_json(cls, state: dict) -> "BadRecordLog":
    return cls(seen=int(state["seen"]),
               by_reason=collections.Counter(state["by_reason"]),
               examples={k: list(v) for k, v in state["examples"].items()})
