"""Host graph-matching solver: exhaustive-search equality, partial matchings, determinism,
batch / thread invariance, time-limit accounting and input errors."""
import numpy as np
import pytest

from exgra_jax.align import solver


def exhaustive_optimum(unary, quadratic, edges1, edges2):
  """Minimum objective over every partial one-to-one matching (numpy, vectorised).

  Builds every label vector in {-1, ..., n2-1}^n1 without repeated labels, one node at a
  time, and scores them all at once through T[e1, a+1, b+1] = sum of Q[e1, e2] over
  e2 = (a, b).
  """
  n1, n2 = unary.shape
  labels = np.zeros((1, 0), np.int64)
  for _ in range(n1):
    grown = np.concatenate([np.repeat(labels, n2 + 1, axis=0),
                            np.tile(np.arange(-1, n2), len(labels))[:, None]], axis=1)
    repeated = (grown[:, :-1] == grown[:, -1:]) & (grown[:, -1:] >= 0)
    labels = grown[~repeated.any(axis=1)]
  labels += 1
  unary_pad = np.concatenate([np.zeros((n1, 1)), unary], axis=1)
  table = np.zeros((edges1.shape[0], n2 + 1, n2 + 1))
  np.add.at(table, (slice(None), edges2[:, 0] + 1, edges2[:, 1] + 1), quadratic)
  table[:, 0, :] = 0.0
  table[:, :, 0] = 0.0
  values = unary_pad[np.arange(n1), labels].sum(1)
  for e, (i, j) in enumerate(edges1):
    values += table[e, labels[:, i], labels[:, j]]
  return values.min()


def knn_edges(points, k):
  distance = np.linalg.norm(points[:, None] - points[None], axis=-1)
  np.fill_diagonal(distance, np.inf)
  neighbours = np.argsort(distance, axis=1)[:, :k]
  return np.stack([np.repeat(np.arange(len(points)), k), neighbours.ravel()], 1)


def random_problem(rng, n1, n2, kind):
  """Small instances of several kinds: ExGra-Med-like (shared kNN), random, positive."""
  if kind == "exgra":
    features = rng.normal(size=(n1, 4))
    noisy = features + rng.uniform(0.3, 1.5) * rng.normal(size=features.shape)
    edges = knn_edges(features, min(3, n1 - 1))
    x = features / np.linalg.norm(features, axis=1, keepdims=True)
    y = noisy / np.linalg.norm(noisy, axis=1, keepdims=True)
    ex = x[edges[:, 0]] - x[edges[:, 1]]
    ey = y[edges[:, 0]] - y[edges[:, 1]]
    ex /= np.linalg.norm(ex, axis=1, keepdims=True) + 1e-9
    ey /= np.linalg.norm(ey, axis=1, keepdims=True) + 1e-9
    unary = -(x @ y.T + rng.gumbel(0, 0.05, (n1, n1)) - 0.5)
    quadratic = -0.5 * (ex @ ey.T + rng.gumbel(0, 0.05, (len(edges),) * 2) - 0.5)
    return unary, quadratic, edges, edges.copy()
  edges1 = rng.integers(0, n1, (rng.integers(0, 3 * n1 + 1), 2))
  edges2 = rng.integers(0, n2, (rng.integers(0, 3 * n2 + 1), 2))
  unary = rng.normal(size=(n1, n2))
  quadratic = rng.normal(size=(len(edges1), len(edges2)))
  if kind == "positive":
    unary, quadratic = np.abs(unary) + 0.1, np.abs(quadratic)
  return unary, quadratic, edges1, edges2


def test_lap_seed_is_the_unary_optimum():
  rng = np.random.default_rng(1)
  for _ in range(20):
    n1, n2 = rng.integers(1, 7, 2)
    unary = rng.normal(size=(n1, n2))
    no_edges = np.zeros((0, 2), np.int64)
    _, stats = solver.solve_batch_with_stats(unary[None], np.zeros((1, 0, 0)),
                                             no_edges[None], no_edges[None],
                                             max_iterations=0)
    best = exhaustive_optimum(unary, np.zeros((0, 0)), no_edges, no_edges)
    np.testing.assert_allclose(stats.seed_objective[0], best, rtol=0, atol=1e-9)


@pytest.mark.parametrize("kind", ["exgra", "random"])
def test_equals_exhaustive_search(kind):
  rng = np.random.default_rng({"exgra": 2, "random": 3}[kind])
  mismatches = []
  for t in range(300):
    n1 = int(rng.integers(2, 8))
    n2 = n1 if kind == "exgra" else int(rng.integers(1, 7))
    problem = random_problem(rng, n1, n2, kind)
    matching, stats = solver.solve_batch_with_stats(*(np.asarray(a)[None] for a in problem))
    best = exhaustive_optimum(*problem)
    ours = solver.matching_objective(*problem, matching[0])
    np.testing.assert_allclose(ours, stats.objective[0], rtol=0, atol=1e-9)
    if ours > best + 1e-9:
      mismatches.append((t, n1, n2, ours, best))
  assert not mismatches, mismatches


def test_positive_costs_leave_nodes_unmatched():
  rng = np.random.default_rng(4)
  unary, quadratic, edges1, edges2 = random_problem(rng, 5, 6, "positive")
  assert solver.solve(unary, quadratic, edges1, edges2).sum() == 0
  unary[2, 3] = -1.0  # one profitable pair: exactly it is matched
  matching = solver.solve(unary, quadratic, edges1, edges2)
  assert matching.sum() == 1 and matching[2, 3] == 1
  assert matching.dtype == np.float32


def test_exgra_costs_choose_partial_matchings():
  rng = np.random.default_rng(5)
  unary, quadratic, edges1, edges2 = random_problem(rng, 7, 7, "exgra")
  unary += 0.6  # most unary costs positive, as with the release's noise
  matching = solver.solve(unary, quadratic, edges1, edges2)
  best = exhaustive_optimum(unary, quadratic, edges1, edges2)
  assert matching.sum() < 7
  np.testing.assert_allclose(
      solver.matching_objective(unary, quadratic, edges1, edges2, matching), best, atol=1e-9)


def _batch(rng, problems, n):
  items = [random_problem(rng, n, n, "exgra") for _ in range(problems)]
  return [np.stack(column) for column in zip(*items)]


def test_deterministic_batch_equals_single_and_threads_agree():
  rng = np.random.default_rng(6)
  batch = _batch(rng, 6, 24)
  one_thread = solver.solve_batch(*batch, threads=1)
  two_threads = solver.solve_batch(*batch, threads=2)
  np.testing.assert_array_equal(one_thread, two_threads)
  np.testing.assert_array_equal(one_thread, solver.solve_batch(*batch, threads=2))
  for p in range(len(batch[0])):
    np.testing.assert_array_equal(one_thread[p], solver.solve(*(a[p] for a in batch)))
  sums = one_thread.sum(-1)
  assert sums.max() <= 1 and one_thread.sum(-2).max() <= 1


def test_iterations_never_worsen_the_objective():
  rng = np.random.default_rng(7)
  batch = _batch(rng, 4, 32)
  _, short = solver.solve_batch_with_stats(*batch, max_iterations=0)
  _, long = solver.solve_batch_with_stats(*batch, max_iterations=50, patience=50)
  assert np.all(long.objective <= short.objective + 1e-12)
  assert np.all(short.objective <= short.seed_objective + 1e-12)
  np.testing.assert_array_equal(long.iterations, 50)
  assert long.time_limit_hits == 0


def test_patience_stops_after_rounds_without_improvement():
  rng = np.random.default_rng(11)
  batch = _batch(rng, 3, 12)
  _, stats = solver.solve_batch_with_stats(*batch, max_iterations=10**6, patience=7)
  assert np.all(stats.iterations >= 7) and np.all(stats.iterations < 10**6)
  _, again = solver.solve_batch_with_stats(*batch, max_iterations=10**6, patience=7)
  np.testing.assert_array_equal(stats.iterations, again.iterations)


def test_time_limit_returns_a_valid_matching_and_counts_the_hit():
  rng = np.random.default_rng(8)
  batch = _batch(rng, 3, 16)
  matchings, stats = solver.solve_batch_with_stats(*batch, max_iterations=10**9,
                                                   patience=10**9, time_limit_s=1e-4)
  assert stats.time_limit_hits == 3 and stats.time_limit_hit.all()
  assert np.all(stats.iterations < 10**9)
  assert matchings.sum(-1).max() <= 1 and matchings.sum(-2).max() <= 1
  for p in range(3):
    np.testing.assert_allclose(
        solver.matching_objective(*(a[p] for a in batch), matchings[p]), stats.objective[p],
        atol=1e-9)


@pytest.mark.parametrize("mutate, message", [
    (lambda u, q, e1, e2: (u.__setitem__((0, 0), np.nan), (u, q, e1, e2))[1],
     "unary costs contain NaN"),
    (lambda u, q, e1, e2: (q.__setitem__((1, 1), np.inf), (u, q, e1, e2))[1],
     "quadratic costs contain NaN or inf"),
    (lambda u, q, e1, e2: (u, q[:, :-1], e1, e2), "quadratic must be"),
    (lambda u, q, e1, e2: (u, q, e1 + 5, e2), "edges1 has node indices outside"),
    (lambda u, q, e1, e2: (u, q, e1, e2 - 1), "edges2 has node indices outside"),
    (lambda u, q, e1, e2: (u, q, e1.astype(float), e2), "edges1 must hold integers"),
    (lambda u, q, e1, e2: (u, q, e1[:, :1], e2), "edges1 must be"),
    (lambda u, q, e1, e2: (u[0], q, e1, e2), "unary must be"),
])
def test_bad_input_raises(mutate, message):
  rng = np.random.default_rng(9)
  problem = [np.array(a) for a in random_problem(rng, 5, 5, "exgra")]
  with pytest.raises(ValueError, match=message):
    solver.solve(*mutate(*problem))


def test_bad_batch_and_budget_raise():
  rng = np.random.default_rng(10)
  batch = _batch(rng, 2, 5)
  with pytest.raises(ValueError, match="batch sizes differ"):
    solver.solve_batch(batch[0], batch[1][:1], batch[2], batch[3])
  with pytest.raises(ValueError, match="max_iterations"):
    solver.solve_batch(*batch, max_iterations=-1)
  with pytest.raises(ValueError, match="patience"):
    solver.solve_batch(*batch, patience=-1)
  with pytest.raises(ValueError, match="time_limit_s"):
    solver.solve_batch(*batch, time_limit_s=-1.0)
  with pytest.raises(ValueError, match="threads"):
    solver.solve_batch(*batch, threads=-2)
  with pytest.raises(ValueError, match="at most one 1"):
    solver.matching_objective(*(a[0] for a in batch), np.ones((5, 5)))
