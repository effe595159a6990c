"""Differentiable graph matching: the host solver inside a `jax.custom_vjp` (docs/align.md).

Forward: every problem of the step goes to the host in *one* batched `jax.pure_callback`
(`align.solver.solve_batch`, parallel over cores) and comes back as a 0/1 node matching
M [P, n1, n2]; the induced edge matching M_E [P, E1, E2] (edge (i, j) of graph 1 matched to
edge (a, b) of graph 2 iff i -> a and j -> b) is computed from M in JAX.

Backward (black-box differentiation / IMLE with the noise already inside the costs): the
problems are solved again with the costs moved along the incoming cotangents,
U' = U + lambda * dL/dM and Q' = Q + lambda * dL/dM_E (same noise: it is part of U and Q),
and the cost gradients are -(M - M') / lambda and -(M_E - M_E') / lambda. The quadratic
gradient is not zero even when only M feeds the loss (dL/dM_E = 0, Q' = Q): M' moves the
induced M_E', so the edge costs, and through them the GNN, get gradient too.

Replay (`replay=(M, M')`): the given 0/1 matchings stand in for the forward solve and the
backward re-solve, everything else unchanged: a release step's LPMP matchings (partial
or not optimal) are replayed through the same gradient (train/step_equivalence.py).

Works under `jit`, `grad` and `vmap` (the callback flattens any leading batch axes into the
problem axis) and inside `shard_map`, one callback per device (train/alignment_sharding.py:
under a plain sharded jit, XLA would gather every device's problems to device 0). The host
solve time is added to `SOLVER_CLOCK`, which the training loop reads for its dashboards (a
side channel: never feeds back into the computation).
"""
from __future__ import annotations

import dataclasses
import functools
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from exgra_jax.align import solver


@dataclasses.dataclass(frozen=True)
class SolverSettings:
  """Options of the host solver (from `config.align`); hashable, so usable as a static arg."""
  max_iterations: int = 100
  time_limit_s: float = 0.0
  threads: int = 0
  imle_lambda: float = 80.0

  def __post_init__(self):
    if self.imle_lambda <= 0:
      raise ValueError(f"align.imle_lambda must be positive, got {self.imle_lambda}")

  @classmethod
  def from_config(cls, align) -> SolverSettings:
    return cls(max_iterations=align.solver_iterations, time_limit_s=align.solver_time_limit_s,
               threads=align.solver_threads, imle_lambda=align.imle_lambda)


class SolverClock:
  """Host seconds, problems solved and time-limit hits since the last `take()` (thread-safe)."""

  def __init__(self):
    self._lock = threading.Lock()
    self._seconds, self._problems, self._limit_hits = 0.0, 0, 0

  def add(self, seconds: float, problems: int, limit_hits: int) -> None:
    with self._lock:
      self._seconds += seconds
      self._problems += problems
      self._limit_hits += limit_hits

  def take(self) -> dict[str, float]:
    with self._lock:
      out = {"solver_seconds": self._seconds, "solver_problems": float(self._problems),
             "solver_time_limit_hits": float(self._limit_hits)}
      self._seconds, self._problems, self._limit_hits = 0.0, 0, 0
    return out


SOLVER_CLOCK = SolverClock()


def _host_solve(settings: SolverSettings, unary, quadratic, edges1, edges2) -> np.ndarray:
  """Host side of the callback: any leading axes are flattened into one problem axis."""
  unary, quadratic = np.asarray(unary), np.asarray(quadratic)
  edges1, edges2 = np.asarray(edges1), np.asarray(edges2)
  lead = unary.shape[:-2]
  start = time.perf_counter()
  matchings, stats = solver.solve_batch_with_stats(
      unary.reshape(-1, *unary.shape[-2:]), quadratic.reshape(-1, *quadratic.shape[-2:]),
      edges1.reshape(-1, *edges1.shape[-2:]), edges2.reshape(-1, *edges2.shape[-2:]),
      max_iterations=settings.max_iterations, time_limit_s=settings.time_limit_s,
      threads=settings.threads)
  SOLVER_CLOCK.add(time.perf_counter() - start, matchings.shape[0],
                   int(stats.time_limit_hit.sum()))
  return matchings.reshape(*lead, *matchings.shape[-2:]).astype(np.float32)


def solve_on_host(settings: SolverSettings, unary: jax.Array, quadratic: jax.Array,
                  edges1: jax.Array, edges2: jax.Array) -> jax.Array:
  """0/1 matchings [..., n1, n2] for problems with any leading axes, in one host callback."""
  shape = jax.ShapeDtypeStruct(unary.shape, jnp.float32)
  matching = jax.pure_callback(functools.partial(_host_solve, settings), shape,
                               unary.astype(jnp.float32), quadratic.astype(jnp.float32),
                               edges1.astype(jnp.int32), edges2.astype(jnp.int32),
                               vmap_method="broadcast_all")
  # Inside a shard_map (train/alignment_sharding.py) the callback's result is typed as the
  # same on every device; it varies over the mesh axes its costs vary over.
  varying = tuple(sorted(jax.typeof(unary).manual_axis_type.varying
                         | jax.typeof(quadratic).manual_axis_type.varying))
  return jax.lax.pcast(matching, varying, to="varying") if varying else matching


def induced_edge_matching(matching: jax.Array, edges1: jax.Array, edges2: jax.Array
                          ) -> jax.Array:
  """M_E[e1, e2] = M[i, a] * M[j, b] for e1 = (i, j), e2 = (a, b); [..., E1, E2]."""
  def one(m, e1, e2):
    return m[e1[:, 0]][:, e2[:, 0]] * m[e1[:, 1]][:, e2[:, 1]]
  for _ in range(matching.ndim - 2):
    one = jax.vmap(one)
  return one(matching, edges1, edges2)


# The replayed (forward, backward) matchings [..., n1, n2] or None (solve).
Replay = tuple[jax.Array, jax.Array] | None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def differentiable_matching(settings: SolverSettings, unary: jax.Array, quadratic: jax.Array,
                            edges1: jax.Array, edges2: jax.Array, replay: Replay = None
                            ) -> tuple[jax.Array, jax.Array]:
  """(M [..., n1, n2], M_E [..., E1, E2]) minimising <U, M> + <Q, M_E>; see module doc.

  Args:
    settings: solver budget and the IMLE lambda.
    unary: U [..., n1, n2]; quadratic: Q [..., E1, E2];
    edges1: [..., E1, 2] and edges2: [..., E2, 2] int edge lists (no gradient).
    replay: None (solve on the host), or (M, M') [..., n1, n2] 0/1 matchings to use as the
      forward solution and as the backward re-solve (no gradient).
  """
  return _forward(settings, unary, quadratic, edges1, edges2, replay)[0]


def _forward(settings, unary, quadratic, edges1, edges2, replay):
  if replay is None:
    matching = solve_on_host(settings, unary, quadratic, edges1, edges2)
  else:
    matching = jnp.asarray(replay[0], jnp.float32)
  edge_matching = induced_edge_matching(matching, edges1, edges2)
  return (matching, edge_matching), (unary, quadratic, edges1, edges2, matching, edge_matching,
                                     replay)


def _backward(settings, residuals, cotangents):
  unary, quadratic, edges1, edges2, matching, edge_matching, replay = residuals
  d_matching, d_edge_matching = cotangents
  lam = settings.imle_lambda
  if replay is None:
    perturbed = solve_on_host(settings, unary + lam * d_matching,
                              quadratic + lam * d_edge_matching, edges1, edges2)
  else:
    perturbed = jnp.asarray(replay[1], jnp.float32)
  perturbed_edges = induced_edge_matching(perturbed, edges1, edges2)
  d_unary = -(matching - perturbed) / lam
  d_quadratic = -(edge_matching - perturbed_edges) / lam
  return d_unary.astype(unary.dtype), d_quadratic.astype(quadratic.dtype), None, None, None


differentiable_matching.defvjp(_forward, _backward)
