"""The multi-graph alignment loss of ExGra-Med (docs/align.md).

For each group of g samples with node features f_I, f_S, f_L [g, d] (image, short text,
long text) and their barycenter c = (f_I + f_S + f_L) / 3 (not detached):

    L_m = (H(m -> c) + H(c -> m)) / 2,    L_align = (L_I + L_S + L_L) / 3,

where H(X -> Y) = (1/g) sum_ij |M_ij - I_ij| is the Hamming distance of the solved matching
M of X's graph onto Y's graph (kNN edges of X shared by Y, the shared GNN, the costs of
`costs.py`) to the identity. The six matchings of a group are solved in the release's call
order I->c, c->I, S->c, c->S, L->c, c->L (PAIR_NAMES); all problems of all groups (and
noise samples) go to the host solver in one callback (`imle.differentiable_matching`).

Noise: the node noise [g, g] is drawn once per group and noise sample and shared by its six
problems; the edge noise is drawn per problem. With `imle_samples` S > 1 the loss (and so
its IMLE gradient) is the mean over S independent noise draws.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from exgra_jax.align import costs, gnn, graphs, imle

PAIR_NAMES = ("image->c", "c->image", "short->c", "c->short", "long->c", "c->long")
MODALITIES = ("image", "short", "long")
GROUPINGS = ("per_device", "fixed", "global")


@dataclasses.dataclass(frozen=True)
class AlignSettings:
  """The loss's constants (from `config.align`; docs/align.md gives the release's)."""
  num_neighbors: int = 5
  gnn_width: int = 0           # 0 = input width
  gnn_layers: int = 2
  gnn_dropout: float = 0.1
  gumbel_scale: float = 0.05
  noise: str = "gumbel"
  samples: int = 1
  solver: imle.SolverSettings = imle.SolverSettings()

  def __post_init__(self):
    if self.noise not in costs.NOISE_KINDS:
      raise ValueError(f"align.imle_noise={self.noise!r} is not one of {costs.NOISE_KINDS}")
    if self.samples < 1:
      raise ValueError(f"align.imle_samples must be >= 1, got {self.samples}")

  @classmethod
  def from_config(cls, align: ml_collections.ConfigDict) -> AlignSettings:
    return cls(num_neighbors=align.num_neighbors, gnn_width=align.gnn_width,
               gnn_layers=align.gnn_layers, gnn_dropout=align.gnn_dropout,
               gumbel_scale=align.gumbel_scale, noise=align.imle_noise,
               samples=align.imle_samples, solver=imle.SolverSettings.from_config(align))

  def gnn_module(self, input_width: int) -> gnn.GraphMatchingGNN:
    return gnn.GraphMatchingGNN(width=self.gnn_width or input_width,
                                num_layers=self.gnn_layers, dropout_rate=self.gnn_dropout)


def init_gnn_params(key: jax.Array, settings: AlignSettings, input_width: int) -> Any:
  """Fresh (boxed, logically annotated) GNN params for node features of `input_width`."""
  g = settings.num_neighbors + 1
  example = graphs.graphs_tuple(jnp.zeros((g, input_width)),
                                graphs.knn_edges(jnp.zeros((g, input_width)),
                                                 settings.num_neighbors))
  return settings.gnn_module(input_width).init(key, example, deterministic=True)["params"]


def group_size_for(align: ml_collections.ConfigDict, micro_batch_size: int,
                   data_parallel_size: int) -> int:
  """Samples per graph for a micro-batch of `micro_batch_size` samples over the whole mesh.

  per_device: the samples one data-parallel shard holds (the release: 16 per GPU);
  fixed: `align.group_size`, where 0 means the whole micro-batch (a group never spans
  micro-batches: each is embedded and matched on its own); global: the whole micro-batch.
  The result divides the micro-batch, else ValueError with the numbers. Start-up
  validation asks this function, so the two cannot disagree.
  """
  if align.grouping == "per_device":
    size, why = micro_batch_size // max(data_parallel_size, 1), "per device"
  elif align.grouping == "fixed":
    size, why = align.group_size or micro_batch_size, "align.group_size"
  elif align.grouping == "global":
    size, why = micro_batch_size, "the micro-batch"
  else:
    raise ValueError(f"align.grouping={align.grouping!r} is not one of {GROUPINGS}")
  if size <= align.num_neighbors or micro_batch_size % size:
    raise ValueError(f"alignment groups of {size} samples ({why}) must exceed "
                     f"align.num_neighbors={align.num_neighbors} and divide the micro-batch "
                     f"of {micro_batch_size} samples")
  return size


def pair_features(f_image: jax.Array, f_short: jax.Array, f_long: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
  """(X, Y) [6, ..., g, d] in PAIR_NAMES order, with the barycenter c = mean of the three."""
  center = (f_image + f_short + f_long) / 3.0
  xs = jnp.stack([f_image, center, f_short, center, f_long, center])
  ys = jnp.stack([center, f_image, center, f_short, center, f_long])
  return xs, ys


def dropout_keys(key: jax.Array, groups: int) -> jax.Array:
  """[2, 6, G] keys of the GNN's dropout masks: X and Y side of each of the six problems
  of each group. Drawn for all groups at once so that a group's masks do not depend on
  where (on which device) it is embedded."""
  kx, ky = jax.random.split(key)
  pairs = len(PAIR_NAMES) * groups
  keys = jnp.stack([jax.random.split(kx, pairs), jax.random.split(ky, pairs)])
  return keys.reshape((2, len(PAIR_NAMES), groups) + keys.shape[2:])  # raw keys: [..., 2]


def pair_costs(gnn_params: Any, settings: AlignSettings, xs: jax.Array, ys: jax.Array,
               node_noise: costs.Noise, edge_noise: costs.Noise, dropout: jax.Array | None
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Costs of the six problems of G groups under S noise draws.

  Args:
    xs, ys: [6, G, g, d] pair features (`pair_features`).
    node_noise: [S, G, g, g] (shared by the six problems); edge_noise: [S, 6, G, E, E];
      each a float32 array or a (high, low) pair of them (`costs.add_noise`).
    dropout: None = GNN deterministic; the [2, 6, G] keys of its dropout masks
      (`dropout_keys`); or the bool keep masks themselves, [2, 6, G, g, width] (X side,
      Y side of each problem).
  Returns:
    unary [S, 6, G, g, g], quadratic [S, 6, G, E, E], edges [6, G, E, 2].
  """
  module = settings.gnn_module(xs.shape[-1])
  edges = jax.vmap(jax.vmap(lambda x: graphs.knn_edges(x, settings.num_neighbors)))(xs)

  def embed(features, edge_list, drop):
    graph = graphs.graphs_tuple(features, edge_list)
    if drop is None:
      return module.apply({"params": gnn_params}, graph, deterministic=True)
    if drop.dtype == jnp.bool_:
      return module.apply({"params": gnn_params}, graph, deterministic=False, keep=drop)
    return module.apply({"params": gnn_params}, graph, deterministic=False,
                        rngs={"dropout": drop})

  pairs = xs.shape[0] * xs.shape[1]
  flat = lambda a: a.reshape(pairs, *a.shape[2:])
  if dropout is None:
    hx = jax.vmap(lambda f, e: embed(f, e, None))(flat(xs), flat(edges))
    hy = jax.vmap(lambda f, e: embed(f, e, None))(flat(ys), flat(edges))
  else:
    hx = jax.vmap(embed)(flat(xs), flat(edges), flat(dropout[0]))
    hy = jax.vmap(embed)(flat(ys), flat(edges), flat(dropout[1]))
  hx = hx.reshape(*xs.shape[:2], *hx.shape[1:])
  hy = hy.reshape(*ys.shape[:2], *hy.shape[1:])

  def costs_of(node, edge):  # node [G, g, g] for one sample, edge [6, G, E, E]
    per_pair = jax.vmap(jax.vmap(costs.matching_costs))  # over 6, then G
    lead = jax.tree.leaves(edge)[0].shape[:2]
    shared_node = jax.tree.map(lambda n: jnp.broadcast_to(n, lead + n.shape[1:]), node)
    return per_pair(hx, hy, edges, shared_node, edge)

  unary, quadratic = jax.vmap(costs_of)(node_noise, edge_noise)
  return unary, quadratic, edges


def hamming_to_identity(matching: jax.Array) -> jax.Array:
  """(1/g) sum_ij |M_ij - I_ij| over the last two axes [..., g, g], in its linear form.

  Written as M (1 - I) + (1 - M) I, which equals |M - I| on 0/1 matchings but whose gradient
  is 1 - 2 I everywhere (BB-GM's HammingLoss, the form the release's solver wrapper comes
  from). With `abs` the gradient would vanish wherever M already equals I (sign(0) = 0), and
  the IMLE perturbation could not reward the correct matches it keeps.
  """
  g = matching.shape[-1]
  eye = jnp.eye(g, dtype=matching.dtype)
  return (matching * (1.0 - eye) + (1.0 - matching) * eye).sum(axis=(-2, -1)) / g


def group_alignment(gnn_params: Any, settings: AlignSettings, f_image: jax.Array,
                    f_short: jax.Array, f_long: jax.Array, node_noise: costs.Noise,
                    edge_noise: costs.Noise, dropout: jax.Array | None,
                    replay: imle.Replay = None) -> tuple[jax.Array, jax.Array]:
  """Per-group results for features [G, g, d] and explicit noise and dropout (keys or keep
  masks, shapes as in `pair_costs`): (L_m per modality [3, G], the solved matchings
  [S, 6, G, g, g]). `replay`: None (solve), or the (forward, backward) matchings
  [S, 6, G, g, g] to use instead of the solves (`imle.differentiable_matching`).

  Groups are independent given their noise and keys, so any subset of groups (the ones a
  device holds) gives the same per-group values as the whole batch: `train/` runs this per
  device inside a `shard_map`.
  """
  xs, ys = pair_features(f_image, f_short, f_long)
  unary, quadratic, edges = pair_costs(gnn_params, settings, xs, ys, node_noise, edge_noise,
                                       dropout)
  edges_b = jnp.broadcast_to(edges, unary.shape[:1] + edges.shape)
  matchings, _ = imle.differentiable_matching(settings.solver, unary, quadratic, edges_b,
                                              edges_b, replay)
  hamming = hamming_to_identity(matchings).mean(axis=0)            # [6, G]
  return (hamming[0::2] + hamming[1::2]) / 2.0, matchings          # [3, G]


def summarize(per_modality: jax.Array, matchings: jax.Array
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(mean over groups of L_align, aux) from `group_alignment`'s outputs.

  aux: `hamming_<modality>` (mean of its two directions), `matched_fraction`,
  `identity_fraction` (matched to itself), `matching` [g, g] (image -> c, mean over groups
  and samples: the dashboard image) and `matchings` [S, 6, G, g, g] (every solved matching,
  for tests and tools).
  """
  loss = per_modality.mean()
  g = matchings.shape[-1]
  solved = jax.lax.stop_gradient(matchings)
  aux = {f"hamming_{m}": per_modality[i].mean() for i, m in enumerate(MODALITIES)}
  aux["matched_fraction"] = solved.sum(axis=(-2, -1)).mean() / g
  aux["identity_fraction"] = jnp.trace(solved, axis1=-2, axis2=-1).mean() / g
  aux["matching"] = solved[:, 0].mean(axis=(0, 1))
  aux["matchings"] = solved
  return loss, aux


def alignment_from_noise(gnn_params: Any, settings: AlignSettings, f_image: jax.Array,
                         f_short: jax.Array, f_long: jax.Array, node_noise: costs.Noise,
                         edge_noise: costs.Noise, dropout_key: jax.Array | None, *,
                         dropout_keep: jax.Array | None = None, replay: imle.Replay = None
                         ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The loss and aux (`summarize`) for features [G, g, d] and explicit noise (shapes as in
  `pair_costs`); `dropout_key` None = GNN deterministic, unless the keep masks
  `dropout_keep` [2, 6, G, g, width] are given; `replay` as in `group_alignment`."""
  if dropout_keep is not None and dropout_key is not None:
    raise ValueError("give the GNN dropout as a key or as keep masks, not both")
  dropout = (dropout_keep if dropout_key is None
             else dropout_keys(dropout_key, f_image.shape[0]))
  return summarize(*group_alignment(gnn_params, settings, f_image, f_short, f_long,
                                    node_noise, edge_noise, dropout, replay))


def draw_noise(key: jax.Array, settings: AlignSettings, groups: int, g: int
               ) -> tuple[jax.Array, jax.Array]:
  """(node noise [S, G, g, g], edge noise [S, 6, G, E, E]) of `settings.noise` type."""
  e = g * settings.num_neighbors
  s = settings.samples
  node_key, edge_key = jax.random.split(key)
  node = costs.perturbation_noise(node_key, (s, groups, g, g), settings.noise,
                                  settings.gumbel_scale)
  edge = costs.perturbation_noise(edge_key, (s, len(PAIR_NAMES), groups, e, e),
                                  settings.noise, settings.gumbel_scale)
  return node, edge


def multi_graph_alignment_loss(gnn_params: Any, f_image: jax.Array, f_short: jax.Array,
                               f_long: jax.Array, key: jax.Array, settings: AlignSettings,
                               *, deterministic: bool = False
                               ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """L_align for features [G, g, d] (G groups of g samples); noise and dropout from `key`.

  `deterministic=True` turns GNN dropout off (noise stays: it is part of the method).
  """
  if not f_image.shape == f_short.shape == f_long.shape or f_image.ndim != 3:
    raise ValueError("features must all be [G, g, d], got "
                     f"{f_image.shape}, {f_short.shape}, {f_long.shape}")
  groups, g, _ = f_image.shape
  noise_key, dropout_key = jax.random.split(key)
  node, edge = draw_noise(noise_key, settings, groups, g)
  return alignment_from_noise(gnn_params, settings, f_image.astype(jnp.float32),
                              f_short.astype(jnp.float32), f_long.astype(jnp.float32),
                              node, edge, None if deterministic else dropout_key)
