"""The device side of continuous batching: a KV cache whose rows each hold their own request,
and the bounded set of programs that serve every request.

Why slots: the model's cached attention already works per row (row b writes its new K/V
at positions[b] and attends to cache positions <= positions[b]; models/llama.py), so
every row of one cache can hold a different request at a different position. A decode
step advances all rows together; a finished row is simply overwritten by the next
request's prefill, which joins at the next step.

Why a fixed cache and a few programs: a new shape is a compilation (seconds on a CPU, more
on an accelerator), and a compilation while requests wait stalls every one of them. So the
device state has one shape for the server's life: the cache [layers, max_batch, kv_heads,
context, head_dim] (`context` = the server's --max_context), the last drawn token of every
row [max_batch] and the random key; and every call is one of a bounded set (`Programs`),
all compiled at start-up (`Programs.compile_all`):
- prefill: (requests, prompt length, image or not), requests a `row_buckets(.., 4)` size (padded
  with copies of the first, whose writes are dropped), prompts right-padded to a
  `prompt_buckets` length; it writes the new rows of the cache and their first tokens;
- step: (rows, steps per call): the first `rows` cache rows (a `row_buckets` size covering
  the highest busy row: one request alone does not pay for sixteen) advance `steps` tokens
  (a `step_counts` number).
The device state is donated to every call, so the cache is updated in place, and it stays
on the device between calls: a step's input tokens are the previous call's output there,
so the host can dispatch step t + 1 before it reads step t's tokens.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from exgra_jax.inference import generate
from exgra_jax.models.config import num_image_tokens
from exgra_jax.models.llama import init_cache
from exgra_jax.models.llava import LlavaModel

MIN_PROMPT = 64

State = dict  # {"cache": Cache, "tokens": [max_batch] int32, "key": key}


def power_of_two(n: int, minimum: int = 1) -> int:
  """The smallest power of two >= max(n, minimum)."""
  return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def row_buckets(max_batch: int, base: int = 2) -> tuple[int, ...]:
  """Row counts that programs take: the powers of `base` below max_batch, and max_batch.
  Steps take powers of two (a step's cost follows its rows, and a step is most of the
  work); prefills, which are far fewer and cost more to compile, powers of four."""
  counts, n = {max_batch}, 1
  while n < max_batch:
    counts.add(n)
    n *= base
  return tuple(sorted(counts))


def step_counts(decode_steps: int) -> tuple[int, ...]:
  """Steps per decode call that programs take: `decode_steps`, and half as many for the
  calls made while answers are short (`Engine._steps_per_call` says why)."""
  return tuple(sorted({max(1, decode_steps // 2), decode_steps}))


def prompt_buckets(context: int) -> tuple[int, ...]:
  """Prompt lengths that prefills take: powers of two >= MIN_PROMPT below `context`, and
  `context` (a prompt is shorter than the context: it needs room for an answer)."""
  lengths = [MIN_PROMPT]
  while lengths[-1] < context:
    lengths.append(lengths[-1] * 2)
  return tuple(sorted({min(n, context) for n in lengths}))


def chunks(n: int, buckets: tuple[int, ...]) -> list[int]:
  """How many requests each prefill call of `n` takes: the smallest bucket holding the
  rest when padding wastes at most a quarter of it, else the largest bucket the rest fills
  (a prefill costs in proportion to its rows: 5 requests are 4 + 1, not 16)."""
  sizes = []
  while n > 0:
    padded = bucket(n, buckets) if n <= buckets[-1] else buckets[-1]
    size = n if 4 * (padded - n) <= padded else max(b for b in buckets if b <= n)
    sizes.append(min(size, padded))
    n -= sizes[-1]
  return sizes


def bucket(n: int, buckets: tuple[int, ...]) -> int:
  """The smallest bucket >= n."""
  return next(b for b in buckets if b >= n)


def like_params(params, tree):
  """`tree` on the params' device. Arrays the programs take back from their own outputs
  (cache, key) must start there: an uncommitted first one compiles every program twice."""
  return jax.device_put(tree, next(iter(jax.tree.leaves(params)[0].devices())))


def new_state(model: LlavaModel, params, rows: int, context: int, key: jax.Array) -> State:
  """A zeroed cache of `rows` rows x `context` positions, pad tokens, the key."""
  return like_params(params, {"cache": init_cache(model.cfg.llm, rows, context),
                              "tokens": jnp.zeros((rows,), jnp.int32), "key": key})


@functools.partial(jax.jit, static_argnames=("model",), donate_argnames=("state",))
def prefill(model: LlavaModel, params, state: State, rows: jax.Array, input_ids: jax.Array,
            attention_mask: jax.Array, image_mask: jax.Array, pixel_values: jax.Array | None,
            temperature: jax.Array, top_p: jax.Array) -> tuple[State, jax.Array]:
  """Right-padded prompts [n, T] (images [n, S, S, 3] or None) into cache rows `rows` [n]
  (an index >= max_batch drops that prompt's writes: the padding copies) -> (the state,
  each prompt's first new token [n], also written to `state["tokens"][rows]`).

  Cache positions >= T keep an earlier request's values, which are never attended: a row
  attends only to positions <= its own, and decoding writes each position before that."""
  key, draw = jax.random.split(state["key"])
  logits, new, _ = model.apply({"params": params}, input_ids, attention_mask, image_mask,
                               pixel_values, init_cache(model.cfg.llm, *input_ids.shape),
                               method="prefill")
  first = generate.draw_tokens(logits, draw, temperature, top_p)
  cache = state["cache"]
  length = min(input_ids.shape[1], cache["k"].shape[3])
  cache = {name: cache[name].at[:, rows, :, :length].set(new[name][:, :, :, :length],
                                                          mode="drop") for name in cache}
  tokens = state["tokens"].at[rows].set(first, mode="drop")
  return {"cache": cache, "tokens": tokens, "key": key}, first


@functools.partial(jax.jit, static_argnames=("model", "rows", "steps"),
                   donate_argnames=("state",))
def step(model: LlavaModel, params, state: State, positions: jax.Array,
         temperature: jax.Array, top_p: jax.Array, *, rows: int, steps: int = 1
         ) -> tuple[State, jax.Array]:
  """`steps` decode steps of the first `rows` cache rows in one call: each row's last token
  (`state["tokens"]`) at positions [rows] -> (the state, the drawn tokens [rows, steps]).
  A row keeps decoding to the end of the call (the host drops what follows its answer);
  writes past the cache's end are dropped."""
  full = state["cache"]["k"].shape[1]
  cache = {name: buffer[:, :rows] for name, buffer in state["cache"].items()}

  def one(carry, _):
    tokens, positions, cache, key = carry
    key, draw = jax.random.split(key)
    logits, cache = model.apply({"params": params}, tokens, positions, cache,
                                method="decode_step")
    tokens = generate.draw_tokens(logits, draw, temperature, top_p)
    return (tokens, positions + 1, cache, key), tokens

  (tokens, _, cache, key), drawn = jax.lax.scan(
      one, (state["tokens"][:rows], positions, cache, state["key"]), length=steps)
  if rows < full:
    cache = {name: state["cache"][name].at[:, :rows].set(cache[name]) for name in cache}
    tokens = state["tokens"].at[:rows].set(tokens)
  return {"cache": cache, "tokens": tokens, "key": key}, drawn.T


def prompt_arrays(prompts: list[tuple[int, ...]], rows: int, length: int, patch_id: int,
                  pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Prompts, padded to `rows` with copies of the first -> (ids, mask, image mask)
  [rows, length]."""
  padded = prompts + [prompts[0]] * (rows - len(prompts))
  ids, mask = generate.pad_prompts(padded, length, pad_id)
  return ids, mask, (ids == patch_id) & (mask == 1)


@dataclasses.dataclass
class CompileReport:
  """What start-up compiled: programs, wall seconds."""
  programs: int = 0
  seconds: float = 0.0


class Programs:
  """The compiled programs of one server, by key: `("prefill", n, T, image)` and
  `("step", rows, steps)`, executables compiled ahead of time for the state's shapes.

  `compile_all` compiles every program a request can need (in a thread pool: XLA compiles
  without the interpreter lock); a program not compiled yet compiles on first use (the
  engine without warm-up, e.g. in tests) and counts in `compiled`.
  """

  def __init__(self, model: LlavaModel, params, state: State, *, max_batch: int,
               context: int, decode_steps: int):
    self.model, self.params = model, params
    self.rows, self.lengths = row_buckets(max_batch), prompt_buckets(context)
    self.step_counts = step_counts(decode_steps)
    self.prefill_rows = row_buckets(max_batch, base=4)
    self._state_shape = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=x.sharding), state)
    self._programs: dict[tuple, jax.stages.Compiled] = {}
    self.compiled = 0

  def all_shapes(self) -> list[tuple]:
    """Every program's key: prefills whose prompts can hold the image, and steps."""
    shortest_with_image = num_image_tokens(self.model.cfg) + 1
    return ([("prefill", n, length, image) for n in self.prefill_rows for length in self.lengths
             for image in (False, True) if length >= shortest_with_image or not image]
            + [("step", rows, steps) for rows in self.rows for steps in self.step_counts])

  def compile_all(self) -> CompileReport:
    start = time.perf_counter()
    missing = [k for k in self.all_shapes() if k not in self._programs]
    lowered = [(k, self._lower(k)) for k in missing]  # tracing holds the interpreter lock
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
      for k, compiled in zip(missing, pool.map(lambda kl: kl[1].compile(), lowered)):
        self._programs[k] = compiled
    self.compiled += len(missing)
    return CompileReport(len(missing), time.perf_counter() - start)

  def get(self, key: tuple) -> jax.stages.Compiled:
    if key not in self._programs:
      self._programs[key] = self._lower(key).compile()
      self.compiled += 1
    return self._programs[key]

  def example_args(self, key: tuple) -> tuple:
    """Inputs of program `key` after params and state (zeros; a prefill's rows index past
    the cache, so that its writes are dropped)."""
    if key[0] == "step":
      rows = key[1]
      return (np.zeros(rows, np.int32), np.zeros(rows, np.float32), np.ones(rows, np.float32))
    _, n, length, image = key
    size = self.model.cfg.vision.image_size
    pixels = np.zeros((n, size, size, 3), np.float32) if image else None
    ids = np.zeros((n, length), np.int32)
    return (np.full(n, self._state_shape["tokens"].shape[0], np.int32), ids, ids,
            ids.astype(bool), pixels, np.zeros(n, np.float32), np.ones(n, np.float32))

  def _lower(self, key: tuple) -> jax.stages.Lowered:
    args = (self.model, self.params, self._state_shape, *self.example_args(key))
    if key[0] == "step":
      return step.lower(*args, rows=key[1], steps=key[2])
    return prefill.lower(*args)
