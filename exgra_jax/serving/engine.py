"""The served model and continuous batching over its KV cache (serving/slots.py).

Why continuous batching: a decode step of 16 rows costs less than 16 steps of one row
(one dispatch, the weights read once), so every request being answered shares each step.
Requests that arrive together are prefilled together (`Engine.arriving`); a request
that arrives while others decode joins at the next step, and a request leaves its row as
soon as its answer is final, freeing it for the next one. Each row has its own position,
temperature and top-p (temperature 0 = greedy, token-identical to `predict`, whatever
else shares the step).

Why the host work is off the device's critical path: JAX dispatch is asynchronous and the
device state (cache, last tokens, key) stays on the device, so the engine thread
dispatches step t + 1 before it reads step t's tokens; the device runs t + 1 while the
host reads t. Detokenizing, stop strings and streaming (serving/answer.py, `Stream.chunks`)
run on a second thread, which tells the engine when an answer is final; eos frees a row
when it is read, and `max_tokens` when the call that reaches it is dispatched. Every
program a request can need is compiled at start-up (`Engine.warm_up`): no request waits
for a compilation. Warm-up ends with a burst of requests through the real path (image
decoding, the engine and detokenizer threads), so that the first burst of traffic pays
none of those first-use costs either.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import io
import os
import queue
import statistics
import threading
import time
from collections.abc import Iterator, Sequence

import jax
import numpy as np
import PIL.Image

from exgra_jax.data import text
from exgra_jax.inference import prompts, single_question
from exgra_jax.models.config import num_image_tokens
from exgra_jax.models.llava import LlavaModel
from exgra_jax.serving import slots
from exgra_jax.serving.answer import AnswerText
from exgra_jax.serving.requests import (ChatRequest, Conversation, Limits, RequestError,
                                       clip_pixels)


@dataclasses.dataclass(frozen=True)
class ServedModel:
  """A loaded model with its tokenizer, prompt template and default answer length."""
  model: LlavaModel
  params: dict
  tokenizer: object
  name: str
  template: str = "simple"
  default_max_tokens: int = 512
  max_context: int | None = None
  _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, compare=False)

  @property
  def context_length(self) -> int:
    """Prompt + answer tokens a request may hold: the model's context, or less when the
    server says so (--max_context: the cache's length, which a decode step reads)."""
    built = self.model.cfg.llm.max_position_embeddings
    return built if self.max_context is None else min(self.max_context, built)

  def encode(self, prompt: str) -> list[int]:
    with self._lock:  # a fast tokenizer may not be entered from two threads at once
      return self.tokenizer(prompt).input_ids

  def decode(self, ids: Sequence[int]) -> str:
    with self._lock:
      return self.tokenizer.decode(ids, skip_special_tokens=True)


def load_model(model_dir: str, *, tokenizer_dir: str | None = None,
               clip_dir: str | None = None, name: str | None = None,
               template: str = "simple", default_max_tokens: int = 512,
               max_context: int | None = None, quantize: str = "") -> ServedModel:
  """Anything `weights.loading.load` reads; refuses incomplete weights. quantize: int8 |
  int4 weight-only (`single_question.answering_model`)."""
  if template not in prompts.CHAT_TEMPLATES:
    raise ValueError(f"template must be one of {prompts.CHAT_TEMPLATES}, got {template!r}")
  model, params, tokenizer = single_question.load_for_generation(
      model_dir, tokenizer_dir=tokenizer_dir, clip_dir=clip_dir, quantize=quantize)
  return ServedModel(model=model, params=params, tokenizer=tokenizer,
                     name=name or os.path.basename(os.path.normpath(model_dir)),
                     template=template, default_max_tokens=default_max_tokens,
                     max_context=max_context)


@dataclasses.dataclass(frozen=True)
class Job:
  """One request ready for the model: prompt ids, CLIP pixels [S, S, 3] or None."""
  prompt_ids: tuple[int, ...]
  pixels: np.ndarray | None
  temperature: float
  top_p: float
  max_tokens: int
  stop: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Completion:
  text: str
  finish_reason: str  # "stop" | "length"
  prompt_tokens: int
  completion_tokens: int


def prepare(request: ChatRequest, served: ServedModel, limits: Limits) -> Job:
  """ChatRequest -> Job: the image decoded and preprocessed, the prompt built and
  tokenised, its length checked against the context (a 400 when over)."""
  cfg = served.model.cfg
  pixels = None
  if request.image is not None:
    pixels = clip_pixels(request.image, cfg.vision.image_size, limits)
  prompt = prompts.chat_prompt(request.turns, served.template,
                               num_image_tokens(cfg), system=request.system,
                               image_tokens=cfg.image_tokens)
  ids = served.encode(prompt)
  room = served.context_length - len(ids)
  max_tokens = request.max_tokens or min(served.default_max_tokens, room)
  if room < 1 or max_tokens > room:
    raise RequestError(400, "context_length_exceeded",
                       f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) "
                       f"exceeds the context length of {served.context_length} tokens")
  return Job(tuple(ids), pixels, request.temperature, request.top_p, max_tokens, request.stop)


@dataclasses.dataclass(frozen=True)
class Chunk:
  """A piece of an answer, sent as soon as it is settled; `tokens`: generated so far."""
  text: str
  tokens: int


class Stream:
  """A submitted job's answer, filled by the engine's thread: `chunks()` yields its pieces
  as they are generated, `result()` waits for the whole Completion."""

  def __init__(self):
    self._chunks: queue.Queue = queue.Queue()
    self._done: concurrent.futures.Future = concurrent.futures.Future()

  def chunks(self, timeout: float | None = None) -> Iterator[Chunk]:
    """The answer's pieces until it is complete (they concatenate to its text); raises
    what generation raised, or TimeoutError after `timeout` s without a piece."""
    for pieces, _ in self.batches(timeout):
      yield from pieces

  def batches(self, timeout: float | None = None) -> Iterator[tuple[list[Chunk], bool]]:
    """`chunks` grouped: (the pieces there at once, whether the answer is complete) each
    time a piece arrives, so that a writer sends what is ready in one write (a short
    answer often arrives whole). Pieces before a failure come out before it is raised."""
    while True:
      try:
        chunk = self._chunks.get(timeout=timeout)
      except queue.Empty as e:
        raise TimeoutError(f"no answer for {timeout} s") from e
      pieces = []
      while chunk is not None:
        pieces.append(chunk)
        try:
          chunk = self._chunks.get_nowait()
        except queue.Empty:
          break
      if chunk is not None:
        yield pieces, False
        continue
      if pieces and self._done.exception() is not None:
        yield pieces, False
        pieces = []
      self._done.result()  # raises the generation's exception, if any
      yield pieces, True
      return

  def result(self, timeout: float | None = None) -> Completion:
    return self._done.result(timeout)

  @property
  def done(self) -> bool:
    return self._done.done()

  def _put(self, chunk: Chunk) -> None:
    self._chunks.put(chunk)

  def _finish(self, completion: Completion | None, error: BaseException | None = None
              ) -> None:
    if self._done.done():
      return  # already failed (a failure reaches every request it touches)
    if error is None:
      self._done.set_result(completion)
    else:
      self._done.set_exception(error)
    self._chunks.put(None)


@dataclasses.dataclass(eq=False)
class _Row:
  """A request in cache row `index`: its next token goes to `position`. `dispatched`: the
  tokens that the calls dispatched for it will draw; `generated`: those handed to the
  detokenizer; `closed`: no more are (the row is free, or will be)."""
  job: Job
  stream: Stream
  answer: AnswerText
  index: int
  position: int
  dispatched: int = 0
  generated: int = 0
  closed: bool = False


@dataclasses.dataclass
class EngineStats:
  """Counters for /health and benchmarks: decode steps, rows decoded over all steps,
  requests that joined while other rows were decoding, prefill calls and the requests
  they held, seconds the engine thread spent in Python per round (everything but waiting
  for the device: what the device's critical path pays) and the detokenizer thread's,
  programs compiled at start-up (and in how many seconds) and after it."""
  steps: int = 0
  row_steps: int = 0
  joined_running: int = 0
  prefills: int = 0
  prefill_requests: int = 0
  host_s: float = 0.0
  detokenize_s: float = 0.0
  compiled_at_start: int = 0
  compile_s: float = 0.0
  compiled_later: int = 0

  def forget_traffic(self) -> None:
    """Zeroes every counter but the compile ones (after warm-up's own requests)."""
    for field in dataclasses.fields(self):
      if field.name not in ("compiled_at_start", "compile_s", "compiled_later"):
        setattr(self, field.name, field.default)

  def report(self) -> dict:
    """The counters, with the mean busy rows and host milliseconds per decode step."""
    steps = max(self.steps, 1)
    return {**dataclasses.asdict(self), "busy_rows_per_step": self.row_steps / steps,
            "host_ms_per_step": 1e3 * self.host_s / steps,
            "detokenize_ms_per_step": 1e3 * self.detokenize_s / steps}


class _Detokenizer:
  """Tokens -> answers, chunks and finished streams, on a thread of its own (`threaded`)
  or in the caller's (tests driving the engine by hand). It reports each final answer's
  row to `finished`, for the engine to free."""

  def __init__(self, finished: queue.Queue, stats: EngineStats, threaded: bool):
    self._finished, self._stats = finished, stats
    self._queue: queue.Queue | None = None
    self._thread = None
    if threaded:
      self._queue = queue.Queue()
      self._thread = threading.Thread(target=self._loop, name="detokenize", daemon=True)
      self._thread.start()

  def put(self, drawn: list[tuple[_Row, list[int]]]) -> None:
    if self._queue is None:
      self._take(drawn)
    else:
      self._queue.put(drawn)

  def close(self) -> None:
    if self._queue is not None:
      self._queue.put(None)
      self._thread.join()

  def _loop(self) -> None:
    while (drawn := self._queue.get()) is not None:
      self._take(drawn)

  def _take(self, drawn: list[tuple[_Row, list[int]]]) -> None:
    """Each row's tokens of one call become one chunk (a call of `decode_steps` steps
    streams one piece per row, not one per token: a piece costs the HTTP thread an event
    and a wake-up)."""
    start = time.perf_counter()
    for row, tokens in drawn:
      if row.stream.done:
        continue  # final already (a stop string), or failed: its tokens are dropped
      answer = row.answer
      for token in tokens:
        if answer.finish_reason is not None:
          break  # final within this call: the rest is dropped
        answer.add(token)
      piece = answer.new_text()
      if piece:
        row.stream._put(Chunk(piece, len(answer.tokens)))
      if answer.finish_reason is not None:
        row.stream._finish(Completion(answer.text, answer.finish_reason,
                                      len(row.job.prompt_ids), len(answer.tokens)))
        self._finished.put(row)
    self._stats.detokenize_s += time.perf_counter() - start


class Engine:
  """Continuous batching: a KV cache of `max_batch` rows x the served context
  (serving/slots.py), an engine thread and a detokenizer thread.

  Each round of the engine thread frees the rows whose answers are final, prefills the
  waiting requests into free rows (one call per image / no-image group), dispatches one
  call of `decode_steps` steps of the busy rows and then reads the previous round's
  tokens, which go to the detokenizer. When nothing is decoding it waits for a request,
  and then, for up to one decode step, for the requests still `arriving`.

  `decode_steps` > 1 runs that many steps per call (one host round trip per
  `decode_steps` tokens: requests join, leave and stream every `decode_steps` tokens), or
  half as many while the recent answers are short (`_steps_per_call`).
  `warm_up` compiles every program at once (the server calls it before serving); without
  it a program compiles on first use. With `start=False` no thread runs: `run_once`,
  called by hand (tests), runs one round and reads its tokens at once.
  """

  def __init__(self, served: ServedModel, max_batch: int, *, decode_steps: int = 1,
               seed: int = 0, start: bool = True):
    if max_batch < 1 or decode_steps < 1:
      raise ValueError(f"max_batch and decode_steps must be >= 1, got {max_batch}, "
                       f"{decode_steps}")
    self.served, self.max_batch, self.decode_steps = served, max_batch, decode_steps
    tokenizer = served.tokenizer
    self._patch_id = tokenizer.convert_tokens_to_ids(
        text.patch_token(served.model.cfg.image_tokens))
    self._eos_id, self._pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    self._seed = seed
    self._state = self._new_state()
    self.programs = slots.Programs(served.model, served.params, self._state,
                                   max_batch=max_batch, context=served.context_length,
                                   decode_steps=decode_steps)
    self._queue: queue.Queue = queue.Queue()
    self._rows: list[_Row | None] = [None] * max_batch
    self._in_flight: list[tuple[jax.Array, list[_Row | None]]] = []
    self._finished: queue.Queue = queue.Queue()
    self._step_s = 0.0  # the last decode round's wall time: how long to wait for company
    self._answer_lengths: collections.deque[int] = collections.deque(maxlen=64)  # tokens
    self._arriving = 0  # requests being prepared by the HTTP layer (`arriving`)
    self._arrivals = threading.Condition()
    self.stats = EngineStats()
    self._detokenizer = _Detokenizer(self._finished, self.stats, threaded=start)
    self._thread = None
    if start:
      self._thread = threading.Thread(target=self._loop, name="batching", daemon=True)
      self._thread.start()

  def warm_up(self, runs: int = 3) -> slots.CompileReport:
    """Compiles every program a request can need (slots.Programs.all_shapes), runs each
    `runs` times (a program's first runs pay one-off costs: a tiny model's step on a CPU
    took 126, 45, 11 and then 3 ms), then answers `warm_up_requests` through the real
    path. Call it before the first request: it changes the cache's contents. The
    counters then hold only the compilations."""
    report = self.programs.compile_all()
    start = time.perf_counter()
    for key in self.programs.all_shapes() * runs:
      self._state, out = self.programs.get(key)(self.served.params, self._state,
                                                *self.programs.example_args(key))
      np.asarray(out)
    streams = [self.submit(job) for job in self.warm_up_requests()]
    while self._thread is None and not all(stream.done for stream in streams):
      self.run_once()
    for stream in streams:
      stream.result()
    self.stats.forget_traffic()
    self._answer_lengths.clear()
    report = dataclasses.replace(report, seconds=report.seconds + time.perf_counter() - start)
    self.stats.compiled_at_start += report.programs
    self.stats.compile_s += report.seconds
    return report

  def warm_up_requests(self, max_tokens: int = 4) -> list[Job]:
    """A full batch of requests with an image (a gray PNG, decoded as uploads are) and
    one without, `max_tokens` greedy tokens each.

    Why, after every program has run: the first burst after start-up was up to 2x slower
    than the next ones in-process with no compilation (a 32-request burst of the tiny
    model: 0.59 s, then 0.29-0.31 s), and not after one burst of real requests; what that
    burst exercises beyond the programs is the engine and detokenizer threads, image
    decoding and tokenizing."""
    image = io.BytesIO()
    size = self.served.model.cfg.vision.image_size
    PIL.Image.new("RGB", (size, size), (128, 128, 128)).save(image, format="PNG")
    with_image, without = (
        prepare(Conversation(picture).request("Describe it.", max_tokens=max_tokens),
                self.served, Limits()) for picture in (image.getvalue(), None))
    return [with_image] * self.max_batch + [without]

  def warm_up_and_say(self) -> None:
    """`warm_up`, then one line on stdout saying what it compiled: serve and chat run it
    before their first request."""
    report = self.warm_up()
    print(f"compiled {report.programs} programs in {report.seconds:.1f} s "
          f"(context {self.served.context_length})", flush=True)

  def submit(self, job: Job) -> Stream:
    stream = Stream()
    self._queue.put((job, stream))
    return stream

  @contextlib.contextmanager
  def arriving(self) -> Iterator[None]:
    """Wraps the preparing and submitting of one request (the HTTP layer's): while it
    runs, the engine knows a request is on its way. With nothing decoding, the engine
    waits for such requests (up to a decode step) to prefill them together with the
    first, and for no one when none is on its way: a lone request never waits."""
    with self._arrivals:
      self._arriving += 1
    try:
      yield
    finally:
      with self._arrivals:
        self._arriving -= 1
        self._arrivals.notify_all()

  def close(self) -> None:
    """Stops the threads; requests still waiting or decoding fail with RuntimeError."""
    self._queue.put(None)
    if self._thread is not None:
      self._thread.join()
    self._detokenizer.close()
    while True:
      try:
        item = self._queue.get_nowait()
      except queue.Empty:
        return
      if item is not None:
        item[1]._finish(None, RuntimeError("the server is shutting down"))

  def run_once(self, block: bool = False) -> bool:
    """One round, its tokens read and detokenized before it returns. `block`: wait for a
    request when none is decoding. False once `close` was called."""
    running = self._round(block)
    self._read_in_flight()
    return running

  def _loop(self) -> None:
    while self._round(block=True):
      pass
    self._read_in_flight()

  def _round(self, block: bool) -> bool:
    """Frees final rows, admits waiting requests, dispatches a decode call, then reads
    the previous round's tokens (so that the device computes while the host reads)."""
    self._free_finished()
    idle = not any(self._rows)
    if idle:
      self._read_in_flight()  # nothing left behind while waiting for a request
      self._free_finished()
    free = [i for i, row in enumerate(self._rows) if row is None]
    taken = self._take(len(free), block and idle)
    if taken is None:
      self._fail_all(RuntimeError("the server is shutting down"))
      return False
    start, steps = time.perf_counter(), self.stats.steps
    earlier, self._in_flight = self._in_flight, []
    if taken:
      self._admit(list(zip(free, taken)), running=not idle)
    if any(self._rows):
      self._dispatch_step()
    host = time.perf_counter() - start
    for outputs, rows in earlier:
      host += self._read(outputs, rows)
    self.stats.host_s += host
    if self.stats.steps > steps:
      self._step_s = time.perf_counter() - start
    return True

  def _take(self, room: int, block: bool) -> list | None:
    """Up to `room` waiting (job, stream) pairs; None when closed. Blocking (nothing is
    decoding), it waits for one, and then, for up to one decode step, for the requests
    still `arriving`."""
    taken = []
    if block:
      item = self._queue.get()
      if item is None:
        return None
      taken.append(item)
      self._await_arrivals(time.perf_counter() + self._step_s)
    while len(taken) < room:
      try:
        item = self._queue.get_nowait()
      except queue.Empty:
        break
      if item is None:
        for job_stream in taken:
          job_stream[1]._finish(None, RuntimeError("the server is shutting down"))
        return None
      taken.append(item)
    return taken

  def _await_arrivals(self, deadline: float) -> None:
    """Returns when no request is `arriving` (all are submitted) or at `deadline`."""
    with self._arrivals:
      while self._arriving and (left := deadline - time.perf_counter()) > 0:
        self._arrivals.wait(left)

  def _new_state(self) -> slots.State:
    return slots.new_state(self.served.model, self.served.params, self.max_batch,
                           self.served.context_length, jax.random.key(self._seed))

  def _admit(self, placed: list[tuple[int, tuple[Job, Stream]]], running: bool) -> None:
    """Dispatches the new requests' prefills (per image / no-image group, calls of
    `slots.chunks` requests) into their rows; their first tokens are read with the
    round's other tokens."""
    try:
      for with_image in (True, False):
        group = [(i, js) for i, js in placed if (js[0].pixels is not None) == with_image]
        if not group:
          continue
        rows = []
        for i, (job, stream) in group:
          rows.append(_Row(job, stream, AnswerText(self.served.decode, self._eos_id,
                                                   job.max_tokens, job.stop),
                           index=i, position=len(job.prompt_ids)))
          self._rows[i] = rows[-1]
        for size in slots.chunks(len(rows), self.programs.prefill_rows):
          call, rows = rows[:size], rows[size:]
          self._in_flight.append((self._prefill([row.job for row in call],
                                                [row.index for row in call]), call))
          for row in call:
            self._count_dispatched(row, 1)
    except Exception as e:  # pylint: disable=broad-except  (handed to the waiting requests)
      for _, (_, stream) in placed:
        stream._finish(None, e)
      self._fail_all(e)
      return
    self.stats.joined_running += len(placed) if running else 0

  def _prefill(self, jobs: list[Job], rows: list[int]) -> jax.Array:
    """-> the first tokens [n] (n: the padded number of requests; the device array)."""
    n = slots.bucket(len(jobs), self.programs.prefill_rows)
    length = slots.bucket(max(len(j.prompt_ids) for j in jobs), self.programs.lengths)
    ids, mask, image_mask = slots.prompt_arrays([j.prompt_ids for j in jobs], n, length,
                                                self._patch_id, self._pad_id)
    padded = jobs + [jobs[0]] * (n - len(jobs))
    image = jobs[0].pixels is not None
    pixels = np.stack([j.pixels for j in padded]) if image else None
    program = self._program(("prefill", n, length, image))
    self._state, first = program(
        self.served.params, self._state,
        np.array(rows + [self.max_batch] * (n - len(rows)), np.int32), ids, mask, image_mask,
        pixels, np.array([j.temperature for j in padded], np.float32),
        np.array([j.top_p for j in padded], np.float32))
    self.stats.prefills += 1
    self.stats.prefill_requests += len(jobs)
    return first

  def _program(self, key: tuple) -> jax.stages.Compiled:
    compiled = self.programs.compiled
    program = self.programs.get(key)
    self.stats.compiled_later += self.programs.compiled - compiled
    return program

  def _dispatch_step(self) -> None:
    busy = [i for i, row in enumerate(self._rows) if row is not None]
    width = slots.bucket(busy[-1] + 1, self.programs.rows)
    rows = self._rows[:width]
    steps = self._steps_per_call()
    column = lambda value, idle, dtype: np.array([value(r) if r else idle for r in rows],
                                                 dtype)
    try:
      self._state, drawn = self._program(("step", width, steps))(
          self.served.params, self._state, column(lambda r: r.position, 0, np.int32),
          column(lambda r: r.job.temperature, 0.0, np.float32),
          column(lambda r: r.job.top_p, 1.0, np.float32))
    except Exception as e:  # pylint: disable=broad-except  (handed to the decoding requests)
      self._fail_all(e)
      return
    for row in rows:
      if row is not None:
        row.position += steps
        self._count_dispatched(row, steps)
    self.stats.steps += steps
    self.stats.row_steps += steps * len(busy)
    self._in_flight.append((drawn, rows))

  def _steps_per_call(self) -> int:
    """`decode_steps`, or half as many (`slots.step_counts`) while the last answers were
    short: at least 8 of them and a median the prefill's token and one short call hold.

    Why: the steps a call runs past a row's end are wasted, and many answers end within a
    few tokens (a closed VQA question's yes, no or organ); a long answer wants full calls
    (fewer host round trips). Measured on a 2-core CPU, 16 clients, interleaved A/B: 2
    steps per call against 4 gave the demo model (2-3 token answers) 8 % more tokens/s and
    a model that answers 32 tokens 6 % fewer; this choice gave them 11 % more and the same
    (1.00x)."""
    short = self.programs.step_counts[0]
    lengths = self._answer_lengths
    if len(lengths) >= 8 and statistics.median(lengths) <= 1 + short:
      return short
    return self.decode_steps

  def _count_dispatched(self, row: _Row, tokens: int) -> None:
    """Frees the row's cache row once the calls dispatched for it reach its `max_tokens`:
    the next request may take it at the next round (its prefill runs after those calls on
    the device), instead of a round later, when their tokens have been read."""
    row.dispatched += tokens
    if row.dispatched >= row.job.max_tokens and self._rows[row.index] is row:
      self._rows[row.index] = None

  def _read_in_flight(self) -> None:
    in_flight, self._in_flight = self._in_flight, []
    for outputs, rows in in_flight:
      self.stats.host_s += self._read(outputs, rows)

  def _read(self, outputs: jax.Array, rows: list[_Row | None]) -> float:
    """Waits for a call's tokens ([rows, steps], or [rows] from a prefill) and hands each
    row's to the detokenizer; frees a row at eos or `max_tokens`. -> seconds spent other
    than waiting."""
    try:
      tokens = np.asarray(outputs).reshape(len(outputs), -1).tolist()
    except Exception as e:  # pylint: disable=broad-except  (handed to the decoding requests)
      self._fail_all(e)
      return 0.0
    start = time.perf_counter()
    drawn = []
    for row, row_tokens in zip(rows, tokens):
      if row is None or row.closed:
        continue  # its answer was final: this call's tokens for it are dropped
      kept = []
      for token in row_tokens:
        kept.append(token)
        row.generated += 1
        if token == self._eos_id or row.generated >= row.job.max_tokens:
          self._close(row, row.generated)
          break
      drawn.append((row, kept))
    self._detokenizer.put(drawn)
    return time.perf_counter() - start

  def _close(self, row: _Row, answer_tokens: int) -> None:
    """Frees the row of a final answer of `answer_tokens` tokens (counted once)."""
    if not row.closed:
      self._answer_lengths.append(answer_tokens)
    row.closed = True
    if self._rows[row.index] is row:
      self._rows[row.index] = None

  def _free_finished(self) -> None:
    """Frees the rows whose answers the detokenizer found final (a stop string)."""
    while True:
      try:
        row = self._finished.get_nowait()
        self._close(row, len(row.answer.tokens))
      except queue.Empty:
        return

  def _fail_all(self, error: BaseException) -> None:
    """Fails every decoding request and starts a new state (a failed call may have
    consumed it)."""
    for row in [*self._rows, *(r for _, rows in self._in_flight for r in rows)]:
      if row is not None and not row.stream.done:
        row.stream._finish(None, error)
        row.closed = True
    self._rows = [None] * self.max_batch
    self._in_flight = []
    self._state = self._new_state()
