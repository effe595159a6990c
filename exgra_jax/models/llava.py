"""LLaVA(-Med) model: frozen CLIP tower -> connector + projector -> LLaMA.

Top-level parameter collections: `vision` (always frozen: its output goes through
`stop_gradient`, so it gets zero gradients whatever the optimizer masks), `projector`,
`llm`. The N projector outputs of a sample replace, in order, the embeddings at the N
positions where `image_mask` is True (the `<im_patch>` tokens).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from exgra_jax.models.config import LlavaConfig, num_image_tokens
from exgra_jax.models.connector import Projector, connector_features
from exgra_jax.models.llama import Cache, Llama
from exgra_jax.models.vit import ClipVisionTower

TEXT_MODES = ("default", "release")  # config.align.text_mode


def merge_image_embeddings(embeds: jax.Array, image_mask: jax.Array,
                           image_features: jax.Array) -> jax.Array:
  """embeds [B, T, D] with the k-th True of image_mask[b] replaced by image_features[b, k].

  A sample must mark exactly N = image_features.shape[1] positions (the data pipeline's
  contract); with fewer, the last features are unused; with more, the extra positions
  repeat feature N-1.
  """
  slot = jnp.clip(jnp.cumsum(image_mask, axis=1) - 1, 0, image_features.shape[1] - 1)
  gathered = jnp.take_along_axis(image_features, slot[..., None], axis=1)
  return jnp.where(image_mask[..., None], gathered.astype(embeds.dtype), embeds)


def image_node_features(image_features: jax.Array) -> jax.Array:
  """Projector output [B, N, d_llm] -> f_I [B, d_llm] float32: the mean over the N tokens."""
  return image_features.astype(jnp.float32).mean(axis=1)


def _text_pool_weights(mask: jax.Array, mode: str, group_size: int = 0) -> jax.Array:
  """[B, T] weights of the positions averaged into a text feature (see `text_features`)."""
  if mode == "default":
    return mask.astype(jnp.float32)
  batch, length = mask.shape
  group = group_size or batch
  if batch % group:
    raise ValueError(f"{batch} texts do not split into groups of {group}")
  positions = jnp.arange(length)
  lengths = jnp.max(jnp.where(mask > 0, positions + 1, 0), axis=1)
  width = jnp.repeat(lengths.reshape(-1, group).max(axis=1), group)
  return (positions[None, :] < width[:, None]).astype(jnp.float32)


def _check_tokens(input_ids: jax.Array, attention_mask: jax.Array,
                  image_mask: jax.Array | None) -> None:
  if input_ids.ndim != 2:
    raise ValueError(f"input_ids must be [B, T], got shape {input_ids.shape}")
  if attention_mask.shape != input_ids.shape:
    raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape "
                     f"{input_ids.shape}")
  if image_mask is not None and image_mask.shape != input_ids.shape:
    raise ValueError(f"image_mask shape {image_mask.shape} != input_ids shape "
                     f"{input_ids.shape}")


class LlavaModel(nn.Module):
  """See docs/interfaces.md ("Model")."""
  cfg: LlavaConfig

  def setup(self):
    self.vision = ClipVisionTower(self.cfg.vision)
    self.projector = Projector(self.cfg)
    self.llm = Llama(self.cfg.llm)

  def image_features(self, pixel_values: jax.Array) -> jax.Array:
    """pixels [B, S, S, 3] -> projector output [B, N, d_llm] (no gradient into the tower)."""
    hidden_states = jax.lax.stop_gradient(self.vision(pixel_values))
    return self.projector(connector_features(hidden_states, self.cfg))

  def _embed(self, input_ids, image_mask, pixel_values):
    embeds = self.llm.embed(input_ids)
    if pixel_values is None:
      return embeds, None
    if pixel_values.shape[0] != input_ids.shape[0]:
      raise ValueError(f"pixel_values has {pixel_values.shape[0]} images for "
                       f"{input_ids.shape[0]} token rows")
    features = self.image_features(pixel_values)
    return merge_image_embeddings(embeds, image_mask, features), features

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, image_mask: jax.Array,
               pixel_values: jax.Array, *, deterministic: bool = True) -> dict[str, jax.Array]:
    """-> dict(logits [B, T, V] float32, image_features [B, N, d_llm]).

    `deterministic` is accepted for the interface; the model has no dropout.
    """
    del deterministic
    _check_tokens(input_ids, attention_mask, image_mask)
    embeds, features = self._embed(input_ids, image_mask, pixel_values)
    hidden, _ = self.llm.hidden_states(embeds, attention_mask)
    return {"logits": self.llm.logits(hidden), "image_features": features}

  def text_features(self, ids: jax.Array, mask: jax.Array, *, mode: str = "default",
                    group_size: int = 0) -> jax.Array:
    """[B, T] right-padded text -> [B, d_llm] float32: final-normed LLM states (no image)
    averaged over positions.

    `default`: the mean over the text's own tokens (independent of the padding).
    `release`: as the release's stage 2 (docs/align.md): it padded each per-device batch to
    its longest text and averaged every position, padding included, and its flash
    attention gave padded positions a zero attention output (the MLP still runs there).
    Here consecutive rows form groups of `group_size` (0 = all rows; train/step.py passes
    the alignment group, the release's per-device batch under `align.grouping=per_device`)
    and a row averages positions 0 .. (longest text of its group) - 1, whatever T is.
    """
    if mode not in TEXT_MODES:
      raise ValueError(f"mode={mode!r} is not one of {TEXT_MODES}")
    _check_tokens(ids, mask, None)
    hidden, _ = self.llm.hidden_states(self.llm.embed(ids), mask,
                                       padding_attends=mode == "default")
    weights = _text_pool_weights(mask, mode, group_size)[..., None]
    return ((hidden.astype(jnp.float32) * weights).sum(axis=1)
            / jnp.maximum(weights.sum(axis=1), 1.0))

  def prefill(self, input_ids: jax.Array, attention_mask: jax.Array, image_mask: jax.Array,
              pixel_values: jax.Array | None, cache: Cache
              ) -> tuple[jax.Array, Cache, jax.Array]:
    """Runs the right-padded prompt into `cache` (from `llama.init_cache`, length >= T).

    Returns (logits of each sample's last real token [B, V], cache, lengths [B]): the next
    token of sample b goes to position lengths[b].
    """
    _check_tokens(input_ids, attention_mask, image_mask)
    if cache["k"].shape[3] < input_ids.shape[1]:
      raise ValueError(f"cache holds {cache['k'].shape[3]} positions, prompt has "
                       f"{input_ids.shape[1]}")
    embeds, _ = self._embed(input_ids, image_mask, pixel_values)
    hidden, cache = self.llm.hidden_states(embeds, attention_mask, cache=cache)
    lengths = attention_mask.astype(jnp.int32).sum(axis=1)
    last = jnp.take_along_axis(hidden, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)
    return self.llm.logits(last)[:, 0], cache, lengths

  def decode_step(self, tokens: jax.Array, positions: jax.Array, cache: Cache
                  ) -> tuple[jax.Array, Cache]:
    """One new token per sample: tokens [B] at positions [B] -> (logits [B, V], cache)."""
    embeds = self.llm.embed(tokens[:, None])
    ones = jnp.ones((tokens.shape[0], 1), jnp.int32)
    hidden, cache = self.llm.hidden_states(embeds, ones, positions=positions[:, None],
                                           cache=cache)
    return self.llm.logits(hidden)[:, 0], cache


def init_boxed_params(cfg: LlavaConfig, key: jax.Array, model: nn.Module | None = None):
  """Fresh, logically annotated (boxed) params of `LlavaModel(cfg)`, or of `model`, a
  LlavaModel(cfg) that qwix wrapped (models/adapters.py: adapters, quantized kernels).

  Initialised on the smallest valid input (one sample: a token, the N image tokens, a
  token); parameter shapes do not depend on it. Wrap in `jax.eval_shape` for shapes only.
  """
  n = num_image_tokens(cfg)
  size = cfg.vision.image_size
  ids = jnp.zeros((1, n + 2), jnp.int32)
  image_mask = jnp.zeros((1, n + 2), bool).at[:, 1:1 + n].set(True)
  model = LlavaModel(cfg) if model is None else model
  return model.init(key, ids, jnp.ones_like(ids), image_mask,
                    jnp.zeros((1, size, size, 3)))["params"]
