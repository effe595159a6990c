"""Prints the per-device memory of a stage's compiled train step, with no weights allocated.

python tools/plan_memory.py --config=configs/pmc10.py --stage=stage2 --devices=8 \
    --mesh=fsdp=8,data=1 --samples_per_device=16 --length=512
Fake CPU devices stand in for the accelerators (XLA_FLAGS is set here, before jax starts).
Logic: exgra_jax/train/memory_plan.py.
"""
import os
import sys

from absl import app, flags

from exgra_jax import configuration

_CONFIG = configuration.define_config_flag()
_STAGE = flags.DEFINE_string("stage", "stage2", "stage whose step is planned")
_DEVICES = flags.DEFINE_integer("devices", 8, "fake devices (the mesh must use them all)")
_MESH = flags.DEFINE_string("mesh", "", "axis=size,... overrides of config.mesh, e.g. fsdp=8,data=1")
_SAMPLES = flags.DEFINE_integer("samples_per_device", 16, "samples per device per micro-batch")
_LENGTH = flags.DEFINE_integer("length", 512, "sequence length (image tokens included)")


def main(argv):
  del argv
  from exgra_jax.train import memory_plan  # jax starts here, after XLA_FLAGS is set
  config = _CONFIG.value
  for item in filter(None, _MESH.value.split(",")):
    axis, size = item.split("=")
    config.mesh[axis] = int(size)
  config[_STAGE.value].micro_batches = 1
  plan = memory_plan.plan_step_memory(config, _STAGE.value, _SAMPLES.value, _LENGTH.value)
  mib = 2 ** 20
  print(f"model {config.model.name}  parameters {plan.parameters:,}  mesh {plan.mesh}  "
        f"{plan.samples_per_device} samples x {plan.sequence_length} tokens per device")
  for name, value in (("arguments", plan.argument_bytes), ("outputs", plan.output_bytes),
                      ("temporaries", plan.temp_bytes), ("aliased", plan.alias_bytes),
                      ("peak", plan.peak_bytes)):
    print(f"  {name:12s} {value / mib:12.1f} MiB per device")
  print(f"  (stage {_STAGE.value}, alignment branch {'included' if config[_STAGE.value].align else 'absent'})")


if __name__ == "__main__":
  count = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--devices=")), "8")
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_force_host_platform_device_count={count}")
  app.run(main, flags_parser=configuration.parse_flags)
