"""CLIP vision tower (ViT, quick-GELU, pre-LN, pre-layernorm on the embeddings).

Returns every hidden state as transformers' `CLIPVisionModel(output_hidden_states=True)`
does, because LLaVA picks layer -2 and the dense connectors mix several layers.
Parameter names follow the structure of the HF module (one Flax module per HF module) so
that the `hf/` name map stays a table of renames and transposes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from exgra_jax.models.config import VisionConfig
from exgra_jax.models.dense import DenseGeneral

_INIT = nn.initializers.normal(0.02)


def _dense(features: int | tuple[int, ...], axes: tuple[str, ...], cfg: VisionConfig,
           name: str, axis: int | tuple[int, ...] = -1) -> DenseGeneral:
  """Dense layer with bias; `axes` names the kernel dims, the bias takes the output ones."""
  return DenseGeneral(features, axes, axis=axis, use_bias=True, dtype=cfg.dtype,
                      param_dtype=cfg.param_dtype, kernel_init=_INIT, name=name)


def _layer_norm(cfg: VisionConfig, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("vision_embed",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("vision_embed",)),
      name=name)


def quick_gelu(x: jax.Array) -> jax.Array:
  """CLIP's activation x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


class VisionAttention(nn.Module):
  """Bidirectional multi-head self-attention over [B, N, D] tokens (with biases)."""
  cfg: VisionConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.cfg
    heads = (c.num_heads, c.head_dim)
    axes = ("vision_embed", "vision_heads", "head_dim")
    q = _dense(heads, axes, c, "q_proj")(x)
    k = _dense(heads, axes, c, "k_proj")(x)
    v = _dense(heads, axes, c, "v_proj")(x)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * c.head_dim ** -0.5
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    return _dense(c.hidden_size, ("vision_heads", "head_dim", "vision_embed"), c,
                  "out_proj", axis=(-2, -1))(out)


class VisionMlp(nn.Module):
  cfg: VisionConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.cfg
    x = quick_gelu(_dense(c.intermediate_size, ("vision_embed", "vision_mlp"), c, "fc1")(x))
    return _dense(c.hidden_size, ("vision_mlp", "vision_embed"), c, "fc2")(x)


class VisionEncoderLayer(nn.Module):
  """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""
  cfg: VisionConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + VisionAttention(self.cfg, name="self_attn")(_layer_norm(self.cfg, "layer_norm1")(x))
    x = x + VisionMlp(self.cfg, name="mlp")(_layer_norm(self.cfg, "layer_norm2")(x))
    return nn.with_logical_constraint(x, ("batch", "length", "vision_embed"))


class ClipVisionTower(nn.Module):
  """pixels [B, S, S, 3] (NHWC, CLIP-normalised) -> tuple of L+1 hidden states [B, 1+P, D].

  hs[0] is the embedding output after the pre-layernorm, hs[i] the output of layer i; the
  CLS token is at index 0 of the token axis. `post_layernorm` only exists so that the
  parameter tree (and count) matches CLIPVisionModel; LLaVA never uses it.
  """
  cfg: VisionConfig

  @nn.compact
  def __call__(self, pixels: jax.Array) -> tuple[jax.Array, ...]:
    c = self.cfg
    if pixels.ndim != 4 or pixels.shape[1:] != (c.image_size, c.image_size, 3):
      raise ValueError(f"pixel_values must be [B, {c.image_size}, {c.image_size}, 3] (NHWC), "
                       f"got {pixels.shape}")
    patches = nn.Conv(
        c.hidden_size, (c.patch_size, c.patch_size), strides=(c.patch_size, c.patch_size),
        padding="VALID", use_bias=False, dtype=c.dtype, param_dtype=c.param_dtype,
        kernel_init=nn.with_logical_partitioning(_INIT, (None, None, None, "vision_embed")),
        name="patch_embedding")(pixels.astype(c.dtype))
    batch = pixels.shape[0]
    patches = patches.reshape(batch, -1, c.hidden_size)
    cls = self.param("class_embedding",
                     nn.with_logical_partitioning(_INIT, ("vision_embed",)),
                     (c.hidden_size,), c.param_dtype)
    positions = self.param("position_embedding",
                           nn.with_logical_partitioning(_INIT, (None, "vision_embed")),
                           (c.num_patches + 1, c.hidden_size), c.param_dtype)
    cls = jnp.broadcast_to(cls.astype(c.dtype), (batch, 1, c.hidden_size))
    x = jnp.concatenate([cls, patches], axis=1) + positions.astype(c.dtype)
    x = _layer_norm(c, "pre_layrnorm")(x)
    hidden_states = [x]
    for i in range(c.num_layers):
      x = VisionEncoderLayer(c, name=f"layers_{i}")(x)
      hidden_states.append(x)
    # Created (not applied to the features) so the tree matches CLIPVisionModel.
    _layer_norm(c, "post_layernorm")(x[:, 0])
    return tuple(hidden_states)
