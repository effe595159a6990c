"""Validates a dataset and prints the count of each problem with example record ids.

python tools/check_data.py --records=train.json --images=images/ [--tokenizer=tok_dir] \
    [--num_image_tokens=256] [--max_length=2048]

Exit status 0 when the check ran (whatever it found); see exgra_jax/data/dataset_check.py.
"""
from absl import app, flags

from exgra_jax.data import dataset_check

_RECORDS = flags.DEFINE_string("records", None, "JSON / JSONL record file", required=True)
_IMAGES = flags.DEFINE_string("images", None, "image folder of the records", required=True)
_TOKENIZER = flags.DEFINE_string("tokenizer", "", "HF tokenizer dir (checks text lengths)")
_NUM_IMAGE_TOKENS = flags.DEFINE_integer("num_image_tokens", 256, "image tokens per image")
_MAX_LENGTH = flags.DEFINE_integer("max_length", 2048, "tokens per conversation")


def main(argv):
  del argv
  log = dataset_check.check_dataset(
      _RECORDS.value, _IMAGES.value, tokenizer_dir=_TOKENIZER.value,
      num_image_tokens=_NUM_IMAGE_TOKENS.value, max_length=_MAX_LENGTH.value)
  print(log.summary())


if __name__ == "__main__":
  app.run(main)
