"""Prints a stage checkpoint's step, parameter tree with shapes, and parameter checksum.

python tools/inspect_checkpoint.py --checkpoint=WORKDIR/checkpoints/stage2/1500
Logic: exgra_jax/train/checkpoint_inspection.py.
"""
from absl import app, flags

from exgra_jax.train import checkpoint_inspection

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "checkpoint step directory", required=True)


def main(argv):
  del argv
  info = checkpoint_inspection.read_checkpoint(_CHECKPOINT.value)
  print(f"step {info['step']}  skipped {info['skipped']}")
  total = 0
  for name, (shape, dtype) in sorted(info["shapes"].items()):
    count = 1
    for size in shape:
      count *= size
    total += count
    print(f"  {name:70s} {str(shape):20s} {dtype}")
  print(f"parameters {total:,}")
  print(f"checksum {info['checksum']}")


if __name__ == "__main__":
  app.run(main)
