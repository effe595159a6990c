r"""The data-efficiency experiment: stage 2 with LM only vs LM + multi-graph alignment (exact
solver, and a deliberately weakened one), at several fractions of the stage-2 data (with the
same epochs, and with the same steps as at 100 %: the `*_long` arms), over seeds, each run
ending with a VQA fine-tune and a test evaluation (docs/data_efficiency.md). Not part of CI.

    nice -n 10 .venv/bin/python -m experiments.data_efficiency.run \
        --out=experiments/data_efficiency/results/first_run
    .venv/bin/python -m experiments.data_efficiency.run --dry_run        # print the commands

Per seed: the contrastive pre-training of the tower and stage 1 (projector only; neither
depends on the arm or the fraction) run once in `<workdir>/seed<S>/stage1`; each (fraction,
arm) then runs stage 2 from that checkpoint (`stage2.init_from`) and the fine-tune from its
own stage 2 (`finetune.init_from`) in `<workdir>/seed<S>/<arm>_f<fraction>`. Every run is
a `python -m exgra_jax.main` sub-process (stdout / stderr to files there); its JSON summary
is kept as `<stage>_summary.json`, and a run that has one is not run again, so the same command
continues an interrupted experiment. All seeds train on the same demo world (world seed
`--world_seed`, built once in `--world_root`): `config.seed` varies init, data order,
dropout and graph noise, the test split stays the same.

Writes `table.md`, `table.json` (rows, mean ± std over seeds, paired differences, the
protocol and wall times) and `chart.png` to --out after every finished run.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

from absl import app, flags, logging

from experiments.data_efficiency import analysis as de
from exgra_jax.eval import vqa_metrics
from exgra_jax.run_paths import RunDir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_OUT = flags.DEFINE_string("out", "experiments/data_efficiency/results/first_run",
                           "where table.md, table.json and chart.png go")
_WORKDIR = flags.DEFINE_string("workdir", "workdir/data_efficiency",
                               "run directories (checkpoints, logs, summaries); not committed")
# Five: with three, a paired difference's 95 % t interval is ± 2.48 std (t = 4.30 / √3).
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "config.seed of the runs")
_FRACTIONS = flags.DEFINE_list("fractions", ["0.1", "1.0"], "stage2.subset_fraction values")
_ARMS = flags.DEFINE_list("arms", list(de.ARMS), "stage-2 arms: lm (align=False), align, "
                         "align_weak (align, solver_iterations=1), lm_long / align_long "
                         "(lm / align for 100 %'s steps); de.ARM_OVERRIDES")
_WEAK_FRACTIONS = flags.DEFINE_list(
    "align_weak_fractions", ["1.0"], "the fractions at which the align_weak arm runs (the "
    "solver question is asked where the alignment sees the most data)")
_LONG_FRACTIONS = flags.DEFINE_list(
    "long_fractions", ["0.1"], "the fractions at which the lm_long / align_long arms run "
    "(stage 2 for as many steps as at 100 %: de.FULL_DATA_STEPS)")
_WORLD = flags.DEFINE_enum("world", "medium", ["small", "medium"], "demo world size")
_WORLD_ROOT = flags.DEFINE_string("world_root", None,
                                  "demo world folder (default .cache/demo_<world>)")
_WORLD_SEED = flags.DEFINE_integer("world_seed", 0, "demo world seed (shared by all runs)")
_STAGE1_EPOCHS = flags.DEFINE_float("stage1_epochs", 0.5, "stage-1 epochs")
_STAGE2_EPOCHS = flags.DEFINE_float("stage2_epochs", 0.5,
                                    "stage-2 epochs over the (subset) records")
_FINETUNE_EPOCHS = flags.DEFINE_float(
    "finetune_epochs", 2.0, "VQA fine-tune epochs (the demo's 4 bring every arm to the same "
    "answers; at 2 the yes/no questions are half learned, where a better start can show)")
_EXTRA = flags.DEFINE_multi_string(
    "extra_override", [], "config override added to every run, e.g. stage2.lr=5e-4 "
    "(with or without the --config. prefix)")
_STAGE2_EVAL = flags.DEFINE_bool(
    "stage2_eval", False, "also answer the VQA test split with each stage-2 checkpoint "
    "itself, before any fine-tune (--mode=eval; ~15 s a run on an idle machine)")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "print the commands, run nothing")
_REPORT_ONLY = flags.DEFINE_bool(
    "report_only", False, "write the outputs from the runs already finished, run nothing "
    "(e.g. after runners for single seeds, --seeds=1 etc., ran side by side)")


@dataclasses.dataclass
class Job:
  stage: str
  workdir: str
  argv: list[str]

  @property
  def summary_path(self) -> str:
    return os.path.join(self.workdir, f"{self.stage}_summary.json")

  def done(self) -> bool:
    return os.path.isfile(self.summary_path)


def _abs(path: str) -> str:
  return path if os.path.isabs(path) else os.path.join(REPO, path)


def _override(text: str) -> str:
  text = text.strip()
  return text if text.startswith("--config.") else "--config." + text.lstrip("-")


def arm_dir(seed: int, fraction: float, arm: str) -> str:
  return os.path.join(_abs(_WORKDIR.value), f"seed{seed}", f"{arm}_f{fraction:g}")


def _common(workdir: str, seed: int, stage: str, world_root: str,
            mode: str = "train") -> list[str]:
  return [sys.executable, "-m", "exgra_jax.main", f"--config=configs/demo.py:{_WORLD.value}",
          f"--workdir={workdir}", f"--mode={mode}", f"--config.seed={seed}",
          # Every run shares one world: main builds it (or finds it built) from demo_seed,
          # whatever config.seed.
          f"--config.data.demo_seed={_WORLD_SEED.value}", f"--config.data.root={world_root}",
          "--config.export.after_training=False", f"--config.stages=('{stage}',)"]


def plan(world_root: str) -> list[Job]:
  """Every run in order: per seed, stage 1, then stage 2 + fine-tune per (fraction, arm)."""
  extra = [_override(o) for o in _EXTRA.value]
  jobs = []
  for seed in (int(s) for s in _SEEDS.value):
    stage1_dir = os.path.join(_abs(_WORKDIR.value), f"seed{seed}", "stage1")
    jobs.append(Job("stage1", stage1_dir, _common(stage1_dir, seed, "stage1", world_root) + [
        f"--config.stage1.epochs={_STAGE1_EPOCHS.value}"] + extra))
    for fraction in (float(f) for f in _FRACTIONS.value):
      for arm in _ARMS.value:
        if arm not in de.ARMS:
          raise app.UsageError(f"unknown arm {arm!r}: expected one of {list(de.ARMS)}")
        if arm == "align_weak" and fraction not in {float(f) for f in _WEAK_FRACTIONS.value}:
          continue
        if arm in de.FULL_DATA_STEPS and fraction not in {float(f) for f in
                                                          _LONG_FRACTIONS.value}:
          continue
        epochs = _STAGE2_EPOCHS.value / (fraction if arm in de.FULL_DATA_STEPS else 1.0)
        work = arm_dir(seed, fraction, arm)
        jobs.append(Job("stage2", work, _common(work, seed, "stage2", world_root) + [
            f"--config.stage2.init_from={RunDir(stage1_dir).stage('stage1')}",
            *[_override(o) for o in de.ARM_OVERRIDES[arm]],
            f"--config.stage2.subset_fraction={fraction}",
            f"--config.stage2.epochs={epochs:g}"] + extra))
        if _STAGE2_EVAL.value:  # stages=('stage2',): eval reads checkpoints/stage2
          jobs.append(Job("stage2_eval", work,
                          _common(work, seed, "stage2", world_root, mode="eval") + extra))
        jobs.append(Job("finetune", work, _common(work, seed, "finetune", world_root) + [
            f"--config.finetune.init_from={RunDir(work).stage('stage2')}",
            f"--config.finetune.epochs={_FINETUNE_EPOCHS.value}"] + extra))
  return jobs


def _parse_stdout(path: str) -> dict:
  """The JSON main prints last (anything printed before it is skipped)."""
  with open(path) as f:
    lines = f.read().splitlines()
  starts = [i for i, line in enumerate(lines) if line == "{"]
  if not starts:
    raise ValueError(f"{path} holds no JSON summary")
  return json.loads("\n".join(lines[starts[-1]:]))


def run(job: Job) -> dict:
  """Runs `job` (unless its summary exists); returns its summary record."""
  if job.done():
    with open(job.summary_path) as f:
      record = json.load(f)
    if record["command"][1:] != job.argv[1:]:  # [0]: the interpreter's path
      raise RuntimeError(f"{job.summary_path} is the result of another command "
                         f"({shlex.join(record['command'][1:])}): use another --workdir")
    return record
  os.makedirs(job.workdir, exist_ok=True)
  for attempt in (1, 2):
    stdout, log = (os.path.join(job.workdir, f"{job.stage}.{ext}") for ext in ("stdout", "log"))
    logging.info("running %s in %s (log: %s)", job.stage, job.workdir, log)
    start = time.time()
    with open(stdout, "w") as out, open(log, "w") as err:
      rc = subprocess.call(job.argv, stdout=out, stderr=err, cwd=REPO)
    wall = time.time() - start
    if rc != 0:
      raise RuntimeError(f"{job.stage} in {job.workdir} failed (exit {rc}); see {log}")
    summary = _parse_stdout(stdout)
    if job.stage == "stage2_eval":  # --mode=eval prints the metrics themselves
      break
    summary = summary[job.stage]
    if summary.get("status") == "trained":
      break
    if summary.get("status") == "complete" and attempt == 1 and job.stage != "stage1":
      # The stage had finished but its summary was never kept (killed between the last
      # checkpoint and the print): a resumed complete stage reports no final training
      # metrics (only the fine-tune's test), so run it again from its start.
      logging.warning("%s in %s was complete without a kept summary: running it again",
                      job.stage, job.workdir)
      run_dir = RunDir(job.workdir)
      for path in (run_dir.stage(job.stage), run_dir.best(job.stage)):
        shutil.rmtree(path, ignore_errors=True)
      continue
    if summary.get("status") != "complete":
      raise RuntimeError(f"{job.stage} in {job.workdir} ended with status "
                         f"{summary.get('status')!r}; run the experiment again to resume")
    break
  record = {"stage": job.stage, "wall_s": wall, "command": job.argv, "summary": summary}
  shutil.copyfile(RunDir(job.workdir).config_json,
                  os.path.join(job.workdir, f"{job.stage}_config.json"))
  tmp = job.summary_path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(record, f, indent=1, default=str)
  os.replace(tmp, job.summary_path)
  logging.info("%s in %s: %.0f s", job.stage, job.workdir, wall)
  return record


def test_kind_scores(work: str) -> dict[str, float]:
  """The fine-tuned model's test score per question kind, from the answers it wrote and the
  test records its config names."""
  with open(os.path.join(work, "finetune_config.json")) as f:
    config = json.load(f)
  references = vqa_metrics.read_json_or_jsonl(
      os.path.join(config["data"]["root"], config["finetune"]["test_records"]))
  answers = vqa_metrics.read_json_or_jsonl(
      os.path.join(RunDir(work).eval("test", "finetune"), "answers.jsonl"))
  return de.kind_scores(references, answers)


def collect(jobs: list[Job]) -> tuple[list[dict], float]:
  """Rows of the finished (stage 2, fine-tune) pairs; summed wall time of finished jobs."""
  records = {}
  for job in jobs:
    if job.done():
      with open(job.summary_path) as f:
        records[(job.workdir, job.stage)] = json.load(f)
  rows = []
  for seed in (int(s) for s in _SEEDS.value):
    for fraction in (float(f) for f in _FRACTIONS.value):
      for arm in _ARMS.value:
        work = arm_dir(seed, fraction, arm)
        if (work, "stage2") in records and (work, "finetune") in records:
          zero_shot = records.get((work, "stage2_eval"))
          row = de.run_row(arm, fraction, seed, records[(work, "stage2")]["summary"],
                           records[(work, "finetune")]["summary"],
                           zero_shot["summary"] if zero_shot else None)
          row["kinds"] = test_kind_scores(work)
          row["wall_s"] = {stage: records[(work, stage)]["wall_s"]
                           for stage in ("stage2", "stage2_eval", "finetune")
                           if (work, stage) in records}
          rows.append(row)
  return rows, sum(r["wall_s"] for r in records.values())


def write_outputs(jobs: list[Job], world_root: str) -> None:
  rows, wall = collect(jobs)
  if not rows:
    return
  out = _abs(_OUT.value)
  os.makedirs(out, exist_ok=True)
  groups = de.aggregate(rows)
  diffs = [d for treatment, control in de.COMPARISONS
           if {treatment, control} <= set(_ARMS.value)
           for m in de.TEST_METRICS + de.ZERO_SHOT_METRICS
           for d in de.paired_differences(rows, m, treatment, control)]
  settings = {"world": _WORLD.value, "world_seed": _WORLD_SEED.value,
              "world_root": os.path.relpath(world_root, REPO), "seeds": _SEEDS.value,
              "fractions": _FRACTIONS.value, "arms": _ARMS.value,
              "stage1_epochs": _STAGE1_EPOCHS.value, "stage2_epochs": _STAGE2_EPOCHS.value,
              "finetune_epochs": _FINETUNE_EPOCHS.value, "stage2_eval": _STAGE2_EVAL.value,
              "extra_overrides": _EXTRA.value}
  result = {"settings": settings, "summed_run_wall_s": wall, "std": "sample (ddof=1)",
            "groups": groups, "paired_differences": diffs, "rows": rows,
            "commands": {f"{os.path.relpath(j.workdir, _abs(_WORKDIR.value))}/{j.stage}":
                         shlex.join(j.argv) for j in jobs}}
  with open(os.path.join(out, "table.json"), "w") as f:
    json.dump(result, f, indent=1)
  header = (f"Demo world `{_WORLD.value}`, tiny model; stage 1 {_STAGE1_EPOCHS.value:g} epoch, "
            f"stage 2 {_STAGE2_EPOCHS.value:g} epochs of the subset, fine-tune "
            f"{_FINETUNE_EPOCHS.value:g} epoch(s); mean ± sample std (ddof=1) over the seeds "
            f"finished, {', '.join(str(s) for s in sorted({r['seed'] for r in rows}))} (planned: "
            f"{', '.join(_SEEDS.value)}); test split of the VQA set. Runs' summed wall time "
            f"{wall / 60:.1f} min.\n\n")
  with open(os.path.join(out, "table.md"), "w") as f:
    f.write(header + de.markdown_report(groups, diffs, rows))
  de.bar_chart(groups, os.path.join(out, "chart.png"), size=(1500, 400),
               metrics=de.TEST_METRICS + ("zs_selection_score",),
               title=f"Data efficiency on the {_WORLD.value} demo world (tiny model, "
                     f"seeds {', '.join(str(s) for s in sorted({r['seed'] for r in rows}))})")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  world_root = _abs(_WORLD_ROOT.value or f".cache/demo_{_WORLD.value}")
  jobs = plan(world_root)
  if _DRY_RUN.value:
    for job in jobs:
      print(("# done: " if job.done() else "") + shlex.join(job.argv))
    return
  if _REPORT_ONLY.value:
    write_outputs(jobs, world_root)
    return
  start = time.time()
  for job in jobs:
    run(job)
    if job.stage == "finetune":
      write_outputs(jobs, world_root)
  write_outputs(jobs, world_root)
  logging.info("experiment done in %.1f min (this invocation)", (time.time() - start) / 60)


if __name__ == "__main__":
  app.run(main)
