"""Loading, overriding and validating configs (the `--config=FILE[:ARG]` flag).

Config files live in `configs/` and import their siblings as `configs.<name>`; the loader
puts the folder above the config file's folder on `sys.path` so that this works from any
working directory and for every tool, not only `python -m` from the repository root.

Validation happens once, at start-up, and reports *every* problem in one error:
unknown keys and wrong types are caught by the locked ConfigDict while the overrides are
parsed (the message names the closest valid keys); `validate` then checks allowed values
and the relations between fields (batch vs. mesh divisibility, connector vs. projector
widths, head counts, lengths) and explains each failure.
"""
from __future__ import annotations

import ast
import difflib
import os
import re
import sys
from collections.abc import Sequence

from absl import flags
from etils import epath
import ml_collections
from ml_collections import config_flags

from exgra_jax import console, run_paths
from exgra_jax.models import adapters
from exgra_jax.models import config as model_config

# The allowed values of the choice settings, each asked of the module that owns it where
# that module is light to import (the alignment's and the data's are repeated here: their
# owners import jax; tests/test_configuration_owners.py checks the copies against them).
CHOICES = {
    "model.connector": model_config.CONNECTORS,
    "model.dtype": model_config.DTYPES,
    "model.param_dtype": model_config.DTYPES,
    "model.remat": model_config.REMATS,
    "model.attention": model_config.ATTENTIONS,
    "model.image_tokens": model_config.IMAGE_TOKEN_STYLES,
    "model.vision.feature_select": model_config.FEATURE_SELECTS,
    "align.imle_noise": ("gumbel", "sum_of_gamma", "none"),
    "align.grouping": ("per_device", "fixed", "global"),
    "align.text_mode": ("default", "release"),
    "data.label_mode": ("per_turn", "release"),
    "data.demo_world": ("", "small", "medium"),
    "optim.schedule": ("cosine", "constant"),
    "eval.template": ("simple", "train", "none"),
    "eval.quantize": ("", *adapters.QUANTIZED),
    "export.layout": ("llava", "release"),
    "distributed.mode": ("none", "auto", "explicit"),
    "distributed.cpu_collectives": ("gloo", "mpi"),
}
STAGE_CHOICES = {
    "trainable": ("projector_and_new_tokens", "all_but_vision"),
}
STAGE_NAMES = ("stage1", "stage2", "finetune")


class ConfigError(ValueError):
  """A config that cannot run; the message lists every problem found."""


def closest(name: str, options: Sequence[str]) -> str:
  """'did you mean' text for an unknown `name` among `options`."""
  near = difflib.get_close_matches(name, list(options), n=3, cutoff=0.5)
  return f"did you mean {', '.join(repr(n) for n in near)}?" if near else (
      f"valid: {', '.join(sorted(options))}")


def _add_config_root_to_path(argv: Sequence[str]) -> None:
  """Lets `configs/x.py` import `configs.base` wherever the program was started."""
  for arg in argv:
    if arg.startswith("--config="):
      path = arg.split("=", 1)[1].split(":", 1)[0]
      root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
      if root not in sys.path:
        sys.path.insert(0, root)


def define_config_flag(name: str = "config") -> flags.FlagHolder:
  """Defines `--config=FILE[:ARG]` with `--config.a.b=value` overrides (locked config)."""
  _add_config_root_to_path(sys.argv)
  return config_flags.DEFINE_config_file(
      name, None, "Config file, e.g. configs/demo.py or configs/pmc10.py:stage2.",
      lock_config=True)


def parse_flags(argv: list[str]) -> list[str]:
  """absl `flags_parser`: config mistakes become one message on stderr and exit status 2.

  Before absl sees the command line, the config file is checked (a missing file names the
  nearest config), every `--config.a.b=v` override is tried against it (each unknown key
  with the nearest valid keys, each unparsable value with its expected type, all at once),
  and a bare comma list for a tuple field (`--config.stages=stage1,stage2`) is rewritten to
  the tuple syntax absl expects.
  """
  spec, overrides = _config_args(argv)
  if spec is not None:
    base = _load_base_or_exit(spec)
    problems = override_problems(spec, base, overrides)
    if problems:
      exit_usage("invalid config overrides:\n  - " + "\n  - ".join(problems))
    argv = [_tuple_syntax(arg, base) for arg in argv]
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    exit_usage(str(e))
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    # ConfigDict raises these for unknown keys (with "Did you mean") and wrong types.
    exit_usage(f"invalid config override: {_unwrap(e)}")


_OVERRIDE = re.compile(r"^--config\.([\w.]+)=(.*)$", re.S)


def _config_args(argv: Sequence[str]) -> tuple[str | None, list[str]]:
  """The `--config=` spec (None when absent) and the `key=value` overrides in argv."""
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  overrides = [f"{m[1]}={m[2]}" for m in map(_OVERRIDE.match, argv) if m]
  return spec, overrides


def config_file_problem(spec: str) -> str | None:
  """A missing config file, with the nearest config of its folder (or of configs/)."""
  path = spec.split(":", 1)[0]
  if os.path.isfile(path):
    return None
  folder = os.path.dirname(path)
  if not os.path.isdir(folder or "."):
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "configs")
  names = sorted(n for n in os.listdir(folder) if n.endswith(".py") and n != "__init__.py"
                 ) if os.path.isdir(folder) else []
  near = difflib.get_close_matches(os.path.basename(path), names, n=1, cutoff=0.5)
  hint = (f"did you mean {os.path.join(os.path.dirname(path) or folder, near[0])}?" if near
          else f"configs: {', '.join(names)}" if names else "pass --config=configs/demo.py")
  return f"--config={spec}: no such config file ({hint})"


def _load_base_or_exit(spec: str) -> ml_collections.ConfigDict:
  problem = config_file_problem(spec)
  if problem:
    exit_usage(problem)
  try:
    return _load_raw(spec, ())
  except Exception as e:  # pylint: disable=broad-except (any error of the user's file)
    exit_usage(f"--config={spec} could not be loaded: {type(e).__name__}: {_unwrap(e)}")


def _leaves(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  out = []
  for key, value in config.items():
    out += (_leaves(value, f"{prefix}{key}.") if isinstance(value, ml_collections.ConfigDict)
            else [f"{prefix}{key}"])
  return out


def key_problem(config: ml_collections.ConfigDict, key: str) -> str | None:
  """An override key that names no setting, with the nearest setting paths."""
  node = config
  for part in key.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      near = difflib.get_close_matches(key, _leaves(config), n=3, cutoff=0.6)
      hint = (f"did you mean {', '.join(near)}?" if near else
              "every setting is listed in configs/base.py")
      return f"--config.{key}: no such setting ({hint})"
    node = node[part]
  if isinstance(node, ml_collections.ConfigDict):
    return (f"--config.{key} is a group of settings; set one of them, e.g. "
            f"--config.{_leaves(node, key + '.')[0]}=...")
  return None


def override_problems(spec: str, base: ml_collections.ConfigDict,
                      overrides: Sequence[str]) -> list[str]:
  """Every override of `spec` that cannot apply: unknown keys, values of the wrong type."""
  out = []
  for override in overrides:
    key, value = override.split("=", 1)
    problem = key_problem(base, key)
    if problem is None:
      try:
        _load_raw(spec, [_tuple_syntax(f"{key}={value}", base)])
      except Exception as e:  # pylint: disable=broad-except (absl and ConfigDict errors)
        reason = _unwrap(e).split(": ", 1)[-1] if str(e).startswith("flag ") else _unwrap(e)
        expected = type(_get(base, key)).__name__
        problem = f"--config.{key}={value}: {reason} (expects a {expected})"
    if problem:
      out.append(problem)
  return out


def _tuple_syntax(arg: str, base: ml_collections.ConfigDict) -> str:
  """`[--config.]k=a,b` for a tuple field `k` -> `k=('a', 'b')`; other args unchanged."""
  flag = arg.startswith("--config.")
  key, sep, value = arg.removeprefix("--config.").partition("=")
  if (not sep or (not flag and arg.startswith("-")) or "," not in value
      or value.lstrip()[:1] in "([\"'" or key_problem(base, key) is not None
      or not isinstance(_get(base, key), (tuple, list))):
    return arg
  items = []
  for part in (p.strip() for p in value.split(",")):
    try:
      items.append(ast.literal_eval(part))
    except (ValueError, SyntaxError):
      items.append(part)
  return f"{'--config.' if flag else ''}{key}={tuple(items)!r}"


def _unwrap(e: BaseException) -> str:
  text = str(e)
  while text[:1] in "'\"" and text[-1:] == text[:1]:
    text = text[1:-1].encode().decode("unicode_escape")
  return text


def stray_arguments(args: Sequence[str]) -> str:
  """The message for positional arguments a program does not take (absl would print its
  whole flag help above it)."""
  return (f"unexpected arguments {' '.join(args)!r}: every setting is --name=value, e.g. "
          "--config.stage2.lr=1e-5 or --mode=eval")


def exit_usage(message: str) -> None:
  """Writes `error: message` to stderr and exits with status 2 (a usage error)."""
  sys.stderr.write(f"error: {message}\n")
  sys.exit(2)


def start_command(argv: Sequence[str]) -> None:
  """What every command line's main() does first: positional arguments refused in one
  line (exit 2), then the one console setup (`console.setup` at --verbosity)."""
  if len(argv) > 1:
    exit_usage(stray_arguments(argv[1:]))
  console.setup(flags.FLAGS.verbosity)


def exit_on_problems(problems: Sequence[str | None]) -> None:
  """One usage error listing every problem (exit 2); None / "" entries are checks that
  passed. Returns when there is none."""
  found = [p for p in problems if p]
  if found:
    exit_usage("\n".join(found))


LOCAL_ONLY = ("is read and written with local file operations (os, shutil, safetensors, "
              "transformers); use a shared file system every host mounts (NFS / Filestore, "
              "Lustre, or a bucket mounted with gcsfuse), not a URL")


def url_problem(flag: str, path: str | None) -> str | None:
  """`gs://...` and other URLs where the program needs a file-system path (LOCAL_ONLY).

  Why: os.path.abspath turns `gs://bucket/run` into `./gs:/bucket/run`, so without this
  check a pod's hosts would each write their checkpoints to a local folder of that name.
  The records and image folders go through etils.epath and may be URLs.
  """
  if path and "://" in str(path):
    return f"{flag}={path}: this path {LOCAL_ONLY}"
  return None


def path_problem(flag: str, path: str | None, kind: str = "file",
                 holding: str | None = None) -> str | None:
  """A command-line path that is unset, a URL (the tools read models and images with local
  file I/O: `url_problem`) or not what the program reads ("file", "dir" or "any";
  `holding`: a file the directory must contain), e.g. predict's --image."""
  if not path:
    return f"{flag} is required"
  if url := url_problem(flag, path):
    return url
  p = epath.Path(path)
  if not p.exists():
    return f"{flag}={path} does not exist"
  if kind == "file" and p.is_dir():
    return f"{flag}={path} is a directory, not a file"
  if kind == "dir" and not p.is_dir():
    return f"{flag}={path} is not a directory"
  if holding and not (p / holding).exists():
    return f"{flag}={path} holds no {holding}"
  return None


def model_problem(flag: str, path: str | None) -> str | None:
  """`path_problem` for a model to load (any kind `weights.loading.load` reads), plus
  an existing folder that holds no checkpoint: said in one line before anything loads."""
  from exgra_jax.weights import loading  # pylint: disable=g-import-not-at-top (heavy: orbax)
  return path_problem(flag, path, "any") or loading.not_a_checkpoint(path)


def load(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Loads `FILE[:ARG]` and applies `a.b=value` overrides exactly as the command line does.

  For programs and tests that do not go through absl's global flags.
  """
  if any("," in o for o in overrides):
    base = _load_raw(spec, ())
    overrides = [_tuple_syntax(o, base) for o in overrides]
  return _load_raw(spec, overrides)


def _load_raw(spec: str, overrides: Sequence[str]) -> ml_collections.ConfigDict:
  fv = flags.FlagValues()
  _add_config_root_to_path([f"--config={spec}"])
  argv = ["exgra_jax", f"--config={spec}"] + [f"--config.{o}" for o in overrides]
  saved = sys.argv
  sys.argv = argv  # config_flags decides which override flags exist from sys.argv.
  try:
    holder = config_flags.DEFINE_config_file("config", None, "", flag_values=fv,
                                             lock_config=True)
    fv(argv)
    return holder.value
  finally:
    sys.argv = saved


def _get(config: ml_collections.ConfigDict, dotted: str):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def validate(config: ml_collections.ConfigDict, *, num_devices: int | None = None,
             mode: str = "train", check_paths: bool = False) -> None:
  """Raises ConfigError listing every inconsistency of a resolved config.

  `check_paths` adds every file and directory `mode` will read that does not exist
  (`path_problems`), in the same message.
  """
  problems: list[str] = []
  for key, allowed in CHOICES.items():
    value = _get(config, key)
    if value not in allowed:
      problems.append(f"{key}={value!r} is not one of {allowed} ({closest(str(value), allowed)})")
  problems += _range_problems(config)
  model = _model_or_problems(config, problems)
  problems += _stage_problems(config, num_devices)
  problems += _data_problems(config, model)
  if "text_pool" in config.align:  # a recipe written before align.text_mode replaced it
    problems.append("align.text_pool is gone: set align.text_mode (default | release; "
                    "docs/align.md)")
  d = config.distributed
  if d.mode == "explicit" and not (d.coordinator_address and 0 <= d.process_id < d.num_processes):
    problems.append("distributed.mode=explicit needs coordinator_address 'host:port' and "
                    f"0 <= process_id < num_processes (got {d.coordinator_address!r}, "
                    f"{d.process_id}, {d.num_processes})")
  if mode == "train":
    problems += _initial_weights_problems(config)
  if config.vision_pretrain.steps and not (
      config.init.random and config.stage1.records and not (
          config.init.hf_dir or config.init.llm_dir or config.init.checkpoint)):
    problems.append("vision_pretrain.steps > 0 pre-trains the tower of a random start: it needs "
                    "init.random=True, no init.hf_dir / llm_dir / checkpoint, and "
                    "stage1.records (the image/caption pairs)")
  if check_paths:
    problems += path_problems(config, mode)
  if problems:
    raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))


_AT_LEAST_1 = (lambda v: v >= 1, ">= 1")
_POSITIVE = (lambda v: v > 0, "> 0")
_NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
_FRACTION = (lambda v: 0 < v <= 1, "in (0, 1]")
_UNIT_OPEN = (lambda v: 0 <= v < 1, "in [0, 1)")
# Numeric settings whose sign or range no run can do without (stage settings: _STAGE_RANGES).
_RANGES = {
    **{f"model.vision.{k}": _AT_LEAST_1 for k in (
        "image_size", "patch_size", "hidden_size", "num_layers", "num_heads",
        "intermediate_size")},
    **{f"model.llm.{k}": _AT_LEAST_1 for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
        "num_kv_heads", "max_position_embeddings")},
    "model.llm.head_dim": _NON_NEGATIVE,
    "model.vision.layer_norm_eps": _POSITIVE,
    "model.llm.rms_norm_eps": _POSITIVE,
    "model.llm.rope_theta": _POSITIVE,
    "vision_pretrain.steps": _NON_NEGATIVE,
    "vision_pretrain.global_batch": _AT_LEAST_1,
    "vision_pretrain.lr": _POSITIVE,
    "vision_pretrain.weight_decay": _NON_NEGATIVE,
    "vision_pretrain.embed_dim": _AT_LEAST_1,
    "align.alpha": _NON_NEGATIVE,
    "align.num_neighbors": _AT_LEAST_1,
    "align.gnn_layers": _AT_LEAST_1,
    "align.gnn_width": _NON_NEGATIVE,
    "align.gnn_dropout": _UNIT_OPEN,
    "align.gumbel_scale": _NON_NEGATIVE,
    "align.imle_lambda": _POSITIVE,
    "align.imle_samples": _AT_LEAST_1,
    "align.group_size": _NON_NEGATIVE,
    "align.solver_iterations": _AT_LEAST_1,
    "align.solver_time_limit_s": _NON_NEGATIVE,
    "align.solver_threads": _NON_NEGATIVE,
    "data.max_length": _AT_LEAST_1,
    "data.text_max_length": _AT_LEAST_1,
    "optim.b1": _UNIT_OPEN,
    "optim.b2": _UNIT_OPEN,
    "optim.eps": _POSITIVE,
    "optim.weight_decay": _NON_NEGATIVE,
    "optim.clip_norm": _POSITIVE,
    "distributed.num_processes": _AT_LEAST_1,
    "train.log_every": _AT_LEAST_1,
    "train.image_every": _AT_LEAST_1,
    "train.checkpoint_every": _AT_LEAST_1,
    "train.keep_checkpoints": _AT_LEAST_1,
    "train.eval_every": _NON_NEGATIVE,
    "eval.max_new_tokens": _AT_LEAST_1,
    "eval.temperature": _NON_NEGATIVE,
    "eval.batch_size": _AT_LEAST_1,
    "export.shard_size_gb": _POSITIVE,
}
_STAGE_RANGES = {"lr": _POSITIVE, "warmup_ratio": _UNIT_OPEN, "subset_fraction": _FRACTION}


def _range_problems(config: ml_collections.ConfigDict) -> list[str]:
  checks = [(key, _get(config, key), rule) for key, rule in _RANGES.items()]
  out = []
  for name in (n for n in config.stages if n in STAGE_NAMES):
    s = config[name]
    checks += [(f"{name}.{key}", s[key], rule) for key, rule in _STAGE_RANGES.items()]
    if s.max_steps != -1 and s.max_steps < 1:
      out.append(f"{name}.max_steps={s.max_steps} must be -1 (from epochs) or >= 1")
    elif s.max_steps == -1 and not s.epochs > 0:
      out.append(f"{name}.epochs={s.epochs} must be > 0 (or set {name}.max_steps)")
  out += [f"{key}={value!r} must be {text}" for key, value, (ok, text) in checks if not ok(value)]
  profile = config.train.profile_steps
  match = re.fullmatch(r"(\d+):(\d+)", profile)
  if profile and not (match and int(match[1]) < int(match[2])):
    out.append(f"train.profile_steps={profile!r} must be 'start:stop' with 0 <= start < stop")
  return out


def path_problems(config: ml_collections.ConfigDict, mode: str) -> list[str]:
  """Every file and directory `mode` will read that is missing, by setting and path.

  train: each stage's records, image folder, id list, validation / test records,
  candidates and init_from, and the configured init weights; eval: the test records,
  image folder and candidates; every mode: the tokenizer. A missing `data.root` is one
  problem (the paths relative to it are not listed again).
  """
  root = config.data.root
  root_missing = bool(root) and not epath.Path(root).is_dir()
  out = [f"data.root={root!r} is not a directory"] if root_missing else []
  needed: dict[str, tuple[epath.Path, str]] = {}   # setting -> (path, "file" | "dir" | "")
  local_only = ("data.tokenizer_dir", "init.hf_dir", "init.llm_dir", "init.clip_dir",
                "init.checkpoint", *(f"{n}.init_from" for n in STAGE_NAMES))  # weights, tokenizers

  def need(setting: str, kind: str = "", under_root: bool = True) -> None:
    value = _get(config, setting)
    if not value or (under_root and root_missing and not epath.Path(value).is_absolute()):
      return
    needed[setting] = (run_paths.resolve_path(root, value) if under_root
                       else epath.Path(value), kind)

  if mode == "train":
    for name in (n for n in config.stages if n in STAGE_NAMES):
      need(f"{name}.records")
      if not run_paths.resolve_path(root, config[name].records).is_dir():
        need(f"{name}.image_root", "dir")  # (a folder of ArrayRecord shards holds its images)
      for key in ("subset_ids", "val_records", "test_records", "candidates"):
        need(f"{name}.{key}", "file")
      need(f"{name}.init_from", under_root=False)
    for key in ("hf_dir", "llm_dir", "clip_dir", "checkpoint"):
      need(f"init.{key}", under_root=False)
  elif mode == "eval":
    if not (config.eval.records or config.finetune.test_records):
      out.append("nothing to evaluate: set eval.records or finetune.test_records")
    need("eval.records" if config.eval.records else "finetune.test_records", "file")
    need("finetune.image_root", "dir")
    need("finetune.candidates", "file")
  if config.data.tokenizer_dir:
    need("data.tokenizer_dir", "dir")
  elif config.init.hf_dir or config.init.llm_dir:
    need("init.hf_dir" if config.init.hf_dir else "init.llm_dir", "dir", under_root=False)
  else:
    out.append("no tokenizer: set data.tokenizer_dir (or init.hf_dir / init.llm_dir, whose "
               "tokenizer is used)")
  if not config.data.tokenizer_dir and (
      mode == "export" or (mode == "train" and config.export.after_training)):
    out.append("data.tokenizer_dir is empty: the export needs the tokenizer the model was "
               "trained with")
  urls = {s: url_problem(s, str(needed[s][0])) for s in local_only if s in needed}
  out += [problem for problem in urls.values() if problem]
  for setting, (path, kind) in needed.items():
    if urls.get(setting):
      continue
    if not path.exists():
      out.append(f"{setting}: {path} does not exist")
    elif kind == "dir" and not path.is_dir():
      out.append(f"{setting}: {path} is not a directory")
    elif kind == "file" and path.is_dir():
      out.append(f"{setting}: {path} is a directory, not a file")
  return out


def _model_or_problems(config: ml_collections.ConfigDict,
                       problems: list[str]) -> model_config.LlavaConfig | None:
  """The typed model config, or None with its owner's reasons added to `problems`.

  A model size out of range (already in `problems`) is not handed to the owner, which
  divides by it; a choice already reported (with its "did you mean") is not repeated.
  """
  reported = {p.split("=", 1)[0] for p in problems if p.startswith("model.")}
  if reported & {k for k in _RANGES if k.startswith("model.")}:
    return None
  try:
    return model_config.LlavaConfig.from_config(config.model)
  except model_config.ModelConfigError as e:
    problems += [f"model.{p}" for p in e.problems
                 if f"model.{p}".split("=", 1)[0] not in reported]
  except ValueError as e:  # unknown fields (a hand-written config.model tree)
    problems.append(f"model: {e}")
  return None


def _initial_weights_problems(config: ml_collections.ConfigDict) -> list[str]:
  """The first stage's weight source, asked of train/initial_weights.py (the owner)."""
  from exgra_jax.train import initial_weights  # pylint: disable=g-import-not-at-top (jax)
  first = next((n for n in config.stages if n in STAGE_NAMES), None)
  if first is None:
    return []
  try:
    initial_weights.source_for(config, first, epath.Path("."))
  except initial_weights.InitialWeightsError as e:
    return [f"init: {e}"]
  return []


def _stage_problems(config: ml_collections.ConfigDict, num_devices: int | None) -> list[str]:
  """Stage names and batches, and how each batch splits over the mesh and into alignment
  groups: the mesh (train/mesh.py), the groups (align/loss.py) and their placement on the
  devices (train/alignment_sharding.py) are asked of their owners."""
  from exgra_jax.train import mesh as mesh_lib  # pylint: disable=g-import-not-at-top (jax)
  out = []
  for name in config.stages:
    if name not in STAGE_NAMES:
      out.append(f"stages: {name!r} is not a stage ({closest(name, STAGE_NAMES)})")
  shards = None
  if num_devices is not None:
    try:
      shards = mesh_lib.data_parallel_size(mesh_lib.mesh_shape(config.mesh, num_devices))
    except ValueError as e:
      out.append(f"mesh: {e}")
  for name in STAGE_NAMES:
    s = config[name]
    for key, allowed in STAGE_CHOICES.items():
      if s[key] not in allowed:
        out.append(f"{name}.{key}={s[key]!r} is not one of {allowed} "
                   f"({closest(s[key], allowed)})")
    if name not in config.stages:
      continue
    from exgra_jax.models import adapters  # pylint: disable=g-import-not-at-top (heavy: qwix)
    try:  # the adapters' owner checks its settings
      adapters.LoraSettings.from_config(s.lora)
    except ValueError as e:
      out.append(f"{name}.{e}")
    if s.global_batch <= 0 or s.micro_batches <= 0:
      out.append(f"{name}: global_batch and micro_batches must be positive")
      continue
    if s.global_batch % s.micro_batches:
      out.append(f"{name}.global_batch={s.global_batch} does not divide into "
                 f"micro_batches={s.micro_batches}")
      continue
    micro = s.global_batch // s.micro_batches
    if shards is not None and micro % shards:
      out.append(f"{name}: a micro-batch of {micro} samples (global_batch "
                 f"{s.global_batch} / micro_batches {s.micro_batches}) does not divide "
                 f"over the {shards} batch shards of the mesh (data x fsdp)")
    elif s.align and config.align.grouping in CHOICES["align.grouping"]:
      out += _group_problems(config, name, micro, shards)
  return out


def group_problem(align: ml_collections.ConfigDict, micro: int, shards: int) -> str | None:
  """Why `align` cannot group a micro-batch of `micro` samples over `shards` batch shards
  (None: it can). The owners answer: `align.loss.group_size_for` (the group) and
  `train.alignment_sharding.group_span` (its placement on the devices)."""
  from exgra_jax.align import loss as align_loss  # pylint: disable=g-import-not-at-top (jax)
  from exgra_jax.train import alignment_sharding  # pylint: disable=g-import-not-at-top (jax)
  try:
    alignment_sharding.group_span(align_loss.group_size_for(align, micro, shards), micro,
                                  shards)
  except ValueError as e:
    return str(e)
  return None


def _group_problems(config, stage: str, micro: int, shards: int | None) -> list[str]:
  """With the device count unknown (validation before the devices exist) the groups are
  checked for one batch shard; training checks them again on the real mesh."""
  problem = group_problem(config.align, micro, 1 if shards is None else shards)
  return [f"{stage}: {problem}"] if problem else []


def _data_problems(config: ml_collections.ConfigDict,
                   model: model_config.LlavaConfig | None) -> list[str]:
  """Lengths and data settings; the image's tokens are counted by their owners (the model
  config: N per image, data/text.py: the tokens around them)."""
  from exgra_jax.data import text  # pylint: disable=g-import-not-at-top (tokenizers)
  out = []
  d, m = config.data, config.model
  buckets = tuple(d.length_buckets)
  if not buckets or list(buckets) != sorted(buckets):
    out.append(f"data.length_buckets={buckets} must be non-empty and increasing")
  elif buckets[-1] != d.max_length:
    out.append(f"data.length_buckets={buckets}: the last bucket must equal "
               f"data.max_length={d.max_length}")
  if d.max_length > m.llm.max_position_embeddings:
    out.append(f"data.max_length={d.max_length} exceeds "
               f"model.llm.max_position_embeddings={m.llm.max_position_embeddings}")
  if model is not None:
    image_tokens = text.placeholder_length(model_config.num_image_tokens(model),
                                           model.image_tokens)
    if image_tokens >= d.max_length:
      out.append(f"data.max_length={d.max_length} leaves no room for text after the "
                 f"{image_tokens} image tokens")
  if d.workers < 0 or d.prefetch < 1:
    out.append(f"data.workers={d.workers} must be >= 0 and data.prefetch={d.prefetch} >= 1")
  if not 0.0 <= d.max_bad_fraction <= 1.0:
    out.append(f"data.max_bad_fraction={d.max_bad_fraction} must be in [0, 1]")
  if not d.demo_world:
    for name in config.stages:
      if not config[name].records:
        out.append(f"{name}.records is empty: point it at a record file "
                   "(relative to data.root)")
    if not d.root:
      out.append("data.root is empty: set it to the dataset folder")
  return out
