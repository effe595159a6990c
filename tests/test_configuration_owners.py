"""Start-up validation asks each rule's owner (issue 24): for many settings, validation and
the owner give the same answer, and both match an independent reference.

- model settings: `validate` reports a `model.` problem exactly when `LlavaConfig` refuses;
- image tokens: the count validation uses equals what the tokenizer really produces for
  one image (both image-token styles, `feature_select="full"`, the `sti` connector), and
  `data.max_length` is refused exactly when no text token fits after them;
- alignment groups: every grouping, `group_size` 0 included, on odd meshes: validation
  accepts exactly when an exhaustive layout of the samples on the batch shards works;
- the mesh: refused exactly when `train/mesh.py` cannot fill it.
"""
import itertools
import os

import pytest

import data_fixtures
from exgra_jax import run_config
from exgra_jax.align import costs, loss as align_loss
from exgra_jax.data import records, text
from exgra_jax.models import config as model_config
from exgra_jax.train import alignment_sharding, mesh as mesh_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(*overrides: str):
  return run_config.load(os.path.join(REPO, "configs", "demo.py:small"), overrides)


def _problems(config, num_devices=1) -> list[str]:
  try:
    run_config.validate(config, num_devices=num_devices)
  except run_config.ConfigError as e:
    return str(e).split("\n  - ")[1:]
  return []


def test_choice_copies_equal_their_owners():
  assert run_config.CHOICES["align.grouping"] == align_loss.GROUPINGS
  assert run_config.CHOICES["align.imle_noise"] == costs.NOISE_KINDS
  assert run_config.CHOICES["align.text_mode"] == text.ALIGNMENT_TEXT_MODES


MODEL_CASES = [
    (),
    ("model.vision.feature_select=full",),
    ("model.vision.feature_select=full", "model.connector=sti"),
    ("model.vision.feature_select=every",),
    ("model.connector=sti",),
    ("model.connector=sti", "model.vision.image_size=70", "model.vision.patch_size=14"),
    ("model.vision.image_size=50",),
    ("model.vision.num_heads=5",),
    ("model.vision.select_layer=-30",),
    ("model.connector=sci", "model.connector_layers=(1,40)"),
    ("model.projector=identity",),
    ("model.projector=mlp3x_gelu",),
    ("model.projector=mlp_gelu",),
    ("model.llm.num_kv_heads=3",),
    ("model.llm.num_heads=3",),
    ("model.llm.num_heads=3", "model.llm.head_dim=16"),
    ("model.llm.rope_scaling={\"rope_type\":\"linear\",\"factor\":2.0}",),
    ("model.llm.rope_scaling={\"rope_type\":\"quadratic\"}",),
    ("model.llm.rope_scaling=[1]",),
    ("model.attention=cudnn",),
    ("model.attention=cudnn", "model.dtype=bfloat16"),
    ("model.image_tokens=image",),
    ("model.image_tokens=patches",),
]


@pytest.mark.parametrize("overrides", MODEL_CASES, ids=lambda o: " ".join(o) or "demo")
def test_model_validation_is_the_model_configs_answer(overrides):
  config = _cfg(*overrides, "data.max_length=4096", "data.length_buckets=(4096,)",
                "model.llm.max_position_embeddings=4096")
  try:
    model_config.LlavaConfig.from_config(config.model)
    owner_refuses = False
  except ValueError:
    owner_refuses = True
  model_problems = [p for p in _problems(config) if p.startswith("model")]
  assert bool(model_problems) == owner_refuses, model_problems


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
  tok = data_fixtures.sentencepiece_tokenizer(tmp_path_factory.mktemp("tok"))
  return {style: tok for style in model_config.IMAGE_TOKEN_STYLES}


def _tokens_of_one_image(tok, n: int, style: str) -> int:
  """Positions of a tokenised conversation with one image that hold the image's tokens
  (its patches and the tokens around them): the tokenizer's own count, independent of
  `placeholder_length`."""
  turns = (records.Turn("human", f"{records.IMAGE_TOKEN}\nwhat is this?"),
           records.Turn("gpt", "a lung"))
  ids = text.tokenize_conversation(tok, turns, num_image_tokens=n, max_length=10**6,
                                   label_mode="per_turn", image_tokens=style).input_ids
  image_ids = set(tok.convert_tokens_to_ids(list(text.style_tokens(style))))
  return sum(int(i) in image_ids for i in ids)


@pytest.mark.parametrize("style", model_config.IMAGE_TOKEN_STYLES)
@pytest.mark.parametrize("model,patches_and_more", [
    (("model.vision.image_size=56", "model.vision.patch_size=14"), 16),
    (("model.vision.image_size=56", "model.vision.patch_size=14",
      "model.vision.feature_select=full"), 17),
    (("model.vision.image_size=56", "model.vision.patch_size=14", "model.connector=sti"), 20),
    (("model.vision.image_size=224", "model.vision.patch_size=14"), 256),
    (("model.vision.image_size=224", "model.vision.patch_size=14",
      "model.vision.feature_select=full"), 257),
])
def test_image_tokens_counted_as_the_tokenizer_does(tokenizers, style, model,
                                                    patches_and_more):
  config = _cfg(*model, f"model.image_tokens={style}")
  n = model_config.num_image_tokens(config.model)
  assert n == patches_and_more  # hand-worked: (224 / 14)^2 = 256, +1 CLS, +2 x 16 / 8 (sti)
  in_sequence = _tokens_of_one_image(tokenizers[style], n, style)
  assert in_sequence == n + (2 if style == "im_start_end" else 0)
  assert text.placeholder_length(n, style) == in_sequence
  for max_length, refused in ((in_sequence, True), (in_sequence + 1, False)):
    config = _cfg(*model, f"model.image_tokens={style}", f"data.max_length={max_length}",
                  f"data.length_buckets=({max_length},)")
    room = [p for p in _problems(config) if "leaves no room for text" in p]
    assert bool(room) == refused, (max_length, room)


def _layout_works(micro: int, shards: int, group: int, k: int) -> bool:
  """Exhaustive reference: samples 0..micro-1 lie in `shards` equal consecutive blocks;
  groups of `group` consecutive samples must each exceed k, tile the micro-batch, and
  either every group sits inside one shard or every shard inside one group."""
  if micro % shards or group <= k or micro % group:
    return False
  shard_of = [i // (micro // shards) for i in range(micro)]
  group_of = [i // group for i in range(micro)]
  groups_in_one_shard = all(len({shard_of[i] for i in range(micro) if group_of[i] == g}) == 1
                            for g in set(group_of))
  shards_in_one_group = all(len({group_of[i] for i in range(micro) if shard_of[i] == s}) == 1
                            for s in set(shard_of))
  return groups_in_one_shard or shards_in_one_group


def _reference_group(grouping: str, group_size: int, micro: int, shards: int) -> int:
  """The documented meaning of each grouping (configs/base.py, docs/align.md)."""
  return {"per_device": micro // shards, "global": micro,
          "fixed": group_size or micro}[grouping]


MESHES = [  # (data, fsdp, tensor), devices
    ((1, 1, 1), 1), ((2, 1, 1), 2), ((3, 1, 1), 3), ((1, -1, 1), 6), ((2, 2, 2), 8),
    ((-1, 1, 3), 6), ((1, 5, 1), 5),
]


@pytest.mark.parametrize("mesh,devices", MESHES, ids=lambda m: str(m))
def test_alignment_groups_validated_as_the_owners_and_an_exhaustive_layout(mesh, devices):
  axes = [f"mesh.{a}={s}" for a, s in zip(mesh_lib.MESH_AXES, mesh)]
  shards = mesh_lib.data_parallel_size(dict(zip(
      mesh_lib.MESH_AXES, mesh_lib.resolve_mesh_shape(mesh, devices))))
  config, checked = _cfg(*axes, "stages=stage2"), 0
  for grouping, group_size, k, global_batch, micro_batches in itertools.product(
      align_loss.GROUPINGS, (0, 4, 6, 8, 12), (3, 5), (12, 24, 30, 48), (1, 2)):
    micro = global_batch // micro_batches
    config.align.grouping, config.align.group_size = grouping, group_size
    config.align.num_neighbors = k
    config.stage2.global_batch, config.stage2.micro_batches = global_batch, micro_batches
    problems = [p for p in _problems(config, devices) if p.startswith("stage2")]
    expected = _layout_works(micro, shards, _reference_group(grouping, group_size, micro,
                                                             shards), k)
    assert (not problems) == expected, (grouping, group_size, k, micro, shards, problems)
    if expected:  # and training's own call agrees on the group
      group = align_loss.group_size_for(config.align, micro, shards)
      assert group == _reference_group(grouping, group_size, micro, shards)
      alignment_sharding.group_span(group, micro, shards)
    checked += expected
  assert checked > 0  # the table holds settings that work on this mesh, not only failures


@pytest.mark.parametrize("mesh,devices", [
    ((1, -1, 1), 8), ((3, -1, 1), 8), ((-1, -1, 1), 8), ((2, 2, 1), 8), ((0, 1, 1), 1),
    ((1, 1, -1), 7), ((2, 3, 1), 6),
])
def test_mesh_validated_as_train_mesh_builds_it(mesh, devices):
  axes = [f"mesh.{a}={s}" for a, s in zip(mesh_lib.MESH_AXES, mesh)]
  try:
    mesh_lib.resolve_mesh_shape(mesh, devices)
    owner_refuses = False
  except ValueError:
    owner_refuses = True
  mesh_problems = [p for p in _problems(_cfg(*axes, "stages=stage1"), devices)
                   if p.startswith("mesh")]
  assert bool(mesh_problems) == owner_refuses, mesh_problems
