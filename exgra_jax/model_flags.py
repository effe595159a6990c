"""The flags of the commands that answer with one model: predict, chat and serve.

Declared once, so that the three read a model the same way: `--model` is anything
`weights.loading.load` reads (train step or stage, params-only checkpoint, HF directory),
`--tokenizer` overrides its tokenizer, `--clip_dir` gives a release-layout HF directory
its vision tower, `--quantize` answers with int8 / int4 weights (the LLM's projections,
qwix PTQ: `inference.single_question.answering_model`), and `--template` picks the prompt
(docs/eval.md).
"""
from __future__ import annotations

from collections.abc import Sequence

from absl import flags

from exgra_jax import run_config
from exgra_jax.models import adapters

MODEL = flags.DEFINE_string("model", None, "Checkpoint or HF directory.")
TOKENIZER = flags.DEFINE_string(
    "tokenizer", None, "Tokenizer directory (default: the checkpoint's own, or for a train "
    "checkpoint its run's, from WORKDIR/config.json).")
CLIP_DIR = flags.DEFINE_string("clip_dir", None, "CLIP directory (release-layout HF dirs).")
QUANTIZE = flags.DEFINE_enum("quantize", "", ["", *adapters.QUANTIZED],
                             "Weight-only quantization of the LLM's projections (qwix).")


def define_template(choices: Sequence[str]) -> flags.FlagHolder:
  """`--template` over `choices` (predict takes `none` too; a conversation does not)."""
  return flags.DEFINE_enum("template", "simple", list(choices),
                           "Prompt template (docs/eval.md; `train` for models that know only "
                           "the training template, e.g. the demo's tiny model).")


def problems(image: str | None = None, *, image_required: bool = False) -> list[str]:
  """What is wrong with --model and --image (checked when given or required), found before
  the model loads (minutes for a 7B model), to be reported in one message."""
  found = [run_config.model_problem("--model", MODEL.value),
           (image or image_required) and run_config.path_problem("--image", image)]
  return [p for p in found if p]



def loader_args() -> dict[str, str | None]:
  """The tokenizer and CLIP directories and the quantization, as the model loaders take
  them."""
  return {"tokenizer_dir": TOKENIZER.value, "clip_dir": CLIP_DIR.value,
          "quantize": QUANTIZE.value}
