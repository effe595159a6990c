"""Unary and quadratic costs of one matching H(X -> Y) (docs/align.md).

Node features are L2-normalised; edge features are e_ij = h_i - h_j, L2-normalised.
  U = -(cos(x_X, x_Y) + G_n - 0.5)          [g, g]
  Q = -0.5 (e_X . e_Y + G_e - 0.5)          [E, E]
with G ~ Gumbel(0, gumbel_scale). G_n is drawn once per step and shared by the six calls,
G_e per call; both come from JAX keys.
"""
import jax
import jax.numpy as jnp


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Rows of x scaled to unit norm ([..., d]); eps keeps all-zero rows at zero."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


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


def matching_costs(nodes_x: jax.Array, nodes_y: jax.Array, edges: jax.Array,
                   node_noise: jax.Array, edge_noise: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(U [g, g], Q [E, E]) for GNN outputs [g, d] of X and Y over the shared edges [E, 2]."""
  x, y = l2_normalize(nodes_x), l2_normalize(nodes_y)
  ex = l2_normalize(edge_features(nodes_x, edges))
  ey = l2_normalize(edge_features(nodes_y, edges))
  unary = -(x @ y.T + node_noise - 0.5)
  quadratic = -0.5 * (ex @ ey.T + edge_noise - 0.5)
  return unary, quadratic
