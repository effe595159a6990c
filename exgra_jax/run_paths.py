"""Where a run's files live, and where the config's paths point: one owner for both.

    workdir/                         RunDir(workdir)
      config.json                    .config_json      the resolved config (main.py writes it)
      checkpoints/<stage>/<step>/    .stage(name)      Orbax train checkpoints of a stage
      checkpoints/<stage>_best/      .best(stage)      params-only, best validation score
      tensorboard/<stage>/           .tensorboard(stage)
      eval/<stage>/<split>/          .eval(split, stage) (eval(split): --mode=eval's folder)
      export/<layout>/               .export(layout)
      summary.json                   .summary

Which checkpoint answers for a run (`answering_checkpoint`) and which one is exported
(`export_source`) are decided here, once, for every mode and tool.

`resolve_path` and `tokenizer_dir` read the config's data paths; they live here rather than
in the grain pipeline so that data/, weights/ and the tools ask the same function without
importing the pipeline. Ground level: imports nothing of the package.
"""
from __future__ import annotations

import os

from etils import epath

CONFIG_JSON = "config.json"
VISION_PRETRAIN = "vision_pretrain"  # the contrastive tower pre-training's checkpoint folder


def resolve_path(root: str, path: str) -> epath.Path:
  """A configured data path: absolute as given, else relative to `config.data.root`."""
  path = epath.Path(path)
  return path if path.is_absolute() or not root else epath.Path(root) / path


def tokenizer_dir(config) -> str:
  """`data.tokenizer_dir` (relative to data.root), else the tokenizer of the imported weights
  (`init.hf_dir`, then `init.llm_dir`); ValueError when none is configured."""
  data, init = config.data, config.init
  if data.tokenizer_dir:
    return str(resolve_path(data.root, data.tokenizer_dir))
  if init.hf_dir or init.llm_dir:
    return init.hf_dir or init.llm_dir
  raise ValueError("no tokenizer: set config.data.tokenizer_dir (or config.init.hf_dir / "
                   "config.init.llm_dir, whose tokenizer is used)")


class RunDir:
  """The layout of one run's working directory (module doc); paths only, nothing is read."""

  def __init__(self, workdir: str | os.PathLike):
    self.root = epath.Path(workdir)

  @classmethod
  def of_train_step(cls, step_dir: str | os.PathLike) -> RunDir:
    """The run that wrote `workdir/checkpoints/<stage>/<step>`."""
    return cls(epath.Path(step_dir).parent.parent.parent)

  @property
  def config_json(self) -> epath.Path:
    return self.root / CONFIG_JSON

  @property
  def summary(self) -> epath.Path:
    return self.root / "summary.json"

  def stage(self, name: str) -> epath.Path:
    return self.root / "checkpoints" / name

  def best(self, stage: str = "finetune") -> epath.Path:
    return self.root / "checkpoints" / f"{stage}_best"

  def tensorboard(self, stage: str) -> epath.Path:
    return self.root / "tensorboard" / stage

  def eval(self, split: str, stage: str | None = None) -> epath.Path:
    return self.root / "eval" / split if stage is None else self.root / "eval" / stage / split

  @property
  def exports(self) -> epath.Path:
    return self.root / "export"

  def export(self, layout: str) -> epath.Path:
    return self.exports / layout

  def answering_checkpoint(self, stages) -> epath.Path:
    """The checkpoint that answers for the run (--mode=eval / predict): the fine-tune's
    best-validation params if any, else the last stage's checkpoints."""
    best = self.best("finetune")
    if "finetune" in stages and best.exists():
      return best
    return self.stage(stages[-1])

  def export_source(self, stages) -> epath.Path:
    """The checkpoint `--mode=export` exports: the last stage's newest step."""
    return self.stage(stages[-1])
