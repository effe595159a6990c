r"""exgra-jax entry point: train, evaluate, export or predict with one config.

    python -m exgra_jax.main --config=configs/demo.py --workdir=/tmp/exgra_demo
    python -m exgra_jax.main --config=configs/pmc10.py --workdir=/shared/runs/pmc10 \
        --config.data.root=/data/llava_med --config.init.llm_dir=/weights/llama-7b \
        --config.init.clip_dir=/weights/clip-vit-large-patch14

Kept short on purpose (as the flax examples are): parse flags, load and validate the
config, initialise distributed JAX, prepare the data root, dispatch on --mode. A config
that cannot run (a bad value, a file or folder it needs that is missing) stops here with
every problem in one message and exit status 2, before any weight is allocated.
"""
import json
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from etils import epath

from exgra_jax import console, run_config, run_paths, temp_paths
from exgra_jax.data import bad_records, records

_CONFIG = run_config.define_config_flag()
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, results).",
                               required=True)
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "export", "predict"],
                          "train: run config.stages (then export if configured); "
                          "eval: VQA evaluation of the newest checkpoint; "
                          "export: write a Hugging Face directory; "
                          "predict: answer --question about --image.")
_IMAGE = flags.DEFINE_string("image", None, "predict: image file (DICOM too).")
_QUESTION = flags.DEFINE_string("question", None, "predict: the question.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "eval: the model to evaluate (a train checkpoint, a params checkpoint "
    "of tools/import_hf.py or a Hugging Face directory; default: the run's best, else newest).")


def prepare_data_root(config) -> None:
  """Makes the demo world when the config asks for it (idempotent, atomic)."""
  if config.data.demo_world:
    from exgra_jax.data import demo_world  # pylint: disable=g-import-not-at-top
    demo_world.make_demo_world(config.data.root, size=config.data.demo_world,
                               seed=config.data.demo_seed)


def write_resolved_config(config, workdir: epath.Path) -> None:
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    run_paths.RunDir(workdir).config_json.write_text(config.to_json_best_effort(indent=2))


def remove_stale_exports(workdir: epath.Path) -> None:
  """Half-written export folders of a killed run (a killed demo-world build's folder goes
  when `prepare_data_root` builds the world again)."""
  for path in temp_paths.remove_stale(str(run_paths.RunDir(workdir).exports)):
    logging.info("removed %s, left by a killed export", path)


def validate_or_exit(config, *, check_paths: bool) -> None:
  """All problems of the config in one message on stderr, exit status 2, no traceback."""
  try:
    run_config.validate(config, num_devices=jax.device_count(), mode=_MODE.value,
                           check_paths=check_paths)
  except run_config.ConfigError as e:
    run_config.exit_usage(str(e))


def checkpoint_problem(config, workdir: epath.Path) -> str | None:
  """What eval / predict / export lack when the model they read is not there, or is a folder
  that holds no checkpoint, with the fix."""
  if _CHECKPOINT.value and _MODE.value != "eval":
    return (f"--checkpoint is for --mode=eval; --mode={_MODE.value} reads the newest "
            "checkpoint of --workdir (python -m exgra_jax.predict --model=DIR answers with any "
            "model, tools/export_hf.py exports any checkpoint)")
  if _MODE.value == "train":
    return None
  if _CHECKPOINT.value:
    problem = run_config.model_problem("--checkpoint", _CHECKPOINT.value)
    return problem and (f"{problem} (pass a train checkpoint, a params checkpoint of "
                        "tools/import_hf.py or a Hugging Face directory)")
  run = run_paths.RunDir(workdir)
  path = (run.export_source(config.stages) if _MODE.value == "export"
          else run.answering_checkpoint(config.stages))
  if path.exists():
    return run_config.model_problem("--workdir", str(path))
  return (f"--mode={_MODE.value}: no checkpoint of stage {config.stages[-1]!r} in {workdir} "
          f"({path} does not exist): train first with --mode=train and the same --config "
          "and --workdir" + (", or pass --checkpoint=DIR (a train or params checkpoint, or a "
                             "Hugging Face directory)" if _MODE.value == "eval" else ""))


def main(argv):
  run_config.start_command(argv)
  config = _CONFIG.value
  if config is None:
    run_config.exit_usage("--config is required, e.g. --config=configs/demo.py")
  from exgra_jax.train import distributed, gpu_flags  # pylint: disable=g-import-not-at-top
  gpu_flags.apply()  # the project's GPU flags, read when jax creates its backends (next line)
  distributed.initialize(config)
  # A demo world's files exist once it is made: its paths are checked after that.
  validate_or_exit(config, check_paths=not config.data.demo_world)
  workdir = epath.Path(_WORKDIR.value)
  problem = run_config.url_problem("--workdir", _WORKDIR.value) or checkpoint_problem(
      config, workdir) or (
      _MODE.value == "predict" and run_config.path_problem("--image", _IMAGE.value))
  if problem:
    run_config.exit_usage(problem)
  write_resolved_config(config, workdir)
  remove_stale_exports(workdir)
  prepare_data_root(config)
  if config.data.demo_world:
    validate_or_exit(config, check_paths=True)
  logging.info("mode=%s workdir=%s devices=%d processes=%d", _MODE.value, workdir,
               jax.device_count(), jax.process_count())

  if _MODE.value == "train":
    from exgra_jax.train import loop, optimizer  # pylint: disable=g-import-not-at-top
    try:
      result = loop.train(config, workdir)
    except (records.RecordFileError, optimizer.TrainAlsoError) as e:  # the message says the fix
      run_config.exit_usage(str(e))
    except bad_records.TooManyBadRecords as e:  # the data, not the program
      run_config.exit_usage(f"{e}\n(tools/check_data.py lists every bad record and image: "
                               "fix or drop them, or raise --config.data.max_bad_fraction)")
  elif _MODE.value == "eval":
    from exgra_jax.eval import vqa  # pylint: disable=g-import-not-at-top
    result = vqa.evaluate(config, workdir, checkpoint=_CHECKPOINT.value)
  elif _MODE.value == "export":
    from exgra_jax.weights import loading  # pylint: disable=g-import-not-at-top
    result = loading.export_from_workdir(config, workdir)
  else:
    from exgra_jax.inference import single_question  # pylint: disable=g-import-not-at-top
    result = single_question.answer_from_workdir(config, workdir, image=_IMAGE.value,
                                                 question=_QUESTION.value)
  if jax.process_index() == 0:
    report(result, workdir)


def report(result, workdir: epath.Path) -> None:
  """The human summary on stderr, the full result as JSON on stdout (and, after training,
  in WORKDIR/summary.json)."""
  text = json.dumps(result, indent=2, default=str)
  table = console.summary_table(result)
  if _MODE.value == "train":
    summary = run_paths.RunDir(workdir).summary
    summary.write_text(text + "\n")
    table += f"\n\nfull results: {summary} (and the JSON below)"
  sys.stderr.write(table.strip() + "\n\n" if table.strip() else "")
  sys.stderr.flush()
  print(text)


if __name__ == "__main__":
  app.run(main, flags_parser=run_config.parse_flags)
