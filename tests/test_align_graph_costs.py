"""kNN edges vs numpy brute force, GNN vs hand-written numpy and torch GraphConv, costs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from align_reference import numpy_gnn, numpy_knn
from exgra_jax.align import costs, gnn, graphs


def test_knn_edges_match_brute_force():
  x = np.random.default_rng(0).normal(size=(9, 4)).astype(np.float32)
  np.testing.assert_array_equal(graphs.knn_edges(jnp.asarray(x), 3), numpy_knn(x, 3))


def test_knn_edges_tie_break_by_index():
  x = jnp.array([[0.0], [1.0], [-1.0], [2.0]])
  np.testing.assert_array_equal(graphs.knn_edges(x, 2)[:2], [[0, 1], [0, 2]])


@pytest.mark.parametrize("k", [0, 4])
def test_knn_edges_bad_k(k):
  with pytest.raises(ValueError, match="num_neighbors"):
    graphs.knn_edges(jnp.zeros((4, 2)), k)


def _params_numpy(params):
  return {name: {sub: {p: np.array(v.unbox() if hasattr(v, "unbox") else v)
                       for p, v in layer[sub].items()} for sub in layer}
          for name, layer in params.items()}


def test_gnn_matches_numpy_and_torch_with_zero_in_degree():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(5, 3)).astype(np.float32)
  edges = np.array([[0, 1], [2, 1], [1, 0], [3, 2], [0, 2]], np.int32)  # node 3, 4: no in-edge
  graph = graphs.graphs_tuple(jnp.asarray(x), jnp.asarray(edges))
  model = gnn.GraphMatchingGNN(width=4, num_layers=2)
  params = model.init(jax.random.key(0), graph, deterministic=True)["params"]
  out = np.asarray(model.apply({"params": params}, graph, deterministic=True))
  p = _params_numpy(params)

  np.testing.assert_allclose(out, numpy_gnn(p, x, edges), atol=1e-5)

  ht = torch.from_numpy(x)
  src_t, dst_t = torch.from_numpy(edges[:, 0]).long(), torch.from_numpy(edges[:, 1]).long()
  for layer in ("conv1", "conv2"):
    msgs = ht[src_t]
    agg = torch.zeros(ht.shape[0], ht.shape[1]).index_reduce_(
        0, dst_t, msgs, "amax", include_self=False)
    rel, root = p[layer]["lin_rel"], p[layer]["lin_root"]
    lin_rel = torch.nn.Linear(ht.shape[1], 4)
    lin_root = torch.nn.Linear(ht.shape[1], 4, bias=False)
    with torch.no_grad():
      lin_rel.weight.copy_(torch.from_numpy(rel["kernel"].T))
      lin_rel.bias.copy_(torch.from_numpy(rel["bias"]))
      lin_root.weight.copy_(torch.from_numpy(root["kernel"].T))
      ht = torch.relu(lin_rel(agg) + lin_root(ht))
  np.testing.assert_allclose(out, ht.numpy(), atol=1e-5)


def test_gnn_dropout_only_when_not_deterministic():
  graph = graphs.graphs_tuple(jnp.ones((4, 3)), graphs.knn_edges(jnp.eye(4, 3), 2))
  model = gnn.GraphMatchingGNN(width=8, num_layers=1, dropout_rate=0.5)
  variables = model.init(jax.random.key(0), graph, deterministic=True)
  a = model.apply(variables, graph, deterministic=True)
  b = model.apply(variables, graph, deterministic=False, rngs={"dropout": jax.random.key(1)})
  assert np.any(np.asarray(b) == 0) and not np.allclose(a, b)


def test_costs_hand_checked():
  nodes_x = jnp.array([[3.0, 0.0], [0.0, 2.0]])
  nodes_y = jnp.array([[0.0, 1.0], [1.0, 1.0]])
  edges = jnp.array([[0, 1], [1, 0]])
  node_noise = jnp.array([[0.1, 0.0], [0.0, 0.2]])
  edge_noise = jnp.zeros((2, 2))
  unary, quadratic = costs.matching_costs(nodes_x, nodes_y, edges, node_noise, edge_noise)
  s = 1 / np.sqrt(2)
  np.testing.assert_allclose(unary, -(np.array([[0, s], [1, s]]) + node_noise - 0.5), atol=1e-6)
  # e_X = normalised (3,-2), (-3,2); e_Y = normalised (-1,0), (1,0)
  ex = np.array([[3, -2], [-3, 2]]) / np.sqrt(13)
  ey = np.array([[-1, 0], [1, 0]])
  np.testing.assert_allclose(quadratic, -0.5 * (ex @ ey.T - 0.5), atol=1e-6)
