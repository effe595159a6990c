"""Fused causal attention for each platform: Pallas splash (TPU) and cuDNN (GPU).

`model.attention` (configs/model_presets.py) picks the implementation of the decoder's
attention without a KV cache (training, scoring, text features); `llama.causal_attention`
dispatches on it:
- `xla`: `llama.attend`, the blocked masked softmax with a hand-written backward (the
  attention this project started with; what `auto` picks on CPU);
- `splash`: the Pallas splash (flash) kernel `splash_attention`: causal, padding through
  segment ids, no [T, S] score tensor in HBM. Off TPU it runs in Pallas interpret mode,
  which is correct but slow (the CPU tests use it);
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")`, padding through the key
  lengths (right padding). cuDNN has no float32 kernel, so `auto` takes it only for a
  bfloat16 / float16 model on GPU;
- `auto` (`resolve`): splash on TPU, cudnn on GPU (xla there for float32), xla elsewhere.

Shapes: q [B, T, H, hd], k / v [B, T, KV, hd] (H a multiple of KV: grouped-query heads,
query head h reads K/V head h // (H / KV)), key_mask [B, T] (True / 1 on real tokens)
-> [B, T, H, hd] in q's dtype. Query t attends the real keys s <= t. Rows that see no real
key (only in a sample without any real token) are left to the caller, which zeros them.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

LANES = 128  # the splash kernel's KV tiles are multiples of the TPU lane width
SPLASH_BLOCKS = (512, 256, 128)  # tile sizes tried, largest first (must divide the length)


def platform() -> str:
  """Platform the traced program runs on: the active mesh's devices', else the default.

  The mesh comes first so that a program compiled ahead of time for TPU devices from a
  host whose default backend is the CPU (tools/plan_memory.py) still gets the TPU kernel.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.abstract_device is not None:
    return mesh.abstract_device.platform
  return jax.default_backend()


def resolve(choice: str, dtype: str) -> str:
  """`model.attention` -> the implementation used here: xla | splash | cudnn."""
  if choice != "auto":
    return choice
  kind = platform()
  if kind == "tpu":
    return "splash"
  if kind == "gpu" and dtype in ("bfloat16", "float16"):
    return "cudnn"
  return "xla"


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array, *,
                          implementation: str) -> jax.Array:
  """`jax.nn.dot_product_attention`, causal, with the real keys as lengths.

  `implementation="cudnn"` is the GPU choice; "xla" is the same call on XLA's reference
  implementation (what the CPU tests check). The lengths count the real keys, so padding
  must be on the right (the data pipeline's layout); every query row stays valid, so
  padded queries see the real keys as in `llama.attend`. cuDNN's custom call partitions
  over batch and heads itself: no shard_map here.
  """
  lengths = key_mask.astype(jnp.int32).sum(axis=1)
  return jax.nn.dot_product_attention(q, k, v, is_causal=True, key_value_seq_lengths=lengths,
                                      implementation=implementation)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array
                     ) -> jax.Array:
  """The Pallas splash kernel, causal, padded keys excluded through segment ids.

  Every query gets segment 0 and every key segment 0 if real, 1 if padding, so a padded
  query sees the real keys before it (as in `llama.attend`) and no query sees a padded
  key. The length is padded to a multiple of 128 with padding keys (cut from the output)
  and the kernel tiles it in the largest of SPLASH_BLOCKS that divides it. Under a mesh
  (`jax.sharding.get_abstract_mesh()`), the kernel runs in `shard_map` over the mesh axes
  that the logical axis rules give "batch" and "heads" / "kv_heads" where they divide the
  dims; the sequence is never split (the kernel needs whole rows).
  """
  interpret = platform() != "tpu"

  def local(q, k, v, key_mask):
    batch, length, heads, hd = q.shape
    padded = -(-length // LANES) * LANES
    block = next(b for b in SPLASH_BLOCKS if padded % b == 0)
    kernel = splash.make_splash_mha(
        splash.MultiHeadMask([splash.CausalMask((padded, padded))] * heads),
        block_sizes=splash.BlockSizes(
            block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
            block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block,
            block_kv_dq=block),
        head_shards=1, q_seq_shards=1, interpret=interpret)
    pad = lambda x: jnp.pad(x, ((0, 0), (0, padded - length), (0, 0), (0, 0))
                            ).transpose(0, 2, 1, 3)  # [B, heads, padded, hd]
    segments = splash.SegmentIds(
        q=jnp.zeros((batch, padded), jnp.int32),
        kv=jnp.pad(1 - key_mask.astype(jnp.int32), ((0, 0), (0, padded - length)),
                   constant_values=1))
    scaled = q * jnp.asarray(hd ** -0.5, q.dtype)  # the kernel does not scale the scores
    out = jax.vmap(kernel)(pad(scaled), pad(k), pad(v), segments)
    return out.transpose(0, 2, 1, 3)[:, :length]

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return local(q, k, v, key_mask)
  q_spec, kv_spec = splash_specs(mesh, q.shape, k.shape)
  return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, P(q_spec[0])),
                       out_specs=q_spec, check_vma=False)(q, k, v, key_mask)


def splash_specs(mesh: jax.sharding.AbstractMesh, q_shape: tuple[int, ...],
                  kv_shape: tuple[int, ...]) -> tuple[P, P]:
  """shard_map specs of q and k / v: batch and heads as the logical rules place them.

  A dim keeps its mesh axes only where their size divides it (a one-sample init under an
  8-way mesh stays replicated). Query and K/V heads are split only together, over the
  same axes, so that each device's query heads read its own K/V heads.
  """
  rules = nn.get_logical_axis_rules()

  def axes(name: str, size: int):
    spec = nn.logical_to_mesh_axes((name,), rules) if rules else None
    names = None if spec is None else spec[0]
    if names is None:
      return None
    count = math.prod(mesh.shape[a] for a in ((names,) if isinstance(names, str) else names))
    return names if size % count == 0 else None

  batch = axes("batch", q_shape[0])
  heads, kv_heads = axes("heads", q_shape[2]), axes("kv_heads", kv_shape[2])
  if heads != kv_heads:
    heads = kv_heads = None
  return P(batch, None, heads, None), P(batch, None, kv_heads, None)


# The fused implementations, by `model.attention` name (`llama.causal_attention` calls them).
FUSED = {
    "splash": splash_attention,
    "cudnn": functools.partial(dot_product_attention, implementation="cudnn"),
}
