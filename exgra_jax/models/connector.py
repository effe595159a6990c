"""Vision-to-language connector: pick / mix CLIP hidden states, then project to d_llm.

Dense connectors (docs/models.md), on the hidden states hs[0..L] of an L-layer tower
with the CLS token dropped everywhere (P patch tokens of width D; with
`vision.feature_select="full"` the CLS token is kept, P + 1 tokens, as transformers'
`vision_feature_select_strategy="full"`):
- none: hs[select_layer]                                         -> [B, P, D]
- dci:  [hs[sel], mean(hs[0 .. L/2-1]), mean(hs[L/2 .. L-1])] on channels -> [B, P, 3D]
- sci:  [hs[sel], hs[a], hs[b]] on channels, (a, b) = connector_layers     -> [B, P, 3D]
- sti:  hs[sel] followed by hs[a] and hs[b] each average-pooled over tokens with
        window = stride = 8 in 1-D token order (as the release does)       -> [B, P + P/4, D]
Projectors: `linear`, `mlpNx_gelu` (Linear(in -> d), then N-1 times GELU (exact erf, as
torch nn.GELU) + Linear(d -> d)), `identity`.
"""
from __future__ import annotations

import re
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from exgra_jax.models.config import STI_POOL, LlavaConfig

_INIT = nn.initializers.normal(0.02)


def _pool_tokens(x: jax.Array) -> jax.Array:
  """[B, P, D] -> [B, P / 8, D]: mean of consecutive windows of 8 tokens."""
  batch, tokens, width = x.shape
  return x.reshape(batch, tokens // STI_POOL, STI_POOL, width).mean(axis=2)


def connector_features(hidden_states: Sequence[jax.Array], cfg: LlavaConfig) -> jax.Array:
  """CLIP hidden states (L+1 of [B, 1+P, D]) -> projector input [B, N, C] (CLS dropped
  unless `vision.feature_select` is "full")."""
  layers = cfg.vision.num_layers
  if len(hidden_states) != layers + 1:
    raise ValueError(f"expected {layers + 1} hidden states, got {len(hidden_states)}")
  first = 0 if cfg.vision.feature_select == "full" else 1
  patches = [h[:, first:] for h in hidden_states]
  selected = patches[cfg.vision.select_layer]
  if cfg.connector == "none":
    return selected
  if cfg.connector == "dci":
    half = layers // 2
    low = jnp.mean(jnp.stack(patches[:half]), axis=0)
    high = jnp.mean(jnp.stack(patches[half:layers]), axis=0)
    return jnp.concatenate([selected, low, high], axis=-1)
  a, b = cfg.connector_layers
  if cfg.connector == "sci":
    return jnp.concatenate([selected, patches[a], patches[b]], axis=-1)
  if cfg.connector == "sti":
    return jnp.concatenate([selected, _pool_tokens(patches[a]), _pool_tokens(patches[b])],
                           axis=1)
  raise ValueError(f"unknown connector {cfg.connector!r}")


def projector_depth(projector: str) -> int:
  """Number of Linear layers of a projector name (0 for identity)."""
  if projector == "identity":
    return 0
  if projector == "linear":
    return 1
  match = re.fullmatch(r"mlp(\d+)x_gelu", projector)
  if not match:
    raise ValueError(f"projector {projector!r}: expected linear, identity or mlpNx_gelu")
  return int(match.group(1))


class Projector(nn.Module):
  """[B, N, C] -> [B, N, d_llm]. Params `linear_0`, `linear_1`, ... (with biases)."""
  cfg: LlavaConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.cfg.llm
    x = x.astype(c.dtype)
    for i in range(projector_depth(self.cfg.projector)):
      if i:
        x = jax.nn.gelu(x, approximate=False)
      # The d -> d layers name their input axis "mlp" so that no kernel has two dims
      # sharded on the same mesh axis ("embed" maps to fsdp).
      axes = ("vision_embed", "embed") if i == 0 else ("mlp", "embed")
      x = nn.Dense(c.hidden_size, dtype=c.dtype, param_dtype=c.param_dtype,
                   kernel_init=nn.with_logical_partitioning(_INIT, axes),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                          ("embed",)),
                   name=f"linear_{i}")(x)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))
