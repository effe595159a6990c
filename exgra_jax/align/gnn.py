"""The GNN shared by all modalities of the alignment loss (docs/align.md).

Each layer is PyTorch Geometric's GraphConv with max aggregation:
  h_j' = W_root h_j + W_rel max_{i -> j} h_i + b
(the bias belongs to the rel linear, as PyG's `lin_rel`; `lin_root` has none). Messages flow
from source i to target j along the kNN edges; a node with no incoming edge aggregates 0
(PyG's behaviour, not -inf). ReLU follows every layer, dropout follows the last one.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import jraph


def max_aggregate(nodes: jax.Array, senders: jax.Array, receivers: jax.Array) -> jax.Array:
  """max_{i -> j} h_i for every node j; 0 where j has no incoming edge. [g, d]."""
  g = nodes.shape[0]
  aggregated = jax.ops.segment_max(nodes[senders], receivers, num_segments=g)
  in_degree = jax.ops.segment_sum(jnp.ones_like(receivers), receivers, num_segments=g)
  return jnp.where(in_degree[:, None] > 0, aggregated, 0.0)


class GraphConv(nn.Module):
  """One PyG-style GraphConv layer (max aggregation), no activation."""
  features: int

  @nn.compact
  def __call__(self, graph: jraph.GraphsTuple) -> jax.Array:
    aggregated = max_aggregate(graph.nodes, graph.senders, graph.receivers)
    lin_rel = nn.Dense(self.features, use_bias=True, name="lin_rel",
                       kernel_init=nn.with_logical_partitioning(
                           nn.initializers.lecun_normal(), ("embed", "gnn")),
                       bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("gnn",)))
    lin_root = nn.Dense(self.features, use_bias=False, name="lin_root",
                        kernel_init=nn.with_logical_partitioning(
                            nn.initializers.lecun_normal(), ("embed", "gnn")))
    return lin_rel(aggregated) + lin_root(graph.nodes)


class GraphMatchingGNN(nn.Module):
  """`num_layers` GraphConv layers, ReLU after each, dropout after the last.

  Input: a GraphsTuple with nodes [g, d_in]; output: node features [g, width].
  Dropout as torch's `F.dropout`: kept entries times 1 / (1 - rate). Its keep mask
  [g, width] is drawn from the `dropout` rng, or given (`keep`: the replay of a release
  step hands in the release's masks, train/step_equivalence.py).
  """
  width: int
  num_layers: int = 2
  dropout_rate: float = 0.1

  @nn.compact
  def __call__(self, graph: jraph.GraphsTuple, *, deterministic: bool,
               keep: jax.Array | None = None) -> jax.Array:
    if self.num_layers < 1:
      raise ValueError(f"GraphMatchingGNN needs at least one layer, got {self.num_layers}")
    nodes = graph.nodes
    for layer in range(self.num_layers):
      nodes = nn.relu(GraphConv(self.width, name=f"conv{layer + 1}")(graph._replace(nodes=nodes)))
    if deterministic:
      return nodes
    if keep is None:
      keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.dropout_rate,
                                  nodes.shape)
    elif keep.shape != nodes.shape:
      raise ValueError(f"dropout keep mask {keep.shape} != GNN output {nodes.shape}")
    return jnp.where(keep, nodes * (1.0 / (1.0 - self.dropout_rate)), 0.0)
