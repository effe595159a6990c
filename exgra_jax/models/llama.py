"""LLaMA-family decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU, KV cache.

Same math as transformers' `LlamaForCausalLM` (parity-tested at 1e-4 in fp32). Design:
- one attention code path for training, prefill and decode: queries at `positions` [B, T]
  attend keys at key index s where s <= position and the key is real. Without a cache the
  keys are this call's tokens and `attention_mask` marks the real ones (right padding);
  with a cache the keys are the cache slots, the new K/V are written at `positions[:, 0]`
  of each sample, and every slot <= position holds a real token (prompt or generated),
  so shapes stay fixed while decoding one token per step;
- without a cache, the attention is `cfg.attention` (`causal_attention`: xla | splash |
  cudnn, models/attention.py); with one (prefill, one-token decode) it is always `attend`,
  on the cache's own [B, kv_heads, S, head_dim] layout (no transposed copy per step);
- optional `nn.scan` over layers (one compiled layer, params stacked on a `layers` axis)
  and rematerialisation (none / full / dots) from the config;
- logical axis names on every parameter and on the main activations (configs/base.py);
- flat tokens: every projection runs on [B*T, D] rather than [B, T, D]. Same math, but
  XLA:CPU lowers the backward of a 3-D x 2-D matmul (weight gradient contracting B and T)
  with transposed copies that made the MLP ~1.8x slower; on TPU the reshape is free.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from exgra_jax.models import attention as attention_lib
from exgra_jax.models.config import LlmConfig
from exgra_jax.models.dense import DenseGeneral
from exgra_jax.models.rope import apply_rope, rope_cos_sin

_INIT = nn.initializers.normal(0.02)
Cache = dict[str, jax.Array]  # {"k", "v"}: [layers, B, kv_heads, S, head_dim]
CAUSAL_BLOCK = 128  # query block of the causal attention (fastest of 64..256 on CPU at T=512)
_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _dense(features: int | tuple[int, ...], axes: tuple[str, ...], cfg: LlmConfig, name: str,
           axis: int | tuple[int, ...] = -1) -> DenseGeneral:
  return DenseGeneral(features, axes, axis=axis, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                      kernel_init=_INIT, name=name)


class RMSNorm(nn.Module):
  """x / rms(x) * scale, computed in float32 and cast back as HF does."""
  eps: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                             ("embed",)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return scale.astype(self.dtype) * x32.astype(self.dtype)


def attention_mask_for(positions: jax.Array, key_mask: jax.Array) -> jax.Array:
  """Boolean [B, T, S]: query at positions[b, t] may see key s iff s <= it and key_mask[b, s]."""
  keys = jnp.arange(key_mask.shape[1])
  return (keys[None, None, :] <= positions[:, :, None]) & key_mask[:, None, :].astype(bool)


def _query_blocks(length: int, keys: int, causal: bool) -> tuple[tuple[int, int, int], ...]:
  """(start, end, visible keys) of each query block: CAUSAL_BLOCK queries seeing keys < end."""
  if not causal or length <= CAUSAL_BLOCK:
    return ((0, length, keys),)
  return tuple((start, min(start + CAUSAL_BLOCK, length), min(start + CAUSAL_BLOCK, length))
               for start in range(0, length, CAUSAL_BLOCK))


def _block_probs(q: jax.Array, k: jax.Array, mask: jax.Array) -> jax.Array:
  """Softmax of the masked, scaled scores of one query block: float32 [B, KV, G, t, s]."""
  scores = jnp.einsum("bkgtd,bksd->bkgts", q, k).astype(jnp.float32)
  scores = jnp.where(mask[:, None, None], scores * q.shape[-1] ** -0.5,
                     jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(scores, axis=-1)


def _grouped_attention_fwd(q, k, v, mask, blocks):
  outs, probs = [], []
  for start, end, keys in blocks:
    p = _block_probs(q[:, :, :, start:end], k[:, :, :keys], mask[:, start:end, :keys])
    outs.append(jnp.einsum("bkgts,bksd->bkgtd", p.astype(v.dtype), v[:, :, :keys]))
    probs.append(p)
  out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
  return out, (q, k, v, mask, out, tuple(probs))


def _grouped_attention_bwd(blocks, residuals, g):
  """Softmax-attention backward with the row term sum_s P dP = sum_d dO * O (as flash
  attention's): a [t, hd] reduction instead of one over the [t, s] scores, and dK / dV
  accumulated into the visible key prefix instead of padding each block's to full length."""
  q, k, v, mask, out, probs = residuals
  scale = q.shape[-1] ** -0.5
  delta = jnp.sum(g.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  dq, dk, dv = [None] * len(blocks), None, None
  # Largest block first, so that dK / dV start as its full-length products.
  for i in sorted(range(len(blocks)), key=lambda i: -blocks[i][2]):
    start, end, keys = blocks[i]
    p, gi = probs[i], g[:, :, :, start:end]
    dv_i = jnp.einsum("bkgts,bkgtd->bksd", p.astype(v.dtype), gi)
    dp = jnp.einsum("bkgtd,bksd->bkgts", gi, v[:, :, :keys]).astype(jnp.float32)
    ds = p * (dp - delta[:, :, :, start:end])
    ds = jnp.where(mask[:, None, None, start:end, :keys], ds * scale, 0).astype(q.dtype)
    dq[i] = jnp.einsum("bkgts,bksd->bkgtd", ds, k[:, :, :keys])
    dk_i = jnp.einsum("bkgts,bkgtd->bksd", ds, q[:, :, :, start:end])
    if dk is None and keys == k.shape[2]:
      dk, dv = dk_i, dv_i
    else:
      dk = jnp.zeros_like(k) if dk is None else dk
      dv = jnp.zeros_like(v) if dv is None else dv
      dk, dv = dk.at[:, :, :keys].add(dk_i), dv.at[:, :, :keys].add(dv_i)
  dq = dq[0] if len(dq) == 1 else jnp.concatenate(dq, axis=3)
  return dq, dk, dv, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _grouped_attention(q, k, v, mask, blocks):
  """q [B, KV, G, T, hd], k / v [B, KV, S, hd], mask [B, T, S] -> [B, KV, G, T, hd]."""
  return _grouped_attention_fwd(q, k, v, mask, blocks)[0]


_grouped_attention.defvjp(_grouped_attention_fwd, _grouped_attention_bwd)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, causal: bool
           ) -> jax.Array:
  """Softmax attention: q [B, T, H, hd], k / v [B, S, KV, hd], mask [B, T, S] -> [B, T, H, hd].

  Heads are grouped as [B, KV, H/KV, T, hd] so that both matmuls have their batch dims
  leading. With `causal` (no cache: query t and key s are positions t and s), queries go
  in blocks of CAUSAL_BLOCK and each block only computes the keys up to its last query:
  (n + 1) / 2n of the work for n blocks, and much smaller score tensors (memory traffic on
  the scores is what bounds attention on CPU). The backward is hand-written
  (`_grouped_attention_bwd`); the forward is the plain masked softmax.
  """
  return attend_kv_major(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask,
                         causal=causal)


def attend_kv_major(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
                    causal: bool) -> jax.Array:
  """`attend` with k / v [B, KV, S, hd], the KV cache's layout (no transposed copy of the
  cache per decode step)."""
  batch, length, heads, hd = q.shape
  kv_heads = k.shape[1]
  q = q.reshape(batch, length, kv_heads, heads // kv_heads, hd).transpose(0, 2, 3, 1, 4)
  out = _grouped_attention(q, k, v, mask, _query_blocks(length, k.shape[2], causal))
  return out.transpose(0, 3, 1, 2, 4).reshape(batch, length, heads, hd)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                     implementation: str) -> jax.Array:
  """Attention without a cache in `implementation` (xla | splash | cudnn): q [B, T, H, hd],
  k / v [B, T, KV, hd], mask [B, T, T] = attention_mask_for(0..T-1, key_mask) -> [B, T, H, hd].

  The last query sees every key, so `mask[:, -1]` is the key mask the fused kernels take.
  A query that sees no real key (only in a sample without real tokens) gets zeros, and no
  gradient, in every implementation (`attend` alone would give it the mean of the values
  of its query block, a kernel whatever its tiling gives).
  """
  key_mask = mask[:, -1]
  if implementation == "xla":
    out = attend(q, k, v, mask, causal=True)
  else:
    out = attention_lib.FUSED[implementation](q, k, v, key_mask)
  sees_a_key = jnp.cumsum(key_mask.astype(jnp.int32), axis=1) > 0
  return jnp.where(sees_a_key[:, :, None, None], out, 0)


def _write_cache(buffer: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
  """buffer [B, KV, S, hd] with new [B, T, KV, hd] at positions start[b] .. + T - 1.

  One token (a decode step) is a scatter of B rows, which XLA updates in place; longer
  writes (prefill) are a per-sample dynamic-update-slice."""
  new = new.transpose(0, 2, 1, 3)
  if new.shape[2] == 1:
    return buffer.at[jnp.arange(buffer.shape[0]), :, start].set(new[:, :, 0])
  write = jax.vmap(lambda buf, rows, i: jax.lax.dynamic_update_slice(buf, rows, (0, i, 0)))
  return write(buffer, new, start)


class Attention(nn.Module):
  """Grouped-query self-attention; kv_heads < heads shares each K/V head with a group."""
  cfg: LlmConfig

  @nn.compact
  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
               query_mask: jax.Array | None, write_index: jax.Array,
               cache: tuple[jax.Array, jax.Array] | None
               ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    c = self.cfg
    hd, heads, kv_heads = c.resolved_head_dim, c.num_heads, c.num_kv_heads
    batch, length, width = x.shape
    tokens = x.reshape(batch * length, width)  # 2-D matmuls: see the module docstring
    q = _dense((heads, hd), ("embed", "heads", "head_dim"), c, "q_proj")(tokens)
    k = _dense((kv_heads, hd), ("embed", "kv_heads", "head_dim"), c, "k_proj")(tokens)
    v = _dense((kv_heads, hd), ("embed", "kv_heads", "head_dim"), c, "v_proj")(tokens)
    q, k, v = (y.reshape(batch, length, *y.shape[1:]) for y in (q, k, v))
    q = nn.with_logical_constraint(apply_rope(q, cos, sin),
                                   ("batch", "length", "heads", "head_dim"))
    k = nn.with_logical_constraint(apply_rope(k, cos, sin),
                                   ("batch", "length", "kv_heads", "head_dim"))
    if cache is None:
      out = causal_attention(q, k, v, mask, attention_lib.resolve(c.attention, c.dtype))
    else:
      cache = tuple(_write_cache(buffer, new.astype(buffer.dtype), write_index)
                    for buffer, new in zip(cache, (k, v)))
      out = attend_kv_major(q, *cache, mask, causal=False)
    if query_mask is not None:  # [B, T] bool: False rows output nothing (flash's unpad / pad)
      out = jnp.where(query_mask[:, :, None, None], out, 0)
    out = _dense(c.hidden_size, ("heads", "head_dim", "embed"), c, "o_proj", axis=(-2, -1))(
        out.reshape(batch * length, heads, hd))
    return out.reshape(batch, length, width), cache


class Mlp(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""
  cfg: LlmConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.cfg
    batch, length, width = x.shape
    tokens = x.reshape(batch * length, width)  # 2-D matmuls: see the module docstring
    gate = _dense(c.intermediate_size, ("embed", "mlp"), c, "gate_proj")(tokens)
    up = _dense(c.intermediate_size, ("embed", "mlp"), c, "up_proj")(tokens)
    hidden = nn.with_logical_constraint(
        (jax.nn.silu(gate) * up).reshape(batch, length, -1), ("batch", "length", "mlp"))
    out = _dense(c.hidden_size, ("mlp", "embed"), c, "down_proj")(
        hidden.reshape(batch * length, -1))
    return out.reshape(batch, length, width)


class DecoderLayer(nn.Module):
  """Pre-norm block; signature (carry, *broadcast, scanned) -> (carry, out) so it scans."""
  cfg: LlmConfig

  @nn.compact
  def __call__(self, x, cos, sin, mask, query_mask, write_index, cache):
    c = self.cfg
    norm = lambda name: RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype, name=name)
    attn, cache = Attention(c, name="self_attn")(norm("input_layernorm")(x), cos, sin, mask,
                                                 query_mask, write_index, cache)
    x = x + attn
    x = x + Mlp(c, name="mlp")(norm("post_attention_layernorm")(x))
    return nn.with_logical_constraint(x, ("batch", "length", "embed")), cache


def init_cache(cfg: LlmConfig, batch: int, length: int) -> Cache:
  """Zeroed KV cache for `length` positions (prompt + new tokens), compute dtype."""
  shape = (cfg.num_layers, batch, cfg.num_kv_heads, length, cfg.resolved_head_dim)
  return {"k": jnp.zeros(shape, cfg.dtype), "v": jnp.zeros(shape, cfg.dtype)}


class Llama(nn.Module):
  """LlamaForCausalLM. Params: embed_tokens, layers_i (or scanned `layers`), norm, lm_head."""
  cfg: LlmConfig

  def setup(self):
    c = self.cfg
    self.embed_tokens = nn.Embed(
        c.vocab_size, c.hidden_size, dtype=c.dtype, param_dtype=c.param_dtype,
        embedding_init=nn.with_logical_partitioning(_INIT, ("vocab", "embed")))
    layer = DecoderLayer
    if c.remat != "none":
      layer = nn.remat(layer, policy=_REMAT_POLICIES[c.remat], prevent_cse=not c.scan_layers)
    if c.scan_layers:
      self.layers = nn.scan(
          layer, variable_axes={"params": 0}, split_rngs={"params": True},
          in_axes=(nn.broadcast,) * 5 + (0,),
          length=c.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})(c)
    else:
      self.layers = [layer(c) for _ in range(c.num_layers)]
    self.norm = RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype)
    if not c.tie_word_embeddings:
      self.lm_head = _dense(c.vocab_size, ("embed", "vocab"), c, None)

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """[B, T] int -> [B, T, D] token embeddings (compute dtype)."""
    return self.embed_tokens(input_ids)

  def hidden_states(self, embeds: jax.Array, attention_mask: jax.Array,
                    positions: jax.Array | None = None, cache: Cache | None = None, *,
                    padding_attends: bool = True) -> tuple[jax.Array, Cache | None]:
    """embeds [B, T, D] -> (final-normed hidden [B, T, D], updated cache or None).

    Without a cache, positions are 0..T-1 (right padding) and must not be given. With a
    cache, `attention_mask` is unused: the new tokens go to slots positions[:, 0] .. + T - 1
    (default 0..T-1) and attend to every slot <= their position.

    `padding_attends=False` (no cache): the attention output at padded positions is zero,
    as flash attention's unpad / pad leaves it (the release's training ran so); their
    residual stream and MLP still run. By default they attend to the real tokens before
    them, as transformers' eager / sdpa attention does. Real positions never see padding.
    """
    c = self.cfg
    batch, length = embeds.shape[:2]
    if cache is None and positions is not None:
      raise ValueError("positions are only for decoding with a cache; without one they are "
                       "0..T-1")
    if cache is not None and not padding_attends:
      raise ValueError("padding_attends=False is for calls without a cache")
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    if cache is None:
      key_mask = attention_mask
    else:
      key_mask = jnp.ones((cache["k"].shape[1], cache["k"].shape[3]), bool)
    mask = attention_mask_for(positions, key_mask)
    query_mask = None if padding_attends else attention_mask.astype(bool)
    cos, sin = rope_cos_sin(c, positions)
    write_index = positions[:, 0]
    x = nn.with_logical_constraint(embeds.astype(c.dtype), ("batch", "length", "embed"))
    if c.scan_layers:
      layer_cache = None if cache is None else (cache["k"], cache["v"])
      x, layer_cache = self.layers(x, cos, sin, mask, query_mask, write_index, layer_cache)
    else:
      updated = []
      for i, layer in enumerate(self.layers):
        x, kv = layer(x, cos, sin, mask, query_mask, write_index,
                      None if cache is None else (cache["k"][i], cache["v"][i]))
        updated.append(kv)
      layer_cache = None if cache is None else (jnp.stack([kv[0] for kv in updated]),
                                                jnp.stack([kv[1] for kv in updated]))
    new_cache = None if cache is None else {"k": layer_cache[0], "v": layer_cache[1]}
    return self.norm(x), new_cache

  def logits(self, hidden: jax.Array) -> jax.Array:
    """[..., D] -> float32 logits [..., V]."""
    tokens = hidden.reshape(-1, hidden.shape[-1])  # 2-D matmul: see the module docstring
    if self.cfg.tie_word_embeddings:
      out = self.embed_tokens.attend(tokens)
    else:
      out = self.lm_head(tokens)
    out = out.reshape(*hidden.shape[:-1], -1)
    return nn.with_logical_constraint(out.astype(jnp.float32), ("batch", "length", "vocab"))

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """[B, T] ids and 0/1 mask -> float32 logits [B, T, V]."""
    hidden, _ = self.hidden_states(self.embed(input_ids), attention_mask)
    return self.logits(hidden)
