"""A guard that training learns from the images, on a budget of a few minutes.

A fine-tune whose labels were masked wrongly, whose image features never reached the LM,
or whose answers were extracted wrongly scores the same with the real images as with
noise. So: fine-tune the tiny model from random weights (the tower random and frozen, no
vision pre-training: the modality is visible even to a random tower,
docs/data_efficiency.md) on the medium demo world's questions whose answer is read off
the image's modality ("What imaging modality is this?", "Which organ is shown?"), then
answer the test split's once with the real images and once with every image replaced by
noise. With noise a model can at best give each question's most frequent answer (0.37
on both); it must do far better with the real images.

The same trained model is the fixture of weight-only int8 answering (`--quantize`,
`eval.quantize`): a model that learned its answers gives them with int8 weights too.
"""
import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from exgra_jax.data import demo_world

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 150
# Measured (docs/demo_world.md): real images 0.9-1.0, noise <= 0.37 (the best constant
# answers); a model that does not read the images scores the same on both.
MARGIN = 0.3
QUESTIONS = ("What imaging modality is this?", "Which organ is shown?")


def _main(*args):
  out = subprocess.run([sys.executable, "-m", "exgra_jax.main", "--config=configs/demo.py",
                        *args], cwd=REPO, capture_output=True, text=True, timeout=900,
                       check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.splitlines()  # the result is the JSON printed last
  return json.loads("\n".join(lines[max(i for i, line in enumerate(lines) if line == "{"):]))


def _answers(output_dir: str) -> dict[str, str]:
  with open(os.path.join(output_dir, "answers.jsonl"), encoding="utf-8") as f:
    return {r["question_id"]: r["text"] for r in map(json.loads, f)}


@pytest.fixture(scope="module")
def scores(tmp_path_factory):
  """(real, noise, int8) of one fine-tune on the modality and organ questions: test
  metrics with the real images and with noise, and the int8 weights' answers against the
  float32 ones' ({question_id: (float32 answer, int8 answer)})."""
  tmp = tmp_path_factory.mktemp("learns")
  root = str(tmp / "world")
  demo_world.make_demo_world(root, size="medium", seed=0)
  for split in ("train", "test"):
    with open(os.path.join(root, "vqa", f"{split}_w_options_new.json")) as f:
      items = [r for r in json.load(f)
               if r["conversations"][0]["value"].split("\n")[0] in QUESTIONS]
    with open(tmp / f"{split}.json", "w") as f:
      json.dump(items, f)
  noise_dir = tmp / "noise"
  noise_dir.mkdir()
  rng = np.random.default_rng(0)
  for image in sorted({r["image"] for r in items}):
    PIL.Image.fromarray(rng.integers(0, 256, (128, 128, 3), np.uint8)).save(
        noise_dir / image, format="PNG")
  workdir = str(tmp / "run")
  common = [f"--workdir={workdir}", f"--config.data.root={root}",
            "--config.data.demo_world=medium", "--config.vision_pretrain.steps=0",
            "--config.stages=('finetune',)", "--config.export.after_training=False"]
  real = _main(*common, f"--config.finetune.max_steps={STEPS}",
               f"--config.finetune.records={tmp}/train.json", "--config.finetune.val_records=",
               f"--config.finetune.test_records={tmp}/test.json")
  noise = _main(*common, "--mode=eval", f"--config.eval.records={tmp}/test.json",
                f"--config.finetune.image_root={noise_dir}",
                f"--checkpoint={workdir}/checkpoints/finetune")
  int8 = _main(*common[1:], f"--workdir={tmp}/int8", "--mode=eval",
               "--config.eval.quantize=int8", f"--config.eval.records={tmp}/test.json",
               f"--checkpoint={workdir}/checkpoints/finetune")
  full = _answers(os.path.join(workdir, "eval", "finetune", "test"))
  quantized = _answers(int8["output_dir"])
  return real["finetune"]["test"], noise, {q: (a, quantized[q]) for q, a in full.items()}


def test_fine_tuned_model_reads_the_images(scores):
  real, noise, _ = scores
  assert real["open_recall"] - noise["open_recall"] >= MARGIN, (real, noise)


def test_int8_weights_give_the_trained_model_s_answers(scores):
  """--mode=eval with eval.quantize=int8 (the LLM's projections weight-only int8, qwix
  PTQ) against the run's own float32 test answers, greedy, question by question: the
  issue's target is >= 95 %. Measured: 240 of 240 (1.0000), 2026-12-07."""
  *_, pairs = scores
  same = np.mean([full == int8 for full, int8 in pairs.values()])
  print(f"int8 answers equal to float32 on {same:.4f} of {len(pairs)} test questions")
  assert len({full for full, _ in pairs.values()}) > 5  # the answers differ by image
  assert same >= 0.95, [pair for pair in pairs.values() if pair[0] != pair[1]][:10]
