"""A minimal client for OpenAI-compatible chat endpoints (judge and caption extension).

Standard library only (urllib), so that evaluation needs no vendor SDK. Retries with
exponential backoff on HTTP 429/5xx, connection errors and timeouts; other HTTP errors
(401, 404, ...) are raised at once because retrying cannot fix them.
"""
from __future__ import annotations

import dataclasses
import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

_RETRIED_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})


class ChatError(RuntimeError):
  """The endpoint did not produce a reply after all retries (or refused for good)."""


@dataclasses.dataclass(frozen=True)
class ChatClient:
  """POSTs to `{url}` (a full .../chat/completions URL or a base ending in /v1).

  Attributes: model name, bearer key ("" = none), per-request timeout in seconds,
  attempts (>= 1) and the first backoff delay (doubled after each failure).
  """
  url: str
  model: str
  api_key: str = ""
  timeout_s: float = 60.0
  attempts: int = 4
  backoff_s: float = 1.0
  temperature: float = 0.0

  def __post_init__(self):
    if not self.url.startswith(("http://", "https://")):
      raise ValueError(f"chat endpoint URL must start with http:// or https://: {self.url!r}")
    if not self.model:
      raise ValueError("chat endpoint needs a model name")
    if self.attempts < 1:
      raise ValueError(f"attempts must be >= 1, got {self.attempts}")

  @property
  def endpoint(self) -> str:
    url = self.url.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"

  def complete(self, messages: Sequence[dict[str, str]]) -> str:
    """Chat messages -> the content of the first choice. Raises ChatError when exhausted."""
    body = json.dumps({"model": self.model, "messages": list(messages),
                       "temperature": self.temperature}).encode()
    headers = {"Content-Type": "application/json"}
    if self.api_key:
      headers["Authorization"] = f"Bearer {self.api_key}"
    last_error = ""
    for attempt in range(self.attempts):
      if attempt:
        time.sleep(self.backoff_s * 2 ** (attempt - 1))
      request = urllib.request.Request(self.endpoint, data=body, headers=headers)
      try:
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
          reply = json.loads(response.read().decode())
        return reply["choices"][0]["message"]["content"]
      except urllib.error.HTTPError as e:
        last_error = f"HTTP {e.code}"
        if e.code not in _RETRIED_STATUS:
          raise ChatError(f"{self.endpoint}: {last_error} (not retried)") from e
      except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as e:
        last_error = f"{type(e).__name__}: {e}"
      except (json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
        last_error = f"malformed completion response: {e!r}"
    raise ChatError(f"{self.endpoint}: no reply after {self.attempts} attempts ({last_error})")
