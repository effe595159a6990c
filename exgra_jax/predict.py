r"""Answer one question about one image with a trained model.

    python -m exgra_jax.predict --model=workdir/checkpoints/finetune_best \
        --image=scan.dcm --question="Is there a lesion in the liver?"

The command line over `eval.single_question.answer_from_checkpoint`. `--model` is anything
`weights.loading.load` reads: a train checkpoint (step or stage directory), a
params-only checkpoint (`tools/import_hf.py`, `finetune_best`) or a Hugging Face directory
(imported on the fly; `--clip_dir` for the release layout). The image may be DICOM. `--template=none` uses the question as the whole prompt, `<image>`
expanded to the model's image tokens.
"""
from absl import app
from absl import flags

from exgra_jax import console, run_config
from exgra_jax.inference import prompts, single_question
from exgra_jax.models import adapters

_MODEL = flags.DEFINE_string("model", None, "Checkpoint or HF directory.")
_IMAGE = flags.DEFINE_string("image", None, "Image file (JPEG, PNG, TIFF, DICOM).")
_QUESTION = flags.DEFINE_string("question", None, "The question.")
_TEMPLATE = flags.DEFINE_enum("template", "simple", list(prompts.TEMPLATES),
                              "Prompt template (docs/eval.md).")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 128, "Decoding limit.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None,
                                 "Tokenizer directory (default: the checkpoint's own, or for "
                                 "a train checkpoint its run's, from WORKDIR/config.json).")
_CLIP_DIR = flags.DEFINE_string("clip_dir", None, "CLIP directory (release-layout HF dirs).")
_QUANTIZE = flags.DEFINE_enum("quantize", "", ["", *adapters.QUANTIZED],
                              "Weight-only quantization of the LLM's projections (qwix).")


def main(argv):
  if len(argv) > 1:
    run_config.exit_usage(run_config.stray_arguments(argv[1:]))
  console.setup(flags.FLAGS.verbosity)
  # Checked before the model loads (minutes for a 7B model), all in one message.
  problems = [p for p in (
      run_config.path_problem("--image", _IMAGE.value),
      run_config.model_problem("--model", _MODEL.value)) if p]
  if problems:
    run_config.exit_usage("\n".join(problems) + "\n(--model: a train checkpoint, a params "
                             "checkpoint of tools/import_hf.py or a Hugging Face directory)")
  print(single_question.answer_from_checkpoint(
      _MODEL.value, _IMAGE.value, _QUESTION.value, template=_TEMPLATE.value,
      max_new_tokens=_MAX_NEW_TOKENS.value, temperature=_TEMPERATURE.value,
      tokenizer_dir=_TOKENIZER.value, clip_dir=_CLIP_DIR.value, quantize=_QUANTIZE.value))


if __name__ == "__main__":
  flags.mark_flags_as_required(["model", "image", "question"])
  app.run(main)
