"""Host solver for the partial quadratic graph matching of the alignment loss (docs/align.md).

Problem: over partial one-to-one matchings M in {0, 1}^{n1 x n2} (each node matched at most
once on each side, an unmatched node costs 0) minimise

    <U, M> + sum_{e1 = (i, j), e2 = (a, b)} Q[e1, e2] M[i, a] M[j, b],

with U [n1, n2], Q [E1, E2] dense over the edge lists edges1 [E1, 2], edges2 [E2, 2]. This
is the problem the release hands to LPMP (docs/solver.md); with the release's costs the
optimum leaves 15-20 % of the nodes unmatched on noisy instances.

Algorithm (kernels in `solver_kernels.py`, compiled by numba):
1. seed: the optimal partial matching for U alone (a Hungarian on min(U, 0));
2. descent to a local optimum over relabel / insert / remove / swap moves, each evaluated
   exactly in O(1) from a table of per-node local costs that a move updates in
   O(degree1 x degree2) through the sparse edge lists (Q has E1 x E2 = 25 n^2 entries for
   kNN graphs with k = 5; nothing of size n^2 x n^2 is ever built);
3. iterated local search: up to `max_iterations` rounds of a random kick (a few nodes
   relabelled) followed by a descent from the touched nodes, keeping the result when it is
   no worse; it stops early after `patience` rounds in a row without a strict improvement
   (0 = the default, max(20, 640 // n1)).
The random stream comes from a fixed seed, so the result depends only on the inputs and
the iteration budget; `time_limit_s` is an emergency cap (default off) whose hits are
counted in `SolveStats`. Matchings are returned as float32 0/1 arrays.
"""
import concurrent.futures
import dataclasses
import functools
import os
import time

import numpy as np

from exgra_jax.align import solver_kernels

# Default patience (rounds in a row without a strict improvement before stopping early):
# max(20, 640 // n1). Rounds are cheap on small graphs, where kicks of a few nodes also
# escape more slowly (random tiny instances missed the optimum 0.5 % of the time with 40),
# so small problems get more (91 rounds at n1 = 7, 40 at 16); from n1 = 32 on it is 20,
# enough on every ExGra-Med-shaped instance we measured (n = 16..128, against 3000 rounds).
_PATIENCE_FLOOR = 20
_PATIENCE_NODE_ROUNDS = 640
# Rounds of iterated local search between two clock checks when a time limit is set.
_ROUNDS_PER_CLOCK_CHECK = 4
# xorshift seed of every problem (any non-zero value; fixed for determinism).
_RNG_SEED = 0x9E3779B97F4A7C15


@dataclasses.dataclass(frozen=True)
class SolveStats:
  """Per-problem statistics of a batched solve, arrays of shape [P].

  objective: the returned matching's objective (float64, recomputed exactly);
  seed_objective: objective of the unary-only optimal matching the search starts from;
  iterations: search rounds run (<= max_iterations: patience or the time limit can stop it);
  time_limit_hit: whether the wall-clock cap stopped the search early.
  """
  objective: np.ndarray
  seed_objective: np.ndarray
  iterations: np.ndarray
  time_limit_hit: np.ndarray

  @property
  def time_limit_hits(self) -> int:
    """Number of problems stopped by the time limit (log it: results then depend on load)."""
    return int(np.count_nonzero(self.time_limit_hit))


def _check_problem(unary, quadratic, edges1, edges2, where: str) -> None:
  """Raise ValueError naming what is wrong with one problem's arrays."""
  if unary.ndim != 2 or unary.shape[0] < 1 or unary.shape[1] < 1:
    raise ValueError(f"{where}unary must be [n1, n2] with n1, n2 >= 1, got {unary.shape}")
  for name, edges, n in (("edges1", edges1, unary.shape[0]),
                         ("edges2", edges2, unary.shape[1])):
    if edges.ndim != 2 or edges.shape[1] != 2:
      raise ValueError(f"{where}{name} must be [E, 2] (i, j) pairs, got {edges.shape}")
    if not np.issubdtype(edges.dtype, np.integer):
      raise ValueError(f"{where}{name} must hold integers, got {edges.dtype}")
    if edges.size and (edges.min() < 0 or edges.max() >= n):
      raise ValueError(f"{where}{name} has node indices outside [0, {n}): "
                       f"min {edges.min()}, max {edges.max()}")
  expected = (edges1.shape[0], edges2.shape[0])
  if quadratic.shape != expected:
    raise ValueError(f"{where}quadratic must be [E1, E2] = {list(expected)}, "
                     f"got {list(quadratic.shape)}")
  for name, costs in (("unary", unary), ("quadratic", quadratic)):
    if not np.all(np.isfinite(costs)):
      raise ValueError(f"{where}{name} costs contain NaN or inf "
                       f"({int(np.count_nonzero(~np.isfinite(costs)))} entries)")


def _check_budget(max_iterations: int, patience: int, time_limit_s: float,
                  threads: int) -> None:
  if int(max_iterations) != max_iterations or max_iterations < 0:
    raise ValueError(f"max_iterations must be a non-negative integer, got {max_iterations}")
  if int(patience) != patience or patience < 0:
    raise ValueError(f"patience must be a non-negative integer (0 = default), got {patience}")
  if not np.isfinite(time_limit_s) or time_limit_s < 0:
    raise ValueError(f"time_limit_s must be >= 0 (0 = no limit), got {time_limit_s}")
  if int(threads) != threads or threads < 0:
    raise ValueError(f"threads must be a non-negative integer (0 = all cores), got {threads}")


def _solve_checked(unary, quadratic, edges1, edges2, max_iterations, patience,
                   time_limit_s):
  """Solve one validated problem (float64 costs, int64 edges) -> (labels [n1], stats)."""
  start = time.perf_counter()
  n1 = unary.shape[0]
  labels = solver_kernels.lap_partial_matching(unary)
  seed_objective = solver_kernels.objective(unary, quadratic, edges1, edges2, labels)
  rng_state = np.array([_RNG_SEED], np.uint64)
  max_kick = max(3, n1 // 8)
  patience = patience or max(_PATIENCE_FLOOR, _PATIENCE_NODE_ROUNDS // n1)
  chunk = _ROUNDS_PER_CLOCK_CHECK if time_limit_s > 0.0 else max_iterations
  done, stalled, hit = 0, 0, False
  while True:
    rounds, stalled = solver_kernels.improve(
        unary, quadratic, edges1, edges2, labels, rng_state,
        min(chunk, max_iterations - done), max_kick, patience, stalled)
    done += rounds
    if done >= max_iterations or stalled >= patience:
      break
    if time.perf_counter() - start >= time_limit_s:
      hit = True
      break
  final_objective = solver_kernels.objective(unary, quadratic, edges1, edges2, labels)
  return labels, (final_objective, seed_objective, done, hit)


@functools.lru_cache(maxsize=None)
def _thread_pool(workers: int) -> concurrent.futures.ThreadPoolExecutor:
  """One pool per worker count, kept for the process: a training step calls the solver
  every step, and starting threads each time costs as much as solving at n = 16."""
  return concurrent.futures.ThreadPoolExecutor(max_workers=workers,
                                               thread_name_prefix="graph-matching")


def _labels_to_matching(labels: np.ndarray, n2: int) -> np.ndarray:
  matching = np.zeros((labels.shape[0], n2), np.float32)
  rows = np.nonzero(labels >= 0)[0]
  matching[rows, labels[rows]] = 1.0
  return matching


def solve_batch_with_stats(unary, quadratic, edges1, edges2, *, max_iterations: int = 100,
                           patience: int = 0, time_limit_s: float = 0.0,
                           threads: int = 0):
  """Solve P independent problems in parallel; returns (matchings [P, n1, n2], SolveStats).

  Shapes: unary [P, n1, n2], quadratic [P, E1, E2], edges1 [P, E1, 2], edges2 [P, E2, 2].
  `threads` = 0 uses every core; the result does not depend on it. `time_limit_s` caps
  each problem's wall clock (0 = no cap); hits are reported in the stats.
  """
  unary = np.asarray(unary)
  quadratic = np.asarray(quadratic)
  edges1 = np.asarray(edges1)
  edges2 = np.asarray(edges2)
  _check_budget(max_iterations, patience, time_limit_s, threads)
  if unary.ndim != 3:
    raise ValueError(f"unary must be [P, n1, n2], got shape {unary.shape}")
  if quadratic.ndim != 3 or edges1.ndim != 3 or edges2.ndim != 3:
    raise ValueError("quadratic, edges1, edges2 must be batched [P, ...], got shapes "
                     f"{quadratic.shape}, {edges1.shape}, {edges2.shape}")
  problems = unary.shape[0]
  if not quadratic.shape[0] == edges1.shape[0] == edges2.shape[0] == problems:
    raise ValueError("batch sizes differ: unary, quadratic, edges1, edges2 have "
                     f"{problems}, {quadratic.shape[0]}, {edges1.shape[0]}, {edges2.shape[0]}")
  for p in range(problems):
    _check_problem(unary[p], quadratic[p], edges1[p], edges2[p], f"problem {p}: ")
  unary = unary.astype(np.float64)
  quadratic = quadratic.astype(np.float64)
  edges1 = edges1.astype(np.int64)
  edges2 = edges2.astype(np.int64)

  def run(p):
    return _solve_checked(unary[p], quadratic[p], edges1[p], edges2[p], int(max_iterations),
                          int(patience), float(time_limit_s))

  workers = min(problems, threads or os.cpu_count() or 1)
  if workers <= 1:
    results = [run(p) for p in range(problems)]
  else:
    results = list(_thread_pool(workers).map(run, range(problems)))
  n2 = unary.shape[2]
  matchings = np.zeros((problems,) + unary.shape[1:], np.float32)
  for p, (labels, _) in enumerate(results):
    matchings[p] = _labels_to_matching(labels, n2)
  columns = list(zip(*(stats for _, stats in results))) or [(), (), (), ()]
  stats = SolveStats(objective=np.array(columns[0], np.float64),
                     seed_objective=np.array(columns[1], np.float64),
                     iterations=np.array(columns[2], np.int64),
                     time_limit_hit=np.array(columns[3], bool))
  return matchings, stats


def solve_batch(unary, quadratic, edges1, edges2, *, max_iterations: int = 100,
                patience: int = 0, time_limit_s: float = 0.0,
                threads: int = 0) -> np.ndarray:
  """`solve_batch_with_stats` without the stats: float32 0/1 matchings [P, n1, n2]."""
  matchings, _ = solve_batch_with_stats(unary, quadratic, edges1, edges2,
                                        max_iterations=max_iterations, patience=patience,
                                        time_limit_s=time_limit_s, threads=threads)
  return matchings


def solve(unary, quadratic, edges1, edges2, *, max_iterations: int = 100,
          patience: int = 0, time_limit_s: float = 0.0) -> np.ndarray:
  """Solve one problem: unary [n1, n2], quadratic [E1, E2], edges [E, 2] -> float32 [n1, n2].

  Raises ValueError on non-finite costs, inconsistent shapes or out-of-range edges.
  """
  unary = np.asarray(unary)
  quadratic = np.asarray(quadratic)
  edges1 = np.asarray(edges1)
  edges2 = np.asarray(edges2)
  _check_problem(unary, quadratic, edges1, edges2, "")
  return solve_batch(unary[None], quadratic[None], edges1[None], edges2[None],
                     max_iterations=max_iterations, patience=patience,
                     time_limit_s=time_limit_s,
                     threads=1)[0]


def matching_objective(unary, quadratic, edges1, edges2, matching) -> float:
  """Objective of a 0/1 partial matching [n1, n2] (checked: one 1 per row / column at most)."""
  unary = np.asarray(unary, np.float64)
  quadratic = np.asarray(quadratic, np.float64)
  edges1 = np.asarray(edges1)
  edges2 = np.asarray(edges2)
  matching = np.asarray(matching)
  _check_problem(unary, quadratic, edges1, edges2, "")
  if matching.shape != unary.shape:
    raise ValueError(f"matching must be {unary.shape}, got {matching.shape}")
  if (matching.sum(0).max() > 1 or matching.sum(1).max() > 1
      or not np.all((matching == 0) | (matching == 1))):
    raise ValueError("matching must be 0/1 with at most one 1 per row and per column")
  labels = np.where(matching.any(1), matching.argmax(1), -1).astype(np.int64)
  return float(solver_kernels.objective(unary, quadratic, edges1.astype(np.int64),
                                        edges2.astype(np.int64), labels))
