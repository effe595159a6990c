"""NVIDIA GPUs to compile for on a host without one: XLA's target descriptions, and the two
compile-only stand-ins the CUDA compiler needs for a step with host callbacks.

The `*.txtpb` files here are XLA's own `GpuTargetConfigProto`s (openxla/xla,
`xla/backends/gpu/target_config/specs/`, commit named in each file): what a real GPU would
report to the compiler (compute capability, memory, shared memory, cores). With them and the
CUDA plugin (`pip install -e '.[cuda]'`), `jax.experimental.topologies` gives compile-only
devices, and the CUDA compiler (cuDNN fusions need the cuDNN wheel) builds the real program
for them: what `tools/plan_memory.py --gpu` reports. Nothing here is used to train.
"""
import contextlib
import functools
import os
import re
from collections.abc import Iterator

# --gpu=KIND:COUNT -> XLA's file for that card (SXM boards: the 8-GPU HGX/DGX nodes).
TARGET_FILES = {"a100-40": "a100_sxm_40.txtpb", "a100-80": "a100_sxm_80.txtpb",
                "h100": "h100_sxm.txtpb", "h200": "h200.txtpb"}
# Fields newer than jax 0.10's GpuDeviceInfoProto: its text parser refuses the whole file
# ("has no field named collective_memory_granularity"), so they are dropped on reading.
NEWER_FIELDS = ("collective_memory_granularity",)
GPUS_PER_NODE = 8  # an HGX/DGX node; --nodes spreads COUNT GPUs over that many hosts
_HERE = os.path.dirname(os.path.abspath(__file__))


class CudaMissing(RuntimeError):
  """The CUDA compiler (jax's CUDA plugin) is not installed in this environment."""


@functools.cache
def target_config(kind: str) -> str:
  """The text `GpuTargetConfigProto` of GPU `kind` (a TARGET_FILES key), newer fields
  dropped."""
  if kind not in TARGET_FILES:
    raise ValueError(f"unknown GPU {kind!r}: one of {', '.join(TARGET_FILES)}")
  with open(os.path.join(_HERE, TARGET_FILES[kind])) as f:
    lines = f.read().splitlines()
  return "\n".join(line for line in lines
                   if line.strip().split(":")[0] not in NEWER_FIELDS)


def _field(text: str, name: str) -> str:
  return re.search(rf"^\s*{name}: \"?([^\"\n]+)\"?$", text, re.M).group(1)


@functools.cache
def device_memory_bytes() -> dict[str, int]:
  """Memory per card by the device kind the compiler reports ("NVIDIA H100 80GB HBM3"), as
  XLA's target files give it (`device_memory_size`)."""
  out = {}
  for kind in TARGET_FILES:
    text = target_config(kind)
    out[_field(text, "device_description_str")] = int(_field(text, "device_memory_size"))
  return out


def parse_gpu(spec: str, nodes: int = 1) -> tuple[str, int, str]:
  """"h100:8" and `nodes` -> (kind, GPU count, the topology string "1xNODESxPER_NODE").
  ValueError, naming the accepted forms, for anything else."""
  kind, _, count = spec.partition(":")
  if kind not in TARGET_FILES or not count.isdigit() or int(count) < 1:
    raise ValueError(f"--gpu={spec}: expected KIND:COUNT with KIND one of "
                     f"{', '.join(TARGET_FILES)}, e.g. --gpu=h100:8")
  gpus = int(count)
  if nodes < 1 or gpus % nodes or gpus // nodes > GPUS_PER_NODE:
    raise ValueError(f"--gpu={spec} --nodes={nodes}: the GPUs must split evenly over the "
                     f"nodes, at most {GPUS_PER_NODE} per node (e.g. --gpu=h100:16 --nodes=2)")
  return kind, gpus, f"1x{nodes}x{gpus // nodes}"


def topology_devices(kind: str, topology: str) -> list:
  """Compile-only devices of `topology` ("1x2x8": 1 slice, 2 hosts, 8 GPUs each) of GPU
  `kind`; CudaMissing when jax's CUDA plugin or cuDNN is not installed."""
  from jax.experimental import topologies
  from jax._src.lib import cuda_versions
  try:
    devices = list(topologies.get_topology_desc(platform="cuda", topology=topology,
                                                target_config=target_config(kind)).devices)
  except NotImplementedError as e:  # jax 0.10 without the plugin: "topology not implemented"
    raise CudaMissing("the CUDA compiler (jax's CUDA plugin) is not installed: "
                      "pip install -e '.[cuda]'") from e
  try:  # cuDNN attention and convolutions are built from the library's version at trace time
    cuda_versions.cudnn_get_version()
  except RuntimeError as e:
    raise CudaMissing("cuDNN (the nvidia-cudnn-cu12 wheel) is not installed: "
                      "pip install -e '.[cuda]'") from e
  return devices


def cudnn_attention_count(hlo: str) -> int:
  """Fused cuDNN attention calls (forward and backward) in a compiled GPU program."""
  return len(re.findall(r'custom_call_target="__cudnn\$fmha', hlo))


@contextlib.contextmanager
def compile_only_callbacks() -> Iterator[None]:
  """Lets a step with host callbacks (`pure_callback`) lower and compile for compile-only GPU
  devices, for a plan only: the program is the real one, its callbacks are never run.

  Why: jax 0.10 looks up a live backend for the devices' platform while lowering a
  callback (`ModuleContext.get_backend` -> "Unknown backend: 'gpu' requested" on a host with
  no GPU), although the GPU lowering (an `xla_ffi_python_gpu_callback` custom call carrying
  the callback's index) never uses it; and a compile-only client's `compile()` takes no
  host-callback objects (TypeError), which only an executable that runs needs. So, inside
  this context: lowering for a compile-only client gets that client itself, and compiling
  for one drops the callback objects. Real backends are untouched. Private jax APIs, so it
  lives here, the one place that compiles without a GPU, never in training code.
  """
  from jax._src import compiler
  from jax._src.interpreters import mlir
  from jax._src.lib import _jax
  get_backend = mlir.ModuleContext.get_backend
  compile_and_load = compiler.backend_compile_and_load

  def lowering_backend(self, optional: bool = False):
    if isinstance(self.backend, _jax.CompileOnlyPyClient):
      return self.backend
    return get_backend(self, optional)

  def compile_without_callbacks(backend, module, executable_devices, options, host_callbacks):
    if isinstance(backend, _jax.CompileOnlyPyClient):
      host_callbacks = ()
    return compile_and_load(backend, module, executable_devices, options, host_callbacks)

  mlir.ModuleContext.get_backend = lowering_backend
  compiler.backend_compile_and_load = compile_without_callbacks
  try:
    yield
  finally:
    mlir.ModuleContext.get_backend = get_backend
    compiler.backend_compile_and_load = compile_and_load
