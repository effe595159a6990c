"""CLIP-style contrastive pre-training of a randomly initialised vision tower (demo only).

Why: LLaVA / LLaVA-Med (and ExGra-Med) start from a *pretrained* CLIP tower and keep it
frozen in every stage. The demo downloads nothing, so its tower would be random and
frozen, and a random 4-layer width-64 ViT delivers features from which the tiny LM does
not learn lesions, counts or sides in minutes (docs/data_efficiency.md, first run: every
model answered the yes/no questions with one word). As CLIP was pre-trained on
image-caption pairs before LLaVA used it, the demo pre-trains its tower for a few hundred
steps on the stage-1 image / caption pairs, then the recipe freezes it as the release does.

Objective: symmetric InfoNCE (CLIP) between
- the image embedding: mean over the patch tokens the projector reads
  (`connector_features`, i.e. `vision.select_layer` without CLS), LayerNorm, linear. CLIP
  pools the last layer's CLS token instead; pooling what the LLM reads makes exactly those
  features carry what the captions say;
- the caption embedding: mean of learned token embeddings (a bag of tokens), LayerNorm,
  linear. The demo's captions list attributes (modality, organ, count, size, side), word
  order adds little, and a bag needs no second transformer;
- multi-positive targets: pairs in a batch with the very same caption are positives of
  each other (the demo world has ~65 distinct captions, so a batch of 64 holds many
  duplicates; one-hot targets would push identical images apart);
- a learned temperature (CLIP's init 1 / 0.07, logit scale capped at 100).

The result is a params-only checkpoint (`loading.save_params`) of the whole model: the
pre-trained tower, everything else drawn at random from `config.seed` as a random start
would be. The first stage of the recipe starts from it (`initial_weights.source_for`), and
a run started again finds it and does not pre-train twice. The text side and the heads
are thrown away, as LLaVA throws away CLIP's text tower.
"""
from __future__ import annotations

import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from exgra_jax import run_paths
from exgra_jax.data import images, records, text
from exgra_jax.models import llava
from exgra_jax.models.config import LlavaConfig
from exgra_jax.models.connector import connector_features
from exgra_jax.models.vit import ClipVisionTower
from exgra_jax.weights import loading


class ContrastiveModel(nn.Module):
  """(pixels [B, S, S, 3], tokens [B, T], token mask [B, T]) -> unit image and caption
  embeddings [B, E] each, and the logit scale (a scalar)."""
  cfg: LlavaConfig
  embed_dim: int

  @nn.compact
  def __call__(self, pixels: jax.Array, tokens: jax.Array, mask: jax.Array):
    features = connector_features(ClipVisionTower(self.cfg.vision, name="vision")(pixels),
                                  self.cfg)                                   # [B, N, C]
    image = nn.Dense(self.embed_dim, name="image_head")(
        nn.LayerNorm(name="image_norm")(features.mean(axis=1)))
    embedded = nn.Embed(self.cfg.llm.vocab_size, self.embed_dim, name="token_embedding")(tokens)
    weights = mask[..., None].astype(embedded.dtype)
    bag = (embedded * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1.0)
    caption = nn.Dense(self.embed_dim, name="text_head")(nn.LayerNorm(name="text_norm")(bag))
    scale = self.param("logit_scale", nn.initializers.constant(np.log(1 / 0.07)), ())
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True).clip(1e-6)
    return unit(image), unit(caption), jnp.exp(jnp.minimum(scale, np.log(100.0)))


def contrastive_loss(image: jax.Array, caption: jax.Array, scale: jax.Array,
                     caption_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Symmetric multi-positive InfoNCE of unit embeddings [B, E]; caption_ids [B] (equal id =
  equal caption = positive pair). -> (loss, top-1 image->caption retrieval accuracy, where
  any caption equal to the image's own counts as right)."""
  logits = scale * image @ caption.T                                          # [B, B]
  same = (caption_ids[:, None] == caption_ids[None, :]).astype(logits.dtype)
  targets = same / same.sum(axis=1, keepdims=True)
  loss = (optax.softmax_cross_entropy(logits, targets).mean()
          + optax.softmax_cross_entropy(logits.T, targets).mean()) / 2
  accuracy = jnp.take_along_axis(same, logits.argmax(axis=1)[:, None], axis=1).mean()
  return loss, accuracy


def load_pairs(config: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                           np.ndarray]:
  """The stage-1 records as arrays: pixels [N, S, S, 3] float32 (CLIP-normalised), caption
  tokens [N, T] int32, their mask [N, T] bool, caption ids [N] int32 (index of the distinct
  caption text). The caption is the record's last answer."""
  stage = config.stage1
  recs, _ = records.load_records(run_paths.resolve_path(config.data.root, stage.records))
  image_root = run_paths.resolve_path(config.data.root, stage.image_root)
  size = config.model.vision.image_size
  pixels = np.stack([images.clip_input((image_root / r.image).read_bytes(), size)
                     for r in recs])
  captions = [[t.value for t in r.conversations if t.role == "gpt"][-1] for r in recs]
  tok = text.load_tokenizer(run_paths.tokenizer_dir(config), config.model.image_tokens)
  encoded = [text.encode(tok, c).ids[:config.data.text_max_length] for c in captions]
  length = max(len(ids) for ids in encoded)
  tokens = np.zeros((len(encoded), length), np.int32)
  mask = np.zeros((len(encoded), length), bool)
  for i, ids in enumerate(encoded):
    tokens[i, :len(ids)], mask[i, :len(ids)] = ids, True
  distinct = {c: i for i, c in enumerate(sorted(set(captions)))}
  return pixels, tokens, mask, np.array([distinct[c] for c in captions], np.int32)


def pretrain(config: ml_collections.ConfigDict) -> tuple[dict[str, Any], dict[str, float]]:
  """Trains the tower contrastively; -> (vision params, final metrics)."""
  vp = config.vision_pretrain
  cfg = LlavaConfig.from_config(config.model)
  pixels, tokens, mask, caption_ids = load_pairs(config)
  count = len(pixels)
  batch = min(vp.global_batch, count)
  model = ContrastiveModel(cfg, vp.embed_dim)
  key = jax.random.PRNGKey(config.seed)
  params = nn.unbox(model.init(key, pixels[:1], tokens[:1], mask[:1])["params"])
  schedule = optax.warmup_cosine_decay_schedule(0.0, vp.lr, max(1, vp.steps // 20), vp.steps)
  tx = optax.chain(optax.clip_by_global_norm(config.optim.clip_norm),
                   optax.adamw(schedule, weight_decay=vp.weight_decay))
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, opt_state, px, tok, msk, ids):
    def loss_fn(p):
      image, caption, scale = model.apply({"params": p}, px, tok, msk)
      return contrastive_loss(image, caption, scale, ids)
    (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, accuracy

  order = np.random.default_rng(config.seed)
  perm, at, start = order.permutation(count), 0, time.time()
  logging.info("vision pre-training: %d steps of %d image/caption pairs (%d distinct "
               "captions) from %s", vp.steps, batch, len(set(caption_ids.tolist())), count)
  history = []
  for step in range(1, vp.steps + 1):
    if at + batch > count:
      perm, at = order.permutation(count), 0
    idx = np.sort(perm[at:at + batch])
    at += batch
    params, opt_state, loss, accuracy = train_step(
        params, opt_state, pixels[idx], tokens[idx], mask[idx], caption_ids[idx])
    history.append((loss, accuracy))
    if step % config.train.log_every == 0 or step == vp.steps:
      recent = np.asarray(jax.device_get(history[-config.train.log_every:]))
      logging.info("vision_pretrain step %d/%d  loss %.4f  caption retrieval %.3f  %.1f s",
                   step, vp.steps, recent[:, 0].mean(), recent[:, 1].mean(),
                   time.time() - start)
  recent = np.asarray(jax.device_get(history[-config.train.log_every:]))
  return params["vision"], {"steps": vp.steps, "loss": float(recent[:, 0].mean()),
                            "caption_retrieval": float(recent[:, 1].mean()),
                            "seconds": time.time() - start}


def ensure_checkpoint(config: ml_collections.ConfigDict, path: str) -> None:
  """Writes the whole-model params checkpoint at `path` unless it exists (module docstring)."""
  if os.path.isdir(path):
    logging.info("vision pre-training: found %s", path)
    return
  vision, summary = pretrain(config)
  cfg = LlavaConfig.from_config(config.model)
  params = nn.unbox(llava.init_boxed_params(cfg, jax.random.PRNGKey(config.seed)))
  params = {**params, "vision": vision}
  loading.save_params(path, jax.device_get(params), config.model)
  logging.info("vision pre-training: %s written (final loss %.4f, caption retrieval %.3f, "
               "%.0f s)", path, summary["loss"], summary["caption_retrieval"],
               summary["seconds"])
