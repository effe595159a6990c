"""Rotary position embeddings with transformers' rope_scaling variants.

Follows `transformers.modeling_rope_utils` (default, linear, dynamic NTK, llama3, yarn) so
that any LLaMA-family HF checkpoint gives the same logits. Static variants compute the
inverse frequencies once in float32 numpy at trace time; `dynamic` depends on the longest
position in the call (as HF's forward does), so it is computed inside the graph.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from exgra_jax.models.config import LlmConfig


def _default_inv_freq(base: float, dim: int) -> np.ndarray:
  exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
  return (np.float32(1.0) / (np.float32(base) ** exponents)).astype(np.float32)


def _llama3_inv_freq(base: float, dim: int, s: dict) -> np.ndarray:
  inv_freq = _default_inv_freq(base, dim)
  factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
  old_len = s["original_max_position_embeddings"]
  low_wavelen, high_wavelen = old_len / low, old_len / high
  wavelen = np.float32(2 * math.pi) / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(factor), inv_freq)
  smooth = (np.float32(old_len) / wavelen - np.float32(low)) / np.float32(high - low)
  smoothed = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
  medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn_inv_freq(base: float, dim: int, s: dict, max_positions: int
                   ) -> tuple[np.ndarray, float]:
  original = s.get("original_max_position_embeddings", max_positions)
  factor = s.get("factor") or max_positions / original
  attention_factor = s.get("attention_factor")
  mscale, mscale_all_dim = s.get("mscale"), s.get("mscale_all_dim")

  def get_mscale(scale: float, m: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

  if attention_factor is None:
    attention_factor = (get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
                        if mscale and mscale_all_dim else get_mscale(factor))
  beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

  def correction_dim(rotations: float) -> float:
    return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

  low, high = correction_dim(beta_fast), correction_dim(beta_slow)
  if s.get("truncate", True):
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
  extrapolation_factor = (1 - ramp).astype(np.float32)
  pos_freqs = np.float32(base) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))
  inv_freq = (np.float32(1) / (np.float32(factor) * pos_freqs)) * (1 - extrapolation_factor) + (
      np.float32(1) / pos_freqs) * extrapolation_factor
  return inv_freq.astype(np.float32), float(attention_factor)


def inverse_frequencies(cfg: LlmConfig, positions: jax.Array) -> tuple[jax.Array, float]:
  """(inv_freq [head_dim/2] float32, attention factor) for the positions of this call."""
  dim = cfg.resolved_head_dim
  scaling = cfg.rope_scaling_dict()
  kind = scaling.get("rope_type", "default")
  base = cfg.rope_theta
  if kind == "default":
    return jnp.asarray(_default_inv_freq(base, dim)), 1.0
  if kind == "linear":
    return jnp.asarray(_default_inv_freq(base, dim) / np.float32(scaling["factor"])), 1.0
  if kind == "llama3":
    return jnp.asarray(_llama3_inv_freq(base, dim, scaling)), 1.0
  if kind == "yarn":
    inv_freq, attention_factor = _yarn_inv_freq(base, dim, scaling, cfg.max_position_embeddings)
    return jnp.asarray(inv_freq), attention_factor
  if kind == "dynamic":
    factor, max_positions = scaling["factor"], cfg.max_position_embeddings
    seq_len = jnp.maximum(jnp.max(positions) + 1, max_positions).astype(jnp.float32)
    dynamic_base = base * ((factor * seq_len / max_positions) - (factor - 1)) ** (dim / (dim - 2))
    exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
    return 1.0 / (dynamic_base ** exponents), 1.0
  raise ValueError(f"unknown rope_scaling type {kind!r}")


def rope_cos_sin(cfg: LlmConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
  """positions [B, T] int -> (cos, sin) [B, T, head_dim] float32, attention factor folded in.

  `sin` comes pre-signed for `apply_rope`: its first half is negated (exact: a sign flip),
  so that the rotation is a plain roll of x, whose transpose (the backward) is a roll too.
  Both go through an optimisation barrier: computed once per call and read by every layer,
  rather than XLA:CPU fusing the cos / sin into each layer's forward and backward
  elementwise fusions (it did, recomputing them per head, ~8 % of the CPU step).
  """
  inv_freq, attention_factor = inverse_frequencies(cfg, positions)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  cos = jnp.cos(jnp.concatenate([angles, angles], axis=-1)) * attention_factor
  sin = jnp.sin(angles) * attention_factor
  sin = jnp.concatenate([-sin, sin], axis=-1)
  return jax.lax.optimization_barrier((cos, sin))


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x [B, T, H, hd] rotated by `rope_cos_sin`'s (cos, signed sin) [B, T, hd].

  HF's rotate-half convention, x * cos + rotate_half(x) * sin with rotate_half(x) =
  (-x2, x1): here (x2, x1) * (-sin1, sin2), the same products to the bit.
  """
  cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
  half = x.shape[-1] // 2
  rolled = jnp.concatenate([x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rolled * sin
