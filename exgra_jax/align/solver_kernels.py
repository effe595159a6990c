"""Numba kernels of the host graph-matching solver (see `solver.py` for the problem).

Everything here is compiled with `@njit(cache=True, nogil=True)`: `nogil` lets the batched
solve run one problem per thread of a pool, `cache` keeps the compiled code on disk so only
the first process on a machine pays the JIT compile.

Data layout (n1, n2 nodes; E1, E2 edges; labels are right-node indices or -1 = unmatched):
- `pair_first[a, b]`: the first graph-2 edge index with endpoints (a, b), -1 if none, and
  `pair_next[e]` the next one with the same endpoints (-1 ends the list), so duplicate
  edges are summed like the dense problem sums them.
- `out1_ptr / out1_edge`, `in1_ptr / in1_edge`: CSR lists of the graph-1 edges leaving and
  entering each node (a self loop (i, i) is listed as leaving only); `out2 / in2` the same
  for graph 2 (self loops in both); `link_first[min(i, j), max(i, j)]` / `link_next`: the
  graph-1 edges joining i and j (either direction), as a list like `pair_first`.
  `build_structures` returns them as one tuple, `graph`, in that order.
- `local[i, x + 1]` (see `_shift_label`): the objective terms touching node i if it took
  label x, the other labels fixed; kept up to date incrementally, so that every move's
  delta is O(1) and a node's best move O(n2).
The objective of a labelling L is
  sum_i U[i, L_i] [L_i >= 0] + sum_{e1 = (i, j)} sum_{e2 = (L_i, L_j)} Q[e1, e2],
and it only depends on L, never on feasibility, which is what makes the move deltas below
exact: a compound move is evaluated as a sequence of single relabellings.
"""
import numpy as np
from numba import njit

# Smallest objective decrease a move must bring (guards against cycling on float noise).
_IMPROVEMENT_EPS = 1e-9


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
def _csr(count, keys, keep):
  """For each node v < count, the indices e with keys[e] == v and keep[e] (CSR)."""
  ptr = np.zeros(count + 1, np.int64)
  for e in range(keys.shape[0]):
    if keep[e]:
      ptr[keys[e] + 1] += 1
  for v in range(count):
    ptr[v + 1] += ptr[v]
  items = np.empty(ptr[count], np.int64)
  fill = ptr[:-1].copy()
  for e in range(keys.shape[0]):
    if keep[e]:
      items[fill[keys[e]]] = e
      fill[keys[e]] += 1
  return ptr, items


@njit(cache=True, nogil=True)
def build_structures(n1, n2, edges1, edges2):
  """Sparse lookup tables of one problem (layout in the module docstring)."""
  pair_first = np.full((n2, n2), -1, np.int64)
  pair_next = np.full(edges2.shape[0], -1, np.int64)
  for e in range(edges2.shape[0] - 1, -1, -1):
    pair_next[e] = pair_first[edges2[e, 0], edges2[e, 1]]
    pair_first[edges2[e, 0], edges2[e, 1]] = e
  every1 = np.ones(edges1.shape[0], np.bool_)
  not_loop1 = edges1[:, 0] != edges1[:, 1]
  every2 = np.ones(edges2.shape[0], np.bool_)
  out1_ptr, out1_edge = _csr(n1, edges1[:, 0], every1)
  in1_ptr, in1_edge = _csr(n1, edges1[:, 1], not_loop1)
  out2_ptr, out2_edge = _csr(n2, edges2[:, 0], every2)
  in2_ptr, in2_edge = _csr(n2, edges2[:, 1], every2)
  link_first = np.full((n1, n1), -1, np.int64)
  link_next = np.full(edges1.shape[0], -1, np.int64)
  for e in range(edges1.shape[0] - 1, -1, -1):
    if not_loop1[e]:
      low = min(edges1[e, 0], edges1[e, 1])
      high = max(edges1[e, 0], edges1[e, 1])
      link_next[e] = link_first[low, high]
      link_first[low, high] = e
  return (edges1, out1_ptr, out1_edge, in1_ptr, in1_edge, link_first, link_next, edges2,
          out2_ptr, out2_edge, in2_ptr, in2_edge, pair_first, pair_next)


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
def objective(unary, quadratic, edges1, edges2, labels):
  """Exact objective of a labelling [n1] (-1 = unmatched), in float64."""
  n2 = unary.shape[1]
  graph = build_structures(unary.shape[0], n2, edges1, edges2)
  pair_first, pair_next = graph[12], graph[13]
  total = 0.0
  for i in range(unary.shape[0]):
    if labels[i] >= 0:
      total += unary[i, labels[i]]
  for e1 in range(edges1.shape[0]):
    total += _edge_pair_cost(quadratic, pair_first, pair_next, e1, labels[edges1[e1, 0]],
                             labels[edges1[e1, 1]])
  return total




@njit(cache=True, nogil=True)
def _shift_label(local, quadratic, graph, node, old, new):
  """Update `local` for `node` relabelled old -> new: only its graph-1 neighbours' rows move.

  local[t, x + 1] holds the objective terms touching node t if t took label x (column 0:
  unmatched, always 0). An edge e1 = (node, t) adds Q[e1, e2] to local[t, b + 1] for each
  e2 = (label, b); an edge (s, node) adds Q[e1, e2] to local[s, a + 1] for e2 = (a, label).
  Cost O(degree1 * degree2).
  """
  edges1, out1_ptr, out1_edge, in1_ptr, in1_edge = graph[0], graph[1], graph[2], graph[3], graph[4]
  edges2, out2_ptr, out2_edge, in2_ptr, in2_edge = graph[7], graph[8], graph[9], graph[10], graph[11]
  for p in range(out1_ptr[node], out1_ptr[node + 1]):
    e1 = out1_edge[p]
    t = edges1[e1, 1]
    if t == node:
      continue
    if old >= 0:
      for q in range(out2_ptr[old], out2_ptr[old + 1]):
        e2 = out2_edge[q]
        local[t, edges2[e2, 1] + 1] -= quadratic[e1, e2]
    if new >= 0:
      for q in range(out2_ptr[new], out2_ptr[new + 1]):
        e2 = out2_edge[q]
        local[t, edges2[e2, 1] + 1] += quadratic[e1, e2]
  for p in range(in1_ptr[node], in1_ptr[node + 1]):
    e1 = in1_edge[p]
    s = edges1[e1, 0]
    if old >= 0:
      for q in range(in2_ptr[old], in2_ptr[old + 1]):
        e2 = in2_edge[q]
        local[s, edges2[e2, 0] + 1] -= quadratic[e1, e2]
    if new >= 0:
      for q in range(in2_ptr[new], in2_ptr[new + 1]):
        e2 = in2_edge[q]
        local[s, edges2[e2, 0] + 1] += quadratic[e1, e2]


@njit(cache=True, nogil=True)
def _local_costs(unary, quadratic, graph, labels):
  """The [n1, n2 + 1] table of `_shift_label` for a labelling, built from scratch."""
  n1, n2 = unary.shape
  edges1, edges2 = graph[0], graph[7]
  local = np.zeros((n1, n2 + 1))
  local[:, 1:] = unary
  for e1 in range(edges1.shape[0]):  # self loops (i, i): a static term of label a, e2 = (a, a)
    i = edges1[e1, 0]
    if edges1[e1, 1] == i:
      for e2 in range(edges2.shape[0]):
        if edges2[e2, 0] == edges2[e2, 1]:
          local[i, edges2[e2, 0] + 1] += quadratic[e1, e2]
  for j in range(n1):
    if labels[j] >= 0:
      _shift_label(local, quadratic, graph, j, -1, labels[j])
  return local


@njit(cache=True, nogil=True)
def _best_move(local, quadratic, graph, labels, holder, i, first, stop, threshold):
  """Best label b in [first, stop) for node i, its holder j (if any) taking i's label a.

  Returns (delta, b) for the lowest objective change below `threshold`, b = -2 if none.
  Relabel / insert / remove deltas read `local` directly. A swap is i's relabel followed
  by j's; j's `local` row still has i at a, so the edges e1 joining i and j (either
  direction) are re-evaluated: each adds P(a, b) + P(b, a) - P(a, a) - P(b, b), where
  P(x, y) = sum of Q[e1, e2] over e2 = (x, y). (Kept in one loop: a per-candidate helper
  call costs more than the candidate itself.)
  """
  link_first, link_next = graph[5], graph[6]
  pair_first, pair_next = graph[12], graph[13]
  a = labels[i]
  here = local[i, a + 1]
  best_delta = threshold
  best_label = -2
  for b in range(first, stop):
    if b == a:
      continue
    delta = local[i, b + 1] - here
    if b >= 0:
      j = holder[b]
      if j >= 0:
        delta += local[j, a + 1] - local[j, b + 1]
        e1 = link_first[min(i, j), max(i, j)]
        while e1 >= 0:
          for x, y, sign in ((a, b, 1.0), (b, a, 1.0), (a, a, -1.0), (b, b, -1.0)):
            if x >= 0 and y >= 0:
              e2 = pair_first[x, y]
              while e2 >= 0:
                delta += sign * quadratic[e1, e2]
                e2 = pair_next[e2]
          e1 = link_next[e1]
    if delta < best_delta:
      best_delta = delta
      best_label = b
  return best_delta, best_label


@njit(cache=True, nogil=True)
def _relabel(local, quadratic, graph, labels, holder, node, new, log, log_len):
  """Set one node's label, keeping `local` and `holder` in step; records it in `log`."""
  old = labels[node]
  if log_len < log.shape[0]:
    log[log_len, 0] = node
    log[log_len, 1] = old
  log_len += 1
  labels[node] = new
  _shift_label(local, quadratic, graph, node, old, new)
  if new >= 0:
    holder[new] = node
  if old >= 0 and holder[old] == node:
    holder[old] = -1
  return log_len


@njit(cache=True, nogil=True)
def _move(local, quadratic, graph, labels, holder, i, label, log, log_len):
  """Give node i `label`; the label's holder (returned, -1 if none) takes i's old label."""
  old = labels[i]
  j = holder[label] if label >= 0 else -1
  log_len = _relabel(local, quadratic, graph, labels, holder, i, label, log, log_len)
  if j >= 0:
    log_len = _relabel(local, quadratic, graph, labels, holder, j, old, log, log_len)
  return j, log_len


@njit(cache=True, nogil=True)
def _activate(node, graph, active, queue, queue_len):
  """Push a node and its graph-1 neighbours on the work stack (once each)."""
  edges1, out1_ptr, out1_edge, in1_ptr, in1_edge = graph[0], graph[1], graph[2], graph[3], graph[4]
  if not active[node]:
    active[node] = True
    queue[queue_len] = node
    queue_len += 1
  for p in range(out1_ptr[node], out1_ptr[node + 1]):
    t = edges1[out1_edge[p], 1]
    if not active[t]:
      active[t] = True
      queue[queue_len] = t
      queue_len += 1
  for p in range(in1_ptr[node], in1_ptr[node + 1]):
    s = edges1[in1_edge[p], 0]
    if not active[s]:
      active[s] = True
      queue[queue_len] = s
      queue_len += 1
  return queue_len


@njit(cache=True, nogil=True)
def _descend(local, quadratic, graph, labels, holder, active, queue, queue_len, log, log_len):
  """Best-improvement descent over relabel / insert / remove / swap moves.

  Only the nodes on the stack are examined; an applied move re-activates the moved nodes
  and their graph-1 neighbours (whose `local` rows changed). Returns (change, log_len).
  """
  change = 0.0
  while queue_len > 0:
    queue_len -= 1
    i = queue[queue_len]
    active[i] = False
    delta, label = _best_move(local, quadratic, graph, labels, holder, i, -1,
                              local.shape[1] - 1, -_IMPROVEMENT_EPS)
    if label != -2:
      j, log_len = _move(local, quadratic, graph, labels, holder, i, label, log, log_len)
      change += delta
      queue_len = _activate(i, graph, active, queue, queue_len)
      if j >= 0:
        queue_len = _activate(j, graph, active, queue, queue_len)
  return change, log_len


@njit(cache=True, nogil=True)
def _holders(labels, n2):
  """Inverse of a partial matching: holder[a] = the node labelled a, -1 if none."""
  holder = np.full(n2, -1, np.int64)
  for i in range(labels.shape[0]):
    if labels[i] >= 0:
      holder[labels[i]] = i
  return holder


@njit(cache=True, nogil=True)
def _next_random(rng_state, bound):
  """xorshift64* step; an integer in [0, bound). The state lives in rng_state[0]."""
  x = rng_state[0]
  x ^= x >> np.uint64(12)
  x ^= x << np.uint64(25)
  x ^= x >> np.uint64(27)
  rng_state[0] = x
  return np.int64((x * np.uint64(2685821657736338717)) >> np.uint64(33)) % bound


@njit(cache=True, nogil=True)
def improve(unary, quadratic, edges1, edges2, labels, rng_state, iterations, max_kick,
            patience, stalled):
  """Descend to a local optimum, then run kick + descent rounds (in place).

  Rounds stop after `iterations`, or once `patience` rounds in a row (counting `stalled`
  from an earlier call) brought no strict improvement: counts, never the clock, decide.
  Returns (rounds run, rounds since the last strict improvement).

  The first descent sweeps every node until no move improves. A round then relabels
  1..max_kick random nodes (each to a random label or unmatched, swapping with the
  holder), descends from the touched nodes, and keeps the result if it is no worse than
  the best (sideways moves let it drift across plateaus); otherwise it undoes the round's
  relabellings from a log (or rebuilds from the best labels if the log overflowed).
  Everything random comes from rng_state, so the result depends only on the inputs, the
  seed and the counts.
  """
  n1, n2 = unary.shape
  graph = build_structures(n1, n2, edges1, edges2)
  holder = _holders(labels, n2)
  local = _local_costs(unary, quadratic, graph, labels)
  active = np.zeros(n1, np.bool_)
  queue = np.empty(n1, np.int64)
  log = np.empty((16 * n1 + 64, 2), np.int64)
  no_log = np.empty((0, 2), np.int64)
  while True:
    for i in range(n1):
      active[i] = True
      queue[i] = n1 - 1 - i
    change, _ = _descend(local, quadratic, graph, labels, holder, active, queue, n1, no_log, 0)
    if change == 0.0:
      break
  best_labels = labels.copy()
  rounds = 0
  while rounds < iterations and stalled < patience:
    rounds += 1
    stalled += 1
    current = 0.0
    queue_len = 0
    log_len = 0
    kicks = 1 + _next_random(rng_state, max_kick)
    for _ in range(kicks):
      i = _next_random(rng_state, n1)
      label = _next_random(rng_state, n2 + 1) - 1
      a = labels[i]
      if label == a:
        continue
      delta, _ = _best_move(local, quadratic, graph, labels, holder, i, label, label + 1,
                            np.inf)
      current += delta
      j, log_len = _move(local, quadratic, graph, labels, holder, i, label, log, log_len)
      queue_len = _activate(i, graph, active, queue, queue_len)
      if j >= 0:
        queue_len = _activate(j, graph, active, queue, queue_len)
    change, log_len = _descend(local, quadratic, graph, labels, holder, active, queue,
                               queue_len, log, log_len)
    current += change
    if current <= _IMPROVEMENT_EPS:
      if current < -_IMPROVEMENT_EPS:
        stalled = 0
      best_labels[:] = labels
    elif log_len <= log.shape[0]:
      for r in range(log_len - 1, -1, -1):
        _relabel(local, quadratic, graph, labels, holder, log[r, 0], log[r, 1], no_log, 0)
    else:
      labels[:] = best_labels
      holder = _holders(labels, n2)
      local = _local_costs(unary, quadratic, graph, labels)
  return rounds, stalled
