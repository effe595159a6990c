"""Record validation (every bad-input case), JSON/JSONL, nested subsets, id lists."""
import json

import pytest

import data_fixtures
from exgra_jax.data import bad_records as bad
from exgra_jax.data import records


def _reason(raw) -> str:
  with pytest.raises(bad.BadRecordError) as e:
    records.parse_record(raw, 0)
  return e.value.reason


def test_valid_record_round_trip():
  raw = data_fixtures.record(1, image="./a/../b/x.png")
  raw["answer_type"] = "CLOSED"
  r = records.parse_record(raw, 0)
  assert r.id == "r1" and r.image == "b/x.png" and r.answer_type == "CLOSED"
  assert r.conversations[0] == records.Turn("human", "what is this image ?\n<image>")
  assert records.parse_record(r.to_json(), 0) == r


@pytest.mark.parametrize("change,reason", [
    (lambda r: r.pop("image"), bad.MISSING_KEYS),
    (lambda r: r.pop("conversations"), bad.MISSING_KEYS),
    (lambda r: r.update(conversations=[]), bad.EMPTY_CONVERSATION),
    (lambda r: r["conversations"][1].update(value="  "), bad.EMPTY_CONVERSATION),
    (lambda r: r["conversations"][0].update(value="what ?"), bad.IMAGE_TOKEN_MISSING),
    (lambda r: r["conversations"][0].update(value="<image> what <image>"),
     bad.IMAGE_TOKEN_REPEATED),
    (lambda r: r["conversations"][0].update(**{"from": "doctor"}), bad.MISSING_KEYS),
    (lambda r: r.update(image="../outside.png"), bad.PATH_ESCAPES_ROOT),
    (lambda r: r.update(image="a/../../outside.png"), bad.PATH_ESCAPES_ROOT),
    (lambda r: r.update(image="/etc/passwd"), bad.PATH_ESCAPES_ROOT),
    (lambda r: r.update(answer_type="MAYBE"), bad.MISSING_KEYS),
    (lambda r: r["conversations_long"][0].update(value="no image"), bad.IMAGE_TOKEN_MISSING),
])
def test_bad_records_have_reasons(change, reason):
  raw = data_fixtures.record(7)
  change(raw)
  assert _reason(raw) == reason


def test_jsonl_malformed_line_counted(tmp_path):
  lines = [json.dumps(data_fixtures.record(0)), "{not json", "",
           json.dumps({"id": "x", "conversations": []}), json.dumps(data_fixtures.record(1))]
  path = tmp_path / "r.jsonl"
  path.write_text("\n".join(lines))
  recs, log = records.load_records(path)
  assert [r.id for r in recs] == ["r0", "r1"]
  assert log.seen == 4 and log.skipped == 2
  assert log.examples == {bad.MALFORMED_JSON: ["line 2"], bad.MISSING_KEYS: ["x"]}


def test_broken_json_list_raises(tmp_path):
  path = tmp_path / "r.json"
  path.write_text("[{\"id\": 1},")
  with pytest.raises(records.RecordFileError, match="r.json: record file is not a valid JSON"):
    records.load_records(path)


def test_jsonl_line_not_utf8_is_a_bad_record(tmp_path):
  good = [json.dumps(data_fixtures.record(i)).encode() for i in range(2)]
  bad_line = json.dumps(data_fixtures.record(9)).encode().replace(b"what", b"wh\xffat")
  path = tmp_path / "r.jsonl"
  path.write_bytes(b"\n".join([good[0], bad_line, good[1]]) + b"\n")
  recs, log = records.load_records(path)
  assert [r.id for r in recs] == ["r0", "r1"]
  assert log.seen == 3 and log.skipped == 1
  assert log.examples == {bad.NOT_UTF8: ["line 2"]}


def test_json_list_not_utf8_names_offset_and_fix(tmp_path):
  rows = [data_fixtures.record(0), data_fixtures.record(1)]
  data = json.dumps(rows, indent=1).encode()
  offset = data.index(b"what", data.index(b'"r1"'))
  path = tmp_path / "r.json"
  path.write_bytes(data[:offset] + b"\xff" + data[offset:])
  with pytest.raises(records.RecordFileError,
                     match=rf"r.json: byte offset {offset} .*not UTF-8.*check_data.py.*--to_jsonl"):
    records.load_records(path)
  assert records.list_to_jsonl(path, tmp_path / "r.jsonl") == 2
  recs, log = records.load_records(tmp_path / "r.jsonl")
  assert [r.id for r in recs] == ["r0"] and log.examples == {bad.NOT_UTF8: ["line 2"]}


def test_subsets_nested_deterministic_and_order_free():
  recs = [records.parse_record(data_fixtures.record(i), i) for i in range(500)]
  ids = {f: {r.id for r in records.select_fraction(recs, f)} for f in (0.1, 0.4, 1.0)}
  assert (len(ids[0.1]), len(ids[0.4]), len(ids[1.0])) == (50, 200, 500)
  assert ids[0.1] < ids[0.4] < ids[1.0]
  assert {r.id for r in records.select_fraction(recs[::-1], 0.1)} == ids[0.1]
  with pytest.raises(ValueError, match="fraction"):
    records.select_fraction(recs, 0.0)


def test_id_list(tmp_path):
  recs = [records.parse_record(data_fixtures.record(i), i) for i in range(5)]
  (tmp_path / "ids.txt").write_text("r3\nr1\n\n")
  assert [r.id for r in records.select_ids(recs, tmp_path / "ids.txt")] == ["r1", "r3"]
  (tmp_path / "ids.txt").write_text("r3\nnope\n")
  with pytest.raises(ValueError, match="1 ids .* not in the records"):
    records.select_ids(recs, tmp_path / "ids.txt")


def test_bad_fraction_stops_with_summary():
  log = bad.BadRecordLog(seen=100)
  log.add(bad.MISSING_IMAGE, "a")
  log.add(bad.TRUNCATED, "b")
  log.check(0.01)
  assert log.counts() == {"data/bad/missing_image": 1, "data/bad/truncated": 1,
                          "data/seen": 100, "data/skipped": 1}
  log.add(bad.CORRUPT_IMAGE, "c")
  with pytest.raises(bad.TooManyBadRecords, match=r"(?s)0.0200.*corrupt_image: 1 \(e.g. c\)"):
    log.check(0.01)
  assert bad.BadRecordLog.from_json(log.to_json()) == log
