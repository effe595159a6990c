"""Greedy decoding with a fixed-shape KV cache (prefill, then one token per step).

Shapes never change inside the loop (cache length = prompt length + max_new_tokens), so
the whole generation is one compiled `lax.fori_loop`. `eval/` builds sampling, stop
strings and detokenisation on top.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from exgra_jax.models.llama import init_cache
from exgra_jax.models.llava import LlavaModel


def greedy_decode(model: LlavaModel, params, input_ids: jax.Array, attention_mask: jax.Array,
                  image_mask: jax.Array, pixel_values: jax.Array | None, *,
                  max_new_tokens: int, eos_id: int, pad_id: int) -> jax.Array:
  """Right-padded prompts [B, T] -> new tokens [B, max_new_tokens] (pad_id after eos).

  Token-identical to transformers' `generate(do_sample=False)` for each prompt.
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  batch, length = input_ids.shape
  cache = init_cache(model.cfg.llm, batch, length + max_new_tokens)
  variables = {"params": params}
  logits, cache, positions = model.apply(variables, input_ids, attention_mask, image_mask,
                                         pixel_values, cache, method="prefill")
  first = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)

  def step(i, state):
    out, cache, positions, done = state
    logits, cache = model.apply(variables, out[:, i - 1], positions, cache,
                                method="decode_step")
    token = jnp.where(done, pad_id, jnp.argmax(logits, axis=-1).astype(jnp.int32))
    return out.at[:, i].set(token), cache, positions + 1, done | (token == eos_id)

  state = (out, cache, positions, first == eos_id)
  out, *_ = jax.lax.fori_loop(1, max_new_tokens, step, state)
  return out
