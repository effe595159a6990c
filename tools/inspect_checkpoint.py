"""Prints a checkpoint's step, parameter tree with shapes, and parameter checksum.

python tools/inspect_checkpoint.py --checkpoint=WORKDIR/checkpoints/stage2/1500
python tools/inspect_checkpoint.py --checkpoint=WORKDIR/checkpoints/finetune_best
A train step, a stage directory (newest step) or a params-only checkpoint. The checksum
is the one the training summary and the evaluation protocol report print.
Logic: exgra_jax/weights/inspection.py.
"""
from absl import app, flags

from exgra_jax import console, run_config
from exgra_jax.weights import inspection

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "train step, stage or params checkpoint",
                                  required=True)


def main(argv):
  del argv
  console.setup(flags.FLAGS.verbosity)
  problem = run_config.model_problem("--checkpoint", _CHECKPOINT.value)
  if problem:
    run_config.exit_usage(problem)
  info = inspection.read_checkpoint(_CHECKPOINT.value)
  print(f"{info['kind']} {info['path']}")
  if info["step"] is not None:
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
