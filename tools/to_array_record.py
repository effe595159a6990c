"""Converts a record file + image folder into ArrayRecord shards (parallel, resumable).

python tools/to_array_record.py --records=train.json --images=images/ --out=shards/ \
    --num_shards=64 [--workers=8]

Re-running after an interruption keeps the complete shards; see
exgra_jax/data/array_record_writer.py.
"""
from absl import app, flags

from exgra_jax import console
from exgra_jax.data import array_record_writer, records

_RECORDS = flags.DEFINE_string("records", None, "JSON / JSONL record file", required=True)
_IMAGES = flags.DEFINE_string("images", None, "image folder of the records", required=True)
_OUT = flags.DEFINE_string("out", None, "output folder of the shards", required=True)
_NUM_SHARDS = flags.DEFINE_integer("num_shards", 16, "number of shards")
_WORKERS = flags.DEFINE_integer("workers", 4, "shards written at once")


def main(argv):
  del argv
  console.setup(flags.FLAGS.verbosity)
  recs, log = records.load_records(_RECORDS.value)
  paths = array_record_writer.write_shards(recs, _IMAGES.value, _OUT.value,
                                           num_shards=_NUM_SHARDS.value,
                                           workers=_WORKERS.value, log=log)
  print(f"{len(paths)} shards in {_OUT.value}")
  print(log.summary())


if __name__ == "__main__":
  app.run(main)
