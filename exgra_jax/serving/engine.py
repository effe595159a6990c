"""The served model and continuous batching over its KV cache (serving/slots.py).

Why continuous batching: a decode step of 16 rows costs less than 16 steps of one row
(one dispatch, the weights read once: on an accelerator about one step's worth, on 2 CPU
cores with the tiny model 5-8 steps' worth; docs/serve.md), so every request being
answered shares each step.
A request does not wait for a batch: before every step the engine thread puts waiting
requests into free cache rows (one batched prefill per image / no-image group), and a
request leaves its row as soon as its answer is final, freeing it for the next one.
Each row has its own position, temperature and top-p (temperature 0 = greedy,
token-identical to `predict`, whatever else shares the step).

Why per-step tokens reach the host: every drawn token goes through the request's
`AnswerText` (serving/answer.py), which streams the settled text at once (`Stream.chunks`)
and ends the request at eos, a stop string or `max_tokens`.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import queue
import threading
from collections.abc import Iterator, Sequence

import jax
import numpy as np

from exgra_jax.data import images, text
from exgra_jax.eval import prompts, single_question
from exgra_jax.models.config import num_image_tokens
from exgra_jax.models.llava import LlavaModel
from exgra_jax.serving import slots
from exgra_jax.serving.answer import AnswerText
from exgra_jax.serving.requests import ChatRequest, Limits, RequestError, decode_image


@dataclasses.dataclass(frozen=True)
class ServedModel:
  """A loaded model with its tokenizer, prompt template and default answer length."""
  model: LlavaModel
  params: dict
  tokenizer: object
  name: str
  template: str = "simple"
  default_max_tokens: int = 512
  _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, compare=False)

  @property
  def context_length(self) -> int:
    return self.model.cfg.llm.max_position_embeddings

  def encode(self, prompt: str) -> list[int]:
    with self._lock:  # a fast tokenizer may not be entered from two threads at once
      return self.tokenizer(prompt).input_ids

  def decode(self, ids: Sequence[int]) -> str:
    with self._lock:
      return self.tokenizer.decode(ids, skip_special_tokens=True)


def load_model(model_dir: str, *, tokenizer_dir: str | None = None,
               clip_dir: str | None = None, name: str | None = None,
               template: str = "simple", default_max_tokens: int = 512) -> ServedModel:
  """Anything `weights.checkpoints.load` reads; refuses incomplete weights."""
  if template not in prompts.CHAT_TEMPLATES:
    raise ValueError(f"template must be one of {prompts.CHAT_TEMPLATES}, got {template!r}")
  model, params, tokenizer = single_question.load_for_generation(
      model_dir, tokenizer_dir=tokenizer_dir, clip_dir=clip_dir)
  return ServedModel(model=model, params=params, tokenizer=tokenizer,
                     name=name or os.path.basename(os.path.normpath(model_dir)),
                     template=template, default_max_tokens=default_max_tokens)


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
    pixels = images.clip_preprocess(decode_image(request.image, limits), cfg.vision.image_size)
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
    while True:
      try:
        chunk = self._chunks.get(timeout=timeout)
      except queue.Empty as e:
        raise TimeoutError(f"no answer for {timeout} s") from e
      if chunk is None:
        self._done.result()  # raises the generation's exception, if any
        return
      yield chunk

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


@dataclasses.dataclass
class _Row:
  """A request in a cache row: `token` goes to `position` at the next step."""
  job: Job
  stream: Stream
  answer: AnswerText
  token: int
  position: int


@dataclasses.dataclass
class EngineStats:
  """Counters for tests and benchmarks: decode steps, rows decoded over all steps, requests
  that joined while other rows were decoding."""
  steps: int = 0
  row_steps: int = 0
  joined_running: int = 0


class Engine:
  """Continuous batching: a KV cache of `max_batch` rows (serving/slots.py) and a thread
  that, before every decode step, puts waiting requests into free rows (one batched
  prefill per image / no-image group) and then advances every busy row by one token
  (`decode_steps` tokens).

  A request leaves its row as soon as its answer is final (eos, a stop string, or
  `max_tokens`), and the next waiting one takes the row at the next step.
  `decode_steps` > 1 runs that many steps per call (one host round trip per
  `decode_steps` tokens: fewer synchronisations, but requests join, leave and stream
  every `decode_steps` tokens). With `start=False` no thread runs and `run_once` is
  called by hand (tests).
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
    self._key = slots.like_params(served.params, jax.random.key(seed))
    self._queue: queue.Queue = queue.Queue()
    self._rows: list[_Row | None] = [None] * max_batch
    self._cache: dict | None = None
    self.stats = EngineStats()
    self._thread = None
    if start:
      self._thread = threading.Thread(target=self._loop, name="batching", daemon=True)
      self._thread.start()

  def submit(self, job: Job) -> Stream:
    stream = Stream()
    self._queue.put((job, stream))
    return stream

  def close(self) -> None:
    """Stops the thread; requests still waiting or decoding fail with RuntimeError."""
    self._queue.put(None)
    if self._thread is not None:
      self._thread.join()
    while True:
      try:
        item = self._queue.get_nowait()
      except queue.Empty:
        return
      if item is not None:
        item[1]._finish(None, RuntimeError("the server is shutting down"))

  def run_once(self, block: bool = False) -> bool:
    """Admits waiting requests into free rows, then runs `decode_steps` steps of the busy rows.
    `block`: wait for a request when none is decoding. False once `close` was called."""
    free = [i for i, row in enumerate(self._rows) if row is None]
    taken = self._take(len(free), block and len(free) == self.max_batch)
    if taken is None:
      self._fail_all(RuntimeError("the server is shutting down"))
      return False
    if taken:
      self._admit(list(zip(free, taken)))
    if any(self._rows):
      self._decode()
    return True

  def _loop(self) -> None:
    while self.run_once(block=True):
      pass

  def _take(self, room: int, block: bool) -> list | None:
    """Up to `room` waiting (job, stream) pairs; None when closed."""
    taken = []
    while len(taken) < room:
      try:
        item = self._queue.get(block=block and not taken)
      except queue.Empty:
        break
      if item is None:
        for job_stream in taken:
          job_stream[1]._finish(None, RuntimeError("the server is shutting down"))
        return None
      taken.append(item)
    return taken

  def _resize(self, length: int = 0) -> None:
    """Fits the cache to the busy rows (a power of two covering the highest) and to at
    least `length` positions; drops it when no row is busy."""
    busy = [i for i, row in enumerate(self._rows) if row is not None]
    if not busy:
      self._cache = None
      return
    rows = slots.power_of_two(busy[-1] + 1)
    have = (0, 0) if self._cache is None else (self._cache["k"].shape[1],
                                                self._cache["k"].shape[3])
    length = max(length, have[1])
    if (rows, length) != have:
      self._cache = slots.resize(self.served.model, self.served.params, self._cache, rows,
                                 length)

  def _admit(self, placed: list[tuple[int, tuple[Job, Stream]]]) -> None:
    """Prefills the new requests (one call per image / no-image group) into their rows."""
    running = any(self._rows)
    try:
      prefilled = []
      for with_image in (True, False):
        group = [(i, js) for i, js in placed if (js[0].pixels is not None) == with_image]
        if group:
          prefilled.append((group, *self._prefill([job for _, (job, _) in group])))
      for i, (job, stream) in placed:
        self._rows[i] = _Row(job, stream, AnswerText(self.served.decode, self._eos_id,
                                                     job.max_tokens, job.stop),
                             token=self._pad_id, position=len(job.prompt_ids))
      self._resize(slots.cache_length(max(len(r.job.prompt_ids) + r.job.max_tokens
                                           for r in self._rows if r) + self.decode_steps))
      for group, first, cache in prefilled:
        rows = [i for i, _ in group]
        self._cache = slots.insert(self._cache, np.array(
            rows + [rows[0]] * (len(first) - len(rows)), np.int32), cache)
        for i, token in zip(rows, first):
          self._rows[i].token = token
          self._record(i, token)
    except Exception as e:  # pylint: disable=broad-except  (handed to the waiting requests)
      for _, (_, stream) in placed:
        stream._finish(None, e)
      self._fail_all(e)
      return
    self.stats.joined_running += len(placed) if running else 0

  def _prefill(self, jobs: list[Job]) -> tuple[list[int], dict]:
    """-> (first tokens, one per request of the padded batch; their cache)."""
    rows = slots.power_of_two(len(jobs))
    ids, mask, image_mask = slots.prompt_arrays([j.prompt_ids for j in jobs], rows,
                                                self._patch_id, self._pad_id)
    padded = jobs + [jobs[0]] * (rows - len(jobs))
    pixels = np.stack([j.pixels for j in padded]) if jobs[0].pixels is not None else None
    first, cache, self._key = slots.prefill(
        self.served.model, self.served.params, ids, mask, image_mask, pixels, self._key,
        np.array([j.temperature for j in padded], np.float32),
        np.array([j.top_p for j in padded], np.float32))
    return np.asarray(first).tolist(), cache

  def _decode(self) -> None:
    rows = self._rows[:self._cache["k"].shape[1]]
    column = lambda value, idle, dtype: np.array([value(r) if r else idle for r in rows],
                                                 dtype)
    try:
      tokens, self._cache, self._key = slots.step(
          self.served.model, self.served.params, self._cache,
          column(lambda r: r.token, self._pad_id, np.int32),
          column(lambda r: r.position, 0, np.int32), self._key,
          column(lambda r: r.job.temperature, 0.0, np.float32),
          column(lambda r: r.job.top_p, 1.0, np.float32), steps=self.decode_steps)
      tokens = np.asarray(tokens).tolist()
    except Exception as e:  # pylint: disable=broad-except  (handed to the decoding requests)
      self._fail_all(e)
      return
    self.stats.steps += self.decode_steps
    self.stats.row_steps += self.decode_steps * sum(r is not None for r in rows)
    for i, row in enumerate(rows):
      for token in tokens[i] if row is not None else ():
        if self._rows[i] is not row:
          break  # its answer was final: the rest of this call's tokens are dropped
        row.token, row.position = token, row.position + 1
        self._record(i, token)
    self._resize()

  def _record(self, i: int, token: int) -> None:
    """Row i drew `token`: streams what is settled; frees the row when the answer is final."""
    row = self._rows[i]
    row.answer.add(token)
    piece = row.answer.new_text()
    if piece:
      row.stream._put(Chunk(piece, len(row.answer.tokens)))
    if row.answer.finish_reason is not None:
      row.stream._finish(Completion(row.answer.text, row.answer.finish_reason,
                                    len(row.job.prompt_ids), len(row.answer.tokens)))
      self._rows[i] = None

  def _fail_all(self, error: BaseException) -> None:
    """Fails every decoding request and drops the cache (a failed call may have consumed it)."""
    for i, row in enumerate(self._rows):
      if row is not None:
        row.stream._finish(None, error)
        self._rows[i] = None
    self._cache = None

