"""Config loading, overrides and start-up validation (issue 2, item 4)."""
import glob
import os
import re
import subprocess
import sys

import pytest

from exgra_jax import configuration

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(name: str, *overrides: str):
  return configuration.load(os.path.join(REPO, "configs", name), overrides)


@pytest.mark.parametrize("path", sorted(
    p for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
    if os.path.basename(p) not in ("__init__.py", "base.py", "model_presets.py", "pmc.py",
                                   "vqa.py")))
def test_every_recipe_loads_and_validates(path):
  config = configuration.load(path)
  real_data = {} if config.data.demo_world else {"data.root": "/data"}
  config.unlock()
  for key, value in real_data.items():
    config.data.root = value
  config.init.random = True
  configuration.validate(config, num_devices=8)


def test_every_base_field_is_documented():
  """Each default set at function level in base.py carries a one-line comment."""
  source = open(os.path.join(REPO, "configs", "base.py")).read().splitlines()
  field = re.compile(r"^  [cs](\.\w+)+ = (?!ml_collections\.ConfigDict\(\)|stage_config|model_presets)")
  undocumented = [l for l in source if field.match(l) and "#" not in l]
  assert not undocumented, undocumented
  assert sum(bool(field.match(l)) for l in source) > 70


def test_overrides_are_typed_and_applied():
  config = _cfg("pmc10.py:stage2", "stage2.lr=1e-5", "mesh.fsdp=8", "stages=stage2",
                "model.llm.num_layers=4")
  assert config.stage2.lr == 1e-5 and isinstance(config.stage2.lr, float)
  assert config.mesh.fsdp == 8
  assert config.model.llm.num_layers == 4
  assert tuple(config.stages) == ("stage2",)


def test_unknown_key_names_the_closest_valid_key():
  with pytest.raises(AttributeError, match='Did you mean "lr"'):
    _cfg("demo.py", "stage1.lrr=1")


def test_wrong_type_is_an_error():
  with pytest.raises(Exception, match="global_batch"):
    _cfg("demo.py", "stage1.global_batch=abc")


def test_command_line_errors_are_one_readable_line():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run(
      [sys.executable, "-m", "exgra_jax.main", "--config=configs/demo.py",
       "--workdir=/tmp/never_used", "--config.align.num_neighbor=3"],
      cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
  assert out.returncode == 2
  assert "invalid config override" in out.stderr
  assert "num_neighbors" in out.stderr
  assert "Traceback" not in out.stderr


@pytest.mark.parametrize("overrides,message", [
    (("stage2.global_batch=12",), "does not divide over the 8 batch shards"),
    (("stage2.micro_batches=3",), "does not divide into micro_batches=3"),
    (("model.projector=identity",), "projector='identity' needs the connector width"),
    (("model.connector=dci", "model.projector=identity"), "192 with connector='dci'"),
    (("model.connector=dcx",), "did you mean 'dci'"),
    (("align.grouping=fixed", "align.group_size=4"), "cannot have align.num_neighbors=5"),
    (("align.grouping=fixed", "align.group_size=7"), "must divide the stage2 micro-batch"),
    (("model.llm.num_kv_heads=3",), "not a multiple of num_kv_heads=3"),
    (("mesh.data=3",), "needs 3 devices, have 8"),
    (("data.length_buckets=(512,256)",), "must be non-empty and increasing"),
    (("data.prefetch=0",), "data.prefetch=0 >= 1"),
    (("model.llm.rope_scaling={\"rope_type\":\"quadratic\"}",), "'quadratic' is not one of"),
    (("stages=stage1,stage3",), "did you mean 'stage1'"),
    (("init.random=False",), "no weights given"),
])
def test_inconsistent_settings_explain_themselves(overrides, message):
  config = _cfg("demo.py", *overrides)
  with pytest.raises(configuration.ConfigError, match=message.replace("(", r"\(")
                     .replace(")", r"\)").replace("[", r"\[")):
    configuration.validate(config, num_devices=8)


def test_every_problem_is_reported_at_once():
  config = _cfg("demo.py", "model.connector=sti2", "model.llm.num_kv_heads=3")
  with pytest.raises(configuration.ConfigError) as err:
    configuration.validate(config, num_devices=1)
  assert "connector" in str(err.value) and "num_kv_heads" in str(err.value)


def test_mesh_fills_one_axis():
  config = _cfg("pmc10.py")
  assert configuration.mesh_shape(config, 8) == {"data": 1, "fsdp": 8, "tensor": 1}
  with pytest.raises(configuration.ConfigError, match="do not divide"):
    configuration.mesh_shape(_cfg("pmc10.py", "mesh.tensor=3"), 8)


def test_distributed_mode_checked():
  with pytest.raises(configuration.ConfigError, match="coordinator_address"):
    configuration.validate(_cfg("demo.py", "distributed.mode=explicit"))
  with pytest.raises(configuration.ConfigError, match="distributed.mode"):
    configuration.validate(_cfg("demo.py", "distributed.mode=slurm"))
