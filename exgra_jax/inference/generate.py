"""Batched text generation on top of the model's KV-cache entry points.

Why the shapes are fixed: every distinct (batch, prompt length, max_new_tokens) is one
XLA compilation, so prompts are right-padded to the smallest of a few length buckets and
the last partial batch is filled with copies of its first prompt (their outputs are
dropped). Greedy decoding is `models.decode.greedy_decode` (token-identical to
transformers' `generate`); temperature sampling draws from softmax(logits / T) with JAX
keys, optionally kept to the top-p nucleus; T and top-p may differ per row (the server
batches requests with different settings: a row with T = 0 is greedy). The `###` stop string is applied to the decoded text, as the release's
`KeywordsStoppingCriteria` does, together with its answer clean-up (`clean_answer`).
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from exgra_jax.data import text as text_lib
from exgra_jax.models.decode import greedy_decode
from exgra_jax.models.llama import init_cache
from exgra_jax.models.llava import LlavaModel

_LEADING_TAGS = ("###", "Assistant:", "Response:")


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
  """Decoding settings (from config.eval): batch size, buckets, max_new_tokens, T, stop."""
  batch_size: int
  length_buckets: tuple[int, ...]
  max_new_tokens: int
  temperature: float = 0.0
  stop: str = "###"

  def __post_init__(self):
    if self.batch_size < 1 or self.max_new_tokens < 1 or self.temperature < 0:
      raise ValueError(f"invalid generation settings: {self}")
    if not self.length_buckets or list(self.length_buckets) != sorted(self.length_buckets):
      raise ValueError(f"length_buckets must be non-empty and ascending: {self.length_buckets}")

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> GenerationSettings:
    """config.eval's decoding fields with config.data's length buckets."""
    return cls(batch_size=config.eval.batch_size,
               length_buckets=tuple(config.data.length_buckets),
               max_new_tokens=config.eval.max_new_tokens,
               temperature=float(config.eval.temperature), stop=config.eval.stop)


def bucket_length(length: int, buckets: Sequence[int]) -> int:
  """The smallest bucket that holds `length` tokens."""
  for bucket in buckets:
    if length <= bucket:
      return bucket
  raise ValueError(f"prompt of {length} tokens exceeds the largest length bucket {buckets[-1]}")


def pad_prompts(prompts: Sequence[Sequence[int]], length: int, pad_id: int
                ) -> tuple[np.ndarray, np.ndarray]:
  """Token id lists -> right-padded ids [B, length] and attention mask [B, length]."""
  ids = np.full((len(prompts), length), pad_id, np.int32)
  mask = np.zeros((len(prompts), length), np.int32)
  for row, prompt in enumerate(prompts):
    if not prompt:
      raise ValueError(f"prompt {row} is empty")
    ids[row, :len(prompt)] = prompt
    mask[row, :len(prompt)] = 1
  return ids, mask


def draw_tokens(logits: jax.Array, key: jax.Array, temperature: float | jax.Array,
                top_p: float | jax.Array = 1.0) -> jax.Array:
  """logits [B, V] -> tokens [B]: per row argmax where temperature == 0, else a draw from
  softmax(logits / T) over the smallest set of tokens whose probability reaches top_p.

  temperature and top_p: scalars or [B]. With top_p >= 1 the draw is exactly
  `categorical(key, logits / T)`. The sort of the nucleus runs only when a row asks for
  top_p < 1 and the draw only when a row samples (`lax.cond`): an all-greedy batch costs
  an argmax, as in `greedy_decode`.
  """
  rows = logits.shape[:1]
  temperature = jnp.broadcast_to(jnp.asarray(temperature, logits.dtype), rows)[:, None]
  top_p = jnp.broadcast_to(jnp.asarray(top_p, logits.dtype), rows)[:, None]
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def nucleus(scaled: jax.Array) -> jax.Array:
    ordered = jnp.sort(scaled, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    kept = jnp.maximum(jnp.sum(jnp.cumsum(probs, axis=-1) - probs < top_p, axis=-1), 1)
    threshold = jnp.take_along_axis(ordered, kept[:, None] - 1, axis=-1)
    return jnp.where((top_p < 1) & (scaled < threshold), -jnp.inf, scaled)

  def sample() -> jax.Array:
    scaled = logits / jnp.where(temperature > 0, temperature, 1)
    scaled = jax.lax.cond(jnp.any(top_p < 1), nucleus, lambda x: x, scaled)
    sampled = jax.random.categorical(key, scaled).astype(jnp.int32)
    return jnp.where(temperature[:, 0] > 0, sampled, greedy)

  return jax.lax.cond(jnp.any(temperature > 0), sample, lambda: greedy)


def sample_decode(model: LlavaModel, params, input_ids: jax.Array, attention_mask: jax.Array,
                  image_mask: jax.Array, pixel_values: jax.Array | None, key: jax.Array, *,
                  max_new_tokens: int, temperature: float | jax.Array, eos_id: int,
                  pad_id: int, top_p: float | jax.Array = 1.0) -> jax.Array:
  """Like `greedy_decode`, each token from `draw_tokens` (temperature, top_p: scalar or [B])."""
  batch, length = input_ids.shape
  cache = init_cache(model.cfg.llm, batch, length + max_new_tokens)
  variables = {"params": params}
  logits, cache, positions = model.apply(variables, input_ids, attention_mask, image_mask,
                                         pixel_values, cache, method="prefill")
  keys = jax.random.split(key, max_new_tokens)
  draw = lambda logits, k: draw_tokens(logits, k, temperature, top_p)
  first = draw(logits, keys[0])
  out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)

  def step(i, state):
    out, cache, positions, done = state
    logits, cache = model.apply(variables, out[:, i - 1], positions, cache,
                                method="decode_step")
    token = jnp.where(done, pad_id, draw(logits, keys[i]))
    return out.at[:, i].set(token), cache, positions + 1, done | (token == eos_id)

  out, *_ = jax.lax.fori_loop(1, max_new_tokens, step,
                              (out, cache, positions, first == eos_id))
  return out


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature",
                                             "eos_id", "pad_id"))
def decode_batch(model: LlavaModel, params, input_ids, attention_mask, image_mask,
                 pixel_values, key, *, max_new_tokens: int, temperature: float, eos_id: int,
                 pad_id: int) -> jax.Array:
  """One compiled decode: greedy when temperature == 0, sampling otherwise.

  Traced under a mesh and logical rules (fine-tune validation), the activations are sharded
  by batch; the tokens come back replicated so that every process can read every answer
  (a constraint that is a no-op without rules).
  """
  if temperature == 0:
    tokens = greedy_decode(model, params, input_ids, attention_mask, image_mask, pixel_values,
                           max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id)
  else:
    tokens = sample_decode(model, params, input_ids, attention_mask, image_mask, pixel_values,
                           key, max_new_tokens=max_new_tokens, temperature=temperature,
                           eos_id=eos_id, pad_id=pad_id)
  return nn.with_logical_constraint(tokens, (None, None))


def clean_answer(text: str, stop: str) -> str:
  """The release's post-processing: strip leading ###/Assistant:/Response:, cut at `stop`."""
  while True:
    before = len(text)
    text = text.strip()
    for tag in _LEADING_TAGS:
      if text.startswith(tag):
        text = text[len(tag):].strip()
    if len(text) == before:
      break
  return text.split(stop, 1)[0].strip() if stop else text


def generate(model: LlavaModel, params, prompts: Sequence[Sequence[int]],
             pixel_values: np.ndarray | None, settings: GenerationSettings, *,
             image_patch_id: int, eos_id: int, pad_id: int,
             detokenize: Callable[[Sequence[int]], str], key: jax.Array | None = None,
             batch_sharding: jax.sharding.Sharding | None = None) -> list[str]:
  """Prompts (token ids, image already expanded) + images [P, S, S, 3] -> answers.

  `batch_sharding`, when given (the training mesh's data sharding), places each batch's
  arrays on the mesh; params must already be placed. Returns one cleaned answer per prompt.
  """
  if pixel_values is not None and len(pixel_values) != len(prompts):
    raise ValueError(f"{len(prompts)} prompts but {len(pixel_values)} images")
  key = jax.random.key(0) if key is None else key
  answers: list[str] = []
  size = settings.batch_size
  for start in range(0, len(prompts), size):
    chunk = list(prompts[start:start + size])
    real = len(chunk)
    chunk += [chunk[0]] * (size - real)
    length = bucket_length(max(len(p) for p in chunk), settings.length_buckets)
    ids, mask = pad_prompts(chunk, length, pad_id)
    arrays = [ids, mask, (ids == image_patch_id) & (mask == 1)]
    if pixel_values is not None:
      pixels = pixel_values[start:start + real]
      arrays.append(np.concatenate([pixels] + [pixels[:1]] * (size - real)))
    if batch_sharding is not None:
      arrays = [jax.device_put(a, batch_sharding) for a in arrays]
    pixels_arg = arrays[3] if pixel_values is not None else None
    key, step_key = jax.random.split(key)
    tokens = np.asarray(decode_batch(
        model, params, arrays[0], arrays[1], arrays[2], pixels_arg, step_key,
        max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
        eos_id=eos_id, pad_id=pad_id))
    for row in tokens[:real]:
      ends = np.flatnonzero(row == eos_id)
      kept = row[:ends[0]] if ends.size else row
      answers.append(clean_answer(detokenize(kept.tolist()), settings.stop))
  return answers


def answer_prompts(model: LlavaModel, params, tokenizer, prompt_texts: Sequence[str],
                   pixel_values: np.ndarray, settings: GenerationSettings, *,
                   batch_sharding: jax.sharding.Sharding | None = None) -> list[str]:
  """Prompt texts (images expanded) + images -> answers, through a transformers tokenizer.

  The tokenizer must hold the model's patch token (`<im_patch>`, or `<image>` for
  `image_tokens="image"`; data/text.py) and define eos and pad.
  """
  patch = text_lib.patch_token(model.cfg.image_tokens)
  patch_id = tokenizer.convert_tokens_to_ids(patch)
  if patch_id is None or patch_id == tokenizer.unk_token_id:
    raise ValueError(f"tokenizer lacks the {patch} token")
  return generate(model, params, [tokenizer(text).input_ids for text in prompt_texts],
                  pixel_values, settings, image_patch_id=patch_id,
                  eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                  detokenize=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
                  batch_sharding=batch_sharding)
