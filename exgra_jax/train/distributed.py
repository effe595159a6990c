"""Multi-host start-up: `jax.distributed.initialize` from `config.distributed`.

- `none`: single process.
- `auto`: jax detects the cluster (Cloud TPU metadata, SLURM environment variables).
- `explicit`: coordinator address / process count / process id from the config (the
  loopback launcher and the tests use this).
CPU-only multi-process runs need a CPU collectives implementation (gloo) for cross-process
all-reduces; it is set before initialisation.
"""
import jax
import ml_collections

MODES = ("none", "auto", "explicit")


def initialize(config: ml_collections.ConfigDict) -> None:
  """Joins the multi-process run of `config.distributed`; must precede any jax computation.

  Takes the whole config, as `exgra_jax/main.py` calls it.
  """
  dist = config.distributed
  if dist.mode not in MODES:
    raise ValueError(f"distributed.mode={dist.mode!r} is not one of {MODES}")
  if dist.mode == "none":
    return
  if dist.cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", dist.cpu_collectives)
  if dist.mode == "auto":
    jax.distributed.initialize()
    return
  if not dist.coordinator_address:
    raise ValueError("distributed.mode=explicit needs distributed.coordinator_address")
  if not 0 <= dist.process_id < dist.num_processes:
    raise ValueError(f"distributed.process_id={dist.process_id} is not in "
                     f"[0, num_processes={dist.num_processes})")
  jax.distributed.initialize(coordinator_address=dist.coordinator_address,
                             num_processes=dist.num_processes, process_id=dist.process_id)
