"""The grain pipeline: batch schema, determinism, resume (also across worker counts),
per-process shards, bad input inside the pipeline, padded last batch, global arrays."""
import gc
import json
import os
import pathlib
import subprocess
import sys

import jax
from absl import flags
import numpy as np
import pytest

import data_fixtures
from exgra_jax.data import bad_records as bad
from exgra_jax.data import array_record_writer, pipeline, records, sources
from exgra_jax.train import sharding

N_IMAGE = 4
BUCKETS = (48, 64, 96)
# grain's worker processes read absl flags, which the CLI entry points parse.
flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp("world")
  tok_dir = data_fixtures.make_tokenizer(root / "tok")
  recs, _ = records.load_records(data_fixtures.make_world(root, 12))
  spec = pipeline.ExampleSpec(str(tok_dir), image_size=28, num_image_tokens=N_IMAGE,
                              max_length=96, text_max_length=16, label_mode="per_turn",
                              align=True)
  return root, recs, spec


def _pipe(world, recs=None, **kw):
  root, all_recs, spec = world
  args = dict(batch_size=4, length_buckets=BUCKETS, seed=7, num_epochs=1, workers=0,
              process_index=0, process_count=1)
  args.update(kw)
  source = sources.RecordImageSource(recs if recs is not None else all_recs, root / "images")
  return pipeline.InputPipeline(source, spec, **args)


def _pipe_on(world, source, workers=0):
  return pipeline.InputPipeline(source, world[2], batch_size=4, length_buckets=BUCKETS,
                                seed=7, num_epochs=1, workers=workers, process_index=0,
                                process_count=1)


def _ids(batch) -> list:
  """Sample identities: the records share their text, so the images tell them apart."""
  return [row.tobytes() for row in batch["pixel_values"]]


def test_batch_schema(world):
  batch = next(_pipe(world))
  shapes = {k: (v.shape, v.dtype.name) for k, v in batch.items()}
  assert shapes == {
      "pixel_values": ((4, 28, 28, 3), "float32"), "input_ids": ((4, 64), "int32"),
      "attention_mask": ((4, 64), "int32"), "image_mask": ((4, 64), "bool"),
      "labels": ((4, 64), "int32"), "sample_weight": ((4,), "float32"),
      "short_ids": ((4, 16), "int32"), "short_mask": ((4, 16), "int32"),
      "long_ids": ((4, 16), "int32"), "long_mask": ((4, 16), "int32")}
  assert (batch["image_mask"].sum(1) == N_IMAGE).all()
  assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
  assert (batch["long_mask"].sum(1) > batch["short_mask"].sum(1)).all()


def test_epoch_covers_all_in_seeded_order_and_pads_last_batch(world):
  batches = list(_pipe(world, batch_size=5))
  assert [b["sample_weight"].tolist() for b in batches][-1] == [1, 1, 0, 0, 0]
  again = list(_pipe(world, batch_size=5))
  assert [_ids(b) for b in batches] == [_ids(b) for b in again]
  other = list(_pipe(world, batch_size=5, seed=8))
  assert [_ids(b) for b in batches] != [_ids(b) for b in other]
  assert sum(b["sample_weight"].sum() for b in batches) == 12


def test_resume_identical_across_worker_counts(world):
  full = [_ids(b) for b in _pipe(world, num_epochs=2)]
  first = _pipe(world, num_epochs=2)
  for _ in range(2):
    next(first)
  state = json.loads(json.dumps(first.get_state()))
  resumed = _pipe(world, num_epochs=2, workers=2)
  resumed.set_state(state)
  assert [_ids(b) for b in resumed] == full[2:]


def test_worker_batches_in_shared_memory_outlive_the_host_batch(world):
  """Worker-made pixels arrive in shared memory, unlinked when the host batch goes; a
  global array made from them (zero-copy on CPU) must keep them alive."""
  pipe = _pipe(world, workers=2)
  host = next(pipe)
  expected = np.array(host["pixel_values"])
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
  global_batch = sharding.global_batch(host, mesh)
  del host
  pipe.close()
  gc.collect()
  np.testing.assert_array_equal(np.asarray(global_batch["pixel_values"]), expected)


def test_full_shared_memory_is_a_clear_error(world, monkeypatch):
  root, recs, spec = world
  source = sources.ShardView(sources.RecordImageSource(recs, root / "images"), 0, 1)
  maker = pipeline.BatchMaker(
      source, pipeline.RecordOrder(len(source), seed=0, shuffle=False, num_epochs=1), spec,
      seed=0, batch_size=4, buckets=BUCKETS, pad_id=0, first=0, shared_memory=True)
  free = os.statvfs_result((4096, 4096, 100, 1, 1, 100, 100, 100, 0, 255))  # 4 KiB free
  monkeypatch.setattr(pipeline.os, "statvfs", lambda path: free)
  with pytest.raises(MemoryError, match=r"/dev/shm has 0 MiB free.*--shm-size"):
    maker(0)


def test_process_shards_disjoint_and_covering(world):
  _, recs, _ = world
  seen = []
  for p in range(3):
    pipe = _pipe(world, process_index=p, process_count=3)
    seen.append({tuple(r) for b in pipe for r, w in zip(b["pixel_values"].reshape(4, -1),
                                                         b["sample_weight"]) if w})
  assert sum(len(s) for s in seen) == 12 == len(set().union(*seen))
  with pytest.raises(ValueError, match="cannot be shared"):
    sources.ShardView(sources.RecordImageSource(recs[:2], "."), 0, 3)


def test_bad_inputs_skipped_counted_and_stop(world, tmp_path):
  root, recs, spec = world
  (root / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
  no_long = data_fixtures.record(103, image="img1.png")
  no_long.pop("conversations_long")
  bad_recs = [records.parse_record(data_fixtures.record(100, image="missing.png"), 0),
              records.parse_record(data_fixtures.record(101, image="corrupt.png"), 0),
              records.parse_record(
                  data_fixtures.record(102, image="img0.png", answer="lung " * 200), 0),
              records.parse_record(no_long, 0)]
  pipe = _pipe(world, recs=recs[:5] + bad_recs, batch_size=4, max_bad_fraction=0.5)
  batches = list(pipe)
  # 9 positions, every one filled with a real sample (a bad record's slot goes to a
  # deterministic substitute); the last batch of 1 is padded.
  assert [b["sample_weight"].sum() for b in batches] == [4, 4, 1], pipe.log.summary()
  counts = pipe.log.counts()
  assert set(pipe.log.examples[bad.MISSING_IMAGE]) == {"r100"}
  assert set(pipe.log.examples[bad.CORRUPT_IMAGE]) == {"r101"}
  assert set(pipe.log.examples[bad.TRUNCATED]) == {"r102"}
  assert set(pipe.log.examples[bad.NO_LONG_CAPTION]) == {"r103"}
  # Both unusable records were read at their own positions (substitutes may meet them
  # again: every read is counted); each skipped read cost one more read.
  assert counts["data/bad/missing_image"] >= 1 and counts["data/bad/corrupt_image"] >= 1
  assert counts["data/skipped"] == counts["data/bad/missing_image"] + counts[
      "data/bad/corrupt_image"]
  assert counts["data/seen"] == 9 + counts["data/skipped"]
  # Substitutes are a pure function of (seed, position): same batches and counts with
  # worker processes.
  again = _pipe(world, recs=recs[:5] + bad_recs, batch_size=4, max_bad_fraction=0.5,
                workers=2)
  assert [_ids(b) for b in again] == [_ids(b) for b in batches]
  assert again.log.counts() == counts
  hopeless = _pipe(world, recs=bad_recs[:1] * 2, batch_size=4, max_bad_fraction=1.0)
  (only,) = list(hopeless)  # every draw bad: padding rows, each read counted
  assert only["sample_weight"].sum() == 0
  assert hopeless.log.counts()["data/bad/missing_image"] == 2 * (
      pipeline.BatchMaker.SUBSTITUTE_DRAWS + 1)
  strict = _pipe(world, recs=recs[:5] + bad_recs, batch_size=4, max_bad_fraction=0.1)
  with pytest.raises(bad.TooManyBadRecords, match="missing_image"):
    list(strict)
  zero = _pipe(world, recs=bad_recs[:1] + recs[:7], batch_size=4, shuffle=False,
               max_bad_fraction=0.0)
  with pytest.raises(bad.TooManyBadRecords, match="r100"):
    next(zero)


def test_global_batch_on_a_mesh(world):
  batch = next(_pipe(world))
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
  out = sharding.global_batch(batch, mesh)
  assert out["input_ids"].sharding.spec[0] == ("data", "fsdp")
  np.testing.assert_array_equal(np.asarray(out["labels"]), batch["labels"])


def test_array_record_round_trip(world, tmp_path):
  root, recs, _ = world
  paths = array_record_writer.write_shards(recs, root / "images", tmp_path, num_shards=3,
                                           workers=2)
  assert len(paths) == 3
  again = array_record_writer.write_shards(recs, root / "images", tmp_path, num_shards=3,
                                           workers=2)
  assert again == paths  # resumable: finished shards are kept
  shards = sources.ArrayRecordImageSource(paths)
  folder = sources.RecordImageSource(recs, root / "images")
  assert len(shards) == 12
  by_id = {folder[i]["record"]["id"]: folder[i] for i in range(12)}
  for i in range(12):
    element = shards[i]
    assert element == by_id[element["record"]["id"]]
  from_shards = [_ids(b) for b in _pipe_on(world, shards)]
  assert len(from_shards) == 3
  # The shard source also travels to worker processes (pickled) and gives the same batches.
  assert [_ids(b) for b in _pipe_on(world, shards, workers=2)] == from_shards


def test_pipeline_from_config_json_and_shards(world, tmp_path):
  from configs import base
  root, recs, spec = world
  config = base.get_config()
  config.data.root = str(root)
  config.data.tokenizer_dir = spec.tokenizer_dir
  config.data.workers = 0
  config.stage2.records = "records.json"
  config.stage2.subset_fraction = 0.5
  pipe = pipeline.pipeline_from_config(config, "stage2", num_image_tokens=N_IMAGE,
                                       batch_size=4, num_epochs=1)
  batches = list(pipe)
  assert sum(b["sample_weight"].sum() for b in batches) == 6
  assert batches[0]["input_ids"].shape == (4, 512) and "long_ids" in batches[0]
  array_record_writer.write_shards(recs, root / "images", tmp_path / "shards", num_shards=2)
  config.stage2.records = str(tmp_path / "shards")
  pipe = pipeline.pipeline_from_config(config, "stage2", num_image_tokens=N_IMAGE,
                                       batch_size=4, num_epochs=1)
  assert sum(b["sample_weight"].sum() for b in pipe) == 12


def test_global_batch_splits_rows_over_four_devices():
  script = (
      "import jax, numpy as np\n"
      "from exgra_jax.train import sharding\n"
      "mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 2), ('data', 'fsdp'))\n"
      "batch = {'input_ids': np.arange(8 * 3, dtype=np.int32).reshape(8, 3)}\n"
      "out = sharding.global_batch(batch, mesh)['input_ids']\n"
      "rows = sorted(tuple(np.asarray(s.data)[:, 0]) for s in out.addressable_shards)\n"
      "assert rows == [(0, 3), (6, 9), (12, 15), (18, 21)], rows\n"
      "np.testing.assert_array_equal(np.asarray(out), batch['input_ids'])\n")
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[1])}
  subprocess.run([sys.executable, "-c", script], check=True, env=env)
