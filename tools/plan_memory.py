"""Compiles a stage's train step ahead of time and prints its per-device memory and shape.

On fake CPU devices (XLA:CPU's buffer assignment, a guide):
    python tools/plan_memory.py --config=configs/pmc10.py --stage=stage2 --devices=8 \
        --mesh=fsdp=8,data=1 --samples_per_device=16 --length=512
With the TPU compiler for a slice (needs libtpu, `pip install -e '.[tpu]'`; no TPU):
    python tools/plan_memory.py --config=configs/pmc10.py --stage=stage2 \
        --topology=v5p:4x4x4 --mesh=data=1,fsdp=64 --samples_per_device=16 --length=512 --json
With the CUDA compiler for NVIDIA GPUs (needs `pip install -e '.[cuda]'`; no GPU), one mesh
axis over all GPUs unless --mesh says otherwise, the project's GPU flags:
    python tools/plan_memory.py --config=configs/pmc10.py --stage=stage2 --gpu=h100:8 \
        --samples_per_device=16 --length=512 --json
Answering instead of a train step (`--generate`: prefill of --samples_per_device prompts of
--length tokens, then --max_new_tokens greedy steps, on one device), weights as stored or
weight-only quantized as `--quantize` loads them:
    python tools/plan_memory.py --config=configs/vqa_rad.py --generate --quantize=int4 \
        --gpu=a100-40:1 --samples_per_device=16 --length=512 --max_new_tokens=128 --json
Adapters: `--config.finetune.lora.rank=8` (`--config.finetune.lora.base=int4`: QLoRA) plans
the adapter step training runs.
`--json` ends the output with one JSON line (topology, chips, mesh, stage, lora, quantize,
max_new_tokens, parameters, samples_per_device, micro_batches, length, peak_gib, hbm_gib
(what the step may use), device_memory_gib, fits, collectives, callback, cudnn_attention, xla_flags, compile_s); `--hlo_out` writes the compiled HLO.
Settings that cannot work (a group size or batch the mesh does not divide, a missing libtpu
or CUDA plugin) are one line and exit status 2. Logic: exgra_jax/train/memory_plan.py.
"""
import json
import os
import sys

from absl import app, flags

from exgra_jax import run_config
from exgra_jax.train import gpu_flags, gpu_targets

_CONFIG = run_config.define_config_flag()
_STAGE = flags.DEFINE_string("stage", "stage2", "stage whose step is planned")
_DEVICES = flags.DEFINE_integer("devices", 8, "fake CPU devices (no --topology or --gpu)")
_TOPOLOGY = flags.DEFINE_string("topology", "", "TPU slice to compile for, e.g. v5p:4x4x4, "
                                "v5e:4x4, v6e:2x4, v4:2x2x1 (libtpu; no TPU needed)")
_GPU = flags.DEFINE_string("gpu", "", "NVIDIA GPUs to compile for, KIND:COUNT with KIND one "
                           "of a100-40, a100-80, h100, h200 (CUDA plugin; no GPU needed)")
_NODES = flags.DEFINE_integer("nodes", 1, "hosts the --gpu GPUs are spread over")
_MESH = flags.DEFINE_string("mesh", "", "axis=size,... overrides of config.mesh, e.g. fsdp=8,data=1")
_SAMPLES = flags.DEFINE_integer("samples_per_device", 16, "samples per device per micro-batch")
_MICRO = flags.DEFINE_integer("micro_batches", 1, "micro-batches per step (gradient "
                              "accumulation, the stage's micro_batches)")
_LENGTH = flags.DEFINE_integer("length", 512, "sequence length (image tokens included)")
_GENERATE = flags.DEFINE_bool("generate", False, "plan answering (prefill + greedy decode) on "
                               "one device instead of the --stage's train step")
_QUANTIZE = flags.DEFINE_enum("quantize", "", ["", "int8", "int4"], "with --generate: the "
                              "LLM's projections weight-only quantized, as --quantize loads")
_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 128, "with --generate: decoded tokens")
_HLO_OUT = flags.DEFINE_string("hlo_out", "", "write the compiled HLO text to this file")
_JSON = flags.DEFINE_bool("json", False, "end with one JSON line of the plan")

GIB = 2 ** 30


def _fail(message: str) -> None:
  print(f"plan_memory: {message}", file=sys.stderr)
  sys.exit(2)


def main(argv):
  del argv
  import jax  # jax starts here, after the environment is set
  from exgra_jax.train import memory_plan
  xla_flags = " ".join(gpu_flags.command_line()) if _GPU.value else ""
  config = _CONFIG.value
  for item in filter(None, _MESH.value.split(",")):
    axis, _, size = item.partition("=")
    if axis not in config.mesh or not size.lstrip("-").isdigit():
      _fail(f"--mesh item {item!r}: expected AXIS=SIZE with AXIS in {sorted(config.mesh)}")
    config.mesh[axis] = int(size)
  config[_STAGE.value].micro_batches = _MICRO.value
  if _GPU.value and _TOPOLOGY.value:
    _fail("--gpu and --topology name two targets: pass one")
  target, devices = _TOPOLOGY.value, None
  try:
    if _GPU.value:
      kind, count, topology = gpu_targets.parse_gpu(_GPU.value, _NODES.value)
      target = f"{kind}:{topology}"
      if not _MESH.value:  # FSDP over every GPU, as the TPU table's slices
        config.mesh.update(data=1, fsdp=count)
      devices = gpu_targets.topology_devices(kind, topology)
    elif _TOPOLOGY.value:
      devices = memory_plan.topology_devices(_TOPOLOGY.value)
    if _GENERATE.value:
      if devices is not None and len(devices) != 1:
        _fail("--generate plans one device: pass --gpu=KIND:1 (or a one-chip --topology)")
      plan = memory_plan.plan_generation_memory(
          config, _QUANTIZE.value, _SAMPLES.value, _LENGTH.value, _NEW_TOKENS.value,
          (devices or jax.devices())[0], hlo_out=_HLO_OUT.value)
    else:
      if _QUANTIZE.value:
        _fail("--quantize plans answering: add --generate (a QLoRA step: "
              "--config.<stage>.lora.base=int4)")
      plan = memory_plan.plan_step_memory(config, _STAGE.value, _SAMPLES.value,
                                          _LENGTH.value, devices=devices,
                                          hlo_out=_HLO_OUT.value)
  except (memory_plan.LibtpuMissing, gpu_targets.CudaMissing, ValueError) as e:
    _fail(str(e))
  hbm = plan.usable_bytes
  memory = plan.device_memory_bytes
  print(f"model {config.model.name}  parameters {plan.parameters:,}  mesh {plan.mesh}  "
        f"{plan.samples_per_device} samples x {plan.sequence_length} tokens per device "
        f"x {_MICRO.value} micro-batches  "
        f"({plan.devices} x {plan.device_kind}, compiled in {plan.compile_seconds:.0f} s)")
  for name, value in (("arguments", plan.argument_bytes), ("outputs", plan.output_bytes),
                      ("temporaries", plan.temp_bytes), ("aliased", plan.alias_bytes),
                      ("peak", plan.peak_bytes)):
    print(f"  {name:12s} {value / 2 ** 20:12.1f} MiB per device")
  if hbm:
    share = "" if hbm == memory else f" (of {memory / GIB:.1f} GiB, jax's share)"
    print(f"  memory {hbm / GIB:.1f} GiB per device{share}: "
          f"{'fits' if plan.peak_bytes <= hbm else 'does NOT fit'}")
  print(f"  collectives {plan.collectives}  host callbacks {plan.callback}")
  if _GPU.value:
    print(f"  cuDNN attention calls {plan.cudnn_attention}  XLA flags {xla_flags}")
  if _GENERATE.value:
    print(f"  (answering: {_NEW_TOKENS.value} new tokens, weights "
          f"{_QUANTIZE.value or config.model.param_dtype})")
  else:
    print(f"  (stage {_STAGE.value}, alignment branch "
          f"{'included' if config[_STAGE.value].align else 'absent'})")
  if _JSON.value:
    print(json.dumps({
        "topology": target or f"cpu:{plan.devices}", "chips": plan.devices,
        "device_kind": plan.device_kind, "mesh": plan.mesh,
        "stage": "generate" if _GENERATE.value else _STAGE.value,
        "lora": None if _GENERATE.value else config[_STAGE.value].lora.to_dict(),
        "quantize": _QUANTIZE.value or None,
        "max_new_tokens": _NEW_TOKENS.value if _GENERATE.value else None,
        "parameters": plan.parameters,
        "samples_per_device": plan.samples_per_device, "micro_batches": _MICRO.value,
        "length": plan.sequence_length,
        "peak_gib": plan.peak_bytes / GIB, "temp_gib": plan.temp_bytes / GIB,
        "hbm_gib": None if hbm is None else hbm / GIB,
        "device_memory_gib": None if memory is None else memory / GIB,
        "fits": None if hbm is None else plan.peak_bytes <= hbm,
        "collectives": plan.collectives, "callback": plan.callback,
        "cudnn_attention": plan.cudnn_attention, "xla_flags": xla_flags or None,
        "compile_s": round(plan.compile_seconds, 1)}))


if __name__ == "__main__":
  if any(a.startswith(("--topology=", "--gpu=")) and not a.endswith("=") for a in sys.argv):
    # Compile for abstract TPU chips or GPUs: jax itself stays on the CPU, and libtpu's
    # one-process lock is not needed since no TPU is opened.
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  else:
    count = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--devices=")), "8")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={count}")
  app.run(main, flags_parser=run_config.parse_flags)
