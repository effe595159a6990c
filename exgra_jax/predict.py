r"""Answer one question about one image with a trained model.

    python -m exgra_jax.predict --model=workdir/checkpoints/finetune_best \
        --image=scan.dcm --question="Is there a lesion in the liver?"

The command line over `inference.single_question.answer_from_checkpoint`. `--model` is anything
`weights.loading.load` reads: a train checkpoint (step or stage directory), a
params-only checkpoint (`tools/import_hf.py`, `finetune_best`) or a Hugging Face directory
(imported on the fly; `--clip_dir` for the release layout). The image may be DICOM. `--template=none` uses the question as the whole prompt, `<image>`
expanded to the model's image tokens.
"""
from absl import app
from absl import flags

from exgra_jax import model_flags, run_config
from exgra_jax.inference import prompts, single_question

_IMAGE = flags.DEFINE_string("image", None, "Image file (JPEG, PNG, TIFF, DICOM).")
_QUESTION = flags.DEFINE_string("question", None, "The question.")
_TEMPLATE = model_flags.define_template(prompts.TEMPLATES)
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 128, "Decoding limit.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")


def main(argv):
  run_config.start_command(argv)
  # Checked before the model loads (minutes for a 7B model), all in one message.
  problems = model_flags.problems(_IMAGE.value, image_required=True)
  if problems:
    run_config.exit_usage("\n".join(problems) + "\n(--model: a train checkpoint, a params "
                          "checkpoint of tools/import_hf.py or a Hugging Face directory)")
  print(single_question.answer_from_checkpoint(
      model_flags.MODEL.value, _IMAGE.value, _QUESTION.value, template=_TEMPLATE.value,
      max_new_tokens=_MAX_NEW_TOKENS.value, temperature=_TEMPERATURE.value,
      **model_flags.loader_args()))


if __name__ == "__main__":
  flags.mark_flags_as_required(["model", "image", "question"])
  app.run(main)
