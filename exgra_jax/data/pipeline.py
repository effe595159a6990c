"""The grain input pipeline: records -> decoded, tokenised, bucket-padded host batches.

Order of work: a seeded `IndexSampler` (shuffle per epoch, repeat) over this process's
shard of the records; the `ExampleTransform` (decode, CLIP preprocessing, tokenise, mask)
runs in `data.workers` grain worker processes (0 = in-process); batching happens in the
main process, where bad-record markers are counted, so that every skipped record reaches
the `BadRecordLog` whatever the worker count.

Resumable state: the position is the number of sampler elements consumed. The sampler
is a pure function of its index, so resuming restarts a loader at that offset and gives
the identical next batches with any worker count (grain's own loader state refuses a
different worker count). The state is plain JSON and goes into the checkpoint.

Per-process sharding: process p of P takes elements p, p+P, ... of the first
floor(n / P) * P (`sources.ShardView`: equal step counts on every host; the < P elements
left out are logged).
"""
import dataclasses

import grain.python as grain
import jax
import numpy as np
from absl import logging
from etils import epath

from exgra_jax.data import bad_records as bad
from exgra_jax.data import images, records, text
from exgra_jax.data.records import Turn
from exgra_jax.data.sources import ArrayRecordImageSource, RecordImageSource, ShardView


@dataclasses.dataclass(frozen=True)
class ExampleSpec:
  """What one example must look like (from config.data and the model config)."""
  tokenizer_dir: str
  image_size: int
  num_image_tokens: int
  max_length: int
  text_max_length: int
  label_mode: str
  align: bool  # produce short/long alignment texts (stage 2)


def _turns(raw: list[dict]) -> tuple[Turn, ...]:
  return tuple(Turn(t["from"], t["value"]) for t in raw)


class ExampleTransform(grain.MapTransform):
  """Bytes + record -> example dict, or a `{"bad_reason", "record_id"}` marker."""

  def __init__(self, spec: ExampleSpec):
    self._spec = spec
    self._tokenizer = None

  def _tok(self):
    if self._tokenizer is None:  # loaded once per worker process
      self._tokenizer = text.load_tokenizer(self._spec.tokenizer_dir)
    return self._tokenizer

  def map(self, element: dict) -> dict:
    if "bad_reason" in element:
      return element
    record = element["record"]
    try:
      return self._example(record, element["image"])
    except bad.BadRecordError as e:
      return {"bad_reason": e.reason, "record_id": e.record_id}
    except images.ImageDecodeError:
      return {"bad_reason": bad.CORRUPT_IMAGE, "record_id": record["id"]}

  def _example(self, record: dict, image_bytes: bytes) -> dict:
    spec, tok = self._spec, self._tok()
    conversation = _turns(record["conversations"])
    tokenized = text.tokenize_conversation(
        tok, conversation, num_image_tokens=spec.num_image_tokens,
        max_length=spec.max_length, label_mode=spec.label_mode, record_id=record["id"])
    example = {
        "record_id": record["id"],
        "truncated": tokenized.truncated,
        "no_long_caption": spec.align and not record.get("conversations_long"),
        "pixel_values": images.clip_preprocess(images.decode_image(image_bytes),
                                               spec.image_size),
        "input_ids": tokenized.input_ids,
        "labels": tokenized.labels,
        "image_mask": tokenized.image_mask,
    }
    if spec.align:  # without extended captions the long text is the short one (counted)
      long = _turns(record.get("conversations_long") or record["conversations"])
      for key, turns in (("short", conversation), ("long", long)):
        ids, mask = text.tokenize_alignment_text(tok, text.alignment_text(turns),
                                                 spec.text_max_length)
        example[f"{key}_ids"], example[f"{key}_mask"] = ids, mask
    return example


def bucket_length(length: int, buckets: tuple[int, ...]) -> int:
  """The smallest bucket >= length (lengths were truncated to the last bucket)."""
  for b in buckets:
    if length <= b:
      return b
  raise ValueError(f"length {length} exceeds the largest bucket {buckets[-1]}")


def collate(examples: list[dict], batch_size: int, buckets: tuple[int, ...],
            pad_id: int, image_size: int) -> dict:
  """Examples -> the batch dict of docs/interfaces.md, padded to `batch_size` samples.

  Padding samples (a last partial batch) have sample_weight 0, zero pixels, pad ids,
  attention 0 and labels -100 everywhere.
  """
  t = bucket_length(max(len(e["input_ids"]) for e in examples), buckets)
  n = len(examples)
  batch = {
      "pixel_values": np.zeros((batch_size, image_size, image_size, 3), np.float32),
      "input_ids": np.full((batch_size, t), pad_id, np.int32),
      "attention_mask": np.zeros((batch_size, t), np.int32),
      "image_mask": np.zeros((batch_size, t), bool),
      "labels": np.full((batch_size, t), text.IGNORE, np.int32),
      "sample_weight": (np.arange(batch_size) < n).astype(np.float32),
  }
  for key in ("short", "long"):
    if f"{key}_ids" in examples[0]:
      width = examples[0][f"{key}_ids"].shape[0]
      batch[f"{key}_ids"] = np.full((batch_size, width), pad_id, np.int32)
      batch[f"{key}_mask"] = np.zeros((batch_size, width), np.int32)
  for i, e in enumerate(examples):
    length = len(e["input_ids"])
    batch["pixel_values"][i] = e["pixel_values"]
    batch["input_ids"][i, :length] = e["input_ids"]
    batch["attention_mask"][i, :length] = 1
    batch["image_mask"][i, :length] = e["image_mask"]
    batch["labels"][i, :length] = e["labels"]
    for key in ("short_ids", "short_mask", "long_ids", "long_mask"):
      if key in e:
        batch[key][i] = e[key]
  return batch


class _OffsetSampler:
  """`base` sampler started at `offset`: element i is base element i + offset."""

  def __init__(self, base: grain.IndexSampler, offset: int):
    self._base, self._offset = base, offset

  def __len__(self) -> int:
    return max(len(self._base) - self._offset, 0)

  def __getitem__(self, index: int) -> grain.RecordMetadata:
    if index < 0 or index >= len(self):
      raise IndexError(f"index {index} out of range [0, {len(self)})")
    meta = self._base[index + self._offset]
    return grain.RecordMetadata(index=index, record_key=meta.record_key, rng=meta.rng)

  def __repr__(self) -> str:
    return f"_OffsetSampler({self._base!r}, offset={self._offset})"


class InputPipeline:
  """Iterator of host batches of `batch_size` samples (this process's share).

  Args:
    source: a random-access source (`sources.RecordImageSource` or
      `sources.ArrayRecordImageSource`), the same on every process.
    spec: the example spec.
    batch_size: samples per host batch.
    length_buckets: padded lengths (config.data.length_buckets).
    seed: shuffle seed; shuffle: shuffle each epoch; num_epochs: None = repeat forever.
    workers: grain worker processes (0 = in-process); max_bad_fraction: stop threshold.
    log: bad-record log to continue (e.g. the one `records.load_records` filled).
    process_index / process_count: default `jax.process_index()` / `jax.process_count()`.
  """

  def __init__(self, source, spec: ExampleSpec, *,
               batch_size: int, length_buckets: tuple[int, ...], seed: int,
               shuffle: bool = True, num_epochs: int | None = None, workers: int = 0,
               max_bad_fraction: float = 0.01, log: bad.BadRecordLog | None = None,
               process_index: int | None = None, process_count: int | None = None):
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    self._source = ShardView(source, index, count)
    if len(source) - len(self._source) * count:
      logging.info("%d elements left out so that %d processes get equal shares",
                   len(source) - len(self._source) * count, count)
    self._spec = spec
    self._batch_size = batch_size
    self._buckets = tuple(length_buckets)
    self._workers = workers
    self._max_bad_fraction = max_bad_fraction
    self._sampler = grain.IndexSampler(len(self._source), shuffle=shuffle, seed=seed,
                                       num_epochs=num_epochs,
                                       shard_options=grain.NoSharding())
    self.log = log if log is not None else bad.BadRecordLog()
    self._pad_id = text.load_tokenizer(spec.tokenizer_dir).pad_token_id
    self._consumed = 0
    self._iterator = None

  def _loader_iterator(self):
    loader = grain.DataLoader(
        data_source=self._source, sampler=_OffsetSampler(self._sampler, self._consumed),
        operations=[ExampleTransform(self._spec)], worker_count=self._workers,
        shard_options=grain.NoSharding())
    return iter(loader)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self._iterator is None:
      self._iterator = self._loader_iterator()
    examples = []
    while len(examples) < self._batch_size:
      try:
        element = next(self._iterator)
      except StopIteration:
        break
      self._consumed += 1
      self.log.seen += 1
      if "bad_reason" in element:
        self.log.add(element["bad_reason"], element["record_id"])
        continue
      for reason in ("truncated", "no_long_caption"):
        if element[reason]:
          self.log.add(getattr(bad, reason.upper()), element["record_id"])
      examples.append(element)
    exhausted = len(examples) < self._batch_size
    # A fraction means little over a handful of records: check once 1 / max_bad_fraction
    # were seen (at once for 0, which tolerates no bad record), and at the end.
    if self.log.seen * self._max_bad_fraction >= 1 or not self._max_bad_fraction or exhausted:
      self.log.check(self._max_bad_fraction)
    if not examples:
      raise StopIteration
    return collate(examples, self._batch_size, self._buckets, self._pad_id,
                   self._spec.image_size)

  @property
  def examples_per_process(self) -> int:
    """Records in this process's share of one epoch (bad ones included: known later)."""
    return len(self._source)

  def get_state(self) -> dict:
    """JSON-able position and bad-record counts (after the last returned batch)."""
    return {"consumed": self._consumed, "bad_records": self.log.to_json()}

  def set_state(self, state: dict) -> None:
    self._consumed = int(state["consumed"])
    self.log = bad.BadRecordLog.from_json(state["bad_records"])
    self._iterator = None


def to_global_batch(batch: dict, mesh: jax.sharding.Mesh,
                    batch_axes: tuple[str, ...] = ("data", "fsdp")) -> dict:
  """Host batch (this process's rows) -> global `jax.Array`s sharded on the batch axis.

  Every process passes its own rows; the global leading dimension is the sum over
  processes. Other axes are replicated.
  """
  axes = tuple(a for a in batch_axes if a in mesh.axis_names)
  out = {}
  for key, value in batch.items():
    spec = jax.sharding.PartitionSpec(axes or None, *([None] * (value.ndim - 1)))
    out[key] = jax.make_array_from_process_local_data(
        jax.sharding.NamedSharding(mesh, spec), value)
  return out


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


def stage_source(config, stage: str, log: bad.BadRecordLog):
  """The source of `config.<stage>`: ArrayRecord shards when `records` names a folder of
  `*.array_record` files, else the JSON/JSONL records (subset applied) + image folder."""
  stage_cfg, data = config[stage], config.data
  records_path = resolve_path(data.root, stage_cfg.records)
  if records_path.is_dir():
    shards = sorted(str(p) for p in records_path.glob("*.array_record"))
    return ArrayRecordImageSource(shards)
  recs, _ = records.load_records(records_path, log)
  if stage_cfg.subset_ids:
    recs = records.select_ids(recs, resolve_path(data.root, stage_cfg.subset_ids))
  else:
    recs = records.select_fraction(recs, stage_cfg.subset_fraction)
  return RecordImageSource(recs, resolve_path(data.root, stage_cfg.image_root))


def pipeline_from_config(config, stage: str, *, num_image_tokens: int, batch_size: int,
                         num_epochs: int | None = None) -> InputPipeline:
  """The training pipeline of `config.<stage>` for this process.

  `num_image_tokens` comes from `models.config.num_image_tokens(config.model)` (the
  caller's: data knows no model); `batch_size` is this process's samples per batch.
  """
  data = config.data
  log = bad.BadRecordLog()
  spec = ExampleSpec(tokenizer_dir=tokenizer_dir(config),
                     image_size=config.model.vision.image_size,
                     num_image_tokens=num_image_tokens, max_length=data.max_length,
                     text_max_length=data.text_max_length, label_mode=data.label_mode,
                     align=bool(config[stage].align))
  return InputPipeline(stage_source(config, stage, log), spec, batch_size=batch_size,
                       length_buckets=tuple(data.length_buckets), seed=config.seed,
                       shuffle=data.shuffle, num_epochs=num_epochs, workers=data.workers,
                       max_bad_fraction=data.max_bad_fraction, log=log)
