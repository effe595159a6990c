"""Helper run in a subprocess by test_hf_sharded_and_tools.py (fake CPU devices need a
fresh jax): `python hf_sharded_run.py HF_DIR WORKDIR` imports HF_DIR (scanned layers) onto
a data=1 x fsdp=2 x tensor=2 mesh of 4 devices, checks it against a 1-device import,
saves and reloads it as a params checkpoint onto the mesh, exports it from the sharded
arrays and re-imports; prints JSON."""
import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import traverse_util  # noqa: E402

from configs import base  # noqa: E402
from exgra_jax.hf import exporter, importer  # noqa: E402
from exgra_jax.train import mesh as mesh_lib  # noqa: E402
from exgra_jax.weights import loading  # noqa: E402

LEAVES = {"q_proj": ("llm", "layers", "self_attn", "q_proj", "kernel"),
          "embed": ("llm", "embed_tokens", "embedding"), "lm_head": ("llm", "lm_head", "kernel"),
          "vision_fc1": ("vision", "layers_0", "mlp", "fc1", "kernel")}


def _same(a, b) -> bool:
  fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
  return fa.keys() == fb.keys() and all(np.array_equal(np.asarray(fa[k]), np.asarray(fb[k]))
                                        for k in fa)


def _layout(params) -> dict:
  flat = traverse_util.flatten_dict(params)
  return {name: {"spec": list(flat[path].sharding.spec),
                 "shard_fraction": flat[path].addressable_shards[0].data.size / flat[path].size}
          for name, path in LEAVES.items()}


def main(hf_dir: str, workdir: str) -> None:
  config = base.get_config()
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 2, 2
  mesh = mesh_lib.build_mesh(config.mesh)
  rules = config.logical_axis_rules
  scanned = {"scan_layers": True}
  reference = importer.import_model(hf_dir, overrides=scanned)
  sharded = importer.import_model(hf_dir, overrides=scanned, mesh=mesh, rules=rules)
  params_dir = os.path.join(workdir, "params")
  loading.save_params(params_dir, sharded.params, sharded.model_config,
                               tokenizer_dir=sharded.tokenizer_dir)
  reloaded = loading.load(params_dir, mesh=mesh, rules=rules)
  out = os.path.join(workdir, "export")
  exporter.export(sharded.params, sharded.model_config, out,
                  tokenizer_dir=sharded.tokenizer_dir)
  again = importer.import_model(out, overrides=scanned)
  print(json.dumps({
      "devices": jax.device_count(), "import": _layout(sharded.params),
      "reload": _layout(reloaded.params), "import_equal": _same(sharded.params,
                                                                reference.params),
      "reload_equal": _same(reloaded.params, reference.params),
      "export_equal": _same(again.params, reference.params)}))


if __name__ == "__main__":
  main(*sys.argv[1:])
