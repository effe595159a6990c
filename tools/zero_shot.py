"""Zero-shot multiple-choice classification as VQA (OmniMedVQA style) with any model.

python tools/zero_shot.py --model=WORKDIR/checkpoints/finetune_best --items=items.json \
    --image_root=DIR --out=DIR [--template=simple] [--batch_size=8] [--max_new_tokens=64]
Items: `{"question_id", "image", "question", "options": [...] (or option_A..option_D),
"gt_answer", "dataset"}`, images relative to --image_root. Writes `answers.jsonl`
(resumable: the same command continues) and `zero_shot_accuracy.json` (per dataset and
overall) to --out and prints the accuracies. docs/eval.md, "Zero-shot classification".
Logic: exgra_jax/eval/zero_shot.py.
"""
import json
import os

from absl import app, flags

from exgra_jax import model_flags, run_config
from exgra_jax.inference import prompts

_ITEMS = flags.DEFINE_string("items", None, "item file (JSON/JSONL)")
_IMAGE_ROOT = flags.DEFINE_string("image_root", None, "folder the items' images are under")
_OUT = flags.DEFINE_string("out", None, "output folder (answers, accuracies)")
_TEMPLATE = model_flags.define_template(prompts.TEMPLATES)
_BATCH = flags.DEFINE_integer("batch_size", 8, "questions answered together")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 64, "decoding limit")
_BUCKETS = flags.DEFINE_list("length_buckets", ["512", "1024", "2048"],
                             "prompt lengths compiled for (tokens, increasing)")


def main(argv):
  run_config.start_command(argv)
  problems = model_flags.problems() + [p for p in (
      run_config.path_problem("--items", _ITEMS.value),
      run_config.path_problem("--image_root", _IMAGE_ROOT.value, "dir"),
      run_config.url_problem("--out", _OUT.value) if _OUT.value else "--out is required") if p]
  run_config.exit_on_problems(problems)
  # Heavy (jax, the model) only once the command line is known to be right.
  from exgra_jax.data import records  # pylint: disable=g-import-not-at-top
  from exgra_jax.eval import vqa_metrics, zero_shot  # pylint: disable=g-import-not-at-top
  from exgra_jax.inference import generate, single_question  # pylint: disable=g-import-not-at-top
  from exgra_jax.models.config import num_image_tokens  # pylint: disable=g-import-not-at-top
  model, params, tokenizer = single_question.load_for_generation(
      model_flags.MODEL.value, **model_flags.loader_args())
  size = model.cfg.vision.image_size

  def load_pixels(item):
    relative = records.safe_relative_path(str(item["image"]), zero_shot.item_id(item))
    return single_question.load_pixels(os.path.join(_IMAGE_ROOT.value, relative), size)

  settings = generate.GenerationSettings(
      batch_size=_BATCH.value, length_buckets=tuple(int(b) for b in _BUCKETS.value),
      max_new_tokens=_MAX_NEW_TOKENS.value, temperature=0.0, stop="###")
  result = zero_shot.evaluate_loaded(
      model, params, tokenizer, vqa_metrics.read_json_or_jsonl(_ITEMS.value), load_pixels,
      settings=settings, template=_TEMPLATE.value, num_image_tokens=num_image_tokens(model.cfg),
      output_dir=_OUT.value, model_id=os.path.basename(os.path.normpath(model_flags.MODEL.value)))
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  app.run(main)
