"""Unary and quadratic costs of one matching H(X -> Y) (docs/align.md).

Node features are L2-normalised; edge features are e_ij = h_i - h_j, L2-normalised.
  U = -(cos(x_X, x_Y) + G_n - 0.5)          [g, g]
  Q = -0.5 (e_X . e_Y + G_e - 0.5)          [E, E]
with G ~ Gumbel(0, gumbel_scale). G_n is drawn once per step and shared by the six calls,
G_e per call; both come from JAX keys.

The noise is added to the affinity with one rounding (`add_noise`): training draws it in
float32; a replay of the release (train/step_equivalence.py) hands in the release's
float64 numpy draws as a `(high, low)` float32 pair (`split_float64`), and the sum comes
out as the release's float32(float64 affinity + noise).
"""
import jax
import jax.numpy as jnp
import numpy as np

# Noise: a float32 array, or a float64 draw split into a float32 (high, low) pair.
Noise = jax.Array | tuple[jax.Array, jax.Array]


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Rows of x scaled to unit norm ([..., d]), torch's `F.normalize`: x / max(|x|, eps).

  An all-zero row stays zero, and its gradient is torch's, g / eps: the norm's derivative
  at zero is taken as 0 (as torch does), not 0 / 0. Such rows occur: two equal samples of
  a group have equal GNN outputs without dropout, so the edge between them is zero.
  """
  squares = jnp.sum(x * x, axis=-1, keepdims=True)
  nonzero = squares > 0
  norm = jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, squares, 1.0)), 0.0)
  return x / jnp.maximum(norm, eps)


def edge_features(nodes: jax.Array, edges: jax.Array) -> jax.Array:
  """e_ij = h_i - h_j for every edge (i, j); [E, d]."""
  return nodes[edges[:, 0]] - nodes[edges[:, 1]]


NOISE_KINDS = ("gumbel", "sum_of_gamma", "none")


def gumbel_noise(key: jax.Array, shape: tuple[int, ...], scale: float) -> jax.Array:
  """Gumbel(0, scale) samples of the given shape."""
  return scale * jax.random.gumbel(key, shape)


def sum_of_gamma_noise(key: jax.Array, shape: tuple[int, ...], scale: float, *,
                       kappa: float = 1.0, terms: int = 10) -> jax.Array:
  """IMLE's sum-of-Gamma perturbation (Niepert et al. 2021), times `scale`.

  eps = (1 / kappa) * (sum_{i=1..terms} Gamma(1 / kappa, kappa / i) - log terms); with
  kappa = 1 it tends to a standard Gumbel as `terms` grows, so `scale` means the same as
  for `gumbel_noise`.
  """
  index = jnp.arange(1, terms + 1, dtype=jnp.float32)
  gammas = jax.random.gamma(key, 1.0 / kappa, (terms, *shape)) * (kappa / index).reshape(
      (terms,) + (1,) * len(shape))
  return scale * (gammas.sum(axis=0) - jnp.log(float(terms))) / kappa


def perturbation_noise(key: jax.Array, shape: tuple[int, ...], kind: str,
                       scale: float) -> jax.Array:
  """Noise added to the affinities: `align.imle_noise` in NOISE_KINDS."""
  if kind == "gumbel":
    return gumbel_noise(key, shape, scale)
  if kind == "sum_of_gamma":
    return sum_of_gamma_noise(key, shape, scale)
  if kind == "none":
    return jnp.zeros(shape, jnp.float32)
  raise ValueError(f"align.imle_noise={kind!r} is not one of {NOISE_KINDS}")


def split_float64(noise: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """A float64 draw -> float32 (high, low): high = f32(noise), low = f32(noise - high).

  high + low holds the draw to ~48 bits, enough for `add_noise` to round affinity + noise
  as the release's float64 addition does (it adds numpy float64 noise to float32 costs).
  """
  noise = np.asarray(noise, np.float64)
  high = noise.astype(np.float32)
  return high, (noise - high).astype(np.float32)


def add_noise(affinity: jax.Array, noise: Noise) -> jax.Array:
  """affinity + noise rounded once to float32 (shapes equal).

  A float32 noise is one float32 addition. A (high, low) pair (`split_float64`) is added
  as a double-float sum: TwoSum gives the exact rounding error of affinity + high, the
  low parts are summed and the total is rounded once, which is float32(affinity + noise)
  computed in float64. Adding float32(noise) instead would round twice and move about one
  cost in ten by an ulp. Its derivative in `affinity` is exactly 1 (the error terms cancel).
  """
  if not isinstance(noise, tuple):
    return affinity + noise
  high, low = noise
  total = affinity + high
  virtual = total - affinity
  error = (affinity - (total - virtual)) + (high - virtual)
  return total + (error + low)


def matching_costs(nodes_x: jax.Array, nodes_y: jax.Array, edges: jax.Array,
                   node_noise: Noise, edge_noise: Noise) -> tuple[jax.Array, jax.Array]:
  """(U [g, g], Q [E, E]) for GNN outputs [g, d] of X and Y over the shared edges [E, 2].

  The release's order of operations: noise added to the affinity (one rounding), then
  0.5 subtracted, then the sign (and the 0.5 of the quadratic term).
  """
  x, y = l2_normalize(nodes_x), l2_normalize(nodes_y)
  ex = l2_normalize(edge_features(nodes_x, edges))
  ey = l2_normalize(edge_features(nodes_y, edges))
  unary = -(add_noise(x @ y.T, node_noise) - 0.5)
  quadratic = -0.5 * (add_noise(ex @ ey.T, edge_noise) - 0.5)
  return unary, quadratic
