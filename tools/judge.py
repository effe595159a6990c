"""Rates a model's free-text answers against reference answers with an LLM judge.

python tools/judge.py --questions=questions.jsonl --references=ref_answers.jsonl \
    --answers=model_answers.jsonl --reviews=reviews.jsonl --url=http://host:8000/v1 \
    --model=NAME [--key_env=OPENAI_API_KEY]
LLaVA-Med's rating protocol (docs/eval.md, "Chatbot judge"). Answers are the release's
answer files (`question_id`, `text`; e.g. `answers.jsonl` of --mode=eval); reviews are
appended as each finishes, so the same command resumes. Prints the relative scores (JSON);
exit status 1 when a question could not be rated. Logic: exgra_jax/llm_clients/judge.py.
"""
import json
import os

from absl import app, flags

from exgra_jax import run_config
from exgra_jax.eval.vqa_metrics import read_json_or_jsonl
from exgra_jax.llm_clients import judge
from exgra_jax.llm_clients.chat_client import ChatClient

_QUESTIONS = flags.DEFINE_string("questions", None, "question file (JSON/JSONL)", required=True)
_REFERENCES = flags.DEFINE_string("references", None, "reference answers (JSON/JSONL)",
                                  required=True)
_ANSWERS = flags.DEFINE_string("answers", None, "the model's answers (JSON/JSONL)",
                               required=True)
_REVIEWS = flags.DEFINE_string("reviews", None, "reviews file (JSONL, appended)", required=True)
_URL = flags.DEFINE_string("url", None, "OpenAI-compatible endpoint", required=True)
_MODEL = flags.DEFINE_string("model", None, "judge model name at the endpoint", required=True)
_KEY_ENV = flags.DEFINE_string("key_env", "OPENAI_API_KEY", "env var holding the API key")
_TIMEOUT = flags.DEFINE_float("timeout_s", 60.0, "per-request timeout")


def _texts(path: str) -> dict[str, str]:
  return {str(r["question_id"]): r["text"] for r in read_json_or_jsonl(path)}


def main(argv):
  run_config.start_command(argv)
  problems = [run_config.path_problem(f"--{name}", holder.value) for name, holder in (
      ("questions", _QUESTIONS), ("references", _REFERENCES), ("answers", _ANSWERS))]
  run_config.exit_on_problems(problems)
  client = ChatClient(url=_URL.value, model=_MODEL.value,
                      api_key=os.environ.get(_KEY_ENV.value, ""), timeout_s=_TIMEOUT.value)
  try:
    summary = judge.review_all(read_json_or_jsonl(_QUESTIONS.value), _texts(_REFERENCES.value),
                               _texts(_ANSWERS.value), client, _REVIEWS.value)
  except ValueError as e:  # a question without an answer, an unknown domain: the data's
    run_config.exit_usage(str(e))
  print(json.dumps(summary, indent=2))
  return 1 if summary["failed"] else 0


if __name__ == "__main__":
  app.run(main)
