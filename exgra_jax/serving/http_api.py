"""The HTTP layer: OpenAI-compatible routes over an `Engine` (standard library only).

Routes: `POST /v1/chat/completions` (JSON, or server-sent events with `stream: true`),
`GET /v1/models`, `GET /health` and the chat page at `/` (static/index.html, shipped
with the package). Every refused request is a 4xx with an OpenAI-style JSON error
(`{"error": {"message", "type", "code"}}`) and the server keeps serving; a failure in
generation is a 500 for the requests being decoded with it.

Streaming: each piece of the answer is sent as a server-sent event as soon as the engine
settles it (one per decode call; serving/answer.py says which text is held back), and the
events ready at once share one write; the pieces concatenate to exactly the non-streamed
answer.
"""
from __future__ import annotations

import http.server
import importlib.resources
import itertools
import json
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from exgra_jax.serving import engine as engine_lib
from exgra_jax.serving.requests import Limits, RequestError, parse_chat_request, parse_json

_PAGE = "index.html"


def completion_body(completion: engine_lib.Completion, model: str, request_id: str,
                    created: int) -> dict[str, Any]:
  """The `chat.completion` object of a finished answer."""
  return {"id": request_id, "object": "chat.completion", "created": created, "model": model,
          "choices": [{"index": 0, "finish_reason": completion.finish_reason,
                       "message": {"role": "assistant", "content": completion.text}}],
          "usage": {"prompt_tokens": completion.prompt_tokens,
                    "completion_tokens": completion.completion_tokens,
                    "total_tokens": completion.prompt_tokens + completion.completion_tokens}}


def chunk_body(delta: dict[str, str], model: str, request_id: str, created: int,
               finish_reason: str | None = None) -> dict[str, Any]:
  """One `chat.completion.chunk` object of a streamed answer."""
  return {"id": request_id, "object": "chat.completion.chunk", "created": created,
          "model": model, "choices": [{"index": 0, "delta": delta,
                                       "finish_reason": finish_reason}]}


def stream_events(stream: engine_lib.Stream, model: str, request_id: str, created: int,
                  timeout_s: float, include_usage: bool = False
                  ) -> Iterator[tuple[list[dict[str, Any]], bool]]:
  """The chunks of an answer as the engine settles them, in lists of those ready at once
  (each list is one write), with whether it is the last: the role, one chunk per piece of
  text, then the finish reason (and, with `include_usage`, OpenAI's last chunk: no
  choices, the usage). Raises what generation raised (before the role chunk when
  generation fails before its first piece)."""
  batches = stream.batches(timeout_s)
  pieces, final = next(batches)  # so that a failed prefill is an HTTP error, not a stream
  events = [chunk_body({"role": "assistant", "content": ""}, model, request_id, created)]
  while True:
    events += [chunk_body({"content": piece.text}, model, request_id, created)
               for piece in pieces]
    if final:
      break
    yield events, False
    (pieces, final), events = next(batches), []
  completion = stream.result()
  events.append(chunk_body({}, model, request_id, created, completion.finish_reason))
  if include_usage:
    events.append({**chunk_body({}, model, request_id, created), "choices": [],
                   "usage": completion_body(completion, model, request_id, created)["usage"]})
  yield events, True


class Server(http.server.ThreadingHTTPServer):
  """A threading HTTP server that holds what its handlers need.

  Each connection is handled on a thread of its own, as in ThreadingHTTPServer, but the
  threads are kept and reused: a new thread is started only when none is idle, and as
  many as the engine has rows are started with the server, so that a first burst of
  clients finds them there. Why: the accept loop waits for each new thread to start, and
  under a burst of clients that hand-off holds up every connection behind it (reusing
  threads gave the demo model 7 % more tokens/s at 16 concurrent clients on a 2-core CPU,
  interleaved A/B).
  """
  request_queue_size = 128  # listen backlog; the default 5 drops bursts of clients (1 s retries)

  def __init__(self, address: tuple[str, int], served: engine_lib.ServedModel,
               engine: engine_lib.Engine, *, limits: Limits,
               image_root: str | None, timeout_s: float = 600.0):
    super().__init__(address, Handler)
    self.served, self.engine, self.limits = served, engine, limits
    self.image_root, self.timeout_s = image_root, timeout_s
    self.max_body = limits.max_image_bytes * 4 // 3 + 2**20  # a base64 image + text
    self._connections: queue.SimpleQueue = queue.SimpleQueue()
    self._idle_threads = self._handler_threads = 0
    self._idle_lock = threading.Lock()
    for _ in range(engine.max_batch):
      self._start_handler_thread(idle=True)

  def process_request(self, request, client_address) -> None:
    """Hands the connection to an idle handler thread, or to a new one when none is."""
    with self._idle_lock:
      start = not self._idle_threads
      if not start:
        self._idle_threads -= 1
    if start:
      self._start_handler_thread(idle=False)
    self._connections.put((request, client_address))

  def _start_handler_thread(self, idle: bool) -> None:
    with self._idle_lock:
      self._handler_threads += 1
      self._idle_threads += idle
    threading.Thread(target=self._handle_connections, name="http-handler",
                     daemon=True).start()

  def _handle_connections(self) -> None:
    while (connection := self._connections.get()) is not None:
      self.process_request_thread(*connection)
      with self._idle_lock:
        self._idle_threads += 1

  def server_close(self) -> None:
    """Closes the socket; each handler thread ends after its connection."""
    super().server_close()
    with self._idle_lock:
      for _ in range(self._handler_threads):
        self._connections.put(None)
      self._handler_threads = 0

  def serve_in_thread(self) -> threading.Thread:
    thread = threading.Thread(target=self.serve_forever, name="http", daemon=True)
    thread.start()
    return thread


class Handler(http.server.BaseHTTPRequestHandler):
  """One request; `self.server` is a `Server`."""
  server: Server
  server_version = "exgra-jax"
  wbufsize = -1  # buffered: a response's headers and body (or first events) in one write

  def log_message(self, format: str, *args) -> None:  # pylint: disable=redefined-builtin
    pass  # quiet: one line per request would drown the console under load

  def _send(self, status: int, body: bytes, content_type: str) -> None:
    self.send_response(status)
    self.send_header("Content-Type", content_type)
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  def _json(self, status: int, payload: dict[str, Any]) -> None:
    self._send(status, json.dumps(payload).encode(), "application/json")

  def _error(self, status: int, code: str, message: str) -> None:
    kind = "invalid_request_error" if status < 500 else "server_error"
    self._json(status, {"error": {"message": message, "type": kind, "code": code}})

  def do_GET(self) -> None:  # noqa: N802 (http.server API)
    path = self.path.split("?", 1)[0]
    if path in ("/", "/index.html"):
      page = importlib.resources.files("exgra_jax.serving").joinpath("static", _PAGE)
      self._send(200, page.read_bytes(), "text/html; charset=utf-8")
    elif path == "/health":
      self._json(200, {"status": "ok", "model": self.server.served.name,
                       "engine": self.server.engine.stats.report()})
    elif path == "/v1/models":
      self._json(200, {"object": "list", "data": [
          {"id": self.server.served.name, "object": "model", "created": 0,
           "owned_by": "exgra-jax"}]})
    else:
      self._error(404, "not_found", f"no route GET {path}")

  def do_POST(self) -> None:  # noqa: N802 (http.server API)
    if self.path.split("?", 1)[0] != "/v1/chat/completions":
      self._error(404, "not_found", f"no route POST {self.path}")
      return
    try:
      with self.server.engine.arriving():  # so that requests arriving together prefill together
        request = parse_chat_request(parse_json(self._body()), image_root=self.server.image_root,
                                     limits=self.server.limits)
        stream = self.server.engine.submit(
            engine_lib.prepare(request, self.server.served, self.server.limits))
    except RequestError as e:
      self._error(e.status, e.code, str(e))
      return
    name, request_id, created = (self.server.served.name, f"chatcmpl-{uuid.uuid4().hex}",
                                 int(time.time()))
    try:
      if request.stream:
        self._stream(stream_events(stream, name, request_id, created, self.server.timeout_s,
                                   request.include_usage))
      else:
        completion = stream.result(timeout=self.server.timeout_s)
        self._json(200, completion_body(completion, name, request_id, created))
    except Exception as e:  # pylint: disable=broad-except  (reported to this client only)
      self._error(500, "generation_failed", f"generation failed: {type(e).__name__}: {e}")

  def _body(self) -> bytes:
    length = self.headers.get("Content-Length")
    if length is None or not length.isdigit():
      raise RequestError(411, "length_required", "send the body with a Content-Length")
    if int(length) > self.server.max_body:
      raise RequestError(413, "request_too_large",
                         f"request body over {self.server.max_body} bytes")
    return self.rfile.read(int(length))

  def _stream(self, batches: Iterator[tuple[list[dict[str, Any]], bool]]) -> None:
    """Server-sent events, each list of events in one write (the first with the headers,
    the last with `[DONE]`); the status line waits for the first list, so that a request
    whose generation fails at once gets a 500. A failure later ends the stream with an
    OpenAI-style error event."""
    first = next(batches)
    self.send_response(200)
    self.send_header("Content-Type", "text/event-stream")
    self.send_header("Cache-Control", "no-cache")
    self.send_header("Connection", "close")
    self.end_headers()
    self.close_connection = True
    events = lambda batch: "".join(f"data: {json.dumps(event)}\n\n" for event in batch)
    try:
      for batch, final in itertools.chain([first], batches):
        self.wfile.write((events(batch) + ("data: [DONE]\n\n" if final else "")).encode())
        self.wfile.flush()
    except (BrokenPipeError, ConnectionResetError):
      return  # the client went away; nothing to tell it
    except Exception as e:  # pylint: disable=broad-except  (reported in the stream)
      error = {"message": f"generation failed: {type(e).__name__}: {e}",
               "type": "server_error", "code": "generation_failed"}
      self.wfile.write((events([{"error": error}]) + "data: [DONE]\n\n").encode())
