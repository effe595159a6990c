"""The alignment loss from explicit inputs, to hold against the release's PyTorch code.

`loss_from_explicit_inputs` takes everything the release's loss consumes as plain arrays:
the three node-feature matrices of one group, the GNN weights in PyTorch Geometric
`GraphConv` naming and layout, the node noise and the six edge noises in the release's
call order (I->c, c->I, S->c, c->S, L->c, c->L), with dropout off. Fed the same numbers
the release used (dump them from its forward pass), it must give the same six matchings
and the same loss; its gradients are the IMLE gradients of this implementation.

PyG naming, per layer n = 1, 2 (torch layout, weight [out, in]):
  `conv{n}.lin_rel.weight`, `conv{n}.lin_rel.bias`, `conv{n}.lin_root.weight`.

The step before, the node features of explicit records (which texts, their ids and
masks, f_S / f_L / f_I in the `default` or `release` text mode), is checked with
`exgra_jax.eval.node_features.node_features`: it loads a model directory, which `align/`
(it sees embeddings only, never `models/` or the weight loaders) may not do.
"""
from collections.abc import Mapping
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from exgra_jax.align import loss as loss_lib


def gnn_params_from_pyg(weights: Mapping[str, np.ndarray], num_layers: int) -> dict:
  """PyG GraphConv state-dict entries -> our GNN params (kernels transposed to [in, out])."""
  expected = {f"conv{n}.{name}" for n in range(1, num_layers + 1)
              for name in ("lin_rel.weight", "lin_rel.bias", "lin_root.weight")}
  if set(weights) != expected:
    raise ValueError(f"GNN weights must be exactly {sorted(expected)}; missing "
                     f"{sorted(expected - set(weights))}, unexpected "
                     f"{sorted(set(weights) - expected)}")
  as_array = lambda name: jnp.asarray(np.asarray(weights[name], np.float32))
  return {f"conv{n}": {"lin_rel": {"kernel": as_array(f"conv{n}.lin_rel.weight").T,
                                   "bias": as_array(f"conv{n}.lin_rel.bias")},
                       "lin_root": {"kernel": as_array(f"conv{n}.lin_root.weight").T}}
          for n in range(1, num_layers + 1)}


def loss_from_explicit_inputs(f_image: np.ndarray, f_short: np.ndarray, f_long: np.ndarray,
                              gnn_weights: Mapping[str, np.ndarray], node_noise: np.ndarray,
                              edge_noises: np.ndarray,
                              settings: loss_lib.AlignSettings = loss_lib.AlignSettings()
                              ) -> dict[str, np.ndarray]:
  """L_align of one group with the given noise, dropout off.

  Args:
    f_image, f_short, f_long: [B, d] node features.
    gnn_weights: PyG-named GNN weights (module doc), `settings.gnn_layers` layers.
    node_noise: [B, B] Gumbel node noise G_n (shared by the six problems).
    edge_noises: [6, B*k, B*k] edge noises G_e in the release's call order.
    settings: k, solver budget and IMLE lambda (noise settings are not used: it is given).
  Returns:
    {"loss": scalar, "matchings": [6, B, B] in call order, "grad_image", "grad_short",
     "grad_long": [B, d] gradients of the loss}.
  """
  b = f_image.shape[0]
  e = b * settings.num_neighbors
  node_noise = np.asarray(node_noise, np.float32)
  edge_noises = np.asarray(edge_noises, np.float32)
  if node_noise.shape != (b, b) or edge_noises.shape != (6, e, e):
    raise ValueError(f"noise shapes must be [{b}, {b}] and [6, {e}, {e}], got "
                     f"{node_noise.shape} and {edge_noises.shape}")
  params = gnn_params_from_pyg(gnn_weights, settings.gnn_layers)
  settings = dataclasses.replace(settings,
                                 gnn_width=int(params["conv1"]["lin_rel"]["kernel"].shape[1]))

  def loss_fn(fi, fs, fl):
    return loss_lib.alignment_from_noise(
        params, settings, fi[None], fs[None], fl[None], jnp.asarray(node_noise)[None, None],
        jnp.asarray(edge_noises)[None, :, None], dropout_key=None)

  features = [jnp.asarray(np.asarray(f, np.float32)) for f in (f_image, f_short, f_long)]
  (value, aux), grads = jax.value_and_grad(loss_fn, argnums=(0, 1, 2), has_aux=True)(*features)
  return {"loss": np.asarray(value), "matchings": np.asarray(aux["matchings"][0, :, 0]),
          "grad_image": np.asarray(grads[0]), "grad_short": np.asarray(grads[1]),
          "grad_long": np.asarray(grads[2])}
