"""The alignment loss's node features of explicit records, computed as training computes them.

`align/equivalence.py` holds the loss against the release from the node features on; this
covers the step before: which texts are embedded, how they are tokenised, padded and
masked, and how positions are averaged into f_S and f_L (docs/align.md). Dump the release's
`merge_sentence_id(_long)`, attention masks and text features for some records and
compare them with `node_features(model_dir, records, text_mode="release")`.

Why in `eval/`: the entry point loads a model directory (weights/loading.py, which
imports HF directories through hf/), and `align/` imports neither `models/` nor the weight
loaders. `eval/` is the lowest layer that sees the loaders and the ground packages.

Same code as training, not a re-implementation: the texts and their ids / masks come from
`data.pipeline.alignment_example` (data/text.py), f_S and f_L from
`LlavaModel.text_features` and f_I from `models.llava.image_node_features`, as in
train/step.py. The model has no dropout. The ids are cut after the longest text of each kind
(the release's collator padded to it); training's wider arrays (`data.text_max_length`)
give the same features: with causal attention the trailing padding cannot reach earlier
positions, and neither mode averages past the group's longest text.

    out = node_features("/weights/exgra-med", records, text_mode="release",
                        image_features=projector_outputs)
    out["short_ids"], out["short_mask"]: [B, Ts] int32 (likewise `long_*`, [B, Tl])
    out["f_short"], out["f_long"]: [B, d] float32; out["f_image"]: [B, d] float32 when
      projector outputs or pixels are given
"""
from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from exgra_jax.data import pipeline, text
from exgra_jax.eval import report
from exgra_jax.hf.placement import typed_config
from exgra_jax.models.llava import LlavaModel, image_node_features
from exgra_jax.weights import loading

RELEASE_MAX_LENGTH = 2048  # the release's tokenizer.model_max_length


def _stack_texts(examples: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
  """`{key}_ids` / `{key}_mask` of the examples -> [B, T] each, cut after the last column
  that holds a real token of any row."""
  ids = np.stack([e[f"{key}_ids"] for e in examples])
  mask = np.stack([e[f"{key}_mask"] for e in examples])
  width = int(np.flatnonzero(mask.any(axis=0)).max(initial=0)) + 1
  return ids[:, :width], mask[:, :width]


def node_features(model_dir: str, records: Sequence[Mapping[str, Any]], *,
                  text_mode: str = "default", image_features: Any = None,
                  pixel_values: Any = None, max_length: int = RELEASE_MAX_LENGTH,
                  group_size: int = 0, clip_dir: str | None = None,
                  tokenizer_dir: str | None = None) -> dict[str, np.ndarray]:
  """f_S, f_L (and f_I) of `records` with the model in `model_dir`.

  Args:
    model_dir: anything `loading.load` reads: an HF directory (LLaVA, release,
      plain LLaMA), a train step or stage directory, a params-only checkpoint. Without
      pixels only the LLM is loaded, so a plain LLaMA needs no CLIP directory.
    records: LLaVA-Med records (`conversations`, optionally `conversations_long`; without
      it the long text is the short one, as in training).
    text_mode: `default` or `release` (`config.align.text_mode`, docs/align.md).
    image_features: projector outputs [B, N, d] -> f_I, their mean over N.
    pixel_values: CLIP-preprocessed images [B, S, S, 3] -> f_I through the model's tower
      and projector (needs a model with its tower).
    max_length: tokens kept per text (training: `data.text_max_length`).
    group_size: release padding groups of consecutive records (0 = all records, one
      release per-device batch); `default` does not depend on it.
    clip_dir, tokenizer_dir: as `loading.load` takes them (a train checkpoint
      holds no tokenizer).
  Returns:
    {"short_ids", "short_mask", "long_ids", "long_mask": [B, T] int32,
     "f_short", "f_long": [B, d] float32, and "f_image": [B, d] float32 when given}.
  """
  if image_features is not None and pixel_values is not None:
    raise ValueError("give projector outputs (image_features) or pixel_values, not both")
  images = image_features if image_features is not None else pixel_values
  if images is not None and len(images) != len(records):
    raise ValueError(f"{len(images)} images for {len(records)} records")
  loaded = loading.load(model_dir, tokenizer_dir=tokenizer_dir, clip_dir=clip_dir,
                                 text_only=pixel_values is None)
  loading.require_complete_weights(loaded.report)
  if loaded.tokenizer_dir is None:
    raise ValueError(f"{model_dir} holds no tokenizer: pass tokenizer_dir")
  model = LlavaModel(typed_config(loaded.model_config))
  tok = text.load_tokenizer(loaded.tokenizer_dir, model.cfg.image_tokens)
  examples = [pipeline.alignment_example(tok, record, max_length=max_length, mode=text_mode)
              for record in records]
  variables = {"params": loaded.params}
  features = jax.jit(functools.partial(model.apply, method="text_features", mode=text_mode,
                                       group_size=group_size))
  out = {}
  for key in ("short", "long"):
    ids, mask = _stack_texts(examples, key)
    out.update({f"{key}_ids": ids, f"{key}_mask": mask,
                f"f_{key}": np.asarray(features(variables, ids, mask))})
  if pixel_values is not None:
    image_features = jax.jit(functools.partial(model.apply, method="image_features"))(
        variables, jnp.asarray(pixel_values, jnp.float32))
  if image_features is not None:
    out["f_image"] = np.asarray(image_node_features(jnp.asarray(image_features)))
  return out
