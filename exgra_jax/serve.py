r"""Serve a model over an OpenAI-compatible HTTP API, with a chat page at `/`.

    python -m exgra_jax.serve --model=workdir/checkpoints/finetune_best \
        [--host=127.0.0.1] [--port=8000] [--image_root=DIR] [--max_batch=16] [--decode_steps=4] \
        [--max_context=N]

`--model` is anything `weights.loading.load` reads (train checkpoint, params-only
checkpoint, Hugging Face directory). Binds to 127.0.0.1 unless `--host` says otherwise:
the server has no authentication. Concurrent requests share every decode step (up to
`--max_batch`; a new request joins at the next step), and `stream: true` sends each piece
of the answer as it is generated. Before it listens, the server compiles every program a
request can need (a few dozen; it says how many and how long that took): no request waits
for a compilation. docs/serve.md has the API, the limits and the errors.
"""
import errno
import http.server
import sys

from absl import app
from absl import flags

from exgra_jax import model_flags, run_config
from exgra_jax.inference import prompts
from exgra_jax.serving import engine as engine_lib
from exgra_jax.serving import http_api
from exgra_jax.serving.requests import Limits

_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to bind (0.0.0.0 = every interface).")
_PORT = flags.DEFINE_integer("port", 8000, "TCP port (0 = any free port).")
_IMAGE_ROOT = flags.DEFINE_string("image_root", None,
                                  "Directory whose files requests may name as image paths "
                                  "(default: none; images come as data: URLs).")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 16, "Most requests decoded together (cache rows).")
_DECODE_STEPS = flags.DEFINE_integer(
    "decode_steps", 4, "Decode steps per host round trip: requests stream, join and leave "
    "every N tokens, with N times fewer synchronisations (1 = at every token). 4: on a "
    "2-core CPU, 1.3-2x the tokens/s of 1 (docs/serve.md).")
_TEMPLATE = model_flags.define_template(prompts.CHAT_TEMPLATES)
_MAX_CONTEXT = flags.DEFINE_integer(
    "max_context", None, "Prompt + answer tokens per request (default: the model's context): "
    "the KV cache's length, which every decode step reads, and the longest prompt bucket.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 512,
                                   "Answer length when a request names no max_tokens.")
_MAX_IMAGE_MB = flags.DEFINE_float("max_image_mb", 20.0, "Largest image file (MiB).")
_MAX_IMAGE_PIXELS = flags.DEFINE_integer("max_image_pixels", 40_000_000,
                                         "Largest image (width x height).")
_NAME = flags.DEFINE_string("name", None, "Model name in the API (default: --model's basename).")


def bind_problem(host: str, port: int) -> str | None:
  """Why the server cannot listen on host:port (out of range, taken, not this machine's
  address), with the fix; checked by binding as the server does, before the model loads."""
  if not 0 <= port <= 65535:
    return f"--port={port} is not a TCP port: use 1..65535, or --port=0 for any free port"
  try:
    http.server.HTTPServer((host, port), http.server.BaseHTTPRequestHandler).server_close()
  except OSError as e:
    return bind_error(host, port, e)
  return None


def bind_error(host: str, port: int, error: OSError) -> str:
  taken = error.errno == errno.EADDRINUSE
  return (f"--port={port}: {host}:{port} is already in use (another server?): stop it, or "
          "pick another --port (--port=0: any free port)" if taken else
          f"--host={host} --port={port}: cannot listen there ({error.strerror or error}): "
          "use --host=127.0.0.1 or an address of this machine")


def main(argv):
  run_config.start_command(argv)
  problems = model_flags.problems() + [p for p in (
      bind_problem(_HOST.value, _PORT.value),
      _IMAGE_ROOT.value and run_config.path_problem("--image_root", _IMAGE_ROOT.value, "dir"),
      _MAX_BATCH.value < 1 and f"--max_batch={_MAX_BATCH.value} must be >= 1",
      _DECODE_STEPS.value < 1 and f"--decode_steps={_DECODE_STEPS.value} must be >= 1",
      _MAX_CONTEXT.value is not None and _MAX_CONTEXT.value < 2
      and f"--max_context={_MAX_CONTEXT.value} must be >= 2") if p]
  run_config.exit_on_problems(problems)
  served = engine_lib.load_model(model_flags.MODEL.value, **model_flags.loader_args(),
                                 name=_NAME.value, template=_TEMPLATE.value,
                                 default_max_tokens=_MAX_TOKENS.value,
                                 max_context=_MAX_CONTEXT.value)
  # The engine thread waits for the device and then needs the interpreter back at once,
  # while handler threads decode images and parse JSON: with the default 5 ms switch
  # interval every decode step could wait that long for them.
  sys.setswitchinterval(0.0005)
  engine = engine_lib.Engine(served, _MAX_BATCH.value, decode_steps=_DECODE_STEPS.value)
  engine.warm_up_and_say()
  limits = Limits(max_image_bytes=int(_MAX_IMAGE_MB.value * 2**20),
                  max_image_pixels=_MAX_IMAGE_PIXELS.value)
  try:
    server = http_api.Server((_HOST.value, _PORT.value), served, engine, limits=limits,
                             image_root=_IMAGE_ROOT.value)
  except OSError as e:  # taken while the model loaded
    engine.close()
    run_config.exit_usage(bind_error(_HOST.value, _PORT.value, e))
  host, port = server.server_address[:2]
  print(f"serving {served.name} on http://{host}:{port}/ (OpenAI API at /v1)", flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()
    engine.close()


if __name__ == "__main__":
  flags.mark_flags_as_required(["model"])
  app.run(main)
