"""The alignment loss from explicit inputs, to hold against the release's PyTorch code.

`loss_from_explicit_inputs` takes everything the release's loss consumes as plain arrays:
the three node-feature matrices of one group, the GNN weights in PyTorch Geometric
`GraphConv` naming and layout, the node noise and the six edge noises in the release's
call order (I->c, c->I, S->c, c->S, L->c, c->L), optionally the GNN's dropout keep masks
and LPMP's forward / backward matchings (`release_randomness` puts them in the loss's
layout). Fed the same numbers the release used (dump them from its forward pass), it
must give the same six matchings and the same loss; its gradients are the IMLE gradients
of this implementation.

PyG naming, per layer n = 1, 2 (torch layout, weight [out, in]):
  `conv{n}.lin_rel.weight`, `conv{n}.lin_rel.bias`, `conv{n}.lin_root.weight`;
in the release's state dict behind `RELEASE_GNN_PREFIX`.

The step before, the node features of explicit records (which texts, their ids and
masks, f_S / f_L / f_I in the `default` or `release` text mode), is checked with
`exgra_jax.eval.node_features.node_features`: it loads a model directory, which `align/`
(it sees embeddings only, never `models/` or the weight loaders) may not do. The whole
stage-2 step (LM loss, this loss, every gradient) is replayed by
`exgra_jax.train.step_equivalence.release_step`.
"""
from collections.abc import Mapping
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from exgra_jax.align import costs
from exgra_jax.align import loss as loss_lib

# The GNN's attribute in the release's LlavaLlamaModel (llava/model/llava_pre.py).
RELEASE_GNN_PREFIX = "model.message_pass_node_features."
_PYG_LEAVES = (("lin_rel.weight", ("lin_rel", "kernel")), ("lin_rel.bias", ("lin_rel", "bias")),
               ("lin_root.weight", ("lin_root", "kernel")))


def gnn_params_from_pyg(weights: Mapping[str, np.ndarray], num_layers: int) -> dict:
  """PyG GraphConv state-dict entries -> our GNN params (kernels transposed to [in, out])."""
  expected = {f"conv{n}.{name}" for n in range(1, num_layers + 1) for name, _ in _PYG_LEAVES}
  if set(weights) != expected:
    raise ValueError(f"GNN weights must be exactly {sorted(expected)}; missing "
                     f"{sorted(expected - set(weights))}, unexpected "
                     f"{sorted(set(weights) - expected)}")
  as_array = lambda name: jnp.asarray(np.asarray(weights[name], np.float32))
  return {f"conv{n}": {"lin_rel": {"kernel": as_array(f"conv{n}.lin_rel.weight").T,
                                   "bias": as_array(f"conv{n}.lin_rel.bias")},
                       "lin_root": {"kernel": as_array(f"conv{n}.lin_root.weight").T}}
          for n in range(1, num_layers + 1)}


def gnn_params_to_pyg(params: Mapping) -> dict[str, np.ndarray]:
  """Our GNN params (or their gradients) -> PyG state-dict entries, torch layout."""
  out = {}
  for layer, leaves in params.items():
    for name, (module, leaf) in _PYG_LEAVES:
      value = np.asarray(leaves[module][leaf], np.float32)
      out[f"{layer}.{name}"] = np.ascontiguousarray(value.T if leaf == "kernel" else value)
  return out


def release_randomness(n: int, num_neighbors: int, node_noise: np.ndarray,
                       edge_noise: np.ndarray, dropout_keep: np.ndarray | None = None,
                       matchings: Mapping[str, np.ndarray] | None = None) -> dict:
  """The release's randomness of one group of n samples -> the loss's layout (one group,
  one noise sample), for `loss.alignment_from_noise`.

  Args:
    node_noise: [n, n], shared by the six problems; edge_noise: [6, E, E], E = n * k,
      one per problem in call order. float64 (the release's numpy draws) is kept exact
      as a (high, low) float32 pair (`costs.split_float64`); float32 is used as it is.
    dropout_keep: None or bool [6, 2n, width]: each problem's GNN keep mask over the
      release's batched pair of graphs (rows: graph 1's n nodes, then graph 2's).
    matchings: None or dict(forward=, backward=) [6, n, n] 0/1 matchings to replay.
  Returns:
    dict(node_noise [1, 1, n, n], edge_noise [1, 6, 1, E, E] (arrays or pairs),
    dropout_keep None or [2, 6, 1, n, width], replay None or ([1, 6, 1, n, n]) * 2).
  """
  e = n * num_neighbors
  node_noise, edge_noise = np.asarray(node_noise), np.asarray(edge_noise)
  if node_noise.shape != (n, n) or edge_noise.shape != (6, e, e):
    raise ValueError(f"noise shapes must be [{n}, {n}] and [6, {e}, {e}], got "
                     f"{node_noise.shape} and {edge_noise.shape}")

  def exact(noise, shape):
    parts = (costs.split_float64(noise) if noise.dtype == np.float64
             else (noise.astype(np.float32),))
    parts = tuple(jnp.asarray(p.reshape(shape)) for p in parts)
    return parts if len(parts) == 2 else parts[0]

  out = {"node_noise": exact(node_noise, (1, 1, n, n)),
         "edge_noise": exact(edge_noise, (1, 6, 1, e, e)), "dropout_keep": None,
         "replay": None}
  if dropout_keep is not None:
    keep = np.asarray(dropout_keep)
    if keep.dtype != np.bool_ or keep.ndim != 3 or keep.shape[:2] != (6, 2 * n):
      raise ValueError(f"dropout_keep must be bool [6, {2 * n}, width], got {keep.dtype} "
                       f"{keep.shape}")
    out["dropout_keep"] = jnp.asarray(np.stack([keep[:, :n], keep[:, n:]])[:, :, None])
  if matchings is not None:
    if set(matchings) != {"forward", "backward"}:
      raise ValueError(f"matchings must hold forward and backward, got {sorted(matchings)}")
    replay = []
    for name in ("forward", "backward"):
      m = np.asarray(matchings[name])
      if m.shape != (6, n, n) or not np.isin(m, (0, 1)).all():
        raise ValueError(f"matchings[{name!r}] must be 0/1 [6, {n}, {n}], got {m.shape}")
      replay.append(jnp.asarray(m.astype(np.float32)[None, :, None]))
    out["replay"] = tuple(replay)
  return out


def loss_from_explicit_inputs(f_image: np.ndarray, f_short: np.ndarray, f_long: np.ndarray,
                              gnn_weights: Mapping[str, np.ndarray], node_noise: np.ndarray,
                              edge_noises: np.ndarray,
                              settings: loss_lib.AlignSettings = loss_lib.AlignSettings(),
                              *, dropout_keep: np.ndarray | None = None,
                              matchings: Mapping[str, np.ndarray] | None = None
                              ) -> dict[str, np.ndarray]:
  """L_align of one group with the given noise (dropout off unless keep masks are given).

  Args:
    f_image, f_short, f_long: [B, d] node features.
    gnn_weights: PyG-named GNN weights (module doc), `settings.gnn_layers` layers.
    node_noise: [B, B] node noise G_n (shared by the six problems).
    edge_noises: [6, B*k, B*k] edge noises G_e in the release's call order (float64 noise
      is added as the release adds it, `release_randomness`).
    settings: k, solver budget and IMLE lambda (noise settings are not used: it is given).
    dropout_keep: None (GNN deterministic) or bool [6, 2B, width] keep masks.
    matchings: None (solve) or dict(forward=, backward=) [6, B, B] to replay.
  Returns:
    {"loss": scalar, "matchings": [6, B, B] in call order, "grad_image", "grad_short",
     "grad_long": [B, d] gradients of the loss, "grad_gnn": PyG-named GNN gradients}.
  """
  b = f_image.shape[0]
  given = release_randomness(b, settings.num_neighbors, node_noise, edge_noises,
                             dropout_keep, matchings)
  params = gnn_params_from_pyg(gnn_weights, settings.gnn_layers)
  settings = dataclasses.replace(settings,
                                 gnn_width=int(params["conv1"]["lin_rel"]["kernel"].shape[1]))

  def loss_fn(gnn, fi, fs, fl):
    return loss_lib.alignment_from_noise(
        gnn, settings, fi[None], fs[None], fl[None], given["node_noise"],
        given["edge_noise"], None, dropout_keep=given["dropout_keep"], replay=given["replay"])

  features = [jnp.asarray(np.asarray(f, np.float32)) for f in (f_image, f_short, f_long)]
  (value, aux), grads = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2, 3),
                                                  has_aux=True))(params, *features)
  return {"loss": np.asarray(value), "matchings": np.asarray(aux["matchings"][0, :, 0]),
          "grad_image": np.asarray(grads[1]), "grad_short": np.asarray(grads[2]),
          "grad_long": np.asarray(grads[3]), "grad_gnn": gnn_params_to_pyg(grads[0])}
