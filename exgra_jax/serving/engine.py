"""The served model and dynamic batching over eval/'s KV-cache generation.

Why batching: one decode step of a batch of 16 costs little more than one of a single
prompt (the weights are read once per step), so requests that wait together are decoded
together. A thread takes up to `max_batch` waiting requests (those that arrive within
`wait_s` of the first join it), groups them by whether they carry an image (one
compiled program each) and runs one `generate.sample_decode` per group, with per-row
temperature and top-p (temperature 0 = greedy, token-identical to `predict`). Requests
that arrive meanwhile form the next batch.

Why the shapes are rounded: every distinct (batch, prompt length, new tokens) is one XLA
compilation, so the batch is padded to a power of two (with copies of its first
request), the prompt length to a power of two (>= 64) and the new tokens to a power of
two (>= 16); each request keeps its own first `max_tokens` tokens.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

from exgra_jax.data import images, text
from exgra_jax.eval import generate, prompts, single_question
from exgra_jax.models.config import num_image_tokens
from exgra_jax.models.llava import LlavaModel
from exgra_jax.serving.requests import ChatRequest, Limits, RequestError, decode_image

_MIN_LENGTH, _MIN_NEW_TOKENS = 64, 16


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


def _power_of_two(n: int, minimum: int) -> int:
  return max(minimum, 1 << (n - 1).bit_length())


def batch_shape(jobs: Sequence[Job], max_batch: int, context_length: int
                ) -> tuple[int, int, int]:
  """(batch rows, prompt length, new tokens) of the compiled program for `jobs`."""
  rows = min(_power_of_two(len(jobs), 1), max(max_batch, len(jobs)))
  length = min(_power_of_two(max(len(j.prompt_ids) for j in jobs), _MIN_LENGTH), context_length)
  return rows, length, _power_of_two(max(j.max_tokens for j in jobs), _MIN_NEW_TOKENS)


def finish(tokens: np.ndarray, job: Job, eos_id: int,
           detokenize: Callable[[Sequence[int]], str]) -> Completion:
  """A row of generated tokens -> the answer: cut at eos and at `max_tokens`, cleaned as
  `generate` cleans answers (leading tags, `###`), then cut at the request's stops."""
  row = tokens[:job.max_tokens]
  ends = np.flatnonzero(row == eos_id)
  kept = row[:ends[0]] if ends.size else row
  raw = detokenize(kept.tolist())
  answer = generate.clean_answer(raw, "###")
  cuts = [answer.index(s) for s in job.stop if s in answer]
  stopped = bool(ends.size) or "###" in raw or bool(cuts)
  return Completion(answer[:min(cuts)] if cuts else answer,
                    "stop" if stopped else "length", len(job.prompt_ids), len(kept))


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "eos_id", "pad_id"))
def _decode(model: LlavaModel, params, ids, mask, image_mask, pixels, key, temperature, top_p,
            *, max_new_tokens: int, eos_id: int, pad_id: int) -> jax.Array:
  return generate.sample_decode(model, params, ids, mask, image_mask, pixels, key,
                                max_new_tokens=max_new_tokens, temperature=temperature,
                                top_p=top_p, eos_id=eos_id, pad_id=pad_id)


def run_batch(served: ServedModel, jobs: Sequence[Job], key: jax.Array, max_batch: int
              ) -> list[Completion]:
  """Jobs that all carry an image, or all none -> their completions, in one generation."""
  tokenizer = served.tokenizer
  rows, length, new_tokens = batch_shape(jobs, max_batch, served.context_length)
  padded = list(jobs) + [jobs[0]] * (rows - len(jobs))
  ids, mask = generate.pad_prompts([j.prompt_ids for j in padded], length,
                                   tokenizer.pad_token_id)
  patch_id = tokenizer.convert_tokens_to_ids(text.patch_token(served.model.cfg.image_tokens))
  has_image = jobs[0].pixels is not None
  pixels = np.stack([j.pixels for j in padded]) if has_image else None
  tokens = np.asarray(_decode(
      served.model, served.params, ids, mask, (ids == patch_id) & (mask == 1),
      pixels, key, np.array([j.temperature for j in padded], np.float32),
      np.array([j.top_p for j in padded], np.float32), max_new_tokens=new_tokens,
      eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id))
  return [finish(row, job, tokenizer.eos_token_id, served.decode)
          for row, job in zip(tokens, jobs)]


def group_by_image(jobs: Sequence[Job]) -> list[list[int]]:
  """Indices of `jobs`, split into those with an image and those without (in order)."""
  groups = [[i for i, j in enumerate(jobs) if (j.pixels is not None) == flag]
            for flag in (True, False)]
  return [g for g in groups if g]


class BatchingEngine:
  """A queue of jobs and one thread that runs them in batches of up to `max_batch`.

  `run(jobs, key)` computes the completions of one group (`run_batch` bound to a model);
  `submit` returns a Future of the job's Completion (or of the exception its batch raised).
  """

  def __init__(self, run: Callable[[list[Job], jax.Array], list[Completion]], max_batch: int,
               wait_s: float = 0.005, seed: int = 0):
    if max_batch < 1:
      raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    self._run, self.max_batch, self._wait_s = run, max_batch, wait_s
    self._key = jax.random.key(seed)
    self._queue: queue.Queue = queue.Queue()
    self.batch_sizes: list[int] = []  # of every generation run (for tests and benchmarks)
    self._thread = threading.Thread(target=self._loop, name="batching", daemon=True)
    self._thread.start()

  def submit(self, job: Job) -> concurrent.futures.Future:
    future: concurrent.futures.Future = concurrent.futures.Future()
    self._queue.put((job, future))
    return future

  def close(self) -> None:
    self._queue.put(None)
    self._thread.join()

  def _take(self) -> list | None:
    first = self._queue.get()
    if first is None:
      return None
    taken = [first]
    deadline = time.monotonic() + self._wait_s
    while len(taken) < self.max_batch:
      try:
        item = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
      except queue.Empty:
        break
      if item is None:
        self._queue.put(None)
        break
      taken.append(item)
    return taken

  def _loop(self) -> None:
    while (taken := self._take()) is not None:
      jobs = [job for job, _ in taken]
      for group in group_by_image(jobs):
        self._key, key = jax.random.split(self._key)
        self.batch_sizes.append(len(group))
        try:
          completions = self._run([jobs[i] for i in group], key)
        except Exception as e:  # pylint: disable=broad-except  (handed to the waiting request)
          for i in group:
            taken[i][1].set_exception(e)
          continue
        for i, completion in zip(group, completions):
          taken[i][1].set_result(completion)
