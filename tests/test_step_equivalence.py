"""One release stage-2 step replayed (`train/step_equivalence.release_step`) against
independent PyTorch references (docs/align.md, "Replaying a release step").

- LM part: transformers' `LlamaForCausalLM` loss and gradients, the projected patches
  spliced after `<im_start>` as the release's `LlavaLlamaModel.forward` does.
- Alignment part: a PyTorch rebuild of the release's alignment (`_cal_loss`, `build_graph`,
  `GDPModel1`: PyG-style GraphConv with torch's `scatter_reduce` amax, its dropout masks,
  float64 noise added in place to float32 costs, a black-box `autograd.Function` replaying
  LPMP's matchings, `HammingLoss`), fed f_S / f_L from transformers' `LlamaModel` with
  flash attention's unpad / pad emulated and the mean over every position; and the
  explicit-input equivalence (`align/equivalence.py`) on the same features.
- The black-box backward on a hand-worked 3-node problem.
- The whole step: release_step's gradients are the training step's (`make_train_step`).

Tiny random weights, float32, CPU. Tolerances: losses 1e-5 relative, gradients 1e-4 of
each tensor's scale (its largest |entry|); the measured deviations are printed (-s).
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers

from align_reference import numpy_knn
from test_align_node_features import flash_unpad_pad
from exgra_jax.align import costs, equivalence, imle, loss
from exgra_jax.hf import hf_configs
from exgra_jax.models.llava import LlavaModel
from exgra_jax.train import state as state_lib
from exgra_jax.train import step, step_equivalence

B, N, D_VISION, K, LAMBDA = 6, 4, 16, 5, 80.0
PAD, BOS, IM_PATCH, IM_START, IM_END = 0, 1, 61, 62, 63
TOKENS = dict(im_patch=IM_PATCH, im_start=IM_START, im_end=IM_END)
LLM_CONFIG = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, rms_norm_eps=1e-6, max_position_embeddings=128,
                  rope_theta=10000.0)
WIDTH = LLM_CONFIG["hidden_size"]  # the release: graph_num_features = the LLM width
GNN = equivalence.RELEASE_GNN_PREFIX
LOSS_RTOL, GRAD_TOL = 1e-5, 1e-4


def grad_deviation(got: np.ndarray, expected: np.ndarray, zero_scale: float = 1e-30
                   ) -> float:
  """max |got - expected| / max |expected| (the tolerance's unit: the tensor's scale; a
  tensor whose expected gradient is all zero is measured against `zero_scale`)."""
  scale = float(np.abs(expected).max()) or zero_scale
  return float(np.abs(got - expected).max() / scale)


def assert_grads(got: dict, expected: dict, what: str) -> float:
  """Every expected tensor within GRAD_TOL of its scale; zero ones (lm_head gets no
  alignment gradient) against the largest scale of the set."""
  worst = 0.0
  largest = max(np.abs(v).max() for v in expected.values())
  for name, value in expected.items():
    assert got[name].shape == value.shape, name
    deviation = grad_deviation(got[name], value, zero_scale=largest)
    assert deviation < GRAD_TOL, f"{what} {name}: {deviation:.2e} of scale"
    worst = max(worst, deviation)
  print(f"{what}: max gradient deviation {worst:.2e} of scale over {len(expected)} tensors")
  return worst


# --- the release's inputs ---------------------------------------------------------------

def _batch(rng: np.random.Generator) -> dict[str, np.ndarray]:
  """A stage-2 collator output: right padding with the pad id, labels -100 on the prompt
  (two tokens of it kept, the release's quirk) and the padding, texts of unequal length."""
  lengths, short, long_ = [14, 11, 16, 12, 15, 13], [5, 8, 3, 6, 7, 4], [9, 6, 11, 10, 7, 8]
  t, ts, tl = max(lengths), max(short), max(long_)
  ids = np.full((B, t), PAD, np.int64)
  labels = np.full((B, t), -100, np.int64)
  for b, length in enumerate(lengths):
    row = np.r_[BOS, rng.integers(2, 60, 2), IM_START, [IM_PATCH] * N, IM_END,
                rng.integers(2, 60, length - N - 5)]
    ids[b, :length] = row
    labels[b, 1:3] = row[1:3]
    labels[b, N + 5:length] = row[N + 5:]

  def texts(widths, width):
    out = np.full((B, width), PAD, np.int64)
    for b, w in enumerate(widths):
      out[b, :w] = np.r_[BOS, rng.integers(2, 60, w - 1)]
    return out

  s, l = texts(short, ts), texts(long_, tl)
  return {"input_ids": ids, "labels": labels, "attention_mask": ids != PAD,
          "merge_sentence_id": s, "attention_mask_F": s != PAD,
          "merge_sentence_id_long": l, "attention_mask_F_long": l != PAD}


def _partial_matchings(rng: np.random.Generator) -> np.ndarray:
  """[6, B, B] 0/1 partial matchings, neither identity nor optimal (as LPMP may return)."""
  out = np.zeros((6, B, B), np.float32)
  for p in range(6):
    perm = rng.permutation(B)
    keep = rng.random(B) > 0.25
    out[p, np.arange(B)[keep], perm[keep]] = 1.0
  return out


@pytest.fixture(scope="module")
def release():
  """Weights (torch modules and the state dict), batch and randomness of one step."""
  rng = np.random.default_rng(0)
  torch.manual_seed(0)
  llm_cfg = hf_configs.llm_config_from_hf({"model_type": "llama", **LLM_CONFIG})
  lm = transformers.LlamaForCausalLM(hf_configs.llama_hf_config(
      llm_cfg, initializer_range=0.2, attn_implementation="eager")).eval()
  projector = torch.nn.Sequential(torch.nn.Linear(D_VISION, WIDTH), torch.nn.GELU(),
                                  torch.nn.Linear(WIDTH, WIDTH))
  gnn = {}
  for n in (1, 2):
    gnn[f"conv{n}.lin_rel.weight"] = rng.normal(0, 0.3, (WIDTH, WIDTH)).astype(np.float32)
    gnn[f"conv{n}.lin_rel.bias"] = rng.normal(0, 0.1, (WIDTH,)).astype(np.float32)
    gnn[f"conv{n}.lin_root.weight"] = rng.normal(0, 0.3, (WIDTH, WIDTH)).astype(np.float32)
  state_dict = {k: v.detach().numpy().copy() for k, v in lm.state_dict().items()}
  state_dict.update({f"model.mm_projector.{k}": v.detach().numpy().copy()
                     for k, v in projector.state_dict().items()})
  state_dict.update({GNN + k: v for k, v in gnn.items()})
  e = B * K
  return {
      "lm": lm, "projector": projector, "gnn": gnn, "state_dict": state_dict,
      "batch": _batch(rng),
      "image_features": rng.normal(size=(B, N, D_VISION)).astype(np.float32),
      "node_noise": rng.gumbel(0, 0.05, (B, B)),
      "edge_noise": rng.gumbel(0, 0.05, (6, e, e)),
      "dropout_keep": rng.random((6, 2 * B, WIDTH)) > 0.1,
      "matchings": {"forward": _partial_matchings(rng), "backward": _partial_matchings(rng)},
  }


def _release_step(release, **overrides):
  kwargs = dict(image_features=release["image_features"], image_token_ids=TOKENS,
                node_noise=release["node_noise"], edge_noise=release["edge_noise"],
                dropout_keep=release["dropout_keep"], matchings=release["matchings"])
  kwargs.update(overrides)
  return step_equivalence.release_step(release["state_dict"], LLM_CONFIG, release["batch"],
                                       **kwargs)


@pytest.fixture(scope="module")
def replayed(release):
  return _release_step(release, alpha=0.7)


# --- torch references ----------------------------------------------------------------------

def _torch_params(release) -> dict[str, torch.Tensor]:
  """Fresh leaf tensors of every release parameter, on the reference modules."""
  lm, projector = release["lm"], release["projector"]
  lm.zero_grad()
  projector.zero_grad()
  params = {k: v for k, v in lm.named_parameters()}
  params.update({f"model.mm_projector.{k}": v for k, v in projector.named_parameters()})
  params.update({GNN + k: torch.tensor(v, requires_grad=True)
                 for k, v in release["gnn"].items()})
  return params


def _grads(params: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
  return {k: (v.grad if v.grad is not None else torch.zeros_like(v)).numpy().copy()
          for k, v in params.items()}


def torch_lm_loss(release) -> torch.Tensor:
  """The release's LM forward: embeddings, projected patches spliced after <im_start>."""
  batch = release["batch"]
  ids = torch.tensor(batch["input_ids"])
  embeds = release["lm"].model.embed_tokens(ids)
  projected = release["projector"](torch.tensor(release["image_features"]))
  rows = []
  for b in range(B):
    start = int(torch.where(ids[b] == IM_START)[0][0])
    rows.append(torch.cat([embeds[b, :start + 1], projected[b], embeds[b, start + N + 1:]]))
  out = release["lm"](inputs_embeds=torch.stack(rows),
                      attention_mask=torch.tensor(batch["attention_mask"]).long(),
                      labels=torch.tensor(batch["labels"]))
  return out.loss


def torch_text_features(release, ids_key: str, mask_key: str) -> torch.Tensor:
  """f_S / f_L: the release's LlamaModel pass (flash attention's unpad / pad), mean over
  every position, padding included."""
  llama = release["lm"].model
  mask = torch.tensor(release["batch"][mask_key]).long()
  with flash_unpad_pad(llama, mask):
    hidden = llama(input_ids=torch.tensor(release["batch"][ids_key]),
                   attention_mask=mask).last_hidden_state
  return hidden.mean(1)


def torch_graph_conv(x: torch.Tensor, edges: np.ndarray, rel_w, rel_b, root_w) -> torch.Tensor:
  """PyG GraphConv, aggr="max": lin_rel(max over in-edges) + lin_root(x); a node without
  in-edges aggregates 0 (scatter_reduce amax, include_self=False, ties share the gradient)."""
  src, dst = torch.tensor(edges[:, 0]).long(), torch.tensor(edges[:, 1]).long()
  index = dst[:, None].expand(-1, x.shape[1])
  agg = torch.zeros_like(x).scatter_reduce(0, index, x[src], reduce="amax",
                                           include_self=False)
  return agg @ rel_w.T + rel_b + x @ root_w.T


class ReplayedMatching(torch.autograd.Function):
  """The release's black-box solver with LPMP's answers given: forward M, backward
  -(M - M') / lambda for the unary and -(M_E - M_E') / lambda for the quadratic costs."""

  @staticmethod
  def forward(ctx, unary, quadratic, forward, backward, edges):
    induced = lambda m: m[edges[:, 0]][:, edges[:, 0]] * m[edges[:, 1]][:, edges[:, 1]]
    ctx.grads = (-(forward - backward) / LAMBDA, -(induced(forward) - induced(backward)) / LAMBDA)
    return forward.clone()

  @staticmethod
  def backward(ctx, grad_matching):
    return ctx.grads[0], ctx.grads[1], None, None, None


def torch_alignment(release, params, f_image, f_short, f_long, *, edge_path: bool = True
                    ) -> tuple[torch.Tensor, list[float]]:
  """The release's multi-graph loss (llava_pre.py `forward`'s alignment block) on torch."""
  center = (f_image + f_short + f_long) / 3
  pairs = [(f_image, center), (center, f_image), (f_short, center), (center, f_short),
           (f_long, center), (center, f_long)]
  eye = torch.eye(B)
  keep = torch.tensor(release["dropout_keep"])
  hammings = []
  for p, (x, y) in enumerate(pairs):
    edges = numpy_knn(x.detach().numpy(), K)  # built on the first argument
    both = torch.cat([x, y])
    batched = np.concatenate([edges, edges + B])  # the two graphs of one PyG batch
    for n in (1, 2):
      both = torch.relu(torch_graph_conv(
          both, batched, params[f"{GNN}conv{n}.lin_rel.weight"],
          params[f"{GNN}conv{n}.lin_rel.bias"], params[f"{GNN}conv{n}.lin_root.weight"]))
    both = both * keep[p] * (1.0 / (1.0 - 0.1))  # F.dropout's kept entries, scaled
    hx, hy = both[:B], both[B:]
    ex = hx[edges[:, 0]] - hx[edges[:, 1]]
    ey = hy[edges[:, 0]] - hy[edges[:, 1]]
    norm = torch.nn.functional.normalize
    unary = norm(hx, dim=1) @ norm(hy, dim=1).T
    unary += torch.from_numpy(release["node_noise"])  # float64 into float32, in place
    unary -= 0.5
    unary *= -1
    quadratic = norm(ex, dim=1) @ norm(ey, dim=1).T
    quadratic += torch.from_numpy(release["edge_noise"][p])
    quadratic -= 0.5
    quadratic *= -0.5
    if not edge_path:
      quadratic = quadratic.detach()
    matching = ReplayedMatching.apply(
        unary, quadratic, torch.tensor(release["matchings"]["forward"][p]),
        torch.tensor(release["matchings"]["backward"][p]), torch.tensor(edges).long())
    errors = matching * (1.0 - eye) + (1.0 - matching) * eye
    hammings.append(errors.mean(dim=0).sum())
  per_modality = [(hammings[i] + hammings[i + 1]) / 2 for i in (0, 2, 4)]
  return sum(per_modality) / 3, [h.item() for h in hammings]


def torch_features(release):
  f_image = release["projector"](torch.tensor(release["image_features"])).mean(1)
  f_short = torch_text_features(release, "merge_sentence_id", "attention_mask_F")
  f_long = torch_text_features(release, "merge_sentence_id_long", "attention_mask_F_long")
  return f_image, f_short, f_long


# --- tests ---------------------------------------------------------------------------------

def test_lm_part_matches_transformers(release, replayed):
  params = _torch_params(release)
  loss_tensor = torch_lm_loss(release)
  loss_tensor.backward()
  expected = loss_tensor.item()
  deviation = abs(replayed["lm_loss"] - expected) / expected
  print(f"lm_loss {replayed['lm_loss']:.7f} vs transformers {expected:.7f}: "
        f"relative deviation {deviation:.2e}")
  assert deviation < LOSS_RTOL
  expected_grads = {k: v for k, v in _grads(params).items() if not k.startswith(GNN)}
  assert_grads(replayed["grads_lm"], expected_grads, "LM vs transformers")
  for name in release["gnn"]:
    assert not replayed["grads_lm"][GNN + name].any()


def test_alignment_part_matches_the_torch_release(release, replayed):
  """Loss, six Hamming distances and alpha * align gradients of every parameter (GNN,
  projector through f_I, the LLM through f_S and f_L) against the torch rebuild."""
  params = _torch_params(release)
  align, hammings = torch_alignment(release, params, *torch_features(release))
  (0.7 * align).backward()
  align = align.item()
  deviation = abs(replayed["align_loss"] - align) / align
  print(f"align_loss {replayed['align_loss']:.7f} vs torch {align:.7f}: relative "
        f"deviation {deviation:.2e}")
  assert deviation < LOSS_RTOL
  np.testing.assert_allclose(replayed["hamming"], hammings, rtol=LOSS_RTOL)
  assert_grads(replayed["grads_align"], _grads(params), "alignment vs torch")


def test_the_edge_cost_path_carries_gnn_gradient(release, replayed):
  """Without the quadratic costs' black-box gradient the GNN gradients are different: the
  comparison above sees the edge path."""
  params = _torch_params(release)
  align, _ = torch_alignment(release, params, *torch_features(release), edge_path=False)
  (0.7 * align).backward()
  cut = _grads(params)
  worst = max(grad_deviation(replayed["grads_align"][GNN + k], cut[GNN + k])
              for k in release["gnn"])
  print(f"GNN gradients without the edge path deviate by {worst:.2e} of scale")
  assert worst > 100 * GRAD_TOL


def test_alignment_part_matches_the_explicit_input_equivalence(release, replayed):
  """align/equivalence.py on the torch features, same noise, masks and matchings: the same
  loss and Hamming distances, and its feature gradients pulled back through the torch
  projector and LLM give release_step's alignment gradients."""
  params = _torch_params(release)
  f_image, f_short, f_long = torch_features(release)
  out = equivalence.loss_from_explicit_inputs(
      *(f.detach().numpy() for f in (f_image, f_short, f_long)), release["gnn"],
      release["node_noise"], release["edge_noise"], step_equivalence.RELEASE_ALIGN,
      dropout_keep=release["dropout_keep"], matchings=release["matchings"])
  deviation = abs(replayed["align_loss"] - float(out["loss"])) / float(out["loss"])
  print(f"align_loss vs the explicit-input equivalence: relative deviation {deviation:.2e}")
  assert deviation < LOSS_RTOL
  np.testing.assert_array_equal(out["matchings"], release["matchings"]["forward"])
  # Replayed, the black-box gradient is -(M - M') / lambda whatever the cotangent: alpha
  # acts only through M' (the release's re-solve at U + lambda * alpha * dH/dM).
  torch.autograd.backward(
      (f_image, f_short, f_long),
      [torch.tensor(out[k]) for k in ("grad_image", "grad_short", "grad_long")])
  expected = _grads(params)
  expected.update({GNN + k: v for k, v in out["grad_gnn"].items()})
  assert_grads(replayed["grads_align"], expected, "alignment vs equivalence")


def test_gnn_gradients_with_tied_maxima(release):
  """Rows 0 and 1 of every modality equal: they send equal messages to the same targets,
  so the max aggregation ties; torch's amax splits the gradient equally between the tied
  sources, and the explicit-input equivalence (GNN, edge-cost path, features) must too."""
  rng = np.random.default_rng(5)
  feats = rng.normal(size=(3, B, WIDTH)).astype(np.float32)
  feats[:, 1] = feats[:, 0]
  leaves = [torch.tensor(f, requires_grad=True) for f in feats]
  params = _torch_params(release)
  align, _ = torch_alignment(release, params, *leaves)
  align.backward()
  out = equivalence.loss_from_explicit_inputs(
      *feats, release["gnn"], release["node_noise"], release["edge_noise"],
      step_equivalence.RELEASE_ALIGN, dropout_keep=release["dropout_keep"],
      matchings=release["matchings"])
  assert abs(float(out["loss"]) - align.item()) <= LOSS_RTOL * align.item()
  expected = {GNN + k: params[GNN + k].grad.numpy() for k in release["gnn"]}
  expected.update({f"grad_{m}": leaf.grad.numpy()
                   for m, leaf in zip(("image", "short", "long"), leaves)})
  got = {GNN + k: v for k, v in out["grad_gnn"].items()}
  got.update({k: out[k] for k in ("grad_image", "grad_short", "grad_long")})
  assert_grads(got, expected, "tied maxima vs torch")
  # The ties are real: the first layer's messages from rows 0 and 1 are equal everywhere.
  edges = numpy_knn(feats[0], K)
  assert any({0, 1} <= set(edges[edges[:, 1] == j, 0]) for j in range(2, B))


def test_solved_step_matches_the_equivalence(release):
  """matchings=None: the project's solver; the same six matchings as the explicit-input
  entry point solving the same costs, hence the same loss and Hamming distances."""
  out = _release_step(release, matchings=None)
  f = [x.detach().numpy() for x in torch_features(release)]
  expected = equivalence.loss_from_explicit_inputs(
      *f, release["gnn"], release["node_noise"], release["edge_noise"],
      step_equivalence.RELEASE_ALIGN, dropout_keep=release["dropout_keep"])
  eye = np.eye(B)
  hamming = (expected["matchings"] * (1 - eye) + (1 - expected["matchings"]) * eye).sum(
      axis=(1, 2)) / B
  np.testing.assert_allclose(out["hamming"], hamming, rtol=LOSS_RTOL)
  np.testing.assert_allclose(out["align_loss"], expected["loss"], rtol=LOSS_RTOL)
  assert 0 < out["align_loss"]


def test_grads_cover_every_parameter(release, replayed):
  names = set(release["state_dict"])
  assert set(replayed["grads"]) == set(replayed["grads_lm"]) == set(replayed["grads_align"])
  assert set(replayed["grads"]) == names
  for name, value in replayed["grads"].items():
    assert value.shape == release["state_dict"][name].shape and value.dtype == np.float32


def _capturing_optimizer() -> optax.GradientTransformation:
  """An optimizer whose state after a step is that step's gradient (and moves nothing)."""
  return optax.GradientTransformation(
      lambda params: jax.tree.map(jnp.zeros_like, params),
      lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


def test_whole_step_is_the_training_step(release, replayed):
  """make_train_step (micro-batching, token count, group count, alpha, frozen-leaf split)
  with the same injected randomness: its gradients are release_step's."""
  sd = release["state_dict"]
  features = jnp.asarray(release["image_features"])
  cfg = step_equivalence.model_config(sd, LLM_CONFIG, features.shape)
  params = step_equivalence.params_from_release(sd, cfg)
  settings = dataclasses.replace(step_equivalence.RELEASE_ALIGN, gnn_width=WIDTH)
  given = equivalence.release_randomness(B, K, release["node_noise"], release["edge_noise"],
                                         release["dropout_keep"], release["matchings"])
  tx = _capturing_optimizer()
  train_step = step.make_train_step(
      LlavaModel(cfg), tx, optax.constant_schedule(0.0),
      align_fn=step_equivalence.injected_alignment(settings, given), alpha=0.7,
      group_size=B, text_mode="release")
  batch = step_equivalence.model_batch(release["batch"], TOKENS, N)
  batch["pixel_values"] = jnp.zeros((B, cfg.vision.image_size, cfg.vision.image_size, 3))
  state = state_lib.create_train_state(params, tx, seed=0)
  with step_equivalence.intercepted_tower(features, cfg):
    new_state, metrics = jax.jit(train_step)(state, batch)
  assert int(new_state.skipped) == 0
  got = step_equivalence.grads_to_release(new_state.opt_state, cfg)
  for key in ("lm_loss", "align_loss"):
    np.testing.assert_allclose(float(metrics[key]), replayed[key], rtol=LOSS_RTOL)
  assert_grads(replayed["grads"], got, "release_step vs make_train_step")


def test_black_box_backward_on_a_three_node_problem():
  """Hand-worked: U matches 0 <-> 1 crosswise and leaves node 2 out (its costs are all
  positive). The Hamming loss c * H(M) sends dL/dM = c (1 - 2I) / 3; with c = 1, lambda 80
  moves the diagonal by -26.7 and the rest by +26.7, so the re-solve is the identity:
  dU = -(M - I) / 80, and dQ = -(M_E - I_E) / 80 over the six edges (i, j), i != j: M
  induces (0,1)->(1,0) and (1,0)->(0,1), the identity the edge identity. With c = 0.01 the
  move (0.27) does not change the answer: zero gradient."""
  unary = jnp.array([[-0.1, -1.0, 0.3], [-1.0, -0.1, 0.2], [0.3, 0.2, 0.4]], jnp.float32)
  edges = jnp.array([(i, j) for i in range(3) for j in range(3) if i != j], jnp.int32)
  quadratic = jnp.zeros((6, 6), jnp.float32)
  settings = imle.SolverSettings(imle_lambda=LAMBDA)

  def loss_of(u, q, c):
    m, _ = imle.differentiable_matching(settings, u, q, edges, edges)
    return c * loss.hamming_to_identity(m)

  m = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 0]], np.float32)
  assert float(loss_of(unary, quadratic, 1.0)) == pytest.approx(5 / 3)
  d_unary, d_quadratic = jax.grad(loss_of, argnums=(0, 1))(unary, quadratic, 1.0)
  eye = np.eye(3, dtype=np.float32)
  np.testing.assert_array_equal(d_unary, -(m - eye) / np.float32(LAMBDA))
  m_edges = np.zeros((6, 6), np.float32)
  index = {tuple(map(int, e)): i for i, e in enumerate(edges)}
  m_edges[index[(0, 1)], index[(1, 0)]] = m_edges[index[(1, 0)], index[(0, 1)]] = 1
  np.testing.assert_array_equal(d_quadratic,
                                -(m_edges - np.eye(6, dtype=np.float32)) / np.float32(LAMBDA))
  small = jax.grad(loss_of, argnums=(0, 1))(unary, quadratic, 0.01)
  assert not np.asarray(small[0]).any() and not np.asarray(small[1]).any()

  # Replayed: the given M, M' whatever the costs and the cotangent.
  forward, backward = jnp.asarray(m), jnp.eye(3).at[2, 2].set(0.0)
  replayed = jax.grad(lambda u, q: loss.hamming_to_identity(imle.differentiable_matching(
      settings, u, q, edges, edges, (forward, backward))[0]), argnums=(0, 1))(unary, quadratic)
  np.testing.assert_array_equal(replayed[0], -(forward - backward) / np.float32(LAMBDA))
  assert np.asarray(replayed[1]).any()


def test_noise_is_added_with_the_release_rounding():
  """float32(float64 affinity + float64 noise), as the release's in-place add: the (high,
  low) pair gives it exactly, float32 noise does not (one rounding too many)."""
  rng = np.random.default_rng(1)
  affinity = rng.uniform(-1, 1, 200_000).astype(np.float32)
  noise = rng.gumbel(0, 0.05, affinity.shape)
  expected = (affinity.astype(np.float64) + noise).astype(np.float32)
  got = np.asarray(jax.jit(costs.add_noise)(jnp.asarray(affinity),
                                            tuple(map(jnp.asarray, costs.split_float64(noise)))))
  np.testing.assert_array_equal(got, expected)
  rounded_twice = affinity + noise.astype(np.float32)
  assert (rounded_twice != expected).mean() > 0.01


def test_bad_inputs_are_named(release):
  with pytest.raises(ValueError, match=r"dropout_keep must be bool \[6, 12, width\]"):
    _release_step(release, dropout_keep=release["dropout_keep"][:, :B])
  with pytest.raises(ValueError, match="noise shapes"):
    _release_step(release, edge_noise=release["edge_noise"][:, :5])
  batch = {**release["batch"]}
  batch["input_ids"] = batch["input_ids"].copy()
  batch["input_ids"][2, 5] = 7  # a patch token replaced
  with pytest.raises(ValueError, match="input_ids row 2"):
    step_equivalence.release_step(release["state_dict"], LLM_CONFIG, batch,
                                  image_features=release["image_features"],
                                  image_token_ids=TOKENS, node_noise=release["node_noise"],
                                  edge_noise=release["edge_noise"],
                                  dropout_keep=release["dropout_keep"])
  state_dict = {k: v for k, v in release["state_dict"].items() if k != "lm_head.weight"}
  with pytest.raises(ValueError, match=r"missing \['lm_head.weight'\]"):
    step_equivalence.release_step(state_dict, LLM_CONFIG, release["batch"],
                                  image_features=release["image_features"],
                                  image_token_ids=TOKENS, node_noise=release["node_noise"],
                                  edge_noise=release["edge_noise"],
                                  dropout_keep=release["dropout_keep"])
