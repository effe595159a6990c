"""Typed model config: round trip with `config.model`, image-token counts, bad values."""
import json

import ml_collections
import pytest

from configs import model_presets
from exgra_jax.models.config import LlavaConfig, num_image_tokens, projector_input_width


@pytest.mark.parametrize("preset", sorted(model_presets.PRESETS))
def test_round_trip_through_json_keeps_every_field(preset):
  model = model_presets.get(preset)
  cfg = LlavaConfig.from_config(model)
  saved = json.loads(json.dumps(cfg.to_dict()))
  assert saved == json.loads(json.dumps(model.to_dict()))
  assert LlavaConfig.from_config(ml_collections.ConfigDict(saved)) == cfg


@pytest.mark.parametrize("connector, tokens, width", [
    ("none", 256, 1024), ("dci", 256, 3072), ("sci", 256, 3072), ("sti", 320, 1024)])
def test_image_tokens_and_projector_width_at_224px(connector, tokens, width):
  model = model_presets.llava_med_7b()
  model.connector = connector
  assert num_image_tokens(model) == tokens
  assert projector_input_width(model) == width
  assert num_image_tokens(LlavaConfig.from_config(model)) == tokens


@pytest.mark.parametrize("field, value, message", [
    ("connector", "dense", "connector='dense'"),
    ("projector", "mlp2x_relu", "projector='mlp2x_relu'"),
    ("projector", "identity", "projector='identity' needs the connector width"),
    ("connector_layers", (1, 9), "connector_layers=(1, 9)"),
    ("remat", "some", "remat='some'"),
])
def test_bad_values_are_named_in_the_error(field, value, message):
  model = model_presets.tiny()
  model.connector = "sci" if field == "connector_layers" else model.connector
  model[field] = value
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    LlavaConfig.from_config(model)


def test_bad_rope_scaling_and_heads_are_named():
  model = model_presets.tiny()
  model.llm.rope_scaling = json.dumps({"rope_type": "longrope"})
  model.llm.num_kv_heads = 3
  with pytest.raises(ValueError, match="num_kv_heads=3.*rope_scaling type 'longrope'"):
    LlavaConfig.from_config(model)


def test_unknown_field_is_rejected():
  model = model_presets.tiny()
  model.llm.rope_base = 1.0
  with pytest.raises(ValueError, match="rope_base"):
    LlavaConfig.from_config(model)
