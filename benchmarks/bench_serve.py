"""Serving throughput and latency: 1, 4 and 16 concurrent HTTP clients of a
`python -m exgra_jax.serve` process against sequential `predict` calls in this process
(`eval.single_question.answer_question`), same model, same run.

Why: the server decodes concurrent requests together (continuous batching,
serving/engine.py); this measures what that buys. Every client asks the same question
about a different demo image with greedy decoding, so all requests have the same prompt
length (one compiled program for predict) and the server's answers are the predict
answers (their token counts are used for both). Settings:
- sequential predict: every request in turn, run before and after the servers (as one
  baseline, so that a change in the machine's load weighs on both sides);
- engine alone: every request submitted at once to an engine in this process (no HTTP,
  images already decoded): the batching alone;
- N clients, steps S: a server process with --decode_steps=S (as deployed: clients in the
  server's process would share its interpreter lock); bursts of 1, 2, 4, ... max_batch
  requests compile its programs before timing, and each setting runs once untimed first.
Reports tokens/s, requests/s, latency p50 / p95, the mean busy rows per decode step and
tokens/s over the sequential baseline (target: 16 clients >= 4x; docs/serve.md has the
numbers), then the time of one decode step of 1 and max_batch rows.

    python -m benchmarks.bench_serve [--model=DIR --image_dir=DIR --template=simple]
        [--requests=32] [--max_tokens=32] [--decode_steps=1,8]

Without --model: a tiny random model and the small demo world in a temporary directory.
"""
import concurrent.futures
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import flax.linen as nn
import jax
import numpy as np
from absl import app, flags

from exgra_jax import configuration
from exgra_jax.data import demo_world
from exgra_jax.eval import single_question
from exgra_jax.models import llava
from exgra_jax.models.config import LlavaConfig
from exgra_jax.serving import engine as engine_lib
from exgra_jax.serving import slots
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
flags.DEFINE_list("decode_steps", ["1", "8"], "Server's --decode_steps (one server each).")

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


def _engine_stats(base: str) -> dict:
  with urllib.request.urlopen(f"{base}/health", timeout=60) as response:
    return json.loads(response.read())["engine"]


def _burst(base: str, images: list[str], clients: int) -> tuple[float, list]:
  """-> (wall seconds, (latency, tokens) per image) of `clients` clients asking in turn."""
  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    results = list(pool.map(lambda image: _request(base, image), images))
  return time.perf_counter() - start, results


def _concurrent(base: str, images: list[str], clients: int) -> dict:
  before = _engine_stats(base)
  wall, results = _burst(base, images, clients)
  after = _engine_stats(base)
  return {**_summary(wall, [r[0] for r in results], sum(r[1] for r in results)),
          "mean_rows": ((after["row_steps"] - before["row_steps"])
                        / max(after["steps"] - before["steps"], 1))}


def _summary(wall: float, latencies: list[float], tokens: int) -> dict:
  quantiles = statistics.quantiles(latencies, n=20, method="inclusive")
  return {"tokens_per_s": tokens / wall, "requests_per_s": len(latencies) / wall,
          "p50_s": statistics.median(latencies), "p95_s": quantiles[18]}


def _step_ms(served: engine_lib.ServedModel, rows: int, length: int) -> float:
  """Best-of-5 time of one decode step of `rows` cache rows of `length` positions (ms)."""
  cache = slots.resize(served.model, served.params, None, rows, length)
  key = slots.like_params(served.params, jax.random.key(0))
  tokens, positions = np.zeros(rows, np.int32), np.full(rows, length // 2, np.int32)
  settings = np.zeros(rows, np.float32), np.ones(rows, np.float32)
  best = float("inf")
  for repeat in range(6):
    start = time.perf_counter()
    for _ in range(20):
      drawn, cache, key = slots.step(served.model, served.params, cache, tokens, positions,
                                     key, *settings)
    drawn.block_until_ready()
    if repeat:  # the first compiles
      best = min(best, (time.perf_counter() - start) / 20 * 1e3)
  return best


def _engine_alone(served: engine_lib.ServedModel, jobs: list[engine_lib.Job],
                  decode_steps: int) -> dict:
  """All jobs submitted at once to an engine in this process (no HTTP): what batching
  gives when nothing else competes for the interpreter."""
  engine = engine_lib.Engine(served, FLAGS.max_batch, decode_steps=decode_steps)
  try:
    for _ in range(2):  # the first compiles
      start = time.perf_counter()
      streams = [(time.perf_counter(), engine.submit(job)) for job in jobs]
      completions = [(stream.result(), time.perf_counter() - began)
                     for began, stream in streams]
      wall = time.perf_counter() - start
  finally:
    engine.close()
  return {**_summary(wall, [latency for _, latency in completions],
                     sum(c.completion_tokens for c, _ in completions)),
          "mean_rows": engine.stats.row_steps / engine.stats.steps}


def _start_server(model_dir: str, image_dir: str, decode_steps: int
                  ) -> tuple[subprocess.Popen, str]:
  """`python -m exgra_jax.serve` on a free port -> (process, base URL)."""
  process = subprocess.Popen(
      [sys.executable, "-m", "exgra_jax.serve", f"--model={model_dir}", "--port=0",
       f"--template={FLAGS.template}", f"--image_root={image_dir}",
       f"--max_batch={FLAGS.max_batch}", f"--max_tokens={FLAGS.max_tokens}",
       f"--decode_steps={decode_steps}"],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  line = process.stdout.readline()
  found = re.search(r"http://127\.0\.0\.1:\d+", line)
  if not found:
    process.kill()
    raise RuntimeError(f"the server did not start: {line!r}")
  return process, found.group(0)


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

    def predict_all() -> tuple[float, list[float]]:
      latencies = []
      start = time.perf_counter()
      for image in images:
        began = time.perf_counter()
        single_question.answer_question(
            served.model, served.params, served.tokenizer, os.path.join(image_dir, image),
            QUESTION, template=FLAGS.template, max_new_tokens=FLAGS.max_tokens)
        latencies.append(time.perf_counter() - began)
      return time.perf_counter() - start, latencies

    predict_all()  # compilation
    before = predict_all()
    results, tokens = {}, None
    jobs = []
    for image in images:
      with open(os.path.join(image_dir, image), "rb") as f:
        request = Conversation(f.read()).request(QUESTION, max_tokens=FLAGS.max_tokens)
      jobs.append(engine_lib.prepare(request, served, Limits()))
    for decode_steps in map(int, FLAGS.decode_steps):
      results[f"engine alone, steps {decode_steps}"] = _engine_alone(served, jobs, decode_steps)
      process, base = _start_server(model_dir, image_dir, decode_steps)
      try:
        burst = 1
        while burst <= FLAGS.max_batch:  # compiles the prefill of each size
          _burst(base, images[:burst], burst)
          burst *= 2
        tokens = tokens or sum(_request(base, image)[1] for image in images)
        for clients in map(int, FLAGS.clients):
          _concurrent(base, images, clients)  # untimed: warms this setting
          results[f"{clients} clients, steps {decode_steps}"] = _concurrent(base, images,
                                                                            clients)
      finally:
        process.terminate()
        process.wait(timeout=60)
    after = predict_all()
    # The baseline: both sequential runs (before and after the servers) as one.
    results = {"sequential predict": _summary(before[0] + after[0], before[1] + after[1],
                                              2 * tokens), **results}
    length = slots.cache_length(len(jobs[0].prompt_ids) + FLAGS.max_tokens)
    steps = {rows: _step_ms(served, rows, length) for rows in (1, FLAGS.max_batch)}
  sequential = results["sequential predict"]["tokens_per_s"]
  print(f"{FLAGS.requests} requests of {FLAGS.max_tokens} tokens, {jax.devices()[0].platform}")
  print(f"{'setting':26s} {'tokens/s':>9s} {'req/s':>7s} {'p50 s':>7s} {'p95 s':>7s} "
        f"{'rows':>6s} {'x sequential':>12s}")
  for name, r in results.items():
    print(f"{name:26s} {r['tokens_per_s']:9.1f} {r['requests_per_s']:7.2f} {r['p50_s']:7.3f} "
          f"{r['p95_s']:7.3f} {r.get('mean_rows', 1):6.1f} {r['tokens_per_s'] / sequential:12.2f}")
  print(f"decode step of {length} cache positions: " + ", ".join(
      f"{rows} rows {ms:.2f} ms" for rows, ms in steps.items()))


if __name__ == "__main__":
  app.run(main)
