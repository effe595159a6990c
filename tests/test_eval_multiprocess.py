"""Two processes over loopback (launch/local_multiprocess.sh) fine-tune with validation and
test evaluation: each answers file holds one answer per question, each protocol report is
written once with no temporary left, both processes exit 0, also when started again on the
finished run (answers already there are read by both and reused)."""
import json
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FINETUNE = ("--config.stages=('finetune',)", "--config.finetune.max_steps=2",
            "--config.finetune.global_batch=8", "--config.train.eval_every=2",
            "--config.train.checkpoint_every=2", "--config.train.log_every=2",
            "--config.export.after_training=False")


def _two_processes(demo_world: str, workdir: str) -> subprocess.CompletedProcess:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  return subprocess.run(
      ["bash", os.path.join(ROOT, "launch", "local_multiprocess.sh"), "2", str(port), "--",
       sys.executable, "-m", "exgra_jax.main", "--config=configs/demo.py:small",
       f"--workdir={workdir}", f"--config.data.root={demo_world}", *FINETUNE],
      cwd=ROOT, capture_output=True, text=True, timeout=1200, check=False)


def _question_ids(demo_world: str, split: str) -> list[str]:
  with open(os.path.join(demo_world, "vqa", f"{split}_w_options_new.json")) as f:
    return sorted(str(item["id"]) for item in json.load(f))


def test_two_processes_write_each_answer_once(demo_world, tmp_path):
  workdir = str(tmp_path / "run")
  for attempt in ("first", "again"):
    result = _two_processes(demo_world, workdir)
    assert result.returncode == 0, (attempt, result.stderr[-4000:])
    for name, split in (("val_step_2", "val"), ("test", "test")):
      directory = os.path.join(workdir, "eval", "finetune", name)
      with open(os.path.join(directory, "answers.jsonl")) as f:
        ids = sorted(json.loads(line)["question_id"] for line in f)
      assert ids == _question_ids(demo_world, split), (attempt, name)
      assert sorted(os.listdir(directory)) == ["answers.jsonl", "protocol.json",
                                               "protocol.md"]
