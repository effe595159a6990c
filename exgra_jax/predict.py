r"""Answer one question about one image with a trained model.

    python -m exgra_jax.predict --model=workdir/checkpoints/finetune_best \
        --image=scan.dcm --question="Is there a lesion in the liver?"

`--model` is anything `train.model_checkpoint.load` reads: a train checkpoint (step or
stage directory), a params-only checkpoint (`tools/import_hf.py`, `finetune_best`) or a
Hugging Face directory (imported on the fly; `--clip_dir` for the release layout). The
image may be DICOM. `--template=none` uses the question as the whole prompt, `<image>`
expanded to the model's image tokens.
"""
from __future__ import annotations

from typing import Any

import ml_collections
from absl import app
from absl import flags
from etils import epath

from exgra_jax.data import pipeline, text
from exgra_jax.eval import prompts, single_question
from exgra_jax.models.config import LlavaConfig
from exgra_jax.models.llava import LlavaModel
from exgra_jax.train import model_checkpoint

_MODEL = flags.DEFINE_string("model", None, "Checkpoint or HF directory.")
_IMAGE = flags.DEFINE_string("image", None, "Image file (JPEG, PNG, TIFF, DICOM).")
_QUESTION = flags.DEFINE_string("question", None, "The question.")
_TEMPLATE = flags.DEFINE_enum("template", "simple", list(prompts.TEMPLATES),
                              "Prompt template (SPEC.md 5).")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 128, "Decoding limit.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None,
                                 "Tokenizer directory (needed for train checkpoints, which "
                                 "hold none).")
_CLIP_DIR = flags.DEFINE_string("clip_dir", None, "CLIP directory (release-layout HF dirs).")


def predict(model_dir: str, image: str, question: str, *, template: str = "simple",
            max_new_tokens: int = 128, temperature: float = 0.0, stop: str = "###",
            tokenizer_dir: str | None = None, clip_dir: str | None = None) -> str:
  """The cleaned answer of the model at `model_dir` (see module doc)."""
  loaded = model_checkpoint.load(model_dir, tokenizer_dir=tokenizer_dir, clip_dir=clip_dir)
  if loaded.report["missing"]:
    raise ValueError(f"{model_dir} lacks parameters: {loaded.report['missing'][:8]}")
  if not loaded.tokenizer_dir:
    raise ValueError(f"{model_dir} holds no tokenizer: pass --tokenizer=DIR")
  model = LlavaModel(LlavaConfig.from_config(loaded.model_config))
  return single_question.answer_question(
      model, loaded.params, text.load_tokenizer(loaded.tokenizer_dir), image, question,
      template=template, max_new_tokens=max_new_tokens, stop=stop, temperature=temperature)


def predict_from_workdir(config: ml_collections.ConfigDict, workdir: epath.Path, *,
                         image: str | None, question: str | None) -> dict[str, Any]:
  """`main --mode=predict`: the run's best (else newest) checkpoint answers one question."""
  from exgra_jax.eval import vqa  # pylint: disable=g-import-not-at-top
  if not image or not question:
    raise app.UsageError("--mode=predict needs --image and --question")
  checkpoint = str(vqa.default_checkpoint(config, workdir))
  answer = predict(checkpoint, image, question, template=config.eval.template,
                   max_new_tokens=config.eval.max_new_tokens,
                   temperature=config.eval.temperature, stop=config.eval.stop,
                   tokenizer_dir=pipeline.tokenizer_dir(config))
  return {"checkpoint": checkpoint, "image": image, "question": question, "answer": answer}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  print(predict(_MODEL.value, _IMAGE.value, _QUESTION.value, template=_TEMPLATE.value,
                max_new_tokens=_MAX_NEW_TOKENS.value, temperature=_TEMPERATURE.value,
                tokenizer_dir=_TOKENIZER.value, clip_dir=_CLIP_DIR.value))


if __name__ == "__main__":
  flags.mark_flags_as_required(["model", "image", "question"])
  app.run(main)
