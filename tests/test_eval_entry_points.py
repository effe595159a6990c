"""`main --mode=eval`, `main --mode=predict` and `python -m exgra_jax.predict` end to end
on the demo world, with a tiny random model saved as the fine-tune's best checkpoint."""
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import pytest

from exgra_jax import run_config
from exgra_jax.inference import single_question
from exgra_jax.models.config import LlavaConfig
from exgra_jax.models import llava
from exgra_jax.models.llava import LlavaModel
from exgra_jax.weights import loading

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run(demo_world, tmp_path_factory):
  """A workdir whose `checkpoints/finetune_best` holds random tiny weights + tokenizer."""
  workdir = tmp_path_factory.mktemp("eval_run")
  config = run_config.load(os.path.join(REPO, "configs", "demo.py:small"),
                              [f"data.root={demo_world}"])
  model = LlavaModel(LlavaConfig.from_config(config.model))
  params = nn.unbox(llava.init_boxed_params(model.cfg, jax.random.key(0)))
  loading.save_params(str(workdir / "checkpoints" / "finetune_best"), params,
                               config.model.to_dict(),
                               tokenizer_dir=os.path.join(demo_world, "tokenizer"))
  return demo_world, workdir, model, params


def _main(demo_world, workdir, *args):
  command = [sys.executable, "-m", "exgra_jax.main", "--config=configs/demo.py:small",
             f"--workdir={workdir}", f"--config.data.root={demo_world}",
             "--config.eval.max_new_tokens=4", *args]
  return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                        check=False)


def test_mode_eval_writes_answers_metrics_and_protocol(run):
  demo_world, workdir, _, _ = run
  result = _main(demo_world, workdir, "--mode=eval")
  assert result.returncode == 0, result.stderr[-3000:]
  metrics = json.loads(result.stdout[result.stdout.index("{"):])
  out = workdir / "eval" / "test_w_options_new"
  with open(out / "answers.jsonl") as f:
    answers = [json.loads(line) for line in f]
  with open(os.path.join(demo_world, "vqa", "test_w_options_new.json")) as f:
    assert len(answers) == len(json.load(f))
  assert metrics["overall"]["count"] == len(answers)
  with open(out / "protocol.json") as f:
    protocol = json.load(f)
  assert protocol["checkpoint"]["path"].endswith("finetune_best")
  assert os.path.exists(out / "protocol.md")


def test_predict_cli_and_mode_predict_answer_a_dicom(run):
  demo_world, workdir, model, params = run
  image = os.path.join(demo_world, "images", "CT_small.dcm")
  question = "Which organ is shown?"
  cli = subprocess.run(
      [sys.executable, "-m", "exgra_jax.predict",
       f"--model={workdir / 'checkpoints' / 'finetune_best'}", f"--image={image}",
       f"--question={question}", "--template=train", "--max_new_tokens=4"],
      cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
  assert cli.returncode == 0, cli.stderr[-3000:]
  from exgra_jax.data import text  # pylint: disable=g-import-not-at-top
  expected = single_question.answer_question(
      model, params, text.load_tokenizer(os.path.join(demo_world, "tokenizer")), image,
      question, template="train", max_new_tokens=4)
  assert cli.stdout.rstrip("\n").split("\n")[-1] == expected
  mode = _main(demo_world, workdir, "--mode=predict", f"--image={image}",
               f"--question={question}")
  assert mode.returncode == 0, mode.stderr[-3000:]
  assert json.loads(mode.stdout[mode.stdout.index("{"):])["answer"] == expected


def test_predict_refuses_a_checkpoint_without_tokenizer(run, tmp_path):
  demo_world, workdir, _, params = run
  bare = tmp_path / "bare"
  config = run_config.load(os.path.join(REPO, "configs", "demo.py"), [])
  loading.save_params(str(bare), params, config.model.to_dict())
  cli = subprocess.run(
      [sys.executable, "-m", "exgra_jax.predict", f"--model={bare}",
       f"--image={os.path.join(demo_world, 'images', 'MR_small.dcm')}", "--question=What?"],
      cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
  assert cli.returncode != 0 and "--tokenizer" in cli.stderr


def test_zero_shot_tool_answers_the_demo_omnimed_items(run, tmp_path):
  demo_world, workdir, model, params = run
  with open(os.path.join(demo_world, "omnimed", "demo_world.json")) as f:
    items = json.load(f)[:3]
  (tmp_path / "items.json").write_text(json.dumps(items))
  cli = subprocess.run(
      [sys.executable, "tools/zero_shot.py",
       f"--model={workdir / 'checkpoints' / 'finetune_best'}", f"--items={tmp_path}/items.json",
       f"--image_root={demo_world}", f"--out={tmp_path}/out", "--template=train",
       "--max_new_tokens=4", "--batch_size=2"],
      cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
  assert cli.returncode == 0, cli.stderr[-3000:]
  accuracy = json.loads(cli.stdout[cli.stdout.index("{"):])
  with open(tmp_path / "out" / "answers.jsonl") as f:
    answers = {r["question_id"]: r["text"] for r in map(json.loads, f)}
  assert sorted(answers) == sorted(i["question_id"] for i in items)
  from exgra_jax.eval import zero_shot  # pylint: disable=g-import-not-at-top
  assert accuracy == zero_shot.accuracy_per_dataset(items, answers)
  with open(tmp_path / "out" / "zero_shot_accuracy.json") as f:
    assert json.load(f) == accuracy
