r"""Chat with a model in the terminal, about one image at a time.

    python -m exgra_jax.chat --model=workdir/checkpoints/finetune_best [--image=scan.dcm]

Type a question and press Enter; `/image PATH` changes the image (and starts a new
conversation: the model sees one image per conversation), `/reset` starts over, `/quit`
(or Ctrl-D) leaves. The same model loading, templates and generation as
`python -m exgra_jax.serve`, in this process; the answer is printed as it is generated
(docs/serve.md).
"""
from __future__ import annotations

import sys

from absl import app
from absl import flags

from exgra_jax import model_flags, run_config
from exgra_jax.inference import prompts
from exgra_jax.serving import engine as engine_lib
from exgra_jax.serving.requests import Conversation, Limits, RequestError

_IMAGE = flags.DEFINE_string("image", None, "Image file to start with (PNG, JPEG, DICOM, ...).")
_TEMPLATE = model_flags.define_template(prompts.CHAT_TEMPLATES)
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 512, "Longest answer (tokens).")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (with --temperature > 0).")

HELP = "commands: /image PATH (new image, new conversation), /reset, /quit"


def read_image(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def _lines():
  """Lines typed (with a prompt on a terminal) or piped in, until end of input."""
  prompt = "> " if sys.stdin.isatty() else ""
  while True:
    try:
      yield input(prompt)
    except EOFError:
      return


def main(argv):
  run_config.start_command(argv)
  problems = model_flags.problems(_IMAGE.value)
  run_config.exit_on_problems(problems)
  served = engine_lib.load_model(model_flags.MODEL.value, **model_flags.loader_args(),
                                 template=_TEMPLATE.value, default_max_tokens=_MAX_TOKENS.value)
  conversation = Conversation(read_image(_IMAGE.value) if _IMAGE.value else None)
  settings = dict(temperature=_TEMPERATURE.value, top_p=_TOP_P.value)
  engine = engine_lib.Engine(served, 1)
  engine.warm_up_and_say()
  try:
    _chat(served, engine, conversation, settings)
  finally:
    engine.close()


def _chat(served: engine_lib.ServedModel, engine: engine_lib.Engine,
          conversation: Conversation, settings: dict) -> None:
  """The read-answer loop: each answer printed piece by piece as the engine settles it."""
  print(f"chatting with {served.name}; {HELP}", flush=True)
  for line in _lines():
    line = line.strip()
    if not line:
      continue
    if line in ("/quit", "/exit"):
      break
    if line == "/reset":
      conversation = Conversation(conversation.image)
      print("(new conversation)", flush=True)
      continue
    if line.startswith("/image"):
      path = line[len("/image"):].strip()
      problem = run_config.path_problem("/image", path)
      if problem:
        print(f"error: {problem}", flush=True)
      else:
        conversation = Conversation(read_image(path))
        print(f"(new conversation about {path})", flush=True)
      continue
    if line.startswith("/"):
      print(f"unknown command {line.split()[0]}; {HELP}", flush=True)
      continue
    request = conversation.request(line, **settings)
    try:
      job = engine_lib.prepare(request, served, Limits())
    except (RequestError, ValueError) as e:
      print(f"error: {e}", flush=True)
      continue
    stream = engine.submit(job)
    for chunk in stream.chunks():
      print(chunk.text, end="", flush=True)
    print(flush=True)
    conversation.record(request, stream.result().text)


if __name__ == "__main__":
  flags.mark_flags_as_required(["model"])
  app.run(main)
