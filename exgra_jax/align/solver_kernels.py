"""Numba kernels of the host graph-matching solver (see `solver.py` for the problem).

Everything here is compiled with `@njit(cache=True, nogil=True)`: `nogil` lets the batched
solve run one problem per thread of a pool, `cache` keeps the compiled code on disk so only
the first process on a machine pays the JIT compile.

Data layout (n1, n2 nodes; E1, E2 edges; labels are right-node indices or -1 = unmatched):
- `pair_first[a, b]`: the first graph-2 edge index with endpoints (a, b), -1 if none, and
  `pair_next[e]` the next one with the same endpoints (-1 ends the list), so duplicate
  edges are summed like the dense problem sums them.
- `out_ptr / out_edge` and `in_ptr / in_edge`: CSR lists of the graph-1 edges leaving and
  entering each node; a self loop (i, i) is listed as leaving only.
The objective of a labelling L is
  sum_i U[i, L_i] [L_i >= 0] + sum_{e1 = (i, j)} sum_{e2 = (L_i, L_j)} Q[e1, e2],
and it only depends on L, never on feasibility, which is what makes the move deltas below
exact: a compound move is evaluated as a sequence of single relabellings.
"""
import numpy as np
from numba import njit

_IMPROVEMENT_EPS = 1e-12


@njit(cache=True, nogil=True)
def lap_partial_matching(unary: np.ndarray) -> np.ndarray:
  """Optimal partial matching for unary costs alone; returns labels [n1] (-1 = unmatched).

  A partial matching's linear cost equals a full assignment's on min(U, 0) padded to a
  square with zeros (extend any partial matching by zero-or-negative entries; drop the
  non-negative ones of a full assignment), so a square Hungarian (shortest augmenting
  paths with potentials, O(N^3), N = max(n1, n2)) solves it exactly.
  """
  n1, n2 = unary.shape
  size = max(n1, n2)
  cost = np.zeros((size, size))
  for i in range(n1):
    for a in range(n2):
      if unary[i, a] < 0.0:
        cost[i, a] = unary[i, a]
  inf = np.inf
  u = np.zeros(size + 1)
  v = np.zeros(size + 1)
  col_owner = np.zeros(size + 1, np.int64)  # 1-based row owning column j; 0 = none
  way = np.zeros(size + 1, np.int64)
  min_slack = np.empty(size + 1)
  used = np.empty(size + 1, np.bool_)
  for row in range(1, size + 1):
    col_owner[0] = row
    j0 = 0
    min_slack[:] = inf
    used[:] = False
    while True:
      used[j0] = True
      i0 = col_owner[j0]
      delta = inf
      j1 = 0
      for j in range(1, size + 1):
        if not used[j]:
          cur = cost[i0 - 1, j - 1] - u[i0] - v[j]
          if cur < min_slack[j]:
            min_slack[j] = cur
            way[j] = j0
          if min_slack[j] < delta:
            delta = min_slack[j]
            j1 = j
      for j in range(size + 1):
        if used[j]:
          u[col_owner[j]] += delta
          v[j] -= delta
        else:
          min_slack[j] -= delta
      j0 = j1
      if col_owner[j0] == 0:
        break
    while j0 != 0:
      j1 = way[j0]
      col_owner[j0] = col_owner[j1]
      j0 = j1
  labels = np.full(n1, -1, np.int64)
  for j in range(1, size + 1):
    i = col_owner[j] - 1
    a = j - 1
    if i < n1 and a < n2 and unary[i, a] < 0.0:
      labels[i] = a
  return labels


@njit(cache=True, nogil=True)
def build_structures(n1, n2, edges1, edges2):
  """Edge lookup tables of one problem (layout in the module docstring)."""
  e1_count = edges1.shape[0]
  e2_count = edges2.shape[0]
  pair_first = np.full((n2, n2), -1, np.int64)
  pair_next = np.full(e2_count, -1, np.int64)
  for e in range(e2_count - 1, -1, -1):
    a = edges2[e, 0]
    b = edges2[e, 1]
    pair_next[e] = pair_first[a, b]
    pair_first[a, b] = e
  out_ptr = np.zeros(n1 + 1, np.int64)
  in_ptr = np.zeros(n1 + 1, np.int64)
  for e in range(e1_count):
    out_ptr[edges1[e, 0] + 1] += 1
    if edges1[e, 1] != edges1[e, 0]:
      in_ptr[edges1[e, 1] + 1] += 1
  for i in range(n1):
    out_ptr[i + 1] += out_ptr[i]
    in_ptr[i + 1] += in_ptr[i]
  out_edge = np.empty(out_ptr[n1], np.int64)
  in_edge = np.empty(in_ptr[n1], np.int64)
  out_fill = out_ptr[:-1].copy()
  in_fill = in_ptr[:-1].copy()
  for e in range(e1_count):
    i = edges1[e, 0]
    j = edges1[e, 1]
    out_edge[out_fill[i]] = e
    out_fill[i] += 1
    if i != j:
      in_edge[in_fill[j]] = e
      in_fill[j] += 1
  return pair_first, pair_next, out_ptr, out_edge, in_ptr, in_edge


@njit(cache=True, nogil=True)
def _edge_pair_cost(quadratic, pair_first, pair_next, e1, a, b):
  """Sum of Q[e1, e2] over graph-2 edges e2 = (a, b); 0 if either end is unmatched."""
  if a < 0 or b < 0:
    return 0.0
  total = 0.0
  e2 = pair_first[a, b]
  while e2 >= 0:
    total += quadratic[e1, e2]
    e2 = pair_next[e2]
  return total


@njit(cache=True, nogil=True)
def _local_cost(unary, quadratic, edges1, pair_first, pair_next, out_ptr, out_edge,
                in_ptr, in_edge, labels, i, label):
  """Objective terms touching node i if it took `label`, the other labels as they are."""
  total = 0.0
  if label >= 0:
    total += unary[i, label]
  for p in range(out_ptr[i], out_ptr[i + 1]):
    e1 = out_edge[p]
    j = edges1[e1, 1]
    other = label if j == i else labels[j]
    total += _edge_pair_cost(quadratic, pair_first, pair_next, e1, label, other)
  for p in range(in_ptr[i], in_ptr[i + 1]):
    e1 = in_edge[p]
    total += _edge_pair_cost(quadratic, pair_first, pair_next, e1, labels[edges1[e1, 0]],
                             label)
  return total


@njit(cache=True, nogil=True)
def objective(unary, quadratic, edges1, edges2, labels):
  """Exact objective of a labelling [n1] (-1 = unmatched), in float64."""
  n2 = unary.shape[1]
  pair_first, pair_next, _, _, _, _ = build_structures(unary.shape[0], n2, edges1, edges2)
  total = 0.0
  for i in range(unary.shape[0]):
    if labels[i] >= 0:
      total += unary[i, labels[i]]
  for e1 in range(edges1.shape[0]):
    total += _edge_pair_cost(quadratic, pair_first, pair_next, e1, labels[edges1[e1, 0]],
                             labels[edges1[e1, 1]])
  return total


@njit(cache=True, nogil=True)
def _move_delta(unary, quadratic, edges1, pair_first, pair_next, out_ptr, out_edge, in_ptr,
                in_edge, labels, holder, i, label):
  """Objective change of giving node i `label`; its holder (if any) takes i's old label."""
  old = labels[i]
  delta = (_local_cost(unary, quadratic, edges1, pair_first, pair_next, out_ptr, out_edge,
                       in_ptr, in_edge, labels, i, label)
           - _local_cost(unary, quadratic, edges1, pair_first, pair_next, out_ptr, out_edge,
                         in_ptr, in_edge, labels, i, old))
  if label >= 0 and holder[label] >= 0:
    j = holder[label]
    labels[i] = label
    delta += (_local_cost(unary, quadratic, edges1, pair_first, pair_next, out_ptr, out_edge,
                          in_ptr, in_edge, labels, j, old)
              - _local_cost(unary, quadratic, edges1, pair_first, pair_next, out_ptr,
                            out_edge, in_ptr, in_edge, labels, j, label))
    labels[i] = old
  return delta


@njit(cache=True, nogil=True)
def _apply_move(labels, holder, i, label):
  """Give node i `label`; the label's previous holder takes i's old label. Returns it."""
  old = labels[i]
  j = holder[label] if label >= 0 else -1
  labels[i] = label
  if label >= 0:
    holder[label] = i
  if old >= 0:
    holder[old] = j
  if j >= 0:
    labels[j] = old
  return j


@njit(cache=True, nogil=True)
def _activate(node, edges1, out_ptr, out_edge, in_ptr, in_edge, active, queue, queue_len):
  """Push a node and its graph-1 neighbours on the work stack (once each)."""
  if not active[node]:
    active[node] = True
    queue[queue_len] = node
    queue_len += 1
  for p in range(out_ptr[node], out_ptr[node + 1]):
    j = edges1[out_edge[p], 1]
    if not active[j]:
      active[j] = True
      queue[queue_len] = j
      queue_len += 1
  for p in range(in_ptr[node], in_ptr[node + 1]):
    j = edges1[in_edge[p], 0]
    if not active[j]:
      active[j] = True
      queue[queue_len] = j
      queue_len += 1
  return queue_len


@njit(cache=True, nogil=True)
def _descend(unary, quadratic, edges1, pair_first, pair_next, out_ptr, out_edge, in_ptr,
             in_edge, labels, holder, active, queue, queue_len):
  """Best-improvement descent over relabel / insert / remove / swap moves.

  Only the nodes on the stack are examined; an applied move re-activates the moved nodes
  and their graph-1 neighbours (whose move deltas changed). Returns the objective change.
  """
  n2 = unary.shape[1]
  change = 0.0
  while queue_len > 0:
    queue_len -= 1
    i = queue[queue_len]
    active[i] = False
    best_delta = -_IMPROVEMENT_EPS
    best_label = -2
    for label in range(-1, n2):
      if label == labels[i]:
        continue
      delta = _move_delta(unary, quadratic, edges1, pair_first, pair_next, out_ptr,
                          out_edge, in_ptr, in_edge, labels, holder, i, label)
      if delta < best_delta:
        best_delta = delta
        best_label = label
    if best_label != -2:
      j = _apply_move(labels, holder, i, best_label)
      change += best_delta
      queue_len = _activate(i, edges1, out_ptr, out_edge, in_ptr, in_edge, active, queue,
                            queue_len)
      if j >= 0:
        queue_len = _activate(j, edges1, out_ptr, out_edge, in_ptr, in_edge, active, queue,
                              queue_len)
  return change


@njit(cache=True, nogil=True)
def _holders(labels, n2):
  """Inverse of a partial matching: holder[a] = the node labelled a, -1 if none."""
  holder = np.full(n2, -1, np.int64)
  for i in range(labels.shape[0]):
    if labels[i] >= 0:
      holder[labels[i]] = i
  return holder


@njit(cache=True, nogil=True)
def descend_to_local_optimum(unary, quadratic, edges1, edges2, labels):
  """Sweep every node until no single move improves (in place): a true local optimum."""
  n1, n2 = unary.shape
  pair_first, pair_next, out_ptr, out_edge, in_ptr, in_edge = build_structures(
      n1, n2, edges1, edges2)
  holder = _holders(labels, n2)
  active = np.zeros(n1, np.bool_)
  queue = np.empty(n1, np.int64)
  while True:
    for i in range(n1 - 1, -1, -1):
      active[i] = True
      queue[n1 - 1 - i] = i
    change = _descend(unary, quadratic, edges1, pair_first, pair_next, out_ptr, out_edge,
                      in_ptr, in_edge, labels, holder, active, queue, n1)
    if change == 0.0:
      return


@njit(cache=True, nogil=True)
def _next_random(rng_state, bound):
  """xorshift64* step; a uniform-ish integer in [0, bound). State lives in rng_state[0]."""
  x = rng_state[0]
  x ^= x >> np.uint64(12)
  x ^= x << np.uint64(25)
  x ^= x >> np.uint64(27)
  rng_state[0] = x
  return np.int64((x * np.uint64(2685821657736338717)) >> np.uint64(33)) % bound


@njit(cache=True, nogil=True)
def iterated_local_search(unary, quadratic, edges1, edges2, labels, rng_state, iterations,
                          max_kick):
  """`iterations` rounds of kick + local descent from the best labelling (in place).

  A round relabels 1..max_kick random nodes (each to a random label or unmatched, swapping
  with the holder), descends from the touched nodes, and keeps the result if it is no worse
  than the best (sideways moves let it drift across plateaus), else restores the best.
  Everything random comes from rng_state, so the result is a function of the inputs, the
  seed and the iteration count. Returns the best labelling's objective change (<= 0).
  """
  n1, n2 = unary.shape
  pair_first, pair_next, out_ptr, out_edge, in_ptr, in_edge = build_structures(
      n1, n2, edges1, edges2)
  holder = _holders(labels, n2)
  best_labels = labels.copy()
  active = np.zeros(n1, np.bool_)
  queue = np.empty(n1, np.int64)
  best = 0.0
  current = 0.0
  for _ in range(iterations):
    queue_len = 0
    kicks = 1 + _next_random(rng_state, max_kick)
    for _ in range(kicks):
      i = _next_random(rng_state, n1)
      label = _next_random(rng_state, n2 + 1) - 1
      if label == labels[i]:
        continue
      current += _move_delta(unary, quadratic, edges1, pair_first, pair_next, out_ptr,
                             out_edge, in_ptr, in_edge, labels, holder, i, label)
      j = _apply_move(labels, holder, i, label)
      queue_len = _activate(i, edges1, out_ptr, out_edge, in_ptr, in_edge, active, queue,
                            queue_len)
      if j >= 0:
        queue_len = _activate(j, edges1, out_ptr, out_edge, in_ptr, in_edge, active, queue,
                              queue_len)
    current += _descend(unary, quadratic, edges1, pair_first, pair_next, out_ptr, out_edge,
                        in_ptr, in_edge, labels, holder, active, queue, queue_len)
    if current <= best + _IMPROVEMENT_EPS:
      best = min(best, current)
      current = best
      best_labels[:] = labels
    else:
      labels[:] = best_labels
      holder = _holders(labels, n2)
      current = best
  labels[:] = best_labels
  return best
