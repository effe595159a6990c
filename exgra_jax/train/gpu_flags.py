"""The XLA flags and allocator setting every GPU run uses, owned here.

`main` applies them before jax starts (`apply`), `launch/slurm_gpu.sbatch` exports them for
everything it runs (`python -m exgra_jax.train.gpu_flags` prints the shell lines), and
`tools/plan_memory.py --gpu` compiles with exactly these (`XLA_GPU_FLAGS` as compiler
options), so a plan is the program a GPU run compiles. Flags already in the environment win
(a user's override). Other platforms ignore them: XLA reads `--xla_gpu_*` only when it
compiles for a GPU. No jax import here: this runs before jax starts. Why each is set and
what it costs: docs/train.md ("GPU flags").
"""
import os
import shlex
from collections.abc import MutableMapping

XLA_GPU_FLAGS: dict[str, bool] = {
    # XLA's Triton GEMM emitter fails to compile the ViT's attention out-projection at the
    # release's shapes ("Couldn't find output tile sizes": the dot's operand is a bitcast of
    # the head merge, 16 x 257 = 4112 rows): GEMMs go to cuBLAS instead (docs/train.md,
    # "The Triton GEMM tiling failure").
    "xla_gpu_enable_triton_gemm": False,
    # Overlap FSDP's all-gathers / reduce-scatters with compute (NVIDIA JAX-Toolbox and
    # MaxText GPU recipes).
    "xla_gpu_enable_latency_hiding_scheduler": True,
}
# jax preallocates this fraction of each GPU's memory (default 0.75); the rest is left to
# CUDA, cuBLAS and cuDNN workspaces. Plans compare the compiler's peak with this share.
MEMORY_FRACTION = 0.90


def command_line() -> list[str]:
  """XLA_GPU_FLAGS as XLA_FLAGS items ("--xla_gpu_enable_triton_gemm=false")."""
  return [f"--{name}={str(value).lower()}" for name, value in XLA_GPU_FLAGS.items()]


def apply(environ: MutableMapping[str, str] = os.environ) -> None:
  """Adds XLA_GPU_FLAGS to XLA_FLAGS (a flag already named there is kept as given) and sets
  XLA_PYTHON_CLIENT_MEM_FRACTION unless set. Call before jax creates its backends."""
  given = environ.get("XLA_FLAGS", "")
  added = [flag for flag in command_line() if flag.split("=")[0] + "=" not in given]
  environ["XLA_FLAGS"] = " ".join(filter(None, [given, *added]))
  environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{MEMORY_FRACTION:.2f}")


if __name__ == "__main__":
  # `eval "$(python -m exgra_jax.train.gpu_flags)"` in a launcher: export lines for a shell.
  environment = dict(os.environ)
  apply(environment)
  for key in ("XLA_FLAGS", "XLA_PYTHON_CLIENT_MEM_FRACTION"):
    print(f"export {key}={shlex.quote(environment[key])}")
