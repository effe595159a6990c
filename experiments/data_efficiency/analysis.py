"""Bookkeeping of the data-efficiency experiment (experiments/data_efficiency/run.py).

The experiment crosses stage-2 arms (LM only, LM + multi-graph alignment with the exact
solver, and with a deliberately weakened one) with stage-2 data fractions and seeds; every
(arm, fraction, seed) run ends with a VQA fine-tune and a test evaluation. This module
turns the runs' JSON summaries into:

- one flat row per run (`run_row`): the test metrics of the fine-tune, the alignment
  Hamming distances and LM loss at the end of stage 2, and (when run) the test metrics of
  the stage-2 checkpoint itself, before any fine-tune (`zs_*`);
- mean +- std over seeds per (fraction, arm) (`aggregate`; std is the sample standard
  deviation, ddof=1, and 0 for a single seed);
- the per-seed difference of a metric between two arms (`paired_differences`, e.g.
  align - LM, align - align_weak): all arms of a seed start from the same stage-1
  checkpoint, so the paired difference removes the spread the arms share;
- the test score per demo-world question kind (`kind_scores`, `kinds_table`);
- a Markdown report (`markdown_report`) and a bar chart (`bar_chart`) drawn with pillow's
  ImageDraw (matplotlib is not a dependency): one panel per metric, one group of bars per
  fraction, bar = mean, whisker = +-1 std, dots = the seeds.

No JAX here: it runs (and is tested) without training anything.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import scipy.stats

from exgra_jax.data import demo_world
from exgra_jax.eval import vqa_metrics

# Arm name -> label, in the order tables and charts show them.
ARMS = {"lm": "LM only", "align": "LM + multi-graph alignment",
        "align_weak": "LM + alignment, weakened solver",
        "lm_long": "LM only, 100 %'s steps", "align_long": "LM + alignment, 100 %'s steps"}
# Per arm: the stage-2 config overrides that make it (experiments/data_efficiency/run.py).
# align_weak: one round of the solver's iterated local search instead of up to 100 (the
# Hungarian seed and one descent remain), to see whether solver quality matters.
ARM_OVERRIDES = {"lm": ("stage2.align=False",), "align": ("stage2.align=True",),
                 "align_weak": ("stage2.align=True", "align.solver_iterations=1"),
                 "lm_long": ("stage2.align=False",), "align_long": ("stage2.align=True",)}
# Arms whose stage 2 runs as many steps on a fraction of the data as the others run on
# all of it (epochs / fraction): the same compute on less data. The paper's pmc10 runs
# the same epochs as pmc100 (a tenth of the steps), which at 10 % of the demo leaves the
# alignment 8 steps, too few for its matchings to leave the random start.
FULL_DATA_STEPS = ("lm_long", "align_long")
# (treatment, control) pairs whose per-seed differences the report shows.
COMPARISONS = (("align", "lm"), ("align_weak", "lm"), ("align", "align_weak"),
               ("align_long", "lm_long"))
# Test metrics of the fine-tune's summary (`summary["finetune"]["test"]`, docs/eval.md).
TEST_METRICS = ("selection_score", "open_recall", "closed_accuracy")
# The same metrics of the stage-2 checkpoint answering the test split without fine-tune.
ZERO_SHOT_METRICS = tuple(f"zs_{m}" for m in TEST_METRICS)
HAMMINGS = ("hamming_image", "hamming_short", "hamming_long")
# Everything `aggregate` averages over seeds.
AGGREGATED = TEST_METRICS + ZERO_SHOT_METRICS + ("hamming",) + HAMMINGS + (
    "stage2_lm_loss", "stage2_align_loss", "val_best_selection_score")
LABELS = {
    "selection_score": "test selection score",
    "open_recall": "test open recall",
    "closed_accuracy": "test closed accuracy",
    "zs_selection_score": "stage 2 alone: selection",
    "zs_open_recall": "stage 2 alone: open recall",
    "zs_closed_accuracy": "stage 2 alone: closed acc.",
    "hamming": "Hamming (end of stage 2)",
    "stage2_lm_loss": "stage-2 LM loss (end)",
}
# Bar colours per arm (colour-blind safe pair), error bars and seed dots.
COLORS = {"lm": (110, 140, 190), "align": (230, 140, 40), "align_weak": (120, 180, 120),
          "lm_long": (175, 195, 225), "align_long": (245, 200, 140)}
_INK = (30, 30, 30)
_GRID = (225, 225, 225)


def _number(value: Any) -> float | None:
  if value is None:
    return None
  value = float(value)
  return None if math.isnan(value) else value


def run_row(arm: str, fraction: float, seed: int, stage2: Mapping[str, Any],
            finetune: Mapping[str, Any],
            stage2_eval: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """One run's row from the JSON summaries of its stage 2 and its fine-tune.

  `stage2` / `finetune` are the per-stage summaries `python -m exgra_jax.main` prints
  (`result["stage2"]`, `result["finetune"]`); `stage2_eval` what `--mode=eval` prints for
  the stage-2 checkpoint (metrics `zs_*`; None when not run). `hamming` is the mean of the
  image, short- and long-text Hamming distances of stage 2's last logged steps; None where
  stage 2 ran without alignment (or did not log them).
  """
  test = finetune.get("test") or {}
  final = stage2.get("final_metrics") or {}
  row: dict[str, Any] = {"arm": arm, "fraction": float(fraction), "seed": int(seed)}
  for name in TEST_METRICS:
    row[name] = _number(test.get(name))
    row[f"zs_{name}"] = _number((stage2_eval or {}).get(name))
  for name in HAMMINGS:
    row[name] = _number(final.get(f"align/{name}"))
  parts = [row[name] for name in HAMMINGS]
  row["hamming"] = None if None in parts else sum(parts) / len(parts)
  row["stage2_lm_loss"] = _number(final.get("lm_loss"))
  row["stage2_align_loss"] = _number(final.get("align_loss"))
  row["val_best_selection_score"] = _number(
      (finetune.get("validation") or {}).get("best_selection_score"))
  row["stage2_steps"] = stage2.get("steps")
  row["finetune_steps"] = finetune.get("steps")
  row["test_counts"] = {kind: (test.get(kind) or {}).get("count") for kind in ("OPEN", "CLOSED")}
  return row


def kind_scores(references: Sequence[Mapping[str, Any]],
                answers: Sequence[Mapping[str, Any]]) -> dict[str, float]:
  """Demo-world test items + a run's answers -> score per question kind, in
  `demo_world.VQA_QUESTION_KINDS` order: the mean CLOSED hit or OPEN recall (docs/eval.md),
  so the kinds' scores, weighted by their counts, give the closed accuracy and the open
  recall. Shows which questions an arm learned (the yes/no ones switch on last)."""
  texts = {str(a["question_id"]): str(a["text"]) for a in answers}
  scores: dict[str, list[float]] = {kind: [] for kind in demo_world.VQA_QUESTION_KINDS}
  for item in references:
    answer_type, reference = vqa_metrics.reference_answer(item)
    question = vqa_metrics.question_text(item)
    item_scores = vqa_metrics.score_item(texts[str(item["id"])], reference)
    scores[demo_world.vqa_question_kind(question)].append(
        item_scores["hit" if answer_type == "CLOSED" else "recall"])
  return {kind: sum(v) / len(v) for kind, v in scores.items() if v}


def mean_std(values: Iterable[float | None]) -> dict[str, Any]:
  """{"mean", "std", "n", "values"} over the values that are not None (sample std, ddof=1;
  0.0 for one value; mean and std None for none)."""
  present = [float(v) for v in values if v is not None]
  n = len(present)
  if not n:
    return {"mean": None, "std": None, "n": 0, "values": []}
  mean = sum(present) / n
  std = math.sqrt(sum((v - mean) ** 2 for v in present) / (n - 1)) if n > 1 else 0.0
  return {"mean": mean, "std": std, "n": n, "values": present}


def _arm_order(arm: str) -> int:
  return list(ARMS).index(arm) if arm in ARMS else len(ARMS)


def aggregate(rows: Sequence[Mapping[str, Any]],
              metrics: Sequence[str] = AGGREGATED) -> list[dict[str, Any]]:
  """Mean +- std over seeds of each (fraction, arm); sorted by fraction, then arm."""
  groups: dict[tuple[float, str], list[Mapping[str, Any]]] = {}
  for row in rows:
    groups.setdefault((float(row["fraction"]), row["arm"]), []).append(row)
  out = []
  for (fraction, arm), members in sorted(groups.items(),
                                         key=lambda kv: (kv[0][0], _arm_order(kv[0][1]))):
    members = sorted(members, key=lambda r: r["seed"])
    out.append({"fraction": fraction, "arm": arm, "seeds": [r["seed"] for r in members],
                "metrics": {m: mean_std(r.get(m) for r in members) for m in metrics}})
  return out


def confidence_95(stats: Mapping[str, Any]) -> list[float] | None:
  """Student-t 95 % interval of the mean of `mean_std(...)`'s values (None below 2):
  mean ± t(0.975, n - 1) · std / √n. With 3 seeds t = 4.30, so a paired effect is only
  told apart from none when it is steady across the seeds, not just positive in each."""
  n = stats["n"]
  if n < 2:
    return None
  half = float(scipy.stats.t.ppf(0.975, n - 1)) * stats["std"] / math.sqrt(n)
  return [stats["mean"] - half, stats["mean"] + half]


def paired_differences(rows: Sequence[Mapping[str, Any]], metric: str,
                       treatment: str = "align", control: str = "lm") -> list[dict[str, Any]]:
  """Per fraction: mean +- std over seeds of metric(treatment) - metric(control), using the
  seeds both arms have (no entry for a pair that has no such seed at any fraction)."""
  by_key = {(float(r["fraction"]), r["arm"], r["seed"]): r.get(metric) for r in rows}
  out = []
  for fraction in sorted({float(r["fraction"]) for r in rows}):
    seeds = sorted({s for f, a, s in by_key if f == fraction and a == treatment}
                   & {s for f, a, s in by_key if f == fraction and a == control})
    diffs = [by_key[(fraction, treatment, s)] - by_key[(fraction, control, s)] for s in seeds
             if by_key[(fraction, treatment, s)] is not None
             and by_key[(fraction, control, s)] is not None]
    stats = mean_std(diffs)
    out.append({"fraction": fraction, "metric": metric, "treatment": treatment,
                "control": control, "seeds": seeds, **stats, "ci95": confidence_95(stats)})
  return out


def format_mean_std(stats: Mapping[str, Any], digits: int = 3) -> str:
  if stats.get("mean") is None:
    return "–"
  return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def _percent(fraction: float) -> str:
  return f"{100 * fraction:g} %"


def _table(groups: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> list[str]:
  lines = ["| stage-2 data | stage 2 | seeds | " + " | ".join(LABELS[c] for c in columns) + " |",
           "|---|---|---|" + "---|" * len(columns)]
  for g in groups:
    cells = [format_mean_std(g["metrics"][c]) for c in columns]
    lines.append(f"| {_percent(g['fraction'])} | {ARMS.get(g['arm'], g['arm'])} | "
                 f"{len(g['seeds'])} | " + " | ".join(cells) + " |")
  return lines


def markdown_report(groups: Sequence[Mapping[str, Any]],
                    differences: Sequence[Mapping[str, Any]] = (),
                    rows: Sequence[Mapping[str, Any]] = ()) -> str:
  """The results table (mean ± std over seeds), the stage-2-alone table when any group has
  those metrics, when given the paired differences, and the rows' scores per question
  kind (`kinds_table`) when they have them."""
  lines = ["After the VQA fine-tune (test split):", ""]
  lines += _table(groups, TEST_METRICS + ("hamming", "stage2_lm_loss"))
  if any(g["metrics"].get(m, {}).get("n") for g in groups for m in ZERO_SHOT_METRICS):
    lines += ["", "The stage-2 checkpoint itself, no fine-tune (test split):", ""]
    lines += _table(groups, ZERO_SHOT_METRICS)
  differences = [d for d in differences if d["n"]]
  if differences:
    lines += ["", "Paired differences between arms, same seed, mean ± std over seeds:", "",
              "| stage-2 data | difference | metric | mean ± std | 95 % CI (t) | per seed |",
              "|---|---|---|---|---|---|"]
    for d in differences:
      per_seed = ", ".join(f"{v:+.3f}" for v in d["values"])
      pair = " − ".join(f"({ARMS.get(d[k], d[k])})" for k in ("treatment", "control"))
      ci = "[{:+.3f}, {:+.3f}]".format(*d["ci95"]) if d.get("ci95") else "–"
      lines.append(f"| {_percent(d['fraction'])} | {pair} | "
                   f"{LABELS.get(d['metric'], d['metric'])} | {format_mean_std(d)} | {ci} | "
                   f"{per_seed} |")
  kinds = kinds_table(rows)
  if kinds:
    lines += ["", "Test score per question kind after the fine-tune (CLOSED: hit, OPEN: "
              "recall), seed by seed:", ""] + kinds
  return "\n".join(lines) + "\n"


def kinds_table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
  """Markdown lines: per (fraction, arm), each question kind's score, seed by seed
  ("a / b / c" in seed order); rows without `kinds` are left out."""
  rows = [r for r in rows if r.get("kinds")]
  if not rows:
    return []
  kinds = [k for k in demo_world.VQA_QUESTION_KINDS if any(k in r["kinds"] for r in rows)]
  groups: dict[tuple[float, str], list[Mapping[str, Any]]] = {}
  for row in sorted(rows, key=lambda r: (float(r["fraction"]), _arm_order(r["arm"]), r["seed"])):
    groups.setdefault((float(row["fraction"]), row["arm"]), []).append(row)
  lines = ["| stage-2 data | stage 2 | seeds | " + " | ".join(kinds) + " |",
           "|---|---|---|" + "---|" * len(kinds)]
  for (fraction, arm), members in groups.items():
    cells = [" / ".join(f"{r['kinds'][k]:.2f}" if k in r["kinds"] else "–" for r in members)
             for k in kinds]
    lines.append(f"| {_percent(fraction)} | {ARMS.get(arm, arm)} | "
                 f"{', '.join(str(r['seed']) for r in members)} | " + " | ".join(cells) + " |")
  return lines


def _font(size: int) -> PIL.ImageFont.ImageFont:
  try:
    return PIL.ImageFont.load_default(size=size)
  except (TypeError, OSError):  # older pillow / no FreeType: the fixed bitmap font
    return PIL.ImageFont.load_default()


def _text(draw, xy, text, font, anchor_x="left", anchor_y="top", fill=_INK):
  left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
  w, h = right - left, bottom - top
  x = {"left": xy[0], "center": xy[0] - w / 2, "right": xy[0] - w}[anchor_x]
  y = {"top": xy[1], "middle": xy[1] - h / 2, "bottom": xy[1] - h}[anchor_y]
  draw.text((x - left, y - top), text, font=font, fill=fill)


def bar_chart(groups: Sequence[Mapping[str, Any]], path: str,
              metrics: Sequence[str] = TEST_METRICS, size: tuple[int, int] = (960, 380),
              title: str = "") -> str:
  """Writes a PNG bar chart of `aggregate`'s groups to `path`; returns `path`.

  Metrics no group has (e.g. `zs_*` when stage 2 was not evaluated alone) are left out.

  One panel per metric (y from 0 to 1, or to the largest value above 1), one cluster per
  stage-2 fraction, one bar per arm: height = mean over seeds, whisker = +-1 std, black
  dots = the individual seeds.
  """
  metrics = [m for m in metrics if any(g["metrics"].get(m, {}).get("n") for g in groups)]
  width, height = size
  image = PIL.Image.new("RGB", (width, height), "white")
  draw = PIL.ImageDraw.Draw(image)
  font, small = _font(14), _font(11)
  fractions = sorted({float(g["fraction"]) for g in groups})
  arms = sorted({g["arm"] for g in groups}, key=_arm_order)
  by_key = {(float(g["fraction"]), g["arm"]): g for g in groups}
  top = 34 if title else 10
  if title:
    _text(draw, (width / 2, 8), title, font, anchor_x="center")
  legend_h, x_label_h, title_h, axis_w = 26, 20, 22, 40
  panel_w = width / max(1, len(metrics))
  plot_top, plot_bottom = top + title_h, height - legend_h - x_label_h
  for p, metric in enumerate(metrics):
    x0 = p * panel_w + axis_w
    x1 = (p + 1) * panel_w - 10
    values = [v for g in groups for v in g["metrics"][metric]["values"]]
    tops = [g["metrics"][metric]["mean"] + g["metrics"][metric]["std"] for g in groups
            if g["metrics"][metric]["mean"] is not None]
    y_max = max([1.0] + values + tops)
    y_max = 1.0 if y_max <= 1.0 else math.ceil(y_max)

    def y_of(v, y_max=y_max):
      return plot_bottom - (plot_bottom - plot_top) * v / y_max

    _text(draw, ((x0 + x1) / 2, top), LABELS.get(metric, metric), font, anchor_x="center")
    for i in range(5):  # grid and y ticks
      v = y_max * i / 4
      y = y_of(v)
      draw.line([(x0, y), (x1, y)], fill=_GRID)
      _text(draw, (x0 - 4, y), f"{v:.2f}", small, anchor_x="right", anchor_y="middle")
    draw.line([(x0, plot_top), (x0, plot_bottom)], fill=_INK)
    draw.line([(x0, plot_bottom), (x1, plot_bottom)], fill=_INK)
    cluster_w = (x1 - x0) / max(1, len(fractions))
    bar_w = cluster_w * 0.7 / max(1, len(arms))
    for c, fraction in enumerate(fractions):
      cx0 = x0 + c * cluster_w + cluster_w * 0.15
      _text(draw, (x0 + (c + 0.5) * cluster_w, plot_bottom + 4), _percent(fraction) + " data",
            small, anchor_x="center")
      for a, arm in enumerate(arms):
        group = by_key.get((fraction, arm))
        if group is None or group["metrics"][metric]["mean"] is None:
          continue
        stats = group["metrics"][metric]
        bx0, bx1 = cx0 + a * bar_w, cx0 + (a + 1) * bar_w - 2
        draw.rectangle([bx0, y_of(stats["mean"]), bx1, plot_bottom], fill=COLORS.get(arm, _GRID),
                       outline=_INK)
        mid = (bx0 + bx1) / 2
        lo, hi = y_of(max(0.0, stats["mean"] - stats["std"])), y_of(stats["mean"] + stats["std"])
        draw.line([(mid, lo), (mid, hi)], fill=_INK, width=2)
        for y in (lo, hi):
          draw.line([(mid - bar_w / 6, y), (mid + bar_w / 6, y)], fill=_INK, width=2)
        for k, v in enumerate(stats["values"]):
          dx = (k - (len(stats["values"]) - 1) / 2) * 5
          y = y_of(v)
          draw.ellipse([mid + dx - 2.5 + bar_w / 4, y - 2.5, mid + dx + 2.5 + bar_w / 4, y + 2.5],
                       fill=_INK)
  x = 10.0
  for arm in arms:  # legend
    y = height - legend_h / 2
    draw.rectangle([x, y - 6, x + 12, y + 6], fill=COLORS.get(arm, _GRID), outline=_INK)
    label = ARMS.get(arm, arm)
    _text(draw, (x + 18, y), label, font, anchor_y="middle")
    x += 18 + draw.textlength(label, font=font) + 24
  _text(draw, (width - 10, height - legend_h / 2),
        "bar: mean over seeds, whisker: ±1 std, dots: seeds", small, anchor_x="right",
        anchor_y="middle")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  image.save(path, format="PNG", optimize=True)
  return path
