"""The device side of continuous batching: a KV cache whose rows each hold their own request.

Why slots: the model's cached attention already works per row (row b writes its new K/V
at positions[b] and attends to cache positions <= positions[b]; models/llama.py), so
every row of one cache can hold a different request at a different position. A decode
step advances all rows together; a finished row is simply overwritten by the next
request's prefill, which joins at the next step. Rows without a request decode a
harmless pad token from position 0.

Shapes, rounded so that little compiles: the cache is [layers, rows, kv_heads, length,
head_dim] with `rows` a power of two that covers the highest busy row (a step costs in
proportion to its rows: one request alone does not pay for sixteen) and `length` a
multiple of 64 that holds every request in it (`resize` adjusts both between steps). A
prefill takes a power-of-two number of new requests (padded with copies of the first,
written to its row again) and prompts right-padded to a power of two (>= 64). Programs:
one prefill per (requests, prompt length, image or not), one step per (rows, length,
steps per call).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from exgra_jax.eval import generate
from exgra_jax.models.llama import Cache, init_cache
from exgra_jax.models.llava import LlavaModel

MIN_PROMPT, MIN_CACHE, CACHE_STEP = 64, 128, 64


def power_of_two(n: int, minimum: int = 1) -> int:
  """The smallest power of two >= max(n, minimum)."""
  return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def cache_length(positions: int) -> int:
  """Cache positions per row for requests that reach `positions`: a multiple of CACHE_STEP
  (>= MIN_CACHE; a decode step costs in proportion to it)."""
  return max(MIN_CACHE, -(-positions // CACHE_STEP) * CACHE_STEP)


def like_params(params, tree):
  """`tree` on the params' device. Arrays the programs take back from their own outputs
  (cache, key) must start there: an uncommitted first one compiles every program twice."""
  return jax.device_put(tree, next(iter(jax.tree.leaves(params)[0].devices())))


def resize(model: LlavaModel, params, cache: Cache | None, rows: int, length: int) -> Cache:
  """`cache` (None: a new one) with `rows` rows of `length` positions: rows dropped from the
  end or zero rows added, positions added at the end (never dropped).

  A new cache is placed with `like_params`.
  """
  if cache is None:
    return like_params(params, init_cache(model.cfg.llm, rows, length))
  have_rows, have_length = cache["k"].shape[1], cache["k"].shape[3]
  pad = ((0, 0), (0, max(rows - have_rows, 0)), (0, 0), (0, length - have_length), (0, 0))
  return {name: jnp.pad(buffer[:, :rows], pad) for name, buffer in cache.items()}


@functools.partial(jax.jit, static_argnames=("model",))
def prefill(model: LlavaModel, params, input_ids: jax.Array, attention_mask: jax.Array,
            image_mask: jax.Array, pixel_values: jax.Array | None, key: jax.Array,
            temperature: jax.Array, top_p: jax.Array) -> tuple[jax.Array, Cache, jax.Array]:
  """Right-padded prompts [n, T] (images [n, S, S, 3] or None) -> (each prompt's first new
  token [n], their cache for `insert`, the next key)."""
  key, draw = jax.random.split(key)
  logits, cache, _ = model.apply({"params": params}, input_ids, attention_mask, image_mask,
                                 pixel_values,
                                 init_cache(model.cfg.llm, *input_ids.shape),
                                 method=LlavaModel.prefill)
  return generate.draw_tokens(logits, draw, temperature, top_p), cache, key


@functools.partial(jax.jit, donate_argnames=("cache",))
def insert(cache: Cache, rows: jax.Array, new: Cache) -> Cache:
  """Prefilled caches [layers, n, kv_heads, T, head_dim] into rows `rows` [n] of `cache`
  [layers, R, kv_heads, L, head_dim],
  positions < min(T, L) (beyond a prompt's length only its padding, which decoding
  overwrites; the cache holds every prompt's length + max_tokens).

  Positions >= T keep an earlier request's values, which are never attended: a row
  attends only to positions <= its own."""
  length = min(new["k"].shape[3], cache["k"].shape[3])
  return {name: cache[name].at[:, rows, :, :length].set(new[name][:, :, :, :length])
          for name in cache}


@functools.partial(jax.jit, static_argnames=("model", "steps"), donate_argnames=("cache",))
def step(model: LlavaModel, params, cache: Cache, tokens: jax.Array, positions: jax.Array,
         key: jax.Array, temperature: jax.Array, top_p: jax.Array, *, steps: int = 1
         ) -> tuple[jax.Array, Cache, jax.Array]:
  """`steps` decode steps of every row, in one call: tokens [rows] at positions [rows] ->
  (the drawn tokens [rows, steps], the cache, the next key). A row keeps decoding to the
  end of the call (the host drops what follows its answer), so the cache must hold
  positions + steps."""
  def one(carry, _):
    tokens, positions, cache, key = carry
    key, draw = jax.random.split(key)
    logits, cache = model.apply({"params": params}, tokens, positions, cache,
                                method=LlavaModel.decode_step)
    tokens = generate.draw_tokens(logits, draw, temperature, top_p)
    return (tokens, positions + 1, cache, key), tokens

  (_, _, cache, key), drawn = jax.lax.scan(one, (tokens, positions, cache, key), length=steps)
  return drawn.T, cache, key


def prompt_arrays(prompts: list[tuple[int, ...]], rows: int, patch_id: int, pad_id: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Prompts, padded to `rows` with copies of the first -> (ids, mask, image mask) [rows, T]
  with T = power_of_two(longest prompt, MIN_PROMPT)."""
  padded = prompts + [prompts[0]] * (rows - len(prompts))
  length = power_of_two(max(len(p) for p in prompts), MIN_PROMPT)
  ids, mask = generate.pad_prompts(padded, length, pad_id)
  return ids, mask, (ids == patch_id) & (mask == 1)
