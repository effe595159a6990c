"""Data-efficiency bookkeeping: rows from summaries, mean/std by hand, paired differences,
the Markdown table and the pillow bar chart (nothing is trained)."""
import math
import os
import subprocess
import sys

import PIL.Image
import pytest

from experiments.data_efficiency import analysis as de


def _summaries(selection, open_recall, closed, hamming=None, lm_loss=1.5):
  final = {"lm_loss": lm_loss, "loss": lm_loss}
  if hamming is not None:
    final.update({"align/hamming_image": hamming[0], "align/hamming_short": hamming[1],
                  "align/hamming_long": hamming[2], "align_loss": 0.5})
  stage2 = {"status": "trained", "steps": 30, "final_metrics": final}
  finetune = {"status": "trained", "steps": 151,
              "validation": {"best_selection_score": selection + 0.01},
              "test": {"selection_score": selection, "open_recall": open_recall,
                       "closed_accuracy": closed, "OPEN": {"count": 420},
                       "CLOSED": {"count": 240}}}
  return stage2, finetune


def _rows():
  rows = []
  # (arm, fraction) -> per seed (selection, open, closed, hamming triple or None)
  table = {
      ("lm", 0.1): [(0.4, 0.3, 0.5, None), (0.5, 0.4, 0.6, None), (0.6, 0.5, 0.7, None)],
      ("align", 0.1): [(0.45, 0.35, 0.55, (0.6, 0.3, 0.3)), (0.55, 0.45, 0.65, (0.3, 0.3, 0.3)),
                       (0.8, 0.7, 0.9, (0.0, 0.3, 0.6))],
      ("lm", 1.0): [(0.7, 0.6, 0.8, None), (0.7, 0.6, 0.8, None)],  # seed 2 missing
  }
  for (arm, fraction), per_seed in table.items():
    for seed, (sel, opn, cls, ham) in enumerate(per_seed):
      rows.append(de.run_row(arm, fraction, seed, *_summaries(sel, opn, cls, ham)))
  return rows


def test_run_row_reads_test_metrics_and_mean_hamming():
  row = de.run_row("align", 0.1, 2, *_summaries(0.5, 0.4, 0.6, (0.2, 0.4, 0.9)))
  assert row["arm"] == "align" and row["fraction"] == 0.1 and row["seed"] == 2
  assert (row["selection_score"], row["open_recall"], row["closed_accuracy"]) == (0.5, 0.4, 0.6)
  assert row["hamming"] == pytest.approx(0.5)
  assert row["hamming_long"] == 0.9 and row["stage2_align_loss"] == 0.5
  assert row["val_best_selection_score"] == pytest.approx(0.51)
  assert row["test_counts"] == {"OPEN": 420, "CLOSED": 240}
  assert row["zs_selection_score"] is None  # stage 2 not evaluated alone
  lm = de.run_row("lm", 1.0, 0, *_summaries(0.5, 0.4, 0.6),
                  stage2_eval={"selection_score": 0.1, "open_recall": 0.2,
                               "closed_accuracy": 0.0, "metrics_version": "exgra-vqa-1"})
  assert lm["hamming"] is None and lm["hamming_image"] is None and lm["stage2_lm_loss"] == 1.5
  assert (lm["zs_selection_score"], lm["zs_open_recall"], lm["zs_closed_accuracy"]) == (
      0.1, 0.2, 0.0)


def test_mean_std_by_hand():
  stats = de.mean_std([0.4, 0.5, 0.6])
  assert stats["mean"] == pytest.approx(0.5)
  # sample std: sqrt(((-0.1)^2 + 0 + 0.1^2) / (3 - 1)) = 0.1
  assert stats["std"] == pytest.approx(0.1)
  assert de.mean_std([0.7, None]) == {"mean": 0.7, "std": 0.0, "n": 1, "values": [0.7]}
  assert de.mean_std([None])["mean"] is None


def test_aggregate_groups_by_fraction_then_arm():
  groups = de.aggregate(_rows())
  assert [(g["fraction"], g["arm"]) for g in groups] == [(0.1, "lm"), (0.1, "align"),
                                                        (1.0, "lm")]
  lm10, al10, lm100 = groups
  assert lm10["seeds"] == [0, 1, 2] and lm100["seeds"] == [0, 1]
  assert lm10["metrics"]["selection_score"]["mean"] == pytest.approx(0.5)
  assert lm10["metrics"]["selection_score"]["std"] == pytest.approx(0.1)
  # align 10 %: selection 0.45, 0.55, 0.8 -> mean 0.6, deviations -0.15, -0.05, 0.2
  assert al10["metrics"]["selection_score"]["mean"] == pytest.approx(0.6)
  assert al10["metrics"]["selection_score"]["std"] == pytest.approx(
      math.sqrt((0.15 ** 2 + 0.05 ** 2 + 0.2 ** 2) / 2))
  # hamming per seed = mean of the three: 0.4, 0.3, 0.3 -> mean 1/3
  assert al10["metrics"]["hamming"]["values"] == pytest.approx([0.4, 0.3, 0.3])
  assert al10["metrics"]["hamming"]["mean"] == pytest.approx(1 / 3)
  assert lm10["metrics"]["hamming"] == {"mean": None, "std": None, "n": 0, "values": []}
  assert lm100["metrics"]["closed_accuracy"] == {"mean": pytest.approx(0.8), "std": 0.0,
                                                 "n": 2, "values": [0.8, 0.8]}


def test_paired_differences_use_common_seeds():
  diffs = de.paired_differences(_rows(), "selection_score")
  assert [d["fraction"] for d in diffs] == [0.1, 1.0]
  ten, full = diffs
  assert ten["seeds"] == [0, 1, 2]
  assert ten["values"] == pytest.approx([0.05, 0.05, 0.2])
  assert ten["mean"] == pytest.approx(0.1)
  assert ten["std"] == pytest.approx(math.sqrt((0.05 ** 2 * 2 + 0.1 ** 2) / 2))
  # 95 % t interval: std / sqrt(3) = 0.05; t(0.975, 2 df) = 4.302653 (tables) -> ± 0.2151
  assert ten["ci95"] == pytest.approx([0.1 - 4.302653 * 0.05, 0.1 + 4.302653 * 0.05])
  assert full["seeds"] == [] and full["mean"] is None  # no align run at 100 %


def test_markdown_report():
  rows = _rows()
  text = de.markdown_report(de.aggregate(rows), de.paired_differences(rows, "selection_score"))
  assert "| 10 % | LM only | 3 | 0.500 ± 0.100 |" in text
  assert "| 100 % | LM only | 2 | 0.700 ± 0.000 |" in text
  assert "0.333 ± 0.058" in text  # hamming of align 10 %: std of (0.4, 0.3, 0.3)
  pair = "(LM + multi-graph alignment) − (LM only)"
  assert (f"| 10 % | {pair} | test selection score | 0.100 ± 0.087 | [-0.115, +0.315] | "
          "+0.050, +0.050, +0.200 |") in text
  assert f"| 100 % | {pair} | test selection score |" not in text  # no pair at 100 %
  assert "no fine-tune" not in text  # no stage-2-alone metrics in these rows
  rows.append(de.run_row("lm", 1.0, 2, *_summaries(0.7, 0.6, 0.8), {"selection_score": 0.25}))
  text = de.markdown_report(de.aggregate(rows))
  assert "no fine-tune" in text and "| 100 % | LM only | 3 | 0.250 ± 0.000 | – | – |" in text


def test_bar_chart_writes_a_png_of_the_requested_size(tmp_path):
  path = de.bar_chart(de.aggregate(_rows()), str(tmp_path / "sub" / "chart.png"),
                      size=(640, 300), title="data efficiency")
  with PIL.Image.open(path) as image:
    assert image.format == "PNG" and image.size == (640, 300)
    colors = {c for _, c in image.convert("RGB").getcolors(maxcolors=1 << 16)}
  assert de.COLORS["lm"] in colors and de.COLORS["align"] in colors


def _vqa_item(item_id, answer_type, question, answer):
  return {"id": item_id, "answer_type": answer_type,
          "conversations": [{"from": "human", "value": f"{question}\n<image>"},
                            {"from": "gpt", "value": answer}]}


def test_scores_per_question_kind_by_hand():
  references = [
      _vqa_item("a", "CLOSED", "Is there a lesion in the liver?", "Yes"),
      _vqa_item("b", "CLOSED", "Is there a nodule in the lung?", "No"),
      _vqa_item("c", "OPEN", "Which organ is shown?", "liver"),
      _vqa_item("d", "OPEN", "How many lesions are there?", "2"),
      _vqa_item("e", "CLOSED", "Is this a CT scan?", "Yes")]
  answers = [{"question_id": "a", "text": "Yes"}, {"question_id": "b", "text": "Yes"},
             {"question_id": "c", "text": "The liver."}, {"question_id": "d", "text": "3"},
             {"question_id": "e", "text": "yes"}]
  # CLOSED: hit (the reference in the normalised answer), OPEN: word recall.
  assert de.kind_scores(references, answers) == {
      "lesion present?": 0.5, "is this a <modality>?": 1.0, "organ": 1.0, "count": 0.0}
  rows = [dict(de.run_row("lm", 1.0, seed, *_summaries(0.5, 0.4, 0.6)),
               kinds={"organ": 1.0 - seed / 4, "count": 0.25}) for seed in (1, 0)]
  lines = de.kinds_table(rows)
  assert lines[0] == "| stage-2 data | stage 2 | seeds | organ | count |"
  assert lines[2] == "| 100 % | LM only | 0, 1 | 1.00 / 0.75 | 0.25 / 0.25 |"
  assert lines[2] in de.markdown_report(de.aggregate(rows), rows=rows)


def test_the_long_arms_run_as_many_stage2_steps_on_a_tenth_of_the_data(tmp_path):
  """experiments/data_efficiency/run.py --dry_run: lm_long / align_long at 10 % get epochs / 0.1
  (the 100 % arms' steps), only at --long_fractions; the other arms keep the epochs."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run(
      [sys.executable, "-m", "experiments.data_efficiency.run", "--dry_run", "--seeds=0",
       f"--workdir={tmp_path}", "--world_root=/nonexistent", "--stage2_epochs=0.5"],
      cwd=repo, capture_output=True, text=True, check=True, timeout=120,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  stage2 = {line.split("--workdir=")[1].split()[0].rsplit("/", 1)[1]: line
            for line in out.stdout.splitlines() if "'stage2'" in line}
  assert sorted(stage2) == ["align_f0.1", "align_f1", "align_long_f0.1", "align_weak_f1",
                            "lm_f0.1", "lm_f1", "lm_long_f0.1"]
  for run, epochs in (("lm_f0.1", "0.5"), ("align_f1", "0.5"), ("lm_long_f0.1", "5"),
                      ("align_long_f0.1", "5")):
    assert f"--config.stage2.epochs={epochs} " in stage2[run] + " ", run
  assert "--config.stage2.align=True" in stage2["align_long_f0.1"]
  assert "--config.stage2.align=False" in stage2["lm_long_f0.1"]
