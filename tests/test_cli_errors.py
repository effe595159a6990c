"""A newcomer's mistakes on the command line: one message naming the setting or path and the
fix, exit status 2, no traceback, nothing written (issue 15, item 2)."""
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest

from exgra_jax import run_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "configs", "demo.py")


def run_cli(*args: str) -> subprocess.CompletedProcess:
  """Runs `args` from the repository root; asserts a usage error without a traceback."""
  out = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
  assert out.returncode == 2, out.stderr
  assert "Traceback" not in out.stderr and out.stderr.startswith("error: "), out.stderr
  return out


def test_missing_config_file_names_the_nearest_config(tmp_path):
  out = run_cli("-m", "exgra_jax.main", "--config=configs/dmeo.py", f"--workdir={tmp_path}/w")
  assert out.stderr == ("error: --config=configs/dmeo.py: no such config file "
                        "(did you mean configs/demo.py?)\n")
  assert not (tmp_path / "w").exists()


def test_every_bad_override_at_once_with_nearest_keys(tmp_path):
  out = run_cli("-m", "exgra_jax.main", "--config=configs/demo.py", f"--workdir={tmp_path}/w",
                "--config.stage2.steps=3", "--config.num_neighbors=3",
                "--config.stage1.lr=abc")
  lines = out.stderr.splitlines()
  assert lines[0] == "error: invalid config overrides:" and len(lines) == 4, lines
  assert "--config.stage2.steps: no such setting (did you mean stage2.max_steps" in lines[1]
  assert "did you mean align.num_neighbors?" in lines[2]
  assert "--config.stage1.lr=abc: could not convert string to float" in lines[3]
  assert "(expects a float)" in lines[3]
  assert not (tmp_path / "w").exists()


def test_missing_config_flag_is_named(tmp_path):
  out = run_cli("-m", "exgra_jax.main", f"--workdir={tmp_path}/w")
  assert "--config is required, e.g. --config=configs/demo.py" in out.stderr


@pytest.mark.parametrize("mode,fix", [
    ("eval", "or pass --checkpoint=DIR"), ("export", "train first with --mode=train")])
def test_a_workdir_without_checkpoints_says_train_first(tmp_path, mode, fix):
  workdir = tmp_path / "empty"
  workdir.mkdir()
  out = run_cli("-m", "exgra_jax.main", f"--config={DEMO}", f"--workdir={workdir}",
                f"--mode={mode}")
  assert f"--mode={mode}: no checkpoint of stage 'finetune' in {workdir}" in out.stderr
  assert "train first with --mode=train and the same --config and --workdir" in out.stderr
  assert fix in out.stderr
  assert not list(workdir.iterdir())  # no config.json either


def test_a_url_workdir_is_refused_before_anything_is_written():
  """os.path would turn gs://bucket/run into ./gs:/bucket/run on every host of a pod."""
  out = run_cli("-m", "exgra_jax.main", f"--config={DEMO}", "--workdir=gs://bucket/run")
  assert out.stderr == (f"error: --workdir=gs://bucket/run: this path "
                        f"{run_config.LOCAL_ONLY}\n")
  assert not os.path.exists(os.path.join(REPO, "gs:"))


# The command lines that load a model named by --model.
_MODEL_TOOLS = [("-m", "exgra_jax.predict", "--image=x.png", "--question=q"),
                ("-m", "exgra_jax.serve"), ("-m", "exgra_jax.chat")]


@pytest.mark.parametrize("tool", _MODEL_TOOLS)
def test_a_url_model_is_refused_without_a_network_lookup(tool):
  out = run_cli(*tool, "--model=gs://bucket/model")
  assert f"--model=gs://bucket/model: this path {run_config.LOCAL_ONLY}" in out.stderr


@pytest.mark.parametrize("tool,flag", [*((tool, "--model") for tool in _MODEL_TOOLS),
    (("tools/export_hf.py", "--out=/tmp/unused"), "--checkpoint"),
    (("tools/inspect_checkpoint.py",), "--checkpoint"),
    (("-m", "exgra_jax.main", f"--config={DEMO}", "--workdir=/tmp/unused", "--mode=eval"),
     "--checkpoint")])
def test_a_folder_that_holds_no_checkpoint_is_one_line(tmp_path, tool, flag):
  out = run_cli(*tool, f"{flag}={tmp_path}")
  assert f"{tmp_path} is not a checkpoint: expected a train step" in out.stderr
  assert not list(tmp_path.iterdir())


def test_eval_checkpoint_flag_is_checked(tmp_path):
  out = run_cli("-m", "exgra_jax.main", f"--config={DEMO}", f"--workdir={tmp_path}/w",
                "--mode=eval", f"--checkpoint={tmp_path}/nothing")
  assert f"--checkpoint={tmp_path}/nothing does not exist" in out.stderr


def test_predict_checks_image_and_model_before_loading(tmp_path):
  out = run_cli("-m", "exgra_jax.predict", f"--model={tmp_path}/model",
                f"--image={tmp_path}/scan.png", "--question=What?")
  assert f"--image={tmp_path}/scan.png does not exist" in out.stderr
  assert f"--model={tmp_path}/model does not exist" in out.stderr


def test_import_hf_on_an_empty_directory(tmp_path):
  out = run_cli("tools/import_hf.py", f"--hf_dir={tmp_path}", f"--out={tmp_path}/out")
  assert f"--hf_dir={tmp_path} holds no config.json" in out.stderr
  assert "`hf download REPO --local-dir DIR`" in out.stderr
  assert not (tmp_path / "out").exists()


def test_stages_take_a_comma_list_or_the_tuple_syntax():
  for value in ("stage1,stage2", "('stage1', 'stage2')"):
    assert run_config.load(DEMO, [f"stages={value}"]).stages == ("stage1", "stage2")
  assert run_config.load(DEMO, ["data.length_buckets=128,256"]).data.length_buckets == (
      128, 256)
  assert run_config.load(DEMO, ["data.root=/a,b"]).data.root == "/a,b"  # not a tuple


def test_a_group_is_not_a_setting():
  base = run_config.load(DEMO)
  assert "is a group of settings; set one of them, e.g. --config.align." in (
      run_config.key_problem(base, "align"))
  assert run_config.key_problem(base, "align.num_neighbors") is None


def test_stray_arguments_are_one_line_without_the_flag_help(tmp_path):
  out = run_cli("-m", "exgra_jax.main", "eval", f"--config={DEMO}", f"--workdir={tmp_path}/w")
  assert out.stderr == ("error: unexpected arguments 'eval': every setting is --name=value, "
                        "e.g. --config.stage2.lr=1e-5 or --mode=eval\n")
  assert not (tmp_path / "w").exists()


def test_an_unreadable_record_file_met_in_training_is_one_error_line(tmp_path):
  """A stage's JSON list that does not parse is found when the stage reads it (the
  up-front checks only see that it exists): one `error:` line naming the file and the
  position, exit status 2, no traceback."""
  from exgra_jax.data import demo_world  # pylint: disable=g-import-not-at-top
  root = tmp_path / "world"
  demo_world.make_demo_world(str(root), size="small", seed=0)
  (root / "stage1_captions.json").write_text('[{"id": "a", "conversations": [}')
  out = subprocess.run([sys.executable, "-m", "exgra_jax.main", f"--config={DEMO}",
                        f"--workdir={tmp_path}/w", "--config.data.demo_world=",
                        f"--config.data.root={root}"],
                       cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 2, out.stderr[-3000:]
  assert "Traceback" not in out.stderr
  assert out.stderr.splitlines()[-1].startswith(
      f"error: {root}/stage1_captions.json: record file is not a valid JSON list")


# What the libraries print unasked (issue 26, item 2): jax's TPU probe, Orbax's metadata
# notice, transformers' notices, and absl-formatted log lines of modules that are not ours.
CHATTER = re.compile(r"Unable to initialize backend|libtpu|TPU accelerator|INVALID_ARGUMENT|"
                     r"Metadata file does not exist|^\[transformers\]|PyTorch was not found",
                     re.M)
ABSL_LINE = re.compile(r"^[IWE]\d{4} [\d:.]+ +\d+ (\w+\.py):\d+\]", re.M)
OURS = {name for _, _, files in os.walk(os.path.join(REPO, "exgra_jax")) for name in files}


def chatter(stderr: str) -> list[str]:
  """The lines of `stderr` that other libraries logged."""
  return ([m.group(0) for m in CHATTER.finditer(stderr)]
          + [m.group(0) for m in ABSL_LINE.finditer(stderr) if m.group(1) not in OURS])


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  """A tiny transformers LLaVA directory and a plain LLaMA one (tests/hf_fixtures.py)."""
  import hf_fixtures  # pylint: disable=g-import-not-at-top  (torch: only these tests)
  root = tmp_path_factory.mktemp("hf")
  cfg = hf_fixtures.tiny_config()
  hf_fixtures.llava_dir(str(root / "llava"), cfg)
  hf_fixtures.plain_dirs(str(root / "llama"), str(root / "clip"), cfg)
  return root


def _partial(hf_dirs, tmp_path, keep) -> str:
  """A copy of the LLaVA directory with only the files `keep` accepts (a partial download)."""
  out = tmp_path / "partial"
  shutil.copytree(hf_dirs / "llava", out)
  for name in os.listdir(out):
    if not keep(name):
      os.remove(out / name)
  return str(out)


def test_import_hf_without_weights_says_download_them(hf_dirs, tmp_path):
  folder = _partial(hf_dirs, tmp_path, lambda name: not name.endswith(".safetensors"))
  out = run_cli("tools/import_hf.py", f"--hf_dir={folder}", f"--out={tmp_path}/out")
  assert f"no safetensors or .bin weights in {folder}" in out.stderr
  assert "the weights were not downloaded: fetch the whole repository (`hf download" in (
      out.stderr)
  assert not chatter(out.stderr), out.stderr
  assert not (tmp_path / "out").exists()


def test_import_hf_on_a_llava_config_alone_says_the_tokenizer_is_missing(hf_dirs, tmp_path):
  folder = _partial(hf_dirs, tmp_path, lambda name: name == "config.json")
  out = run_cli("tools/import_hf.py", f"--hf_dir={folder}", f"--out={tmp_path}/out")
  assert f"error: {folder} holds no tokenizer (none of tokenizer.json" in out.stderr
  assert "download the whole repository (`hf download REPO --local-dir DIR`)" in out.stderr


def test_import_hf_on_a_llama_without_clip_dir_names_the_flag(hf_dirs, tmp_path):
  out = run_cli("tools/import_hf.py", f"--hf_dir={hf_dirs / 'llama'}", f"--out={tmp_path}/out")
  assert f"{hf_dirs / 'llama'} (plain layout) has no CLIP weights: pass clip_dir (--clip_dir" in (
      out.stderr)


def test_a_truncated_safetensors_file_says_download_it_again(hf_dirs, tmp_path):
  folder = _partial(hf_dirs, tmp_path, lambda name: True)
  weights = os.path.join(folder, "model.safetensors")
  with open(weights, "r+b") as f:
    f.truncate(os.path.getsize(weights) // 2)
  for tool in (("tools/import_hf.py", f"--out={tmp_path}/out"),
               ("tools/export_hf.py", f"--out={tmp_path}/out")):
    flag = "--hf_dir" if "import" in tool[0] else "--checkpoint"
    out = run_cli(*tool, f"{flag}={folder}")
    assert f"{weights}: unreadable safetensors file" in out.stderr
    assert "was not downloaded completely; download it again" in out.stderr
  assert not (tmp_path / "out").exists()


def test_serve_on_a_bad_port_is_one_line_before_the_model_loads(hf_dirs):
  out = run_cli("-m", "exgra_jax.serve", f"--model={hf_dirs / 'llava'}", "--port=99999")
  assert out.stderr == ("error: --port=99999 is not a TCP port: use 1..65535, or --port=0 for "
                        "any free port\n")
  with socket.socket() as taken:
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    out = run_cli("-m", "exgra_jax.serve", f"--model={hf_dirs / 'llava'}", f"--port={port}")
  assert out.stderr == (f"error: --port={port}: 127.0.0.1:{port} is already in use (another "
                        "server?): stop it, or pick another --port (--port=0: any free port)\n")


def test_export_prints_no_library_chatter_and_keeps_jax_off_the_tpu(hf_dirs, tmp_path):
  """Without JAX_PLATFORMS (as a user runs it), on a machine with no accelerator, the
  console setup keeps jax on the CPU: libtpu (from the test extra) is never started."""
  from exgra_jax import console  # pylint: disable=g-import-not-at-top
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  if console.accelerator_attached():
    env["JAX_PLATFORMS"] = "cpu"  # a TPU / GPU host: the platform choice is not tested here
  out = subprocess.run([sys.executable, "tools/export_hf.py", f"--checkpoint={hf_dirs / 'llava'}",
                        f"--out={tmp_path}/export"], cwd=REPO, capture_output=True, text=True,
                       env=env, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert not chatter(out.stderr) and "Traceback" not in out.stderr, out.stderr
  assert os.path.exists(tmp_path / "export" / "config.json")


def test_too_many_bad_records_in_training_is_one_error_line(demo_world, tmp_path):
  root = tmp_path / "world"
  shutil.copytree(demo_world, root)
  for name in os.listdir(root / "images"):
    (root / "images" / name).write_bytes(b"not an image")
  out = subprocess.run([sys.executable, "-m", "exgra_jax.main", f"--config={DEMO}:small",
                        f"--workdir={tmp_path}/w", "--config.data.demo_world=",
                        f"--config.data.root={root}"],
                       cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 2, out.stderr[-3000:]
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  message = out.stderr.split("\nerror: ", 1)[1]
  assert re.match(r"bad record fraction [\d.]+ exceeds data.max_bad_fraction=0.01:\n"
                  r"\d+ of \d+ records skipped\n  corrupt_image: ", message), message
  assert message.endswith("fix or drop them, or raise --config.data.max_bad_fraction)\n")


@pytest.mark.parametrize("flag", ["--adapter_only", "--lora_base"])
def test_an_adapter_export_of_a_model_without_adapters_is_one_line(hf_dirs, tmp_path, flag):
  out = run_cli("tools/export_hf.py", f"--checkpoint={hf_dirs / 'llava'}",
                f"--out={tmp_path}/export", flag)
  assert f"holds no LoRA adapters: {flag} needs a train checkpoint" in out.stderr
  assert not os.path.exists(tmp_path / "export")
