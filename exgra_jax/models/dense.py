"""A dense layer over several input / output axes whose kernel keeps its logical rank.

flax's `nn.DenseGeneral` draws a multi-axis kernel flat ([prod(in), prod(out)]) and reshapes
it afterwards. With a `nn.with_logical_partitioning` initialiser the flat draw is boxed with
the names of the full rank, and when init is traced under a mesh and logical-axis rules (as
every sharded init is), unboxing it applies a sharding constraint of the wrong rank
(`ValueError: ... rank at least 3, but was applied to a value of rank 2`). Here the kernel
is created in its full shape [*input axes, *features], so its names always fit.

Parameters (`kernel` [*in, *features], `bias` [*features]) and the computation (both
operands cast to `dtype`, one `dot_general`) are those of `nn.DenseGeneral`, and for the
element-wise initialisers used in this package (a normal draw, zeros) the initial values are
bit-identical too, so checkpoints and HF name maps are unaffected.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen import dtypes


def _as_tuple(value: int | tuple[int, ...]) -> tuple[int, ...]:
  return tuple(value) if isinstance(value, tuple) else (value,)


class DenseGeneral(nn.Module):
  """x [..., *in] -> [..., *features], contracting the input axes `axis` (trailing).

  Attributes:
    features: output feature shape (an int or a tuple).
    kernel_axes: logical names of the kernel, len(axis) + len(features) of them; the bias
      takes the last len(features).
    axis: the contracted input axes (negative or positive; they must be the trailing ones).
  """
  features: int | tuple[int, ...]
  kernel_axes: tuple[str | None, ...]
  axis: int | tuple[int, ...] = -1
  use_bias: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.normal(0.02)
  bias_init: Any = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = _as_tuple(self.features)
    axis = tuple(sorted(a % x.ndim for a in _as_tuple(self.axis)))
    if axis != tuple(range(x.ndim - len(axis), x.ndim)):
      raise ValueError(f"{self.name}: contracted axes {self.axis} must be the trailing axes "
                       f"of an input of rank {x.ndim}")
    if len(self.kernel_axes) != len(axis) + len(features):
      raise ValueError(f"{self.name}: kernel_axes {self.kernel_axes} must name "
                       f"{len(axis)} input and {len(features)} output axes")
    kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init,
                                                               self.kernel_axes),
                        tuple(x.shape[a] for a in axis) + features, self.param_dtype)
    # flax's promote_dtype (as nn.DenseGeneral casts), not .astype: qwix intercepts it to
    # let a quantized kernel (models/adapters.py) through to its quantized dot_general.
    x, kernel = dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    # In `dtype`: qwix's LoRA adds its float32 adapters' update inside this dot_general, which
    # promotes a bfloat16 result to float32 (and breaks the scanned layers' carry type).
    y = jax.lax.dot_general(x, kernel, ((axis, tuple(range(len(axis)))), ((), ()))
                            ).astype(self.dtype)
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(
          self.bias_init, self.kernel_axes[-len(features):]), features, self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y
