"""Console output for people: third-party chatter filtered, progress lines, the end-of-run
table, and validation / test scores as TensorBoard scalars (issue 15, items 1 and 4)."""
import json
import logging
import os

import pytest
from absl import logging as absl_logging

from exgra_jax import console
from exgra_jax.train import metrics

TEST_METRICS = {
    "OPEN": {"recall": 0.123456789, "bleu2": 7.458340731200311e-155, "count": 36},
    "CLOSED": {"recall": 0.5, "bleu2": None, "count": 24},
    "overall": {"recall": 0.27, "bleu2": 3.1e-155, "count": 60},
    "open_recall": 0.123456789, "closed_accuracy": 0.5, "selection_score": 0.3117283945,
    "metrics_version": "exgra-vqa-1"}
RESULT = {
    "stage1": {"status": "trained", "steps": 8, "seconds": 12.3, "steps_per_s": 5.123,
               "final_metrics": {"loss": 6.674934387207031, "lm_loss": 6.674934387207031}},
    "stage2": {"status": "trained", "steps": 15, "seconds": 40.0,
               "final_metrics": {"loss": 5.48, "lm_loss": 4.52, "align_loss": 0.9583333}},
    "finetune": {"status": "complete", "steps": 43, "final_metrics": {},
                 "test": TEST_METRICS},
    "export": {"directory": "/w/export/llava"},
}


def _record(path: str, level: int, message: str) -> logging.LogRecord:
  return logging.LogRecord("absl", level, path, 1, message, None, None)


def test_third_party_info_and_harmless_warnings_are_filtered():
  keep = console.ThirdPartyFilter().filter
  ours = os.path.join(os.path.dirname(console.__file__), "train", "loop.py")
  orbax = "/venv/lib/python3.11/site-packages/orbax/checkpoint/_src/futures/future.py"
  assert keep(_record(ours, logging.INFO, "stage1 step 5/8"))
  assert not keep(_record(orbax, logging.INFO, "_SignalingThread.join() waiting for signals"))
  assert not keep(_record("/x/jax/_src/xla_bridge.py", logging.INFO,
                          "Unable to initialize backend 'tpu'"))
  assert not keep(_record("/x/transformers/__init__.py", logging.WARNING,
                          "PyTorch was not found. Models won't be available"))
  assert keep(_record(orbax, logging.WARNING, "disk almost full"))
  assert keep(_record(orbax, logging.ERROR, "write failed"))


@pytest.mark.parametrize("verbosity,installed", [(0, True), (1, False)])
def test_verbosity_one_keeps_everything(verbosity, installed, monkeypatch):
  handler = absl_logging.get_absl_handler()
  monkeypatch.setattr(os, "environ", dict(os.environ))
  before = list(handler.filters)
  try:
    console.quiet_third_party(verbosity)
    added = [f for f in handler.filters if f not in before]
    assert bool(added) == installed
    assert all(isinstance(f, console.ThirdPartyFilter) for f in added)
  finally:
    handler.filters[:] = before


def test_progress_line_has_stage_step_losses_rate_and_eta():
  line = metrics.progress_line("stage2", 10, 15, {
      "align_loss": 0.71041, "lm_loss": 5.06481, "loss": 5.77531, "grad_norm": 4.8,
      "align/hamming_image": 1.0, "steps_per_s": 0.5})
  assert line == ("stage2 step 10/15 (66%)  loss 5.7753  align_loss 0.7104  lm_loss 5.0648  "
                  "0.50 steps/s  ETA 0:00:10")
  assert metrics.progress_line("stage1", 1, 8, {"loss": 1.0}).endswith("ETA ?")


def test_summary_table_rounds_for_people_json_keeps_precision():
  table = console.summary_table(RESULT)
  lines = table.splitlines()
  assert lines[0].split() == ["stage", "status", "steps", "loss", "lm_loss", "align_loss",
                              "steps/s", "seconds"]
  assert lines[1].split() == ["stage1", "trained", "8", "6.6749", "6.6749", "-", "5.1230", "12"]
  assert lines[3].split()[:3] == ["finetune", "complete", "43"]
  assert ("finetune test: selection_score 0.3117  open_recall 0.1235  closed_accuracy 0.5000"
          in lines)
  assert "e-155" not in table and "7.458" not in table
  assert lines[-3].split() == ["OPEN", "0.1235", "0.0000", "36"]
  assert lines[-2].split() == ["CLOSED", "0.5000", "-", "24"]
  assert json.loads(json.dumps(RESULT))["finetune"]["test"]["OPEN"]["bleu2"] == (
      7.458340731200311e-155)


def test_summary_table_of_an_evaluation():
  table = console.summary_table(TEST_METRICS)
  assert table.splitlines()[0] == (
      "evaluation: selection_score 0.3117  open_recall 0.1235  closed_accuracy 0.5000")
  located = console.summary_table({**TEST_METRICS, "checkpoint": "/w/checkpoints/finetune_best",
                                   "output_dir": "/w/eval/test_w_options_new"})
  assert located.splitlines()[0] == (
      "evaluated /w/checkpoints/finetune_best: answers.jsonl, protocol.json and protocol.md "
      "in /w/eval/test_w_options_new")


def test_validation_and_test_scores_become_scalars(tmp_path):
  scalars = metrics.flat_scalars("test", TEST_METRICS)
  assert scalars["test/selection_score"] == pytest.approx(0.3117283945)
  assert scalars["test/OPEN/recall"] == pytest.approx(0.123456789)
  assert scalars["test/OPEN/count"] == 36.0
  assert "test/CLOSED/bleu2" not in scalars and "test/metrics_version" not in scalars
  writer = metrics.create_writer(str(tmp_path))
  writer.write_scalars(43, scalars)
  writer.flush()
  writer.close()
  import tensorflow as tf  # pylint: disable=g-import-not-at-top (CLU's writer backend)
  events = [os.path.join(tmp_path, n) for n in os.listdir(tmp_path)]
  tags = {v.tag for e in tf.compat.v1.train.summary_iterator(events[0])
          for v in e.summary.value}
  assert {"test/selection_score", "test/OPEN/recall", "test/overall/bleu2"} <= tags
