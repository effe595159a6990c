"""The training loop end to end on the demo world: stages in order, exact resume after a
kill -9, after SIGTERM (checkpoint, exit 0) and from a damaged newest checkpoint, the same
fine-tune best after either, dashboards and skipped completed stages."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from tensorboard.backend.event_processing import event_accumulator

import test_train_checkpointing
from exgra_jax.weights import inspection

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Two short stages, alignment on in the second, a checkpoint every 2 steps.
OVERRIDES = ("--config.stages=('stage1','stage2')", "--config.stage1.max_steps=2",
             "--config.stage2.max_steps=8", "--config.stage1.global_batch=8",
             "--config.stage2.global_batch=8", "--config.train.checkpoint_every=2",
             "--config.train.log_every=2", "--config.train.image_every=2",
             "--config.export.after_training=False")


def _command(demo_world, workdir, overrides=OVERRIDES):
  return [sys.executable, "-m", "exgra_jax.main", "--config=configs/demo.py:small",
          f"--workdir={workdir}", f"--config.data.root={demo_world}", *overrides]


def _run(demo_world, workdir, timeout=600, overrides=OVERRIDES):
  return subprocess.run(_command(demo_world, workdir, overrides), cwd=REPO,
                        capture_output=True, text=True, timeout=timeout, check=False)


def _final(workdir, stage="stage2", step=8):
  return inspection.read_checkpoint(
      os.path.join(workdir, "checkpoints", stage, str(step)))


def _start(demo_world, workdir, log_dir, overrides=OVERRIDES):
  """The run in the background, its output in files (a full pipe would stall it)."""
  out = open(os.path.join(log_dir, "stdout.txt"), "w")
  err = open(os.path.join(log_dir, "stderr.txt"), "w")
  return subprocess.Popen(_command(demo_world, workdir, overrides), cwd=REPO, stdout=out,
                          stderr=err)


def _read(log_dir, name):
  with open(os.path.join(log_dir, name)) as f:
    return f.read()


def _wait_for(path, process, log_dir, timeout=400):
  deadline = time.time() + timeout
  while not os.path.exists(path):
    assert process.poll() is None, _read(log_dir, "stderr.txt")[-3000:]
    assert time.time() < deadline, f"{path} did not appear"
    time.sleep(0.2)


@pytest.fixture(scope="module")
def reference(demo_world, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  result = _run(demo_world, workdir)
  assert result.returncode == 0, result.stderr[-4000:]
  return workdir, result


def test_uninterrupted_run_writes_stages_and_dashboards(reference, demo_world):
  workdir, result = reference
  assert '"status": "trained"' in result.stdout
  assert _final(workdir, "stage1", 2)["step"] == 2
  final = _final(workdir)
  assert final["step"] == 8 and final["skipped"] == 0
  assert any(name.startswith("gnn/") for name in final["shapes"])
  logdir = os.path.join(workdir, "tensorboard", "stage2")
  (events,) = [e for e in os.listdir(logdir) if e.startswith("events.out.tfevents")]
  accumulator = event_accumulator.EventAccumulator(os.path.join(logdir, events),
                                                   size_guidance={"tensors": 0})
  accumulator.Reload()
  tags = set(accumulator.Tags()["tensors"])
  for tag in ("loss", "lm_loss", "align_loss", "align/hamming_image", "learning_rate",
              "grad_norm", "steps_per_s", "tokens_per_s", "solver_seconds", "skipped",
              "data/skipped", "matching_vs_identity"):
    assert tag in tags, (tag, sorted(tags))
  again = _run(demo_world, workdir)  # both stages complete: nothing is retrained
  assert again.returncode == 0 and again.stdout.count('"status": "complete"') == 2


def test_kill_9_then_rerun_ends_identical(reference, demo_world, tmp_path):
  workdir = str(tmp_path / "run")
  process = _start(demo_world, workdir, tmp_path)
  _wait_for(os.path.join(workdir, "checkpoints", "stage2", "4"), process, tmp_path)
  process.send_signal(signal.SIGKILL)
  process.wait(timeout=60)
  result = _run(demo_world, workdir)
  assert result.returncode == 0, result.stderr[-4000:]
  assert "resumes at step" in result.stderr
  assert _final(workdir)["checksum"] == _final(reference[0])["checksum"]


def test_sigterm_checkpoints_exits_zero_and_resumes_identical(reference, demo_world, tmp_path):
  workdir = str(tmp_path / "run")
  process = _start(demo_world, workdir, tmp_path)
  _wait_for(os.path.join(workdir, "checkpoints", "stage2", "2"), process, tmp_path)
  process.send_signal(signal.SIGTERM)
  assert process.wait(timeout=300) == 0, _read(tmp_path, "stderr.txt")[-4000:]
  assert '"status": "preempted"' in _read(tmp_path, "stdout.txt")
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints", "stage2"))
                 if s.isdigit())
  assert steps[-1] < 8
  result = _run(demo_world, workdir)
  assert result.returncode == 0, result.stderr[-4000:]
  assert _final(workdir)["checksum"] == _final(reference[0])["checksum"]


@pytest.mark.parametrize("corrupt", test_train_checkpointing.CORRUPTIONS)
def test_damaged_newest_checkpoint_falls_back_and_ends_identical(reference, demo_world,
                                                                 tmp_path, corrupt):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference[0], workdir)
  stage_dir = os.path.join(workdir, "checkpoints", "stage2")
  corrupt(os.path.join(stage_dir, "8"))
  result = _run(demo_world, workdir)
  assert result.returncode == 0, result.stderr[-4000:]
  assert f"checkpoint {stage_dir}/8 cannot be restored" in result.stderr
  assert "stage stage2 resumes at step 6" in result.stderr
  assert os.listdir(os.path.join(workdir, "checkpoints", "stage2_unrestorable")) == ["8"]
  assert _final(workdir)["checksum"] == _final(reference[0])["checksum"]


# A fine-tune alone: validation every 2 steps, so that the best is chosen among validations
# on both sides of the interruption.
FINETUNE = ("--config.stages=('finetune',)", "--config.finetune.max_steps=8",
            "--config.finetune.global_batch=8", "--config.train.eval_every=2",
            "--config.train.checkpoint_every=2", "--config.train.log_every=2",
            "--config.export.after_training=False")


def _finetune_outcome(workdir: str, stdout: str) -> dict:
  result = json.loads(stdout)["finetune"]
  with open(os.path.join(workdir, "eval", "finetune", "test", "answers.jsonl")) as f:
    answers = f.read()
  return {"validation": result["validation"], "test": result["test"], "answers": answers}


@pytest.fixture(scope="module")
def finetune_reference(demo_world, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("finetune"))
  result = _run(demo_world, workdir, overrides=FINETUNE)
  assert result.returncode == 0, result.stderr[-4000:]
  return _finetune_outcome(workdir, result.stdout)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_interrupted_finetune_chooses_the_same_best(finetune_reference, demo_world, tmp_path,
                                                    sig):
  workdir = str(tmp_path / "run")
  process = _start(demo_world, workdir, tmp_path, overrides=FINETUNE)
  _wait_for(os.path.join(workdir, "checkpoints", "finetune", "4"), process, tmp_path)
  process.send_signal(sig)
  process.wait(timeout=300)
  steps = [int(s) for s in os.listdir(os.path.join(workdir, "checkpoints", "finetune"))
           if s.isdigit()]
  assert max(steps) < 8
  result = _run(demo_world, workdir, overrides=FINETUNE)
  assert result.returncode == 0, result.stderr[-4000:]
  assert "resumes at step" in result.stderr
  outcome = _finetune_outcome(workdir, result.stdout)
  assert [v["step"] for v in outcome["validation"]["history"]] == [2, 4, 6, 8]
  assert outcome == finetune_reference
