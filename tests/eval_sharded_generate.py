"""Run by test_eval_generate.py in a 2-device subprocess (XLA host devices): greedy and
sampled answers with the batch sharded over a 'data' mesh axis, and without; prints JSON."""
import json
import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import jax  # noqa: E402  (the flag must be set before jax starts)
import numpy as np  # noqa: E402

from exgra_jax.inference import generate as gen  # noqa: E402
from exgra_jax.models.config import LlavaConfig, LlmConfig, VisionConfig  # noqa: E402
from exgra_jax.models.llava import LlavaModel  # noqa: E402

CFG = LlavaConfig(
    vision=VisionConfig(image_size=28, patch_size=7, hidden_size=32, num_layers=2, num_heads=4,
                        intermediate_size=64),
    llm=LlmConfig(vocab_size=64, hidden_size=48, intermediate_size=80, num_layers=2,
                  num_heads=4, num_kv_heads=2, max_position_embeddings=64),
    connector="none", projector="mlp2x_gelu")


def main():
  rng = np.random.RandomState(0)
  prompts = [rng.randint(1, 62, n).tolist() for n in (20, 24, 21)]
  for p in prompts:
    p[3:19] = [63] * 16
  pixels = rng.randn(3, 28, 28, 3).astype(np.float32)
  model = LlavaModel(CFG)
  ids, mask = gen.pad_prompts(prompts[:1], 24, 0)
  params = model.init(jax.random.key(0), ids, mask, ids == 63, pixels[:1])["params"]
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  results = {}
  for temperature in (0.0, 2.0):
    settings = gen.GenerationSettings(batch_size=2, length_buckets=(32,), max_new_tokens=6,
                                      temperature=temperature)
    for name, placement in (("plain", None), ("sharded", sharding)):
      results[f"{name}_{temperature}"] = gen.generate(
          model, params, prompts, pixels, settings, image_patch_id=63, eos_id=-1, pad_id=0,
          detokenize=lambda t: " ".join(map(str, t)), key=jax.random.key(1),
          batch_sharding=placement)
  print(json.dumps({"devices": jax.device_count(), **results}))


if __name__ == "__main__":
  main()
