"""Serving throughput and latency: 1, 4 and 16 concurrent HTTP clients against sequential
`predict` calls (`eval.single_question.answer_question`), same model, same run.

Why: the server decodes concurrent requests together (continuous batching,
serving/engine.py); this measures what that buys. Every client asks the same question
about a different demo image with greedy decoding, so all requests have the same prompt
length (one compiled program for predict) and the server's answers are the predict
answers (their token counts are used for both). Every prefill size the server can form is
compiled before timing, and each setting runs once untimed first. Reports tokens/s,
requests/s, latency p50 / p95 and the mean rows per decode step per setting, and each
setting's tokens/s over the sequential one (target: 16 clients >= 4x; docs/serve.md has
the numbers).

    python -m benchmarks.bench_serve [--model=DIR --image_dir=DIR --template=simple]
        [--requests=32] [--max_tokens=32]

Without --model: a tiny random model and the small demo world in a temporary directory.
"""
import concurrent.futures
import json
import os
import statistics
import tempfile
import time
import urllib.request

import flax.linen as nn
import jax
from absl import app, flags

from exgra_jax import configuration
from exgra_jax.data import demo_world
from exgra_jax.eval import single_question
from exgra_jax.models import llava
from exgra_jax.models.config import LlavaConfig
from exgra_jax.serving import engine as engine_lib
from exgra_jax.serving import http_api
from exgra_jax.serving.requests import Conversation, Limits
from exgra_jax.weights import checkpoints

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Model directory (default: a tiny random model).")
flags.DEFINE_string("image_dir", None, "Images to ask about (default: the demo world's).")
flags.DEFINE_enum("template", "train", ["simple", "train"], "Conversation template.")
flags.DEFINE_integer("requests", 32, "Requests per setting.")
flags.DEFINE_integer("max_tokens", 32, "Answer length (tokens).")
flags.DEFINE_integer("max_batch", 16, "Server's --max_batch.")
flags.DEFINE_list("clients", ["1", "4", "16"], "Concurrent clients per setting.")

QUESTION = "What is shown in this image?"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_model(directory: str) -> tuple[str, str]:
  """(model dir, image dir) of a tiny random model on the small demo world."""
  world = os.path.join(directory, "world")
  demo_world.make_demo_world(world, size="small", seed=0)
  config = configuration.load(os.path.join(REPO, "configs", "demo.py"), [])
  params = nn.unbox(llava.init_boxed_params(LlavaConfig.from_config(config.model),
                                            jax.random.key(0)))
  model_dir = os.path.join(directory, "tiny")
  checkpoints.save_params(model_dir, params, config.model.to_dict(),
                          tokenizer_dir=os.path.join(world, "tokenizer"))
  return model_dir, os.path.join(world, "images")


def _request(base: str, image: str) -> tuple[float, int]:
  """One chat completion -> (latency seconds, completion tokens)."""
  payload = {"max_tokens": FLAGS.max_tokens, "messages": [{"role": "user", "content": [
      {"type": "text", "text": QUESTION}, {"type": "image_url", "image_url": {"url": image}}]}]}
  request = urllib.request.Request(f"{base}/v1/chat/completions",
                                   data=json.dumps(payload).encode(),
                                   headers={"Content-Type": "application/json"})
  start = time.perf_counter()
  with urllib.request.urlopen(request, timeout=600) as response:
    usage = json.loads(response.read())["usage"]
  return time.perf_counter() - start, usage["completion_tokens"]


def _concurrent(base: str, images: list[str], clients: int, engine: engine_lib.Engine
                ) -> dict:
  steps, row_steps = engine.stats.steps, engine.stats.row_steps
  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    results = list(pool.map(lambda image: _request(base, image), images))
  wall = time.perf_counter() - start
  return {**_summary(wall, [r[0] for r in results], sum(r[1] for r in results)),
          "mean_batch": (engine.stats.row_steps - row_steps) / (engine.stats.steps - steps)}


def _summary(wall: float, latencies: list[float], tokens: int) -> dict:
  quantiles = statistics.quantiles(latencies, n=20, method="inclusive")
  return {"tokens_per_s": tokens / wall, "requests_per_s": len(latencies) / wall,
          "p50_s": statistics.median(latencies), "p95_s": quantiles[18]}


def _compile_shapes(served: engine_lib.ServedModel, image: str) -> None:
  """Prefills of every size the engine pads to (1, 2, 4, ... max_batch) and the decode
  step, in an engine run by hand (compiled programs are shared by every engine)."""
  with open(image, "rb") as f:
    request = Conversation(f.read()).request(QUESTION, max_tokens=FLAGS.max_tokens)
  job = engine_lib.prepare(request, served, Limits())
  engine = engine_lib.Engine(served, FLAGS.max_batch, start=False)
  rows = 1
  while rows <= FLAGS.max_batch:
    streams = [engine.submit(job) for _ in range(rows)]
    while not all(s.done for s in streams):
      engine.run_once()
    rows *= 2


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as tmp:
    model_dir, image_dir = ((FLAGS.model, FLAGS.image_dir) if FLAGS.model
                            else _tiny_model(tmp))
    names = sorted(n for n in os.listdir(image_dir)
                   if n.lower().endswith((".png", ".jpg", ".jpeg", ".dcm")))
    images = [names[i % len(names)] for i in range(FLAGS.requests)]
    served = engine_lib.load_model(model_dir, template=FLAGS.template,
                                   default_max_tokens=FLAGS.max_tokens)
    engine = engine_lib.Engine(served, FLAGS.max_batch)
    server = http_api.Server(("127.0.0.1", 0), served, engine, limits=Limits(),
                             image_root=image_dir)
    server.serve_in_thread()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
      _compile_shapes(served, os.path.join(image_dir, images[0]))
      tokens = [_request(base, image)[1] for image in images]

      def predict(image: str) -> str:
        return single_question.answer_question(
            served.model, served.params, served.tokenizer, os.path.join(image_dir, image),
            QUESTION, template=FLAGS.template, max_new_tokens=FLAGS.max_tokens)
      predict(images[0])  # compilation
      latencies = []
      start = time.perf_counter()
      for image in images:
        began = time.perf_counter()
        predict(image)
        latencies.append(time.perf_counter() - began)
      results = {"sequential predict": _summary(time.perf_counter() - start, latencies,
                                                sum(tokens))}
      for clients in map(int, FLAGS.clients):
        _concurrent(base, images, clients, engine)  # untimed: warms this setting
        results[f"{clients} concurrent clients"] = _concurrent(base, images, clients, engine)
    finally:
      server.shutdown()
      server.server_close()
      engine.close()
  sequential = results["sequential predict"]["tokens_per_s"]
  print(f"{FLAGS.requests} requests of {FLAGS.max_tokens} tokens, {jax.devices()[0].platform}")
  print(f"{'setting':24s} {'tokens/s':>9s} {'req/s':>7s} {'p50 s':>7s} {'p95 s':>7s} "
        f"{'rows':>6s} {'x sequential':>12s}")
  for name, r in results.items():
    print(f"{name:24s} {r['tokens_per_s']:9.1f} {r['requests_per_s']:7.2f} {r['p50_s']:7.3f} "
          f"{r['p95_s']:7.3f} {r.get('mean_batch', 1):6.1f} {r['tokens_per_s'] / sequential:12.2f}")


if __name__ == "__main__":
  app.run(main)
