"""Writes `conversations_long` for a record file through an OpenAI-compatible endpoint.

python tools/extend_captions.py --records=in.json --output=out.json \
    --url=http://host:8000/v1 --model=NAME [--key_env=OPENAI_API_KEY] [--concurrency=4]
Resumable (rerun the same command); failures are listed in OUTPUT.failures.jsonl and
make the exit status 1. Logic: exgra_jax/llm_clients/caption_extension.py.
"""
import os

from absl import app, flags

from exgra_jax import console
from exgra_jax.llm_clients import caption_extension
from exgra_jax.llm_clients.chat_client import ChatClient
from exgra_jax.eval.vqa_metrics import read_json_or_jsonl

_RECORDS = flags.DEFINE_string("records", None, "input record file (JSON/JSONL)", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "output record file (JSON)", required=True)
_URL = flags.DEFINE_string("url", None, "OpenAI-compatible endpoint", required=True)
_MODEL = flags.DEFINE_string("model", None, "model name at the endpoint", required=True)
_KEY_ENV = flags.DEFINE_string("key_env", "OPENAI_API_KEY", "env var holding the API key")
_CONCURRENCY = flags.DEFINE_integer("concurrency", 4, "requests in flight")
_RPM = flags.DEFINE_float("requests_per_minute", 0.0, "rate limit (0 = none)")
_ATTEMPTS = flags.DEFINE_integer("attempts", 3, "tries per answer on invalid replies")
_TIMEOUT = flags.DEFINE_float("timeout_s", 60.0, "per-request timeout")


def main(argv):
  del argv
  console.setup(flags.FLAGS.verbosity)
  client = ChatClient(url=_URL.value, model=_MODEL.value,
                      api_key=os.environ.get(_KEY_ENV.value, ""), timeout_s=_TIMEOUT.value)
  settings = caption_extension.ExtensionSettings(_CONCURRENCY.value, _RPM.value,
                                                 _ATTEMPTS.value)
  result = caption_extension.extend_records(read_json_or_jsonl(_RECORDS.value), client,
                                            _OUTPUT.value, settings)
  print(f"extended {result['done']} records, {len(result['failed'])} failed "
        f"(see {_OUTPUT.value}.failures.jsonl)")
  return 1 if result["failed"] else 0


if __name__ == "__main__":
  app.run(main)
