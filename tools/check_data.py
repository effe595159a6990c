"""Validates a dataset and prints the count of each problem with example record ids.

python tools/check_data.py --records=train.json --images=images/ [--tokenizer=tok_dir] \
    [--num_image_tokens=256] [--image_tokens=im_start_end|image] [--max_length=2048] \
    [--to_jsonl=train.jsonl]

--to_jsonl first rewrites a JSON list as JSONL (the fix for a list with bytes that are
not UTF-8: in JSONL such a record is skipped and counted alone), then checks the JSONL.
Exit status 0 when the check ran, whatever it found, a record file that cannot be read
included; see exgra_jax/data/dataset_check.py.
"""
from absl import app, flags

from exgra_jax import console
from exgra_jax.data import dataset_check, records

_RECORDS = flags.DEFINE_string("records", None, "JSON / JSONL record file", required=True)
_IMAGES = flags.DEFINE_string("images", None, "image folder of the records", required=True)
_TOKENIZER = flags.DEFINE_string("tokenizer", "", "HF tokenizer dir (checks text lengths)")
_NUM_IMAGE_TOKENS = flags.DEFINE_integer("num_image_tokens", 256, "image tokens per image")
_IMAGE_TOKENS = flags.DEFINE_enum("image_tokens", "im_start_end", ["im_start_end", "image"],
                                  "the model's image-token style (config.model.image_tokens)")
_MAX_LENGTH = flags.DEFINE_integer("max_length", 2048, "tokens per conversation")
_TO_JSONL = flags.DEFINE_string("to_jsonl", "", "write the JSON list as this JSONL first")


def main(argv):
  del argv
  console.setup(flags.FLAGS.verbosity)
  path = _RECORDS.value
  try:
    if _TO_JSONL.value:
      count = records.list_to_jsonl(path, _TO_JSONL.value)
      print(f"wrote {count} records to {_TO_JSONL.value}")
      path = _TO_JSONL.value
    log = dataset_check.check_dataset(
        path, _IMAGES.value, tokenizer_dir=_TOKENIZER.value,
        num_image_tokens=_NUM_IMAGE_TOKENS.value, max_length=_MAX_LENGTH.value,
        image_tokens=_IMAGE_TOKENS.value)
  except records.RecordFileError as e:
    print(f"record file unreadable: {e}")
    return
  print(log.summary())


if __name__ == "__main__":
  app.run(main)
