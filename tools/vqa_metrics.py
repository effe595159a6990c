"""Prints the VQA metrics of an answers file as JSON (see exgra_jax/eval/vqa_metrics.py).

python tools/vqa_metrics.py --gt=test_w_options_new.json --pred=answers.jsonl \
    [--candidate=candidate.json]
"""
import json

from absl import app, flags

from exgra_jax import console
from exgra_jax.eval import vqa_metrics

_GT = flags.DEFINE_string("gt", None, "VQA set JSON (release format)", required=True)
_PRED = flags.DEFINE_string("pred", None, "answers jsonl (release format)", required=True)
_CANDIDATE = flags.DEFINE_string("candidate", None, "candidate.json for open accuracy")


def main(argv):
  del argv
  console.setup(flags.FLAGS.verbosity)
  print(json.dumps(vqa_metrics.evaluate_files(_GT.value, _PRED.value, _CANDIDATE.value),
                   indent=2))


if __name__ == "__main__":
  app.run(main)
