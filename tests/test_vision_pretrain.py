"""Contrastive pre-training of the demo's vision tower (train/vision_pretrain.py)."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from exgra_jax import run_config
from exgra_jax.models import llava
from exgra_jax.models.config import LlavaConfig
from exgra_jax.train import vision_pretrain
from exgra_jax.weights import loading

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _unit(x):
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def test_loss_counts_identical_captions_as_positives():
  ids = jnp.array([0, 0, 1, 2])
  caption = _unit(jax.random.normal(jax.random.key(0), (3, 8)))[ids]   # rows 0, 1 equal
  matched, accuracy = vision_pretrain.contrastive_loss(caption, caption, 50.0, ids)
  swapped, wrong = vision_pretrain.contrastive_loss(caption[::-1], caption, 50.0, ids)
  assert float(accuracy) == 1.0 and float(wrong) < 1.0
  # Two equal captions share the target mass: the loss of a perfect match is log 2 on those
  # rows (the two columns are tied), not a penalty for the duplicate.
  assert float(matched) < np.log(2) / 2 + 1e-3 < float(swapped)


def test_pretraining_learns_and_fits_the_model(demo_world):
  config = run_config.load(os.path.join(REPO, "configs", "demo.py:small"),
                              [f"data.root={demo_world}", "vision_pretrain.steps=40",
                               "vision_pretrain.global_batch=32", "train.log_every=10"])
  vision, summary = vision_pretrain.pretrain(config)
  # 120 images, ~60 distinct captions, batches of 32: chance retrieval is ~0.05.
  assert summary["caption_retrieval"] > 0.2, summary
  expected = jax.eval_shape(lambda: nn.unbox(llava.init_boxed_params(
      LlavaConfig.from_config(config.model), jax.random.key(0))))["vision"]
  assert (jax.tree_util.tree_map(np.shape, vision)
          == jax.tree_util.tree_map(lambda x: x.shape, expected))


def test_stage1_starts_from_the_pretrained_tower_and_keeps_it_frozen(demo_world, tmp_path):
  workdir = tmp_path / "run"
  out = subprocess.run(
      [sys.executable, "-m", "exgra_jax.main", "--config=configs/demo.py:small",
       f"--workdir={workdir}", f"--config.data.root={demo_world}",
       "--config.stages=('stage1',)", "--config.stage1.max_steps=2",
       "--config.vision_pretrain.steps=3", "--config.export.after_training=False"],
      cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  pretrained = workdir / "checkpoints" / "vision_pretrain"
  assert f"stage stage1 starts from {pretrained}" in out.stderr
  before = loading.load(str(pretrained)).params
  after = loading.load(str(workdir / "checkpoints" / "stage1")).params
  for a, b in zip(jax.tree_util.tree_leaves(before["vision"]),
                  jax.tree_util.tree_leaves(after["vision"])):
    np.testing.assert_array_equal(a, b)


def test_only_a_random_start_is_pretrained():
  config = run_config.load(os.path.join(REPO, "configs", "demo.py"),
                              ["init.random=False", "init.hf_dir=/weights/llava"])
  with pytest.raises(run_config.ConfigError, match="vision_pretrain.steps > 0 pre-trains"):
    run_config.validate(config, num_devices=1)
  config = run_config.load(os.path.join(REPO, "configs", "demo.py"),
                              ["init.random=False", "init.hf_dir=/weights/llava",
                               "vision_pretrain.steps=0"])
  run_config.validate(config, num_devices=1)
