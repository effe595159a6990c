"""Plain-numpy references for the alignment tests: kNN edges and PyG-style GraphConv."""
import numpy as np


def numpy_knn(x: np.ndarray, k: int) -> np.ndarray:
  """Edges (i, j), j among the k nearest other rows of x (stable ties): int32 [n*k, 2]."""
  d = ((x[:, None] - x[None]) ** 2).sum(-1)
  np.fill_diagonal(d, np.inf)
  return np.array([(i, j) for i in range(len(x)) for j in np.argsort(d[i], kind="stable")[:k]],
                  np.int32)


def numpy_gnn(params: dict, x: np.ndarray, edges: np.ndarray) -> np.ndarray:
  """GraphConv layers (sorted by name) with max aggregation (0 without in-edges) and ReLU."""
  h = x
  for layer in sorted(params):
    agg = np.zeros_like(h)
    for j in range(len(h)):
      src = edges[edges[:, 1] == j, 0]
      if len(src):
        agg[j] = h[src].max(0)
    rel, root = params[layer]["lin_rel"], params[layer]["lin_root"]
    h = np.maximum(agg @ np.asarray(rel["kernel"]) + np.asarray(rel["bias"])
                   + h @ np.asarray(root["kernel"]), 0)
  return h
