"""Parity of the Flax CLIP tower with transformers' CLIPVisionModel (fp32, CPU)."""
import jax
import numpy as np
import pytest
import torch
import transformers

from exgra_jax.models.config import VisionConfig
from exgra_jax.models.vit import ClipVisionTower
from models_torch_weights import clip_params, hf_clip_config

TOL = 1e-4  # max-abs on every hidden state
CFG = VisionConfig(image_size=28, patch_size=7, hidden_size=32, num_layers=3, num_heads=4,
                   intermediate_size=64)


def test_all_hidden_states_match_clip_vision_model():
  torch.manual_seed(0)
  model = transformers.CLIPVisionModel(hf_clip_config(CFG)).eval()
  params = clip_params(model.state_dict(), CFG)
  pixels = np.random.RandomState(0).randn(2, 3, 28, 28).astype(np.float32)
  with torch.no_grad():
    ref = model(pixel_values=torch.tensor(pixels), output_hidden_states=True).hidden_states
  ours = ClipVisionTower(CFG).apply({"params": params}, pixels.transpose(0, 2, 3, 1))
  assert len(ours) == len(ref) == CFG.num_layers + 1
  for i, (a, b) in enumerate(zip(ours, ref)):
    assert a.shape == (2, CFG.num_patches + 1, CFG.hidden_size)
    np.testing.assert_allclose(np.asarray(a), b.numpy(), atol=TOL, rtol=0, err_msg=f"hs[{i}]")


@pytest.mark.parametrize("shape", [(2, 3, 28, 28), (2, 28, 28), (2, 56, 56, 3)])
def test_wrong_pixel_layout_is_named(shape):
  with pytest.raises(ValueError, match=r"pixel_values must be \[B, 28, 28, 3\]"):
    ClipVisionTower(CFG).init(jax.random.key(0), np.zeros(shape, np.float32))
