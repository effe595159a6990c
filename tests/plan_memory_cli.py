"""tools/plan_memory.py run as a user would (a subprocess), for the compiler tests
(test_tpu_compile.py: libtpu; test_gpu_compile.py: jax's CUDA plugin)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "plan_memory.py")
DEMO = "--config=" + os.path.join(ROOT, "configs", "demo.py")


def run_plan(*flags: str, hidden_module: str = "",
             tmp_path=None) -> subprocess.CompletedProcess:
  """The tool on the demo config with `flags`. `hidden_module` (with a `tmp_path` for its
  `sitecustomize`) is made unimportable in the tool's interpreter: a missing install."""
  env = dict(os.environ, PYTHONPATH=ROOT)
  if hidden_module:
    (tmp_path / "sitecustomize.py").write_text(
        f"import sys\nsys.modules[{hidden_module!r}] = None\n")
    env["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{ROOT}"
    # Importing libtpu sets TPU_LIBRARY_PATH in the importing process (this pytest worker,
    # if any test here imported jax), and jax loads that path without importing libtpu.
    env.pop("TPU_LIBRARY_PATH", None)
  return subprocess.run([sys.executable, TOOL, DEMO, *flags], capture_output=True, text=True,
                        timeout=900, check=False, env=env)
