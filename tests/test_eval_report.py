"""Inference prompts and the protocol report (checksums, counts, refusal of partial loads)."""
import hashlib
import json

import pytest

from exgra_jax.eval import answers, report

from exgra_jax.inference import prompts
from exgra_jax.weights import loading


def test_simple_prompt_is_the_release_conversation():
  prompt = prompts.build_prompt('Is there a mass? (Answer with either "Yes" or "No").\n<image>',
                              "simple", 2)
  assert prompt == ("A chat between a curious human and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the human's "
                    "questions.###Human: Hi!###Assistant: Hi there!  How can I help you "
                  'today?\n###Human: Is there a mass? (Answer with either "Yes" or "No").\n'
                  "<im_start><im_patch><im_patch><im_end>###")


def test_train_and_none_templates_expand_image_in_place():
  assert prompts.build_prompt("<image>\nWhat?", "none", 1) == \
      "<im_start><im_patch><im_end>\nWhat?"
  assert prompts.build_prompt("What?", "train", 1).endswith(
      "questions.\n\n### Human: What?\n### Assistant:")
  with pytest.raises(ValueError, match="unknown template"):
    prompts.build_prompt("q", "chatml", 1)
  with pytest.raises(ValueError, match="at most 1"):
    prompts.build_prompt("<image><image>", "none", 1)


def test_sha256_of_file_and_directory(tmp_path):
  (tmp_path / "ckpt" / "sub").mkdir(parents=True)
  (tmp_path / "ckpt" / "a.bin").write_bytes(b"abc")
  (tmp_path / "ckpt" / "sub" / "b.bin").write_bytes(b"xyz")
  assert report.sha256_path(str(tmp_path / "ckpt" / "a.bin")) == hashlib.sha256(b"abc").hexdigest()
  before = report.sha256_path(str(tmp_path / "ckpt"))
  (tmp_path / "ckpt" / "sub" / "b.bin").write_bytes(b"xyZ")
  assert report.sha256_path(str(tmp_path / "ckpt")) != before


def _metrics():
  return {"OPEN": {"count": 3, "recall": 0.5}, "CLOSED": {"count": 5, "hit": 0.8},
          "overall": {"count": 8}, "open_recall": 0.5, "closed_accuracy": 0.8,
          "selection_score": 0.65}


def test_report_records_protocol_and_writes_files(tmp_path):
  data = tmp_path / "test.json"
  data.write_text("[]")
  (tmp_path / "ckpt").mkdir()
  (tmp_path / "ckpt" / "w").write_bytes(b"1")
  built = report.build_report(checkpoint=str(tmp_path / "ckpt"), params_checksum="ab" * 32,
                              data_files={"test": str(data)},
                              template="simple", decoding={"max_new_tokens": 1024},
                              metrics=_metrics(), load_report={"missing": [], "unexpected": ["x"]})
  assert built["split_sizes"] == {"OPEN": 3, "CLOSED": 5, "overall": 8}
  assert built["data_files"]["test"]["sha256"] == hashlib.sha256(b"[]").hexdigest()
  assert built["checkpoint"]["unexpected_parameters"] == ["x"]
  assert built["checkpoint"]["params_checksum"] == "ab" * 32
  report.write_report(str(tmp_path / "out"), built)
  assert json.loads((tmp_path / "out" / "protocol.json").read_text())["metrics_version"]
  table = (tmp_path / "out" / "protocol.md").read_text()
  assert "| open / closed | 3 / 5 |" in table and "| selection_score | 65.00 |" in table


def test_report_refuses_incomplete_weights(tmp_path):
  with pytest.raises(loading.IncompleteWeights, match="2 parameters did not load"):
    report.build_report(checkpoint=str(tmp_path), params_checksum="", data_files={},
                        template="simple",
                        decoding={}, metrics=_metrics(),
                        load_report={"missing": ["vision/a", "vision/b"]})
  with pytest.raises(ValueError, match="'missing' key"):
    loading.require_complete_weights({})


def test_answers_file_is_release_format_and_resumes(tmp_path):
  path = str(tmp_path / "answers.jsonl")
  calls = []
  def answer_batch(batch):
    calls.append(list(batch))
    if len(calls) == 2:
      raise KeyboardInterrupt  # interrupted after the first chunk was written
    return [p.upper() for _, p in batch]
  questions = [("1", "a"), ("2", "b"), ("3", "c")]
  with pytest.raises(KeyboardInterrupt):
    answers.answer_all(questions, answer_batch, path, "m", chunk_size=2)
  lines = [json.loads(l) for l in open(path)]
  assert [l["question_id"] for l in lines] == ["1", "2"]
  assert set(lines[0]) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
  records = answers.answer_all(questions, lambda b: [p.upper() for _, p in b], path, "m", 2)
  assert [r["text"] for r in records] == ["A", "B", "C"]
  assert len(open(path).readlines()) == 3
  with pytest.raises(ValueError, match="returned 0 answers"):
    answers.answer_all([("9", "x")], lambda b: [], path, "m", 1)
