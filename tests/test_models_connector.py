"""Dense connectors and projectors: shapes and hand-worked values."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from exgra_jax.models.config import LlavaConfig, LlmConfig, VisionConfig, num_image_tokens
from exgra_jax.models.connector import Projector, connector_features
from exgra_jax.models.llava import LlavaModel

# 4-layer tower, 16 patches (+ CLS), width 2; hs[i][b, t, :] = 100 i + t.
VISION = VisionConfig(image_size=28, patch_size=7, hidden_size=2, num_layers=4, num_heads=1,
                      intermediate_size=4)
LLM = LlmConfig(vocab_size=8, hidden_size=2, intermediate_size=4, num_layers=1, num_heads=1,
                num_kv_heads=1)
HIDDEN = tuple(jnp.broadcast_to((100.0 * i + jnp.arange(17.0))[None, :, None], (3, 17, 2))
               for i in range(5))
T = np.arange(1.0, 17.0)  # patch token indices (CLS at 0 is dropped)


def _cfg(connector: str, projector: str = "linear") -> LlavaConfig:
  return LlavaConfig(vision=VISION, llm=LLM, connector=connector, connector_layers=(1, 2),
                     projector=projector)


def test_none_selects_layer_minus_two_without_cls():
  out = connector_features(HIDDEN, _cfg("none"))
  assert out.shape == (3, 16, 2)
  np.testing.assert_array_equal(out[0, :, 0], 300 + T)


def test_dci_concatenates_selected_and_the_two_half_means():
  out = connector_features(HIDDEN, _cfg("dci"))
  assert out.shape == (3, 16, 6)
  # hs[3]; mean(hs[0], hs[1]) = 50 + t; mean(hs[2], hs[3]) = 250 + t.
  np.testing.assert_array_equal(out[1, :, ::2], np.stack([300 + T, 50 + T, 250 + T], -1))


def test_sci_concatenates_selected_and_connector_layers():
  out = connector_features(HIDDEN, _cfg("sci"))
  assert out.shape == (3, 16, 6)
  np.testing.assert_array_equal(out[2, :, 1::2], np.stack([300 + T, 100 + T, 200 + T], -1))


def test_sti_appends_token_pools_of_eight():
  cfg = _cfg("sti")
  out = connector_features(HIDDEN, cfg)
  assert out.shape == (3, num_image_tokens(cfg), 2) == (3, 20, 2)
  np.testing.assert_array_equal(out[0, :16, 0], 300 + T)
  np.testing.assert_array_equal(out[0, 16:, 0], [104.5, 112.5, 204.5, 212.5])


def test_wrong_number_of_hidden_states_is_named():
  with pytest.raises(ValueError, match="expected 5 hidden states, got 4"):
    connector_features(HIDDEN[:4], _cfg("none"))


@pytest.mark.parametrize("projector, depth", [("linear", 1), ("mlp2x_gelu", 2),
                                              ("mlp3x_gelu", 3)])
def test_projector_depth_and_shapes(projector, depth):
  cfg = _cfg("sci", projector)
  params = Projector(cfg).init(jax.random.key(0), jnp.zeros((1, 16, 6)))["params"]
  assert sorted(params) == [f"linear_{i}" for i in range(depth)]
  assert params["linear_0"]["kernel"].value.shape == (6, 2)
  assert all(params[f"linear_{i}"]["kernel"].value.shape == (2, 2) for i in range(1, depth))


def test_mlp2x_gelu_uses_exact_gelu_between_the_layers():
  identity = {"kernel": jnp.eye(2), "bias": jnp.zeros(2)}
  params = {"linear_0": identity, "linear_1": identity}
  out = Projector(_cfg("none", "mlp2x_gelu")).apply({"params": params}, jnp.array([[[1., -1.]]]))
  # torch.nn.GELU()(tensor([1., -1.])) = [0.8413447, -0.1586553] (erf, not tanh).
  np.testing.assert_allclose(out[0, 0], [0.8413447, -0.1586553], atol=1e-6)


def test_identity_projector_has_no_parameters_and_passes_through():
  cfg = _cfg("none", "identity")
  x = jnp.arange(6.0).reshape(1, 3, 2)
  assert Projector(cfg).init(jax.random.key(0), x) == {}
  np.testing.assert_array_equal(Projector(cfg).apply({}, x), x)


@pytest.mark.parametrize("connector", ["none", "dci", "sci", "sti"])
def test_llava_forward_with_each_connector(connector):
  """End to end: N image tokens in the prompt, projector width from the connector."""
  cfg = LlavaConfig(vision=dataclasses.replace(VISION, hidden_size=8, num_heads=2),
                    llm=dataclasses.replace(LLM, hidden_size=16, num_heads=2, num_kv_heads=1),
                    connector=connector, connector_layers=(1, 2), projector="mlp2x_gelu")
  n = num_image_tokens(cfg)
  ids = np.zeros((2, n + 4), np.int32)
  image_mask = np.zeros_like(ids, bool)
  image_mask[:, 2:2 + n] = True
  args = (ids, np.ones_like(ids), image_mask, np.ones((2, 28, 28, 3), np.float32))
  variables = LlavaModel(cfg).init(jax.random.key(0), *args)
  out = LlavaModel(cfg).apply(variables, *args)
  assert out["logits"].shape == (2, n + 4, 8)
  assert out["image_features"].shape == (2, n, 16)
  width = 24 if connector in ("dci", "sci") else 8
  assert variables["params"]["projector"]["linear_0"]["kernel"].value.shape == (width, 16)
