"""The training loop: the stages of `config.stages`, in order, in one workdir.

    train(config, workdir)
      for each stage (stage1 -> stage2 -> finetune, as configured):
        1. data      the stage's grain pipeline, this process's share of each global batch
        2. state     optimizer + sharded state; resume from the stage's newest checkpoint,
                     else start from the weights `initial_weights` names
        3. steps     jitted sharded step; dashboards, checkpoints, pre-emption, validation
        4. finish    final checkpoint; fine-tune: best-validation params and test metrics
      export to Hugging Face format when `config.export.after_training`

A stage whose newest checkpoint is at its last step is complete and is skipped, so a killed
run started again with the same command continues where it stopped, and finishes with the
same parameters as an uninterrupted run (the data iterator state is in every checkpoint).
SIGTERM (pre-emption) writes a checkpoint at the next step boundary and returns normally
(exit status 0).
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from exgra_jax import run_paths
from exgra_jax.align import imle
from exgra_jax.align import loss as align_loss
from exgra_jax.data import pipeline as pipeline_lib
from exgra_jax.data import records, text
from exgra_jax.eval import vqa
from exgra_jax.hf import hf_configs
from exgra_jax.models.config import LlavaConfig, num_image_tokens
from exgra_jax.models import llava
from exgra_jax.models import adapters
from exgra_jax.models.llava import LlavaModel
from exgra_jax.train import (alignment_sharding, initial_weights, metrics, optimizer,
                             sharded_state, sharding, stage_checkpoints, step,
                             vision_pretrain)
from exgra_jax.train import mesh as mesh_lib
from exgra_jax.weights import loading
from exgra_jax.weights.checksum import parameter_checksum


@dataclasses.dataclass
class Stage:
  """Everything one stage's steps need, built before any weight is allocated."""
  name: str
  cfg: ml_collections.ConfigDict
  model: LlavaModel             # with the stage's LoRA adapters when cfg.lora.rank > 0
  lora: adapters.LoraSettings
  init_boxed_params: Any        # () -> boxed params (the model's, plus `gnn` with alignment)
  tx: Any
  schedule: Any
  abstract_state: Any
  shardings: Any
  total_steps: int
  steps_per_epoch: int
  step_fn: Any                  # pure step(state, batch) -> (state, metrics), not yet jitted
  mesh: jax.sharding.Mesh       # where its state lives and its programs are traced

  def plain_params(self, params: Any) -> Any:
    """The state's params as a plain LlavaModel's (what answering, params-only checkpoints
    and the next stage take): without the GNN, adapters merged into their kernels."""
    params = step.model_params(params)
    return adapters.merge_adapters(params, self.lora.scale) if self.lora.enabled else params


def new_token_ids(tokenizer, image_tokens: str) -> tuple[int, ...]:
  """Ids of the tokens LLaVA adds to the LLM (their rows train in stage 1): `<image>`, the
  tokens of the image-token style, pad."""
  tokens = dict.fromkeys((records.IMAGE_TOKEN, *text.style_tokens(image_tokens)))
  return tuple(tokenizer.convert_tokens_to_ids(t) for t in tokens) + (tokenizer.pad_token_id,)


def count_steps(stage_cfg: ml_collections.ConfigDict, num_examples: int) -> tuple[int, int]:
  """-> (total optimizer steps, steps per epoch) of a stage over `num_examples` records."""
  per_epoch = max(1, math.ceil(num_examples / stage_cfg.global_batch))
  if stage_cfg.max_steps > 0:
    return stage_cfg.max_steps, per_epoch
  return max(1, math.ceil(stage_cfg.epochs * num_examples / stage_cfg.global_batch)), per_epoch


def build_stage(config: ml_collections.ConfigDict, name: str, mesh: jax.sharding.Mesh,
                num_examples: int, token_ids: tuple[int, ...]) -> Stage:
  """The stage's model, optimizer, abstract sharded state and step function."""
  cfg = config[name]
  lora = adapters.LoraSettings.from_config(cfg.lora)
  model = LlavaModel(LlavaConfig.from_config(config.model))
  if lora.enabled:
    model = adapters.lora_model(model, lora, train=True)
  settings = align_loss.AlignSettings.from_config(config.align) if cfg.align else None

  def init_boxed_params():
    key = jax.random.key(config.seed)
    params = dict(adapters.frozen_base_dtype(adapters.init_params(model, key), lora)
                  if lora.enabled else llava.init_boxed_params(model.cfg, key))
    if settings is not None:
      params["gnn"] = align_loss.init_gnn_params(jax.random.key(config.seed + 1), settings,
                                                 config.model.llm.hidden_size)
    return params

  total, per_epoch = count_steps(cfg, num_examples)
  abstract_params = nn.unbox(jax.eval_shape(init_boxed_params))
  tx, schedule = optimizer.build_optimizer(abstract_params, config.optim, cfg, total, token_ids)
  abstract_state, shardings = sharded_state.state_shardings(
      init_boxed_params, tx, mesh, config.logical_axis_rules)
  align_fn, group_size = None, 0
  if settings is not None:
    micro_batch = cfg.global_batch // cfg.micro_batches
    group_size = align_loss.group_size_for(config.align, micro_batch,
                                           mesh_lib.data_parallel_size(mesh.shape))
    # GNN and host solves on the devices holding each group, not funnelled through one.
    align_fn = alignment_sharding.make_sharded_alignment(settings, mesh, group_size,
                                                         micro_batch)
  step_fn = step.make_train_step(model, tx, schedule, micro_batches=cfg.micro_batches,
                                 align_fn=align_fn, alpha=config.align.alpha,
                                 group_size=group_size, text_mode=config.align.text_mode,
                                 frozen=optimizer.frozen_leaves(abstract_params, cfg.trainable,
                                                                lora))
  return Stage(name=name, cfg=cfg, model=model, lora=lora, init_boxed_params=init_boxed_params,
               tx=tx, schedule=schedule, abstract_state=abstract_state, shardings=shardings,
               total_steps=total, steps_per_epoch=per_epoch, step_fn=step_fn, mesh=mesh)


def _checkpointer(config, workdir: epath.Path, name: str) -> stage_checkpoints.StageCheckpointer:
  return stage_checkpoints.StageCheckpointer(
      str(run_paths.RunDir(workdir).stage(name)), every=config.train.checkpoint_every,
      keep=config.train.keep_checkpoints, async_save=config.train.async_checkpoint)


def starting_state(config, stage: Stage, workdir: epath.Path, mesh,
                   previous: tuple[str, Any] | None):
  """A fresh sharded state whose params come from the stage's weight source."""
  state = sharded_state.init_sharded_state(stage.init_boxed_params, stage.tx, config.seed,
                                           stage.shardings, mesh, config.logical_axis_rules)
  kind, path = initial_weights.source_for(config, stage.name, workdir)
  if kind == "random":
    logging.info("stage %s starts from random weights (config.init.random)", stage.name)
    return state
  if kind == "vision_pretrain":
    vision_pretrain.ensure_checkpoint(config, path)
  if kind == "previous_stage" and previous and previous[0] == epath.Path(path).name:
    loaded, source = previous[1], f"the end of stage {previous[0]}"
  else:  # a checkpoint (the previous stage's newest, when not in memory) or an HF directory
    loaded, source = load_weights(config, path, mesh), path
  if stage.cfg.align:
    loaded = step.model_params(loaded)  # the GNN starts fresh
  if stage.lora.enabled and stage.lora.base in adapters.QUANTIZED:  # QLoRA: a quantized base
    loaded = adapters.quantize_params(stage.model, loaded)
  logging.info("stage %s starts from %s", stage.name, source)
  params = initial_weights.merge_loaded(state.params, loaded, stage.shardings.params, source)
  return state.replace(params=params)


def load_weights(config, path: str, mesh) -> Any:
  """Params of an exgra-jax checkpoint or an HF directory (LLaVA / release layouts, with
  `init.clip_dir` for the vision tower), laid out on `mesh` tensor by tensor."""
  # What an HF directory does not decide (layer scanning, dtypes, the projector of a plain
  # LLaMA start, a release checkpoint's connector) comes from config.model.
  overrides = {key: config.model[key] for key in hf_configs.OVERRIDABLE}
  loaded = loading.load(path, tokenizer_dir=run_paths.tokenizer_dir(config), mesh=mesh,
                            rules=config.logical_axis_rules,
                            clip_dir=config.init.clip_dir or None, overrides=overrides)
  # The data pipeline writes images in config.model's style: it must be the weights' own.
  stored = LlavaConfig.from_config(loaded.model_config).image_tokens
  if stored != config.model.image_tokens:
    raise ValueError(f"{path} was trained with image_tokens={stored!r}, the config has "
                     f"{config.model.image_tokens!r}: set config.model.image_tokens={stored!r}")
  return loaded.params


def _host_tokens(batch: dict) -> float:
  """Supervised tokens of the global batch, counted on this process's host rows."""
  mask = step.supervised_token_mask(batch["labels"], batch["sample_weight"])
  return float(mask.sum()) * jax.process_count()


def _write_summaries(writer, at: int, pending: list[dict], extra: dict[str, float]) -> dict:
  """Means of the pending steps' scalar metrics (one device fetch), plus `extra`."""
  fetched = jax.device_get(pending)
  scalars = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]
             if np.ndim(fetched[0][k]) == 0}
  scalars.update(extra)
  writer.write_scalars(at, scalars)
  return scalars


def run_stage(config, stage: Stage, pipe: pipeline_lib.InputPipeline, workdir: epath.Path,
              mesh, previous, preemption: stage_checkpoints.PreemptionFlag
              ) -> dict[str, Any]:
  """Trains one stage to its last step (or until pre-empted); returns its summary."""
  ckpt = _checkpointer(config, workdir, stage.name)
  model_config = config.model.to_dict()
  validation = FinetuneValidation(config, stage, workdir)
  restored = ckpt.restore_newest(
      stage_checkpoints.abstract_with_shardings(stage.abstract_state, stage.shardings))
  if restored is not None:
    state = restored.state
    pipe.set_state(restored.data)
    validation.load_json(restored.validation)
    logging.info("stage %s resumes at step %d of %d", stage.name, restored.step,
                 stage.total_steps)
  else:
    state = starting_state(config, stage, workdir, mesh, previous)
  start = int(jax.device_get(state.step))
  if start >= stage.total_steps:
    ckpt.close()
    # A finished fine-tune still reports its test metrics (answers already written are
    # reused: the answers file is resumable).
    return {"status": "complete", "steps": start, "params": state.params,
            "params_checksum": parameter_checksum(state.params),
            **validation.finish(state.params)}

  # The stage's time starts here: loading its weights (and the vision pre-training, which
  # runs in starting_state and logs its own time) is not part of it.
  started, first_step_done = time.perf_counter(), None
  logdir = str(run_paths.RunDir(workdir).tensorboard(stage.name))
  writer = metrics.create_writer(logdir)
  hooks = metrics.progress_hooks(stage.total_steps, writer, logdir,
                                 metrics.parse_profile_steps(config.train.profile_steps))
  throughput = metrics.Throughput()
  train_step, pending, last = None, [], {}
  imle.SOLVER_CLOCK.take()
  try:
    for at in range(start, stage.total_steps):
      host_batch = next(pipe)
      batch = sharding.global_batch(host_batch, mesh)
      if train_step is None:
        train_step = sharded_state.jit_train_step(stage.step_fn, stage.shardings, mesh,
                                                  config.logical_axis_rules, tuple(batch))
      state, step_metrics = train_step(state, batch)
      done = at + 1
      if first_step_done is None:  # compiled and run: the rate below starts after it
        jax.block_until_ready(state.step)
        first_step_done = time.perf_counter()
      throughput.update(_host_tokens(host_batch))
      pending.append(step_metrics)
      for hook in hooks:
        hook(done)
      if done % config.train.log_every == 0 or done == stage.total_steps:
        extra = {**throughput.report(), **imle.SOLVER_CLOCK.take(),
                 **{k: float(v) for k, v in pipe.log.counts().items()}}
        last = _write_summaries(writer, done, pending, extra)
        pending = []
        logging.info("%s", metrics.progress_line(stage.name, done, stage.total_steps, last))
      if "align/matching" in step_metrics and done % config.train.image_every == 0:
        writer.write_images(done, {"matching_vs_identity": metrics.matching_image(
            np.asarray(jax.device_get(step_metrics["align/matching"])))[None]})
      val_metrics = validation.maybe_run(state.params, done)
      if val_metrics:
        writer.write_scalars(done, metrics.flat_scalars("val", val_metrics))
      final = done == stage.total_steps
      stop = stage_checkpoints.any_process(preemption.requested)
      ckpt.save(done, state, pipe.get_state(), model_config, validation=validation.to_json(),
                force=final or stop)
      if stop:
        ckpt.wait()
        logging.warning("stage %s pre-empted at step %d: checkpoint written", stage.name, done)
        return {"status": "preempted", "steps": done}
  finally:
    pipe.close()
    ckpt.wait()
    ckpt.close()
    writer.flush()
  jax.block_until_ready(state.params)
  # Steps per second over the stage after its first step (compilation), validation and
  # checkpoints included as in the progress lines; the last interval's own rate (in the
  # progress line) is not the stage's and is left out of final_metrics.
  after_first = stage.total_steps - start - 1
  rate = after_first / (time.perf_counter() - first_step_done) if after_first else None
  summary = {"status": "trained", "steps": stage.total_steps,
             "skipped_steps": int(jax.device_get(state.skipped)),
             "steps_per_s": rate and round(rate, 3),
             "final_metrics": {k: v for k, v in last.items()
                               if k not in ("steps_per_s", "tokens_per_s")},
             "bad_records": pipe.log.counts(), "params": stage.plain_params(state.params),
             "params_checksum": parameter_checksum(state.params)}
  summary.update(validation.finish(state.params))
  summary["seconds"] = round(time.perf_counter() - started, 1)
  if "test" in summary:  # the fine-tune's TensorBoard run shows the test scores too
    writer.write_scalars(stage.total_steps, metrics.flat_scalars("test", summary["test"]))
    writer.flush()
  return summary


class FinetuneValidation:
  """Fine-tune model selection on the validation split and the final test evaluation.

  Every `train.eval_every` steps (0 = once per epoch) and at the last step, the current
  params answer `val_records`; the best (open recall + closed accuracy) / 2 so far is saved
  to `checkpoints/<stage>_best` as a params-only checkpoint. At the end the best params
  (the final ones when there is no validation split) answer `test_records`. The best score,
  its step and the history go into every checkpoint (`to_json` / `load_json`), so that a
  resumed fine-tune compares with the same best and ends with the same choice.
  """

  def __init__(self, config, stage: Stage, workdir: epath.Path):
    self.config, self.stage, self.run = config, stage, run_paths.RunDir(workdir)
    self.every = config.train.eval_every or stage.steps_per_epoch
    self.best_score, self.best_step, self.history = None, None, []

  def _evaluate(self, params, records: str, name: str) -> dict[str, Any]:
    # Generation is traced under the training mesh too, so its activations follow the
    # models' logical constraints like the train step's.
    with sharding.mesh_and_rules(self.stage.mesh, self.config.logical_axis_rules):
      return vqa.evaluate_split(
          self.config, LlavaModel(self.stage.model.cfg), self.stage.plain_params(params),
          records=records,
          image_root=self.stage.cfg.image_root, candidates=self.stage.cfg.candidates,
          output_dir=str(self.run.eval(name, self.stage.name)),
          checkpoint=str(self.run.stage(self.stage.name)),
          load_report={"missing": [], "unexpected": []})

  def to_json(self) -> dict[str, Any]:
    return {"best_score": self.best_score, "best_step": self.best_step,
            "history": self.history}

  def load_json(self, saved: dict[str, Any]) -> None:
    """Takes the state `to_json` saved; {} (a checkpoint from before it was saved) keeps
    the fresh state."""
    if saved:
      self.best_score, self.best_step = saved["best_score"], saved["best_step"]
      self.history = list(saved["history"])

  @property
  def best_dir(self) -> epath.Path:
    return self.run.best(self.stage.name)

  def maybe_run(self, params, done: int) -> dict[str, Any] | None:
    """Validates at step `done` when due; returns the metrics (None when not due)."""
    cfg = self.stage.cfg
    if not cfg.val_records or (done % self.every and done != self.stage.total_steps):
      return None
    result = self._evaluate(params, cfg.val_records, f"val_step_{done}")
    score = result.get("selection_score")
    self.history.append({"step": done, "selection_score": score})
    logging.info("%s validation at step %d: selection score %s", self.stage.name, done,
                 "-" if score is None else f"{score:.4f}")
    if score is not None and (self.best_score is None or score > self.best_score):
      self.best_score, self.best_step = score, done
      loading.save_params(str(self.best_dir), self.stage.plain_params(params),
                              self.config.model.to_dict(),
                              tokenizer_dir=run_paths.tokenizer_dir(self.config))
    return result

  def finish(self, params) -> dict[str, Any]:
    out: dict[str, Any] = {}
    cfg = self.stage.cfg
    if self.history:
      out["validation"] = {"history": self.history, "best_step": self.best_step,
                           "best_selection_score": self.best_score}
    if cfg.test_records:
      if cfg.val_records and self.best_dir.exists():
        params = loading.load(str(self.best_dir), mesh=self.stage.mesh,
                                  rules=self.config.logical_axis_rules).params
      out["test"] = self._evaluate(params, cfg.test_records, "test")
    return out


def _train_stage(config, name: str, workdir: epath.Path, mesh, token_ids, previous,
                 preemption: stage_checkpoints.PreemptionFlag) -> dict[str, Any]:
  """Builds stage `name` over its data and runs it."""
  per_process = config[name].global_batch // jax.process_count()
  pipe = pipeline_lib.pipeline_from_config(config, name,
                                           num_image_tokens=num_image_tokens(config.model),
                                           batch_size=per_process)
  stage = build_stage(config, name, mesh, pipe.examples_per_process * jax.process_count(),
                      token_ids)
  logging.info("stage %s: %d steps (%d per epoch) of %d samples", name, stage.total_steps,
               stage.steps_per_epoch, stage.cfg.global_batch)
  protocol = {}
  if stage.cfg.align:  # how f_S / f_L were made (docs/align.md)
    protocol = {"align_text_mode": config.align.text_mode,
                "text_max_length": config.data.text_max_length}
    logging.info("stage %s: alignment texts in align.text_mode=%s, cut at "
                 "data.text_max_length=%d", name, *protocol.values())
  return {**run_stage(config, stage, pipe, workdir, mesh, previous, preemption), **protocol}


def train(config: ml_collections.ConfigDict, workdir: epath.Path) -> dict[str, Any]:
  """Runs `config.stages` in order (see module doc); returns a summary per stage."""
  mesh = mesh_lib.build_mesh(config.mesh)
  tokenizer = text.load_tokenizer(run_paths.tokenizer_dir(config), config.model.image_tokens)
  token_ids = new_token_ids(tokenizer, config.model.image_tokens)
  results, previous = {}, None
  preemption = stage_checkpoints.PreemptionFlag()  # SIGTERM from here on: checkpoint, exit 0
  try:
    for name in config.stages:
      summary = _train_stage(config, name, workdir, mesh, token_ids, previous, preemption)
      previous = (name, summary.pop("params", None))
      results[name] = summary
      if summary["status"] == "preempted":
        return results
  finally:
    preemption.restore_handler()
  if config.export.after_training:
    results["export"] = loading.export_from_workdir(config, workdir)
  return results
