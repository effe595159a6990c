"""Serving against transformers on the same machine, model and prompts, in one run.

Why: the server must beat what a user gets from transformers on the same hardware. Every
request asks the same question about a different image, greedy, at most --max_tokens
tokens. Settings:
- transformers `generate` one request at a time, and in batches of 16 (left padding):
  `LlavaForConditionalGeneration` + `AutoProcessor` on the model's Hugging Face export,
  torch on 2 CPU threads and on 1 (--torch_threads; on a loaded machine 2 threads can be
  many times slower than 1: OpenMP threads wait for each other); run between every two
  bursts of the server (idle meanwhile) and reported as the mean of those runs, so that
  the machine's load, which moves by tens of percent within minutes on a shared host,
  weighs on both sides; the ratios are over the fastest thread count;
- our server (`python -m exgra_jax.serve`, its own process, --max_batch 16) with 16, 4 and
  1 concurrent HTTP clients streaming, in that order, right after start-up (the server
  compiles its programs before it listens: no warm-up requests). Each setting's first
  timed burst is reported on its own (a compilation under traffic would show there), then
  the mean of the next --bursts.
Columns: completion tokens/s, latency p50 / p95, time to first token (streamed), the mean
busy rows per decode step and the host time per decode step (from /health), the clients'
own CPU time per request (they share the cores with the server), and tokens/s over
transformers batched 16 and one at a time.

    python -m benchmarks.bench_serve [--model=DIR --hf_model=DIR --image_dir=DIR]
        [--question=...] [--requests=32] [--max_tokens=32] [--max_context=256]

Without --model: a tiny random model (which answers with --max_tokens tokens) and its
export, on the small demo world in a temporary directory.
"""
import concurrent.futures
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

import flax.linen as nn
import jax
import numpy as np
import PIL.Image
import torch
import transformers
from absl import app, flags

from exgra_jax import run_config
from exgra_jax.data import demo_world
from exgra_jax.hf import exporter
from exgra_jax.inference import single_question
from exgra_jax.models import llava
from exgra_jax.models.config import LlavaConfig
from exgra_jax.serving import engine as engine_lib
from exgra_jax.serving.requests import Conversation, Limits
from exgra_jax.weights import loading

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Model directory (default: a tiny random model).")
flags.DEFINE_string("hf_model", None, "Its Hugging Face export (llava layout).")
flags.DEFINE_string("image_dir", None, "Images to ask about (default: the demo world's).")
flags.DEFINE_string("question", "What is shown in this image?", "The question.")
flags.DEFINE_enum("template", "train", ["simple", "train"], "Conversation template.")
flags.DEFINE_integer("requests", 32, "Requests per burst.")
flags.DEFINE_integer("bursts", 3, "Timed bursts per setting after the first.")
flags.DEFINE_integer("max_tokens", 32, "Answer length (tokens).")
flags.DEFINE_integer("max_batch", 16, "Server's --max_batch (and transformers' batch).")
flags.DEFINE_integer("max_context", 256, "Server's --max_context.")
flags.DEFINE_integer("decode_steps", None, "Server's --decode_steps (default: the server's).")
flags.DEFINE_list("torch_threads", ["2", "1"], "torch CPU threads (one baseline each; the "
                  "ratios are over the fastest).")
flags.DEFINE_list("clients", ["16", "4", "1"], "Concurrent clients, in this order.")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_model(directory: str) -> tuple[str, str, str]:
  """(model dir, HF export dir, image dir) of a tiny random model on the small demo world."""
  world = os.path.join(directory, "world")
  demo_world.make_demo_world(world, size="small", seed=0)
  config = run_config.load(os.path.join(REPO, "configs", "demo.py"), [])
  params = nn.unbox(llava.init_boxed_params(LlavaConfig.from_config(config.model),
                                            jax.random.key(0)))
  model_dir, hf_dir = os.path.join(directory, "tiny"), os.path.join(directory, "tiny_hf")
  tokenizer_dir = os.path.join(world, "tokenizer")
  loading.save_params(model_dir, params, config.model.to_dict(), tokenizer_dir=tokenizer_dir)
  exporter.export(params, config.model, hf_dir, tokenizer_dir=tokenizer_dir)
  return model_dir, hf_dir, os.path.join(world, "images")


def _summary(wall: float, latencies: list[float], tokens: int,
             first_tokens: list[float] | None = None) -> dict:
  quantiles = statistics.quantiles(latencies, n=20, method="inclusive")
  return {"tokens_per_s": tokens / wall, "p50_s": statistics.median(latencies),
          "p95_s": quantiles[18],
          "ttft_s": statistics.median(first_tokens) if first_tokens else None}


def _mean(results: list[dict]) -> dict:
  return {k: (None if results[0][k] is None else statistics.mean(r[k] for r in results))
          for k in results[0]}


class Transformers:
  """The model's HF export in transformers: generate, one at a time or batched."""

  def __init__(self, hf_dir: str, image_dir: str, images: list[str], expected_ids):
    self.model = transformers.LlavaForConditionalGeneration.from_pretrained(hf_dir).eval()
    self.processor = transformers.AutoProcessor.from_pretrained(hf_dir)
    self.processor.tokenizer.padding_side = "left"
    self.config = self.model.generation_config
    self.config.max_new_tokens = FLAGS.max_tokens  # the export's stop string ### stays
    prompt = self.processor.apply_chat_template([{"role": "user", "content": [
        {"type": "text", "text": FLAGS.question}, {"type": "image"}]}],
                                                add_generation_prompt=True)
    self.prompts = [prompt] * len(images)
    self.images = []
    for name in images:
      with PIL.Image.open(os.path.join(image_dir, name)) as image:
        self.images.append(image.convert("RGB"))
    ids = self.processor(images=self.images[:1], text=prompt, return_tensors="pt")["input_ids"]
    self.same_prompt = ids[0].tolist() == list(expected_ids)

  def run(self, batch: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    latencies, tokens = [], 0
    start = time.perf_counter()
    for i in range(0, len(self.images), batch):
      began = time.perf_counter()
      inputs = self.processor(images=self.images[i:i + batch], text=self.prompts[i:i + batch],
                              padding=True, return_tensors="pt")
      with torch.no_grad():
        out = self.model.generate(**inputs, generation_config=self.config,
                                  tokenizer=self.processor.tokenizer)
      new = out[:, inputs["input_ids"].shape[1]:].numpy()
      for row in new:
        ends = np.flatnonzero((row == self.config.eos_token_id)
                              | (row == self.config.pad_token_id))
        tokens += int(ends[0]) if ends.size else len(row)
      latencies += [time.perf_counter() - began] * len(new)
    return _summary(time.perf_counter() - start, latencies, tokens)


def _request(base: str, image: str) -> tuple[float, float, int]:
  """One streamed chat completion -> (latency, time to the first token, completion tokens).

  A lean client (http.client, one connection per request as the server closes streams;
  only the usage event is parsed): the clients share the machine's cores with the server,
  and what they spend is not the server's (urllib and a JSON parse per event took about
  1.5 ms of CPU per 32-token request)."""
  payload = {"max_tokens": FLAGS.max_tokens, "stream": True,
             "stream_options": {"include_usage": True}, "messages": [{"role": "user",
             "content": [{"type": "text", "text": FLAGS.question},
                         {"type": "image_url", "image_url": {"url": image}}]}]}
  host, port = urllib.parse.urlsplit(base).netloc.split(":")
  connection = http.client.HTTPConnection(host, int(port), timeout=600)
  start, first, usage = time.perf_counter(), None, None
  try:
    connection.request("POST", "/v1/chat/completions", body=json.dumps(payload).encode(),
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    for line in response:
      if not line.startswith(b"data: {"):
        continue
      first = first or time.perf_counter() - start
      if b'"usage"' in line:
        usage = json.loads(line[len(b"data: "):]).get("usage") or usage
  finally:
    connection.close()
  return time.perf_counter() - start, first, usage["completion_tokens"]


def _health(base: str) -> dict:
  with urllib.request.urlopen(f"{base}/health", timeout=60) as response:
    return json.loads(response.read())["engine"]


def _burst(base: str, images: list[str], clients: int) -> dict:
  """`clients` clients asking about `images` in turn -> summary with the engine's rows and
  host time per step over the burst."""
  before = _health(base)
  start, cpu = time.perf_counter(), time.process_time()
  with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    results = list(pool.map(lambda image: _request(base, image), images))
  wall, cpu = time.perf_counter() - start, time.process_time() - cpu
  after = _health(base)
  steps = max(after["steps"] - before["steps"], 1)
  return {**_summary(wall, [r[0] for r in results], sum(r[2] for r in results),
                     [r[1] for r in results]),
          "rows": (after["row_steps"] - before["row_steps"]) / steps,
          "host_ms": 1e3 * (after["host_s"] - before["host_s"]) / steps,
          "compiled": after["compiled_later"] - before["compiled_later"],
          "client_ms": 1e3 * cpu / len(images)}


def _start_server(model_dir: str, image_dir: str) -> tuple[subprocess.Popen, str, str]:
  """`python -m exgra_jax.serve` on a free port -> (process, base URL, its compile line)."""
  process = subprocess.Popen(
      [sys.executable, "-m", "exgra_jax.serve", f"--model={model_dir}", "--port=0",
       f"--template={FLAGS.template}", f"--image_root={image_dir}",
       f"--max_batch={FLAGS.max_batch}", f"--max_tokens={FLAGS.max_tokens}",
       f"--max_context={FLAGS.max_context}",
       *([f"--decode_steps={FLAGS.decode_steps}"] if FLAGS.decode_steps else [])],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  compiled, line = process.stdout.readline().strip(), process.stdout.readline()
  found = re.search(r"http://127\.0\.0\.1:\d+", line)
  if not found:
    process.kill()
    raise RuntimeError(f"the server did not start: {compiled!r} {line!r}")
  return process, found.group(0), compiled


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as tmp:
    if FLAGS.model:
      model_dir, hf_dir, image_dir = FLAGS.model, FLAGS.hf_model, FLAGS.image_dir
    else:
      model_dir, hf_dir, image_dir = _tiny_model(tmp)
    names = sorted(n for n in os.listdir(image_dir) if n.lower().endswith((".png", ".jpg")))
    images = [names[i % len(names)] for i in range(FLAGS.requests)]
    served = engine_lib.load_model(model_dir, template=FLAGS.template)
    with open(os.path.join(image_dir, images[0]), "rb") as f:
      job = engine_lib.prepare(Conversation(f.read()).request(FLAGS.question), served,
                               Limits())
    theirs = Transformers(hf_dir, image_dir, images, job.prompt_ids)
    threads = list(map(int, FLAGS.torch_threads))
    baselines = {(batch, n): [] for n in threads for batch in (1, FLAGS.max_batch)}

    def run_transformers():
      for batch, n in baselines:
        baselines[batch, n].append(theirs.run(batch, n))

    theirs.run(FLAGS.max_batch, threads[-1])  # warm-up
    process, base, compiled = _start_server(model_dir, image_dir)
    ours = {}
    try:  # transformers between the server's bursts: the machine's load weighs on both
      for clients in map(int, FLAGS.clients):
        run_transformers()
        ours[f"ours, {clients} clients, first burst"] = _burst(base, images, clients)
        later = []
        for _ in range(FLAGS.bursts):
          run_transformers()
          later.append(_burst(base, images, clients))
        ours[f"ours, {clients} clients, next {FLAGS.bursts}"] = _mean(later)
      run_transformers()
    finally:
      process.terminate()
      process.wait(timeout=60)
  rows = {}
  for (batch, n), runs in baselines.items():
    kind = "one at a time" if batch == 1 else f"batches of {batch}"
    rows[f"transformers generate, {kind}, {n} threads"] = _mean(runs)
  best = lambda kind: max((r for name, r in rows.items() if kind in name),
                          key=lambda r: r["tokens_per_s"])
  one, batched = best("one at a time"), best("batches of")
  rows.update(ours)
  print(f"{FLAGS.requests} requests, at most {FLAGS.max_tokens} tokens, greedy; "
        f"{jax.devices()[0].platform}; "
        f"load average {os.getloadavg()[0]:.1f}; server: {compiled}; same prompt ids on "
        f"both sides: {theirs.same_prompt}")
  print("| setting | tokens/s | p50 s | p95 s | TTFT s | busy rows/step | host ms/step "
        "| compiled | client CPU ms/request | x batched | x one at a time |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for name, r in rows.items():
    ttft = "-" if r["ttft_s"] is None else f"{r['ttft_s']:.3f}"
    engine = (f"{r['rows']:.1f} | {r['host_ms']:.3f} | {r['compiled']:.0f} | "
              f"{r['client_ms']:.2f}" if "rows" in r else "- | - | - | -")
    print(f"| {name} | {r['tokens_per_s']:.0f} | {r['p50_s']:.3f} | {r['p95_s']:.3f} | "
          f"{ttft} | {engine} | {r['tokens_per_s'] / batched['tokens_per_s']:.2f} | "
          f"{r['tokens_per_s'] / one['tokens_per_s']:.2f} |")


if __name__ == "__main__":
  app.run(main)
