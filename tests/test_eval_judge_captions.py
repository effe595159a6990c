"""Chat client, judge and caption extension against a real HTTP server on loopback."""
import json
import os
import subprocess
import sys

import pytest

from exgra_jax.llm_clients import caption_extension, judge
from exgra_jax.llm_clients.chat_client import ChatClient, ChatError
from eval_chat_server import chat_server

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _client(url, **kw):
  return ChatClient(url=url, model="m", timeout_s=kw.pop("timeout_s", 2.0),
                    backoff_s=0.01, **kw)


def test_client_retries_500_and_timeouts_then_succeeds():
  calls = iter([(500, None, 0), (200, "late", 0.5), (200, "ok", 0)])
  with chat_server(lambda body: next(calls)) as (url, requests):
    assert _client(url, timeout_s=0.2).complete([{"role": "user", "content": "x"}]) == "ok"
  assert len(requests) == 3 and requests[0]["model"] == "m"


def test_client_gives_up_and_does_not_retry_auth_errors():
  with chat_server(lambda body: (500, None, 0)) as (url, requests):
    with pytest.raises(ChatError, match="no reply after 2 attempts"):
      _client(url, attempts=2).complete([])
  with chat_server(lambda body: (401, None, 0)) as (url, requests):
    with pytest.raises(ChatError, match="HTTP 401"):
      _client(url).complete([])
    assert len(requests) == 1
  with pytest.raises(ValueError, match="http"):
    ChatClient(url="localhost:1", model="m")


def test_parse_scores():
  assert judge.parse_scores("8 6\nbecause") == (8.0, 6.0)
  assert judge.parse_scores("7, 9.5") == (7.0, 9.5)
  with pytest.raises(ValueError, match="not two scores"):
    judge.parse_scores("Assistant 1 is better")


def _questions():
  return [{"question_id": "1", "text": "What?", "type": "conversation", "domain": "mri"},
          {"question_id": "2", "text": "Describe", "type": "detailed",
           "domain": {"chest_xray": False, "ct_scan": True}, "fig_caption": "CT"}]


def test_judge_scores_resumes_and_reports_relative_score(tmp_path):
  replies = {"A1": "8 4\nok", "A2": "garbled"}  # question 2: never two scores
  def reply(body):
    prompt = body["messages"][1]["content"]
    return 200, replies["A1" if "[Assistant 2]\nA1" in prompt else "A2"], 0
  refs, answers = {"1": "R1", "2": "R2"}, {"1": "A1", "2": "A2"}
  path = str(tmp_path / "reviews.jsonl")
  with chat_server(reply) as (url, requests):
    summary = judge.review_all(_questions(), refs, answers, _client(url), path)
    assert summary["overall"] == {"relative_score": 50.0, "reference_mean": 8.0,
                                  "model_mean": 4.0, "count": 1}
    assert summary["domain/mri"]["count"] == 1
    assert [f["question_id"] for f in summary["failed"]] == ["2"]
    assert len(requests) == 1 + 3  # question 2 asked parse_attempts times
    replies["A2"] = "6 6"
    summary = judge.review_all(_questions(), refs, answers, _client(url), path)
    assert len(requests) == 5  # only question 2 asked again
  assert summary["domain/ct_scan"]["relative_score"] == 100.0
  assert summary["overall"]["relative_score"] == pytest.approx(100 * 5 / 7)
  assert summary["type/detailed"]["count"] == 1 and not summary["failed"]


def test_judge_rejects_unknown_domain():
  with pytest.raises(ValueError, match="domain must be one of"):
    judge.question_domain({"question_id": 1, "domain": "dental"})


def _records():
  return [{"id": f"r{i}", "image": "x.png",
           "conversations": [{"from": "human", "value": f"<image>\nQuestion {i}?"},
                             {"from": "gpt", "value": f"Answer {i}."}]} for i in range(4)]


def _caption_reply(body):
  request = json.loads(body["messages"][1]["content"])
  assert "<image>" not in request["question"]
  number = request["answer"].split()[1].rstrip(".")
  if number == "1":
    return 200, "not json", 0
  if number == "2":
    return 200, json.dumps({"revision": "x" * 10_000}), 0  # longer than allowed
  return 200, "```json\n" + json.dumps({"revision": f"Long answer {number}."}) + "\n```", 0


def test_extend_captions_valid_invalid_and_resume(tmp_path):
  out = str(tmp_path / "long.json")
  settings = caption_extension.ExtensionSettings(concurrency=2, attempts=2)
  with chat_server(_caption_reply) as (url, requests):
    result = caption_extension.extend_records(_records(), _client(url), out, settings,
                                              progress=False)
    assert result["done"] == 2
    assert sorted(f["id"] for f in result["failed"]) == ["r1", "r2"]
    assert len(requests) == 2 + 2 * 2
  written = json.load(open(out))
  assert [r["id"] for r in written] == ["r0", "r3"]
  assert written[0]["conversations_long"][1]["value"] == "Long answer 0."
  assert written[0]["conversations_long"][0] == _records()[0]["conversations"][0]
  failures = [json.loads(l) for l in open(out + ".failures.jsonl")]
  assert {f["id"] for f in failures} == {"r1", "r2"}
  assert any("not JSON" in f["error"] for f in failures)
  # an interrupted write leaves a torn line; the rerun ignores it and redoes only failures
  with open(out + ".progress.jsonl", "a") as f:
    f.write('{"id": "r1", "conv')
  ok = lambda body: (200, json.dumps({"revision": "fine"}), 0)
  with chat_server(ok) as (url, requests):
    result = caption_extension.extend_records(_records(), _client(url), out, settings,
                                              progress=False)
    assert len(requests) == 2 and result["done"] == 4 and not result["failed"]
  assert [r["id"] for r in json.load(open(out))] == ["r0", "r1", "r2", "r3"]


def test_extension_rejects_bad_input(tmp_path):
  with pytest.raises(ValueError, match="unique"):
    caption_extension.extend_records(_records()[:1] * 2, _client("http://127.0.0.1:9"),
                                     str(tmp_path / "o.json"), progress=False)
  with pytest.raises(caption_extension.InvalidRevision, match="paragraph"):
    caption_extension.parse_revision('{"revision": "a\\nb"}', "x" * 10)


def test_judge_tool_runs_the_protocol_from_files(tmp_path):
  """tools/judge.py as a user runs it: answer files in, relative scores out, exit 1 while a
  question could not be rated."""
  files = {"questions": _questions(),
           "references": [{"question_id": "1", "text": "R1"}, {"question_id": "2", "text": "R2"}],
           "answers": [{"question_id": "1", "text": "A1"}, {"question_id": "2", "text": "A2"}]}
  for name, rows in files.items():
    (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  with chat_server(lambda body: (200, "9 6\nfine", 0)) as (url, requests):
    out = subprocess.run(
        [sys.executable, "tools/judge.py", *(f"--{n}={tmp_path}/{n}.jsonl" for n in files),
         f"--reviews={tmp_path}/reviews.jsonl", f"--url={url}", "--model=m"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  summary = json.loads(out.stdout[out.stdout.index("{"):])
  assert summary["overall"] == {"relative_score": 100 * 6 / 9, "reference_mean": 9.0,
                                "model_mean": 6.0, "count": 2}
  assert len(requests) == 2 and summary["failed"] == []
