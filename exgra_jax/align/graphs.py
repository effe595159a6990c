"""kNN graphs over the samples of one alignment group (docs/align.md).

Each row i of X gets an edge (i -> j) to each of its k nearest other rows j (Euclidean,
no self loops). The edge count g * k is static, so the graph has a fixed shape under jit;
ties are broken by the smaller row index (`jax.lax.top_k` is stable), so the graph is
deterministic. Y uses X's edges, which is what makes H(X -> Y) and H(Y -> X) differ.
"""
import jax
import jax.numpy as jnp
import jraph


def knn_edges(features: jax.Array, num_neighbors: int) -> jax.Array:
  """Edges (source i, target j) with j among i's k nearest rows; int32 [g * k, 2].

  Args:
    features: [g, d] node features.
    num_neighbors: k, with 1 <= k < g.
  """
  if features.ndim != 2:
    raise ValueError(f"knn_edges expects features [g, d], got shape {features.shape}")
  g = features.shape[0]
  if not 1 <= num_neighbors < g:
    raise ValueError(f"num_neighbors must be in [1, g - 1] = [1, {g - 1}], got {num_neighbors}")
  squared_norms = jnp.sum(features * features, axis=-1)
  distances = squared_norms[:, None] + squared_norms[None, :] - 2.0 * features @ features.T
  distances = jnp.where(jnp.eye(g, dtype=bool), jnp.inf, distances)
  _, targets = jax.lax.top_k(-distances, num_neighbors)  # [g, k], nearest first
  sources = jnp.repeat(jnp.arange(g, dtype=jnp.int32), num_neighbors)
  return jnp.stack([sources, targets.reshape(-1).astype(jnp.int32)], axis=-1)


def graphs_tuple(features: jax.Array, edges: jax.Array) -> jraph.GraphsTuple:
  """A single-graph jraph GraphsTuple with nodes [g, d] and the given edges [E, 2]."""
  g, num_edges = features.shape[0], edges.shape[0]
  return jraph.GraphsTuple(
      nodes=features, edges=None, senders=edges[:, 0], receivers=edges[:, 1],
      n_node=jnp.array([g]), n_edge=jnp.array([num_edges]), globals=None)


def paired_graphs(features_x: jax.Array, features_y: jax.Array,
                  num_neighbors: int) -> tuple[jraph.GraphsTuple, jraph.GraphsTuple]:
  """Graphs for X and Y that share X's kNN edge set (edges computed on X only)."""
  if features_x.shape != features_y.shape:
    raise ValueError(f"X and Y must have the same shape, got {features_x.shape} and "
                     f"{features_y.shape}")
  edges = knn_edges(features_x, num_neighbors)
  return graphs_tuple(features_x, edges), graphs_tuple(features_y, edges)
