"""Writes the demo world (images, records, VQA sets, tokenizer) into a folder.

python tools/make_demo_data.py --root=.cache/demo_small --size=small [--seed=0]

Idempotent: an existing complete world of the same size and seed is left as is.
See exgra_jax/data/demo_world.py and docs/demo_world.md.
"""
import json

from absl import app, flags

from exgra_jax import console
from exgra_jax.data import demo_world

_ROOT = flags.DEFINE_string("root", None, "output folder", required=True)
_SIZE = flags.DEFINE_enum("size", "small", sorted(demo_world.SIZES), "world size")
_SEED = flags.DEFINE_integer("seed", 0, "generator seed (>= 0)")


def main(argv):
  del argv
  console.setup(flags.FLAGS.verbosity)
  manifest = demo_world.make_demo_world(_ROOT.value, size=_SIZE.value, seed=_SEED.value)
  print(json.dumps(manifest["counts"], indent=1))


if __name__ == "__main__":
  app.run(main)
