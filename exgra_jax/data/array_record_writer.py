"""Records + image folder -> ArrayRecord shards holding each record with its image bytes.

Why: a training host then reads a few large sequential files (local disk or a mounted
bucket) instead of millions of small images. Shards are written in parallel (one thread
per shard: the work is file I/O) and the conversion is resumable: a shard is written
under a temporary name and renamed when complete, and complete shards are kept on a
second run. Records whose image is missing are left out and counted in the log.
"""
import concurrent.futures

from array_record.python import array_record_module
from etils import epath

from exgra_jax.data import bad_records as bad
from exgra_jax.data.records import Record
from exgra_jax.data.sources import RecordImageSource, encode_element

SHARD_SUFFIX = ".array_record"


def shard_path(out_dir: epath.Path, index: int, count: int) -> epath.Path:
  return out_dir / f"data-{index:05d}-of-{count:05d}{SHARD_SUFFIX}"


def _write_shard(records: list[Record], source: RecordImageSource, indices: range,
                 path: epath.Path) -> list[tuple[str, str]]:
  """Writes one shard; returns the (reason, record id) of the records left out."""
  skipped = []
  tmp = path.parent / (path.name + ".tmp")
  writer = array_record_module.ArrayRecordWriter(str(tmp), "group_size:1")
  for i in indices:
    element = source[i]
    if "bad_reason" in element:
      skipped.append((element["bad_reason"], element["record_id"]))
      continue
    writer.write(encode_element(records[i], element["image"]))
  writer.close()
  tmp.rename(path)
  return skipped


def write_shards(records: list[Record], image_root: str | epath.Path,
                 out_dir: str | epath.Path, *, num_shards: int, workers: int = 4,
                 log: bad.BadRecordLog | None = None) -> list[str]:
  """Writes shard k from records [k n / s, (k + 1) n / s) for s shards -> shard paths."""
  if num_shards < 1 or num_shards > max(len(records), 1):
    raise ValueError(f"num_shards={num_shards} must be in [1, {len(records)}]")
  out_dir = epath.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  log = log if log is not None else bad.BadRecordLog()
  source = RecordImageSource(records, image_root)
  n = len(records)
  bounds = [k * n // num_shards for k in range(num_shards + 1)]
  paths = [shard_path(out_dir, k, num_shards) for k in range(num_shards)]
  todo = [k for k in range(num_shards) if not paths[k].exists()]
  log.seen += sum(bounds[k + 1] - bounds[k] for k in todo)
  with concurrent.futures.ThreadPoolExecutor(max(workers, 1)) as pool:
    futures = [pool.submit(_write_shard, records, source,
                           range(bounds[k], bounds[k + 1]), paths[k]) for k in todo]
    for future in futures:
      for reason, record_id in future.result():
        log.add(reason, record_id)
  return [str(p) for p in paths]
