"""IMLE around the host solver, the multi-graph loss, grouping and the PyG-naming entry point.

The references are independent of the code under test: the solver called directly on costs
computed in numpy, GraphConv written out in numpy, Hamming distances counted by hand.
"""
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from align_reference import numpy_gnn, numpy_knn
from exgra_jax.align import costs, equivalence, imle, loss, solver


def _random_problem(rng, n, k):
  x = rng.normal(size=(n, 4))
  edges = np.array([(i, j) for i in range(n)
                    for j in np.argsort(((x - x[i]) ** 2).sum(1))[1:k + 1]], np.int32)
  unary = rng.normal(size=(n, n)).astype(np.float32)
  quadratic = rng.normal(size=(len(edges), len(edges))).astype(np.float32) * 0.3
  return unary, quadratic, edges


def test_hamming_by_hand():
  m = np.zeros((4, 4), np.float32)
  m[0, 0] = m[1, 2] = m[2, 1] = 1  # 0 right, 1 and 2 swapped, 3 unmatched
  # wrong: (1,2), (2,1) present; (1,1), (2,2), (3,3) missing -> 5 / 4
  np.testing.assert_allclose(loss.hamming_to_identity(jnp.asarray(m)), 5 / 4)
  np.testing.assert_allclose(loss.hamming_to_identity(jnp.eye(4)), 0.0)


def test_forward_equals_solver_and_induced_edges():
  rng = np.random.default_rng(0)
  unary, quadratic, edges = _random_problem(rng, 7, 2)
  settings = imle.SolverSettings()
  m, m_e = jax.jit(imle.differentiable_matching, static_argnums=0)(
      settings, unary, quadratic, edges, edges)
  expected = solver.solve(unary, quadratic, edges, edges)
  np.testing.assert_array_equal(m, expected)
  for e1, (i, j) in enumerate(edges):
    for e2, (a, b) in enumerate(edges):
      assert m_e[e1, e2] == expected[i, a] * expected[j, b]


def test_imle_gradient_by_hand():
  """d<W, M>/dU = -(M(U, Q) - M(U + lam W, Q)) / lam; dQ uses the induced edge matchings."""
  rng = np.random.default_rng(1)
  unary, quadratic, edges = _random_problem(rng, 6, 2)
  w = rng.normal(size=unary.shape).astype(np.float32)
  lam = 5.0
  settings = imle.SolverSettings(imle_lambda=lam)

  def objective(u, q):
    m, _ = imle.differentiable_matching(settings, u, q, edges, edges)
    return jnp.sum(w * m)

  d_u, d_q = jax.grad(objective, argnums=(0, 1))(unary, quadratic)
  m = solver.solve(unary, quadratic, edges, edges)
  m_pert = solver.solve(unary + lam * w, quadratic, edges, edges)
  assert not np.array_equal(m, m_pert), "pick a perturbation that changes the matching"
  np.testing.assert_allclose(d_u, -(m - m_pert) / lam, atol=1e-7)
  induce = lambda a: np.array([[a[i, x] * a[j, y] for x, y in edges] for i, j in edges])
  np.testing.assert_allclose(d_q, -(induce(m) - induce(m_pert)) / lam, atol=1e-7)


def test_vmap_and_leading_axes_equal_single_solves():
  rng = np.random.default_rng(2)
  problems = [_random_problem(rng, 6, 2) for _ in range(4)]
  edges = problems[0][2]
  unary = np.stack([p[0] for p in problems])
  quadratic = np.stack([p[1] for p in problems])
  settings = imle.SolverSettings()
  batched = jax.jit(jax.vmap(lambda u, q: imle.differentiable_matching(settings, u, q, edges,
                                                                      edges)[0]))(unary, quadratic)
  for p in range(4):
    np.testing.assert_array_equal(batched[p], solver.solve(unary[p], quadratic[p], edges, edges))


def _unit(a):
  return a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)


def test_equivalence_entry_point_against_hand_built_problems():
  """PyG-named weights + explicit noise: the six matchings equal the solver called directly
  on costs built in numpy, and the loss equals the Hamming distances counted from them."""
  rng = np.random.default_rng(3)
  b, d, width, k = 8, 6, 5, 3
  feats = [rng.normal(size=(b, d)).astype(np.float32) for _ in range(3)]
  weights = {}
  for n, fan_in in ((1, d), (2, width)):
    weights[f"conv{n}.lin_rel.weight"] = rng.normal(size=(width, fan_in)).astype(np.float32)
    weights[f"conv{n}.lin_rel.bias"] = rng.normal(size=(width,)).astype(np.float32)
    weights[f"conv{n}.lin_root.weight"] = rng.normal(size=(width, fan_in)).astype(np.float32)
  node_noise = rng.gumbel(size=(b, b)).astype(np.float32) * 0.05
  edge_noises = rng.gumbel(size=(6, b * k, b * k)).astype(np.float32) * 0.05
  settings = loss.AlignSettings(num_neighbors=k)
  out = equivalence.loss_from_explicit_inputs(*feats, weights, node_noise, edge_noises, settings)

  params = {f"conv{n}": {"lin_rel": {"kernel": weights[f"conv{n}.lin_rel.weight"].T,
                                     "bias": weights[f"conv{n}.lin_rel.bias"]},
                         "lin_root": {"kernel": weights[f"conv{n}.lin_root.weight"].T}}
            for n in (1, 2)}
  fi, fs, fl = feats
  c = (fi + fs + fl) / 3
  pairs = [(fi, c), (c, fi), (fs, c), (c, fs), (fl, c), (c, fl)]
  hamming = []
  for p, (x, y) in enumerate(pairs):
    edges = numpy_knn(x, k)
    hx, hy = numpy_gnn(params, x, edges), numpy_gnn(params, y, edges)
    unary = -(_unit(hx) @ _unit(hy).T + node_noise - 0.5)
    ex = _unit(hx[edges[:, 0]] - hx[edges[:, 1]])
    ey = _unit(hy[edges[:, 0]] - hy[edges[:, 1]])
    quadratic = -0.5 * (ex @ ey.T + edge_noises[p] - 0.5)
    expected = solver.solve(unary, quadratic, edges, edges)
    np.testing.assert_array_equal(out["matchings"][p], expected, err_msg=f"pair {p}")
    hamming.append(np.abs(expected - np.eye(b)).sum() / b)
  per_modality = [(hamming[0] + hamming[1]) / 2, (hamming[2] + hamming[3]) / 2,
                  (hamming[4] + hamming[5]) / 2]
  np.testing.assert_allclose(out["loss"], np.mean(per_modality), atol=1e-6)
  for name in ("grad_image", "grad_short", "grad_long"):
    assert out[name].shape == (b, d) and np.all(np.isfinite(out[name]))


def test_equivalence_rejects_misnamed_weights():
  with pytest.raises(ValueError, match="missing.*conv2"):
    equivalence.gnn_params_from_pyg({"conv1.lin_rel.weight": np.zeros((2, 2)),
                                     "conv1.lin_rel.bias": np.zeros(2),
                                     "conv1.lin_root.weight": np.zeros((2, 2))}, 2)


def _setup(g=8, groups=2, d=12, seed=0, **kw):
  settings = loss.AlignSettings(num_neighbors=3, gnn_width=16, **kw)
  key = jax.random.key(seed)
  feats = jax.random.normal(key, (3, groups, g, d))
  params = nn.unbox(loss.init_gnn_params(jax.random.key(1), settings, d))
  return settings, feats, params


def test_loss_jit_grad_and_aux():
  settings, feats, params = _setup()
  fn = jax.jit(lambda p, f, key: loss.multi_graph_alignment_loss(p, *f, key, settings))
  value, aux = fn(params, feats, jax.random.key(2))
  again, _ = fn(params, feats, jax.random.key(2))
  assert float(value) == float(again)  # noise from the key: reproducible
  assert 0.0 <= float(value) <= 2.0
  assert aux["matchings"].shape == (1, 6, 2, 8, 8) and aux["matching"].shape == (8, 8)
  np.testing.assert_allclose(
      float(value), np.mean([aux[f"hamming_{m}"] for m in loss.MODALITIES]), atol=1e-6)
  grads = jax.jit(jax.grad(lambda p, f: loss.multi_graph_alignment_loss(
      p, *f, jax.random.key(2), settings)[0], argnums=(0, 1)))(params, feats)
  assert float(jnp.abs(grads[1]).sum()) > 0
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(grads))


def test_loss_and_gradient_under_vmap_equal_single_calls():
  settings, feats, params = _setup()
  batch = jnp.stack([feats, feats[:, ::-1]])  # two feature sets: [2, 3, G, g, d]
  value_and_grad = jax.value_and_grad(lambda f: loss.multi_graph_alignment_loss(
      params, *f, jax.random.key(3), settings)[0])
  values, grads = jax.jit(jax.vmap(value_and_grad))(batch)
  for i in range(2):
    value, grad = value_and_grad(batch[i])
    np.testing.assert_allclose(values[i], value, atol=1e-6)
    np.testing.assert_allclose(grads[i], grad, atol=1e-6)


def test_node_noise_shared_edge_noise_per_problem():
  settings = loss.AlignSettings(num_neighbors=3)
  node, edge = loss.draw_noise(jax.random.key(0), settings, groups=2, g=8)
  assert node.shape == (1, 2, 8, 8) and edge.shape == (1, 6, 2, 24, 24)
  assert not np.allclose(edge[0, 0], edge[0, 1])


@pytest.mark.parametrize("kind", ["gumbel", "sum_of_gamma"])
def test_noise_kinds_have_gumbel_like_mean(kind):
  x = costs.perturbation_noise(jax.random.key(0), (200_000,), kind, 0.05)
  # Gumbel(0, s) has mean s * Euler-Mascheroni; sum-of-gamma with 10 terms is close to it.
  np.testing.assert_allclose(float(x.mean()), 0.05 * 0.5772, atol=0.05 * 0.06)
  assert float(jnp.abs(costs.perturbation_noise(jax.random.key(0), (5,), "none", 1.0)).max()) == 0


def test_noise_samples_average():
  settings, feats, params = _setup(samples=3)
  value, aux = loss.multi_graph_alignment_loss(params, *feats, jax.random.key(0), settings,
                                               deterministic=True)
  assert aux["matchings"].shape[0] == 3
  hamming = loss.hamming_to_identity(aux["matchings"]).mean(0)
  np.testing.assert_allclose(float(value), float(((hamming[0::2] + hamming[1::2]) / 2).mean()),
                             atol=1e-6)


def test_descent_on_features_lowers_the_loss():
  """Adam on free features through the IMLE gradient drives the matchings to the identity."""
  settings, feats, params = _setup(g=8, groups=1, seed=4, noise="none")
  step_loss = jax.jit(jax.value_and_grad(lambda f: loss.multi_graph_alignment_loss(
      params, *f, jax.random.key(0), settings, deterministic=True)[0]))
  tx = optax.adam(0.05)
  opt = tx.init(feats)
  first, _ = step_loss(feats)
  for _ in range(40):
    value, grad = step_loss(feats)
    updates, opt = tx.update(grad, opt)
    feats = optax.apply_updates(feats, updates)
  last, _ = step_loss(feats)
  assert float(last) < 0.5 * float(first), (float(first), float(last))


def _align_config(grouping, group_size=0):
  return ml_collections.ConfigDict({"grouping": grouping, "group_size": group_size,
                                    "num_neighbors": 5})


def test_group_size_for():
  assert loss.group_size_for(_align_config("per_device"), 64, 4) == 16
  assert loss.group_size_for(_align_config("fixed", 8), 64, 4) == 8
  assert loss.group_size_for(_align_config("global"), 64, 4) == 64
  with pytest.raises(ValueError, match="divide"):
    loss.group_size_for(_align_config("fixed", 12), 64, 4)
  with pytest.raises(ValueError, match="exceed"):
    loss.group_size_for(_align_config("per_device"), 16, 4)
  with pytest.raises(ValueError, match="grouping"):
    loss.group_size_for(_align_config("per_host"), 16, 1)


def test_loss_inside_jit_sharded_over_four_devices():
  """Features sharded over 4 CPU devices give the same loss and gradients as one device."""
  script = textwrap.dedent("""
      import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
      from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      from exgra_jax.align import loss
      settings = loss.AlignSettings(num_neighbors=3, gnn_width=16)
      feats = jax.random.normal(jax.random.key(0), (3, 4, 8, 12))
      params = nn.unbox(loss.init_gnn_params(jax.random.key(1), settings, 12))
      f = lambda p, x: loss.multi_graph_alignment_loss(p, *x, jax.random.key(2), settings)[0]
      vg = jax.value_and_grad(f, argnums=1)
      ref_value, ref_grad = jax.jit(vg, device=jax.devices()[0])(params, feats)
      mesh = Mesh(np.array(jax.devices()), ("data",))
      sharded = jax.device_put(feats, NamedSharding(mesh, P(None, "data")))
      value, grad = jax.jit(vg)(params, sharded)
      assert len(jax.devices()) == 4
      np.testing.assert_allclose(value, ref_value, atol=1e-6)
      np.testing.assert_allclose(grad, ref_grad, atol=1e-6)
      print("OK", float(value))
  """)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "OK" in result.stdout
