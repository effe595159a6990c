"""LlavaModel against transformers' LlavaForConditionalGeneration (fp32, CPU, tiny config),
greedy KV-cache decoding against `generate`, text features, frozen tower, 7B parameter count."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import linen as nn

from configs import base, model_presets
from exgra_jax.models.config import LlavaConfig, LlmConfig, VisionConfig
from exgra_jax.models.decode import greedy_decode
from exgra_jax.models.llava import LlavaModel
from models_torch_weights import hf_llava_config, llava_params, stack_layers

TOL = 1e-4  # max-abs on logits, image features and text features
IMAGE_TOKEN = 63
CFG = LlavaConfig(
    vision=VisionConfig(image_size=28, patch_size=7, hidden_size=32, num_layers=3, num_heads=4,
                        intermediate_size=64),
    llm=LlmConfig(vocab_size=64, hidden_size=48, intermediate_size=80, num_layers=2,
                  num_heads=4, num_kv_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6),
    connector="none", projector="mlp2x_gelu")


@pytest.fixture(scope="module")
def pair():
  """(torch model, our params); a wide init so that greedy decoding does not repeat one token."""
  torch.manual_seed(0)
  model = transformers.LlavaForConditionalGeneration(
      hf_llava_config(CFG, IMAGE_TOKEN, initializer_range=0.3)).eval()
  return model, llava_params(model.state_dict(), CFG)


def _inputs(prompt_lengths=(24, 21)):
  """Right-padded prompts with the 16 image tokens at positions 3..18, NCHW pixels."""
  rng = np.random.RandomState(0)
  batch, length = len(prompt_lengths), max(prompt_lengths)
  ids = rng.randint(0, IMAGE_TOKEN - 1, (batch, length))
  ids[:, 3:3 + CFG.vision.num_patches] = IMAGE_TOKEN
  mask = (np.arange(length) < np.array(prompt_lengths)[:, None]).astype(np.int64)
  ids = ids * mask
  pixels = rng.randn(batch, 3, 28, 28).astype(np.float32)
  return ids, mask, pixels


def _apply(params, ids, mask, pixels, **kw):
  return LlavaModel(CFG).apply({"params": params}, ids, mask, ids == IMAGE_TOKEN,
                               pixels.transpose(0, 2, 3, 1), **kw)


def test_forward_with_images_matches_llava_for_conditional_generation(pair):
  model, params = pair
  ids, mask, pixels = _inputs()
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                pixel_values=torch.tensor(pixels))
    ref_features = model.model.get_image_features(pixel_values=torch.tensor(pixels))
  out = _apply(params, ids, mask, pixels)
  real = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(out["logits"])[real], ref.logits.numpy()[real],
                             atol=TOL, rtol=0)
  ref_features = torch.stack(ref_features.pooler_output).numpy()  # one [N, d] per image
  np.testing.assert_allclose(np.asarray(out["image_features"]), ref_features, atol=TOL, rtol=0)


def test_greedy_decode_is_token_identical_to_generate(pair):
  model, params = pair
  ids, mask, pixels = _inputs((24, 20))
  new = 12
  ours = np.asarray(greedy_decode(
      LlavaModel(CFG), params, ids, mask, ids == IMAGE_TOKEN, pixels.transpose(0, 2, 3, 1),
      max_new_tokens=new, eos_id=-1, pad_id=0))
  for b in range(2):  # HF generates right-padded batches wrongly, so one prompt at a time
    real = mask[b].astype(bool)
    with torch.no_grad():
      ref = model.generate(input_ids=torch.tensor(ids[b:b + 1, real]),
                           attention_mask=torch.tensor(mask[b:b + 1, real]),
                           pixel_values=torch.tensor(pixels[b:b + 1]), do_sample=False,
                           max_new_tokens=new, eos_token_id=None, pad_token_id=0)
    expected = ref[0, real.sum():].numpy()
    assert len(set(expected)) > 3, "degenerate reference: test would prove little"
    np.testing.assert_array_equal(ours[b], expected)


def test_greedy_decode_pads_after_eos(pair):
  _, params = pair
  ids, mask, pixels = _inputs((24, 20))
  args = (LlavaModel(CFG), params, ids, mask, ids == IMAGE_TOKEN, pixels.transpose(0, 2, 3, 1))
  free = np.asarray(greedy_decode(*args, max_new_tokens=8, eos_id=-1, pad_id=0))
  eos = int(free[0, 3])
  stop = int(np.argmax(free[0] == eos))
  stopped = np.asarray(greedy_decode(*args, max_new_tokens=8, eos_id=eos, pad_id=-7))
  np.testing.assert_array_equal(stopped[0, :stop + 1], free[0, :stop + 1])
  assert (stopped[0, stop + 1:] == -7).all()


def test_text_features_match_the_torch_language_model(pair):
  """The default mode's masked mean (the release mode: tests/test_align_node_features.py)."""
  model, params = pair
  ids, mask, _ = _inputs()
  ids = np.where(ids == IMAGE_TOKEN, 5, ids)
  with torch.no_grad():
    hidden = model.model.language_model(input_ids=torch.tensor(ids),
                                        attention_mask=torch.tensor(mask)).last_hidden_state
  hidden = hidden.numpy()
  expected = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
  ours = LlavaModel(CFG).apply({"params": params}, ids, mask,
                               method=LlavaModel.text_features)
  np.testing.assert_allclose(np.asarray(ours), expected, atol=TOL, rtol=0)
  # row 1 is padded: a mean over all positions would differ there
  assert np.abs(np.asarray(ours)[1] - hidden[1].mean(0)).max() > 1e-3


def test_vision_tower_gets_no_gradient_and_the_projector_does(pair):
  _, params = pair
  ids, mask, pixels = _inputs()

  def loss(p):
    out = _apply(p, ids, mask, pixels)
    return out["logits"].mean() + out["image_features"].mean()

  grads = jax.grad(loss)(params)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads["vision"]))
  assert float(jnp.abs(grads["projector"]["linear_0"]["kernel"]).max()) > 0


def test_bad_inputs_are_named(pair):
  _, params = pair
  ids, mask, pixels = _inputs()
  with pytest.raises(ValueError, match="attention_mask shape"):
    _apply(params, ids, mask[:, :5], pixels)
  with pytest.raises(ValueError, match="pixel_values has 1 images for 2 token rows"):
    _apply(params, ids, mask, pixels[:1])
  with pytest.raises(ValueError, match="mode='mean' is not one of"):
    LlavaModel(CFG).apply({"params": params}, ids, mask, mode="mean",
                          method=LlavaModel.text_features)


def test_bfloat16_compute_stays_close_to_float32(pair):
  _, params = pair
  ids, mask, pixels = _inputs()
  cfg = LlavaConfig(vision=dataclasses.replace(CFG.vision, dtype="bfloat16"),
                    llm=dataclasses.replace(CFG.llm, dtype="bfloat16"),
                    connector=CFG.connector, projector=CFG.projector)
  f32 = _apply(params, ids, mask, pixels)["logits"]
  bf16 = LlavaModel(cfg).apply({"params": params}, ids, mask, ids == IMAGE_TOKEN,
                               pixels.transpose(0, 2, 3, 1))["logits"]
  assert bf16.dtype == jnp.float32
  scale = float(jnp.abs(f32).max())
  assert float(jnp.abs(bf16 - f32).max()) < 0.05 * scale


def _torch_parameter_count(cfg: LlavaConfig) -> int:
  with torch.device("meta"):
    model = transformers.LlavaForConditionalGeneration(hf_llava_config(cfg, cfg.llm.vocab_size - 1))
  return sum(p.numel() for p in model.parameters())


def test_llava_med_7b_parameter_count_equals_transformers():
  cfg = LlavaConfig.from_config(model_presets.llava_med_7b())
  size = cfg.vision.image_size
  shapes = jax.eval_shape(LlavaModel(cfg).init, jax.random.key(0),
                          jnp.zeros((1, 8), jnp.int32), jnp.ones((1, 8), jnp.int32),
                          jnp.zeros((1, 8), bool), jnp.zeros((1, size, size, 3)))["params"]
  ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  assert ours == _torch_parameter_count(cfg) == 7_062_607_872


def test_logical_axes_map_onto_the_base_mesh_without_conflicts():
  """Every parameter's logical names become a valid PartitionSpec under the base rules."""
  for preset in ("tiny", "llava_med_7b"):
    cfg = LlavaConfig.from_config(model_presets.get(preset))
    size = cfg.vision.image_size
    boxed = jax.eval_shape(LlavaModel(cfg).init, jax.random.key(0),
                           jnp.zeros((1, 8), jnp.int32), jnp.ones((1, 8), jnp.int32),
                           jnp.zeros((1, 8), bool), jnp.zeros((1, size, size, 3)))["params"]
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1),
                             ("data", "fsdp", "tensor"))
    rules = base.get_config().logical_axis_rules
    specs = nn.get_partition_spec(boxed)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
    assert set(boxed) == {"vision", "projector", "llm"}
    kernel = shardings["llm"]["layers"]["mlp"]["gate_proj"]["kernel"] if cfg.llm.scan_layers \
        else shardings["llm"]["layers_0"]["mlp"]["gate_proj"]["kernel"]
    assert kernel.spec == jax.sharding.PartitionSpec(
        *(((None,) if cfg.llm.scan_layers else ()) + ("fsdp", "tensor")))


def test_greedy_decode_with_scanned_rematerialised_layers(pair):
  """The 7B preset's layout (scan + remat) decodes the same tokens as the unscanned one."""
  _, params = pair
  ids, mask, pixels = _inputs((24, 20))
  scanned = dataclasses.replace(CFG, llm=dataclasses.replace(CFG.llm, scan_layers=True,
                                                             remat="full"))
  stacked = dict(params, llm=stack_layers(params["llm"], CFG.llm.num_layers))
  args = (ids, mask, ids == IMAGE_TOKEN, pixels.transpose(0, 2, 3, 1))
  kw = dict(max_new_tokens=6, eos_id=-1, pad_id=0)
  np.testing.assert_array_equal(greedy_decode(LlavaModel(scanned), stacked, *args, **kw),
                                greedy_decode(LlavaModel(CFG), params, *args, **kw))
