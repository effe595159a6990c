"""The grain input pipeline: records -> decoded, tokenised, bucket-padded host batches.

Order of work: a `RecordOrder` maps each sampler position to a record of this process's
shard (a seeded permutation per epoch, repeated); a `BatchMaker` turns B consecutive
positions into one batch: it reads and tokenises every record, then decodes each image
and CLIP-preprocesses it straight into its row. Whole batches are made in the
`data.workers` grain worker processes (0 = in-process), so the main process receives
finished batches and counts the bad records they report into the `BadRecordLog`.

Bad records: each is counted with its reason and id and replaced by a record drawn
deterministically from (seed, position), so batches stay full of real samples; the run
stops once more than `data.max_bad_fraction` of the records read were bad.

Resumable state: the number of positions consumed. A batch is a pure function of its
positions, so resuming starts the loader at that position and gives the identical next
batches with any worker count (grain's own iterator state refuses a different worker
count). The state is plain JSON and goes into the checkpoint.

Per-process sharding: process p of P takes elements p, p+P, ... of the first
floor(n / P) * P (`sources.ShardView`: equal step counts on every host; the < P elements
left out are logged).
"""
import dataclasses
import os
import sys

import grain.python as grain
from grain import multiprocessing as grain_multiprocessing
import jax
import numpy as np
from absl import logging

from exgra_jax import run_paths
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
  text_mode: str = "default"  # alignment texts: default | release (text.alignment_text)
  image_tokens: str = text.DEFAULT_IMAGE_TOKENS  # the model's image-token style (text.py)


def _turns(raw: list[dict]) -> tuple[Turn, ...]:
  return tuple(Turn(t["from"], t["value"]) for t in raw)


def alignment_example(tok, record: dict, *, max_length: int, mode: str) -> dict:
  """A record's two alignment texts -> `short_ids`, `short_mask`, `long_ids`, `long_mask`
  ([max_length] int32 each). Without extended captions the long text is the short one."""
  long = record.get("conversations_long") or record["conversations"]
  example = {}
  for key, raw in (("short", record["conversations"]), ("long", long)):
    ids, mask = text.tokenize_alignment_text(
        tok, text.alignment_text(_turns(raw), mode), max_length, mode)
    example[f"{key}_ids"], example[f"{key}_mask"] = ids, mask
  return example


def tokenize_example(tok, record: dict, spec: ExampleSpec) -> dict:
  """A record's texts -> ids, labels, image mask (+ alignment texts); BadRecordError."""
  conversation = _turns(record["conversations"])
  tokenized = text.tokenize_conversation(
      tok, conversation, num_image_tokens=spec.num_image_tokens,
      max_length=spec.max_length, label_mode=spec.label_mode, record_id=record["id"],
      image_tokens=spec.image_tokens)
  example = {
      "record_id": record["id"],
      "truncated": tokenized.truncated,
      "no_long_caption": spec.align and not record.get("conversations_long"),
      "input_ids": tokenized.input_ids,
      "labels": tokenized.labels,
      "image_mask": tokenized.image_mask,
  }
  if spec.align:  # a missing extended caption is counted (no_long_caption)
    example.update(alignment_example(tok, record, max_length=spec.text_max_length,
                                     mode=spec.text_mode))
  return example


def bucket_length(length: int, buckets: tuple[int, ...]) -> int:
  """The smallest bucket >= length (lengths were truncated to the last bucket)."""
  for b in buckets:
    if length <= b:
      return b
  raise ValueError(f"length {length} exceeds the largest bucket {buckets[-1]}")


def collate_text(examples: list[dict], batch_size: int, buckets: tuple[int, ...],
                 pad_id: int, text_width: int) -> dict:
  """Tokenised examples -> the text arrays of a batch (docs/interfaces.md), padded to
  `batch_size` samples and to the smallest bucket that fits.

  Padding samples (a last partial batch, or slots no good record could fill) have
  sample_weight 0, pad ids, attention 0 and labels -100 everywhere. `text_width` > 0
  adds the alignment texts (`short_*`, `long_*`, that wide).
  """
  t = bucket_length(max((len(e["input_ids"]) for e in examples), default=1), buckets)
  batch = {
      "input_ids": np.full((batch_size, t), pad_id, np.int32),
      "attention_mask": np.zeros((batch_size, t), np.int32),
      "image_mask": np.zeros((batch_size, t), bool),
      "labels": np.full((batch_size, t), text.IGNORE, np.int32),
      "sample_weight": (np.arange(batch_size) < len(examples)).astype(np.float32),
  }
  if text_width:
    for key in ("short", "long"):
      batch[f"{key}_ids"] = np.full((batch_size, text_width), pad_id, np.int32)
      batch[f"{key}_mask"] = np.zeros((batch_size, text_width), np.int32)
  for i, e in enumerate(examples):
    length = len(e["input_ids"])
    batch["input_ids"][i, :length] = e["input_ids"]
    batch["attention_mask"][i, :length] = 1
    batch["image_mask"][i, :length] = e["image_mask"]
    batch["labels"][i, :length] = e["labels"]
    for key in ("short_ids", "short_mask", "long_ids", "long_mask"):
      if key in e:
        batch[key][i] = e[key]
  return batch


_MIN_SHARED_MEMORY_BYTES = 1 << 20


class RecordOrder:
  """Sampler position -> index into the source: epoch e visits a permutation seeded by
  (seed, e), or the source order when `shuffle` is False.

  A pure function of the position, so any worker computes any batch and a resumed run
  continues at a position. (grain's `IndexSampler` computes the same kind of map with an
  index-shuffle cipher at ~0.24 ms per element, 6 % of an example's whole cost; one
  numpy permutation per epoch, cached, costs O(n) once.)
  """

  def __init__(self, length: int, *, seed: int, shuffle: bool, num_epochs: int | None):
    self._length, self._seed, self._shuffle = length, seed, shuffle
    self.positions = sys.maxsize if num_epochs is None else length * num_epochs
    self._epoch, self._permutation = -1, None

  def __call__(self, position: int) -> int:
    epoch, offset = divmod(position, self._length)
    if not self._shuffle:
      return offset
    if epoch != self._epoch:
      self._permutation = np.random.default_rng([self._seed, epoch]).permutation(self._length)
      self._epoch = epoch
    return int(self._permutation[offset])

  def __getstate__(self) -> dict:  # workers compute their own permutation
    return {**self.__dict__, "_epoch": -1, "_permutation": None}


_SHARED_MEMORY_DIR = "/dev/shm"  # Linux's POSIX shared memory (elsewhere: not checked)


def _shared_zeros(shape: tuple[int, ...]) -> np.ndarray:
  """A zero-filled float32 array in shared memory; a clear error where `/dev/shm` cannot
  hold it (writing past a full tmpfs would kill the worker with SIGBUS instead)."""
  needed = int(np.prod(shape)) * 4
  stat = os.statvfs(_SHARED_MEMORY_DIR) if os.path.isdir(_SHARED_MEMORY_DIR) else None
  if stat is not None and stat.f_bavail * stat.f_frsize < needed:
    raise MemoryError(
        f"{_SHARED_MEMORY_DIR} has {stat.f_bavail * stat.f_frsize / 2**20:.0f} MiB free, a "
        f"batch of pixels needs {needed / 2**20:.0f} MiB: give the container more shared "
        "memory (docker --shm-size) or lower data.prefetch / data.workers / the batch")
  return grain_multiprocessing.SharedMemoryArray(shape, np.float32)


class BatchMaker:
  """Batch index k -> (batch dict, report): positions first + kB ... of the order.

  Work in two passes over the batch, each keeping its data in the caches: first every
  record is read and its texts tokenised (the tokenizer's tables stay hot), then every
  image is decoded and at once CLIP-preprocessed into its row of the pixel buffer (the
  decoded image stays hot; no per-image float array, no copy). Measured in one thread:
  0.85-0.96 of the decode + preprocess limit, against 0.80-0.85 for example-by-example.

  Bad records: the record at a position is replaced by one drawn with
  (seed, position, draw), up to `SUBSTITUTE_DRAWS` times, so that a batch is full of
  real samples whenever it can be (a padding row would be a node of the alignment
  graphs) and stays a pure function of its positions; a slot whose draws are all bad
  becomes a padding row. The report lists every (reason, record id) to count, the kept
  ones (truncated, no long caption) included, the records read (`read`) and the
  positions covered (`positions`).

  `shared_memory`: the pixel buffer (MBs) is allocated in shared memory, which grain
  hands to the main process without a copy (for batches made in worker processes; in
  the main process nothing would unlink the segment).
  """
  SUBSTITUTE_DRAWS = 8

  def __init__(self, source, order: RecordOrder, spec: ExampleSpec, *, seed: int,
               batch_size: int, buckets: tuple[int, ...], pad_id: int, first: int,
               shared_memory: bool):
    self._source, self._order, self._spec, self._seed = source, order, spec, seed
    self._batch_size, self._first, self._shared_memory = batch_size, first, shared_memory
    self._collate_args = (batch_size, buckets, pad_id,
                          spec.text_max_length if spec.align else 0)
    self._tokenizer = None

  def _tok(self):
    if self._tokenizer is None:  # loaded once per worker process
      self._tokenizer = text.load_tokenizer(self._spec.tokenizer_dir, self._spec.image_tokens)
    return self._tokenizer

  def _record_index(self, position: int, draw: int) -> int:
    if draw == 0:
      return self._order(position)
    rng = np.random.default_rng([self._seed, position, draw - 1])
    return int(rng.integers(len(self._source)))

  def _read_and_tokenize(self, position: int, first_draw: int, met: list
                         ) -> tuple[int, dict, dict] | None:
    """(draw, element, tokenised example) of the first usable text from `first_draw` on."""
    for draw in range(first_draw, self.SUBSTITUTE_DRAWS + 1):
      element = self._source[self._record_index(position, draw)]
      if "bad_reason" in element:  # e.g. a missing image file
        met.append((element["bad_reason"], element["record_id"]))
        continue
      try:
        return draw, element, tokenize_example(self._tok(), element["record"], self._spec)
      except bad.BadRecordError as e:
        met.append((e.reason, e.record_id))
    return None

  def __call__(self, k: int) -> tuple[dict, dict]:
    start = self._first + k * self._batch_size
    positions = range(start, min(start + self._batch_size, self._order.positions))
    met = []
    found = [self._read_and_tokenize(p, 0, met) for p in positions]
    size = self._spec.image_size
    shape = (self._batch_size, size, size, 3)  # zero-filled: padding rows stay 0
    pixels = (_shared_zeros(shape) if self._shared_memory else np.zeros(shape, np.float32))
    examples = []
    for position, slot in zip(positions, found):
      while slot is not None:
        draw, element, example = slot
        try:
          images.clip_input(element["image"], size, out=pixels[len(examples)])
        except images.ImageDecodeError:
          met.append((bad.CORRUPT_IMAGE, example["record_id"]))
          slot = self._read_and_tokenize(position, draw + 1, met)
          continue
        examples.append(example)
        break
    # The kept reasons are also the examples' flag names ("truncated", "no_long_caption").
    problems = met + [(reason, e["record_id"]) for e in examples
                      for reason in bad.KEPT_REASONS if e[reason]]
    batch = collate_text(examples, *self._collate_args)
    batch["pixel_values"] = pixels
    return batch, {"problems": problems, "positions": len(positions),
                   "read": len(examples) + len(met)}


class InputPipeline:
  """Iterator of host batches of `batch_size` samples (this process's share).

  Args:
    source: a random-access source (`sources.RecordImageSource` or
      `sources.ArrayRecordImageSource`), the same on every process.
    spec: the example spec.
    batch_size: samples per host batch.
    length_buckets: padded lengths (config.data.length_buckets).
    seed: shuffle seed; shuffle: shuffle each epoch; num_epochs: None = repeat forever.
    workers: grain worker processes (0 = in-process); prefetch: batches made ahead per
      worker (or by the in-process thread); max_bad_fraction: stop threshold.
    log: bad-record log to continue (e.g. the one `records.load_records` filled).
    process_index / process_count: default `jax.process_index()` / `jax.process_count()`.
  """

  def __init__(self, source, spec: ExampleSpec, *,
               batch_size: int, length_buckets: tuple[int, ...], seed: int,
               shuffle: bool = True, num_epochs: int | None = None, workers: int = 0,
               prefetch: int = 2, max_bad_fraction: float = 0.01,
               log: bad.BadRecordLog | None = None,
               process_index: int | None = None, process_count: int | None = None):
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    self._source = ShardView(source, index, count)
    if len(source) - len(self._source) * count:
      logging.info("%d elements left out so that %d processes get equal shares",
                   len(source) - len(self._source) * count, count)
    self._spec = spec
    self._batch_size = batch_size
    self._workers, self._prefetch = workers, prefetch
    self._max_bad_fraction = max_bad_fraction
    self._seed = seed
    self._order = RecordOrder(len(self._source), seed=seed, shuffle=shuffle,
                              num_epochs=num_epochs)
    self.log = log if log is not None else bad.BadRecordLog()
    self._buckets = tuple(length_buckets)
    self._pad_id = text.load_tokenizer(spec.tokenizer_dir, spec.image_tokens).pad_token_id
    self._consumed = 0
    self._iterator = None

  def _batches(self):
    """grain: batch indices -> `BatchMaker` -> batches, from position `consumed` on.

    A whole batch is made by one worker (worker w makes batches w, w + W, ...; grain
    interleaves them back in order), so its content does not depend on the worker count,
    and the main process only receives finished batches. A worker makes its batches in
    its own main thread, `data.prefetch` ahead in grain's queue: reading threads in the
    workers oversubscribe the cores (grain's default of 16 per worker cost a third of the
    throughput on 2 cores), and batches made ahead in such a thread would outlive a
    closed worker in shared memory. In-process, one thread makes them ahead.
    """
    maker = BatchMaker(self._source, self._order, self._spec, seed=self._seed,
                       batch_size=self._batch_size, buckets=self._buckets,
                       pad_id=self._pad_id, first=self._consumed,
                       shared_memory=self._workers > 0)
    count = -(-(self._order.positions - self._consumed) // self._batch_size)
    stream = grain.MapDataset.range(count).map(maker).to_iter_dataset(
        grain.ReadOptions(num_threads=0 if self._workers else 1,
                          prefetch_buffer_size=self._prefetch))
    if self._workers:
      # Only the pixels travel through shared memory; the small arrays are pickled (a
      # segment each would cost more in creation and resource-tracker round trips).
      stream = grain.experimental.WithOptionsIterDataset(
          stream, grain.experimental.DatasetOptions(min_shm_size=_MIN_SHARED_MEMORY_BYTES))
      stream = stream.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=self._workers, per_worker_buffer_size=self._prefetch))
    return iter(stream)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self._iterator is None:
      self._iterator = self._batches()
    try:
      batch, report = next(self._iterator)
    except StopIteration:
      self.log.check(self._max_bad_fraction)
      raise
    self._consumed += report["positions"]
    self.log.seen += report["read"]
    for reason, record_id in report["problems"]:
      self.log.add(reason, record_id)
    # A fraction means little over a handful of records: check once 1 / max_bad_fraction
    # were seen (at once for 0, which tolerates no bad record), and at the end.
    final = report["positions"] < self._batch_size
    if self.log.seen * self._max_bad_fraction >= 1 or not self._max_bad_fraction or final:
      self.log.check(self._max_bad_fraction)
    return batch

  @property
  def examples_per_process(self) -> int:
    """Records in this process's share of one epoch (bad ones included: known later)."""
    return len(self._source)

  def get_state(self) -> dict:
    """JSON-able position and bad-record counts (after the last returned batch)."""
    return {"consumed": self._consumed, "bad_records": self.log.to_json()}

  def set_state(self, state: dict) -> None:
    self.close()
    self._consumed = int(state["consumed"])
    self.log = bad.BadRecordLog.from_json(state["bad_records"])

  def close(self) -> None:
    """Stops the workers and frees the batches they made ahead (their shared memory).
    Iterating again starts afresh at the current position."""
    if self._iterator is not None:
      self._iterator.close()
      self._iterator = None


def stage_source(config, stage: str, log: bad.BadRecordLog):
  """The source of `config.<stage>`: ArrayRecord shards when `records` names a folder of
  `*.array_record` files, else the JSON/JSONL records (subset applied) + image folder."""
  stage_cfg, data = config[stage], config.data
  records_path = run_paths.resolve_path(data.root, stage_cfg.records)
  if records_path.is_dir():
    shards = sorted(str(p) for p in records_path.glob("*.array_record"))
    return ArrayRecordImageSource(shards)
  recs, _ = records.load_records(records_path, log)
  if stage_cfg.subset_ids:
    recs = records.select_ids(recs, run_paths.resolve_path(data.root, stage_cfg.subset_ids))
  else:
    recs = records.select_fraction(recs, stage_cfg.subset_fraction)
  return RecordImageSource(recs, run_paths.resolve_path(data.root, stage_cfg.image_root))


def pipeline_from_config(config, stage: str, *, num_image_tokens: int, batch_size: int,
                         num_epochs: int | None = None) -> InputPipeline:
  """The training pipeline of `config.<stage>` for this process.

  `num_image_tokens` comes from `models.config.num_image_tokens(config.model)` (the
  caller's: data knows no model); `batch_size` is this process's samples per batch.
  """
  data = config.data
  log = bad.BadRecordLog()
  spec = ExampleSpec(tokenizer_dir=run_paths.tokenizer_dir(config),
                     image_size=config.model.vision.image_size,
                     num_image_tokens=num_image_tokens, max_length=data.max_length,
                     text_max_length=data.text_max_length, label_mode=data.label_mode,
                     align=bool(config[stage].align), text_mode=config.align.text_mode,
                     image_tokens=config.model.image_tokens)
  return InputPipeline(stage_source(config, stage, log), spec, batch_size=batch_size,
                       length_buckets=tuple(data.length_buckets), seed=config.seed,
                       shuffle=data.shuffle, num_epochs=num_epochs, workers=data.workers,
                       prefetch=data.prefetch,
                       max_bad_fraction=data.max_bad_fraction, log=log)
