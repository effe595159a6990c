"""Config loading, overrides and start-up validation (issue 2, item 4)."""
import glob
import os
import re
import subprocess
import sys

import pytest

from exgra_jax import run_config
from exgra_jax.train import mesh as mesh_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(name: str, *overrides: str):
  return run_config.load(os.path.join(REPO, "configs", name), overrides)


@pytest.mark.parametrize("path", sorted(
    p for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
    if os.path.basename(p) not in ("__init__.py", "base.py", "model_presets.py", "pmc.py",
                                   "vqa.py")))
def test_every_recipe_loads_and_validates(path):
  config = run_config.load(path)
  real_data = {} if config.data.demo_world else {"data.root": "/data"}
  config.unlock()
  for key, value in real_data.items():
    config.data.root = value
  config.init.random = True
  run_config.validate(config, num_devices=8)


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
    (("align.grouping=fixed", "align.group_size=4"), "must exceed align.num_neighbors=5"),
    (("align.grouping=fixed", "align.group_size=7"), "stage2: alignment groups of 7 samples"),
    (("model.llm.num_kv_heads=3",), "not a multiple of num_kv_heads=3"),
    (("mesh.data=3",), "needs 3 devices, have 8"),
    (("data.length_buckets=(512,256)",), "must be non-empty and increasing"),
    (("data.prefetch=0",), "data.prefetch=0 >= 1"),
    (("model.llm.rope_scaling={\"rope_type\":\"quadratic\"}",), "'quadratic' is not one of"),
    (("stages=stage1,stage3",), "'stage3' is not a stage"),
    (("init.random=False",), "no weights to start stage 'stage1'"),
])
def test_inconsistent_settings_explain_themselves(overrides, message):
  config = _cfg("demo.py", *overrides)
  with pytest.raises(run_config.ConfigError, match=message.replace("(", r"\(")
                     .replace(")", r"\)").replace("[", r"\[")):
    run_config.validate(config, num_devices=8)


def test_every_problem_is_reported_at_once():
  config = _cfg("demo.py", "model.connector=sti2", "model.llm.num_kv_heads=3")
  with pytest.raises(run_config.ConfigError) as err:
    run_config.validate(config, num_devices=1)
  assert "connector" in str(err.value) and "num_kv_heads" in str(err.value)


def test_mesh_fills_one_axis():
  assert mesh_lib.mesh_shape(_cfg("pmc10.py").mesh, 8) == {"data": 1, "fsdp": 8, "tensor": 1}
  with pytest.raises(run_config.ConfigError, match="8 devices cannot fill mesh"):
    run_config.validate(_cfg("pmc10.py", "mesh.tensor=3"), num_devices=8)


def test_distributed_mode_checked():
  with pytest.raises(run_config.ConfigError, match="coordinator_address"):
    run_config.validate(_cfg("demo.py", "distributed.mode=explicit"))
  with pytest.raises(run_config.ConfigError, match="distributed.mode"):
    run_config.validate(_cfg("demo.py", "distributed.mode=slurm"))


@pytest.mark.parametrize("overrides,message", [
    (("stage1.lr=-0.001",), "stage1.lr=-0.001 must be > 0"),
    (("stage2.epochs=-1.0",), "stage2.epochs=-1.0 must be > 0 (or set stage2.max_steps)"),
    (("stage2.max_steps=0",), "stage2.max_steps=0 must be -1 (from epochs) or >= 1"),
    (("finetune.warmup_ratio=1.0",), "finetune.warmup_ratio=1.0 must be in [0, 1)"),
    (("stage1.subset_fraction=1.5",), "stage1.subset_fraction=1.5 must be in (0, 1]"),
    (("train.log_every=0",), "train.log_every=0 must be >= 1"),
    (("train.checkpoint_every=0",), "train.checkpoint_every=0 must be >= 1"),
    (("train.eval_every=-5",), "train.eval_every=-5 must be >= 0"),
    (("train.profile_steps=5:2",), "train.profile_steps='5:2' must be 'start:stop'"),
    (("optim.clip_norm=0.0",), "optim.clip_norm=0.0 must be > 0"),
    (("align.gnn_dropout=1.0",), "align.gnn_dropout=1.0 must be in [0, 1)"),
    (("eval.batch_size=0",), "eval.batch_size=0 must be >= 1"),
    (("model.llm.num_layers=0",), "model.llm.num_layers=0 must be >= 1"),
])
def test_values_out_of_range_are_named(overrides, message):
  with pytest.raises(run_config.ConfigError, match=re.escape(message)):
    run_config.validate(_cfg("demo.py", *overrides), num_devices=1)


def test_epochs_may_be_zero_with_max_steps():
  run_config.validate(_cfg("demo.py", "stage2.epochs=0.0", "stage2.max_steps=3"),
                         num_devices=1)


_FILES = ("s1.json", "s2.jsonl", "vqa/train.json", "vqa/val.json", "vqa/test.json",
          "vqa/candidate.json")
_DIRS = ("images", "vqa/images", "tok", "weights/llm", "weights/clip")


def _real_data_config(root, *overrides: str):
  """demo.py pointed at a folder that holds (empty) files for every path it names."""
  for name in _DIRS:
    (root / name).mkdir(parents=True, exist_ok=True)
  for name in _FILES:
    (root / name).touch()
  return _cfg("demo.py:small", "data.demo_world=", f"data.root={root}", "data.tokenizer_dir=tok",
              "stage1.records=s1.json", "stage2.records=s2.jsonl",
              "finetune.records=vqa/train.json", "finetune.val_records=vqa/val.json",
              "finetune.test_records=vqa/test.json", "finetune.candidates=vqa/candidate.json",
              "init.random=False", f"init.llm_dir={root / 'weights/llm'}",
              f"init.clip_dir={root / 'weights/clip'}", *overrides)


@pytest.mark.parametrize("mode,remove,message", [
    ("train", "s2.jsonl", "stage2.records: {root}/s2.jsonl does not exist"),
    ("train", "images", "stage1.image_root: {root}/images does not exist"),
    ("train", "vqa/candidate.json", "finetune.candidates: {root}/vqa/candidate.json"),
    ("train", "vqa/val.json", "finetune.val_records: {root}/vqa/val.json does not exist"),
    ("train", "tok", "data.tokenizer_dir: {root}/tok does not exist"),
    ("train", "weights/llm", "init.llm_dir: {root}/weights/llm does not exist"),
    ("train", "weights/clip", "init.clip_dir: {root}/weights/clip does not exist"),
    ("eval", "vqa/test.json", "finetune.test_records: {root}/vqa/test.json does not exist"),
    ("eval", "vqa/images", "finetune.image_root: {root}/vqa/images does not exist"),
    ("predict", "tok", "data.tokenizer_dir: {root}/tok does not exist"),
])
def test_missing_paths_are_named_with_their_setting(tmp_path, mode, remove, message):
  config = _real_data_config(tmp_path)
  run_config.validate(config, mode=mode, check_paths=True)
  target = tmp_path / remove
  if target.is_dir():
    target.rename(tmp_path / "moved_away")
  else:
    target.unlink()
  with pytest.raises(run_config.ConfigError,
                     match=re.escape(message.format(root=tmp_path))):
    run_config.validate(config, mode=mode, check_paths=True)


def test_weights_and_tokenizer_urls_are_refused_without_touching_them(tmp_path):
  """Weights and tokenizers are loaded with local file I/O: a gs:// path is named as such
  (not looked up: that would need the network, and its loaders would mangle it)."""
  config = _real_data_config(tmp_path, "init.llm_dir=gs://bucket/llama-7b",
                             "stage2.init_from=gs://bucket/run/checkpoints/stage1")
  with pytest.raises(run_config.ConfigError) as err:
    run_config.validate(config, check_paths=True)
  problems = [line.removeprefix("  - ") for line in str(err.value).splitlines()[1:]]
  assert problems == [
      f"init.llm_dir=gs://bucket/llama-7b: this path {run_config.LOCAL_ONLY}",
      f"stage2.init_from=gs://bucket/run/checkpoints/stage1: this path "
      f"{run_config.LOCAL_ONLY}"], problems


def test_missing_root_and_tokenizer_each_one_problem(tmp_path):
  config = _real_data_config(tmp_path, f"data.root={tmp_path / 'nowhere'}",
                             "data.tokenizer_dir=", "init.llm_dir=", "init.clip_dir=",
                             "init.random=True", "export.after_training=True")
  with pytest.raises(run_config.ConfigError) as err:
    run_config.validate(config, check_paths=True)
  problems = str(err.value).splitlines()[1:]
  assert len(problems) == 3, problems
  assert "data.root=" in problems[0] and "is not a directory" in problems[0]
  assert "no tokenizer" in problems[1] and "data.tokenizer_dir is empty" in problems[2]


def test_command_line_lists_every_problem_and_exits_2(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run(
      [sys.executable, "-m", "exgra_jax.main", "--config=configs/demo.py:small",
       f"--workdir={tmp_path / 'run'}", "--config.data.demo_world=",
       f"--config.data.root={tmp_path / 'nowhere'}", "--config.stage1.lr=-1.0",
       "--config.train.log_every=0", f"--config.init.llm_dir={tmp_path / 'llama'}"],
      cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
  assert out.returncode == 2, out.stderr
  assert "Traceback" not in out.stderr
  for text in ("stage1.lr=-1.0 must be > 0", "train.log_every=0 must be >= 1",
               "is not a directory", f"init.llm_dir: {tmp_path / 'llama'} does not exist"):
    assert text in out.stderr
  assert not (tmp_path / "run").exists()
