"""tools/check_data.py and the dataset check behind it, on a world with every problem."""
import json
import os
import pathlib
import subprocess
import sys

import data_fixtures
from exgra_jax.data import bad_records as bad
from exgra_jax.data import dataset_check

_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _check_data(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "tools/check_data.py", *args], capture_output=True,
                        text=True, check=True, cwd=_ROOT,
                        env={**os.environ, "PYTHONPATH": str(_ROOT)})


def test_check_counts_every_problem(tmp_path):
  data_fixtures.make_world(tmp_path, 3)
  tok = data_fixtures.make_tokenizer(tmp_path / "tok")
  (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
  rows = [data_fixtures.record(i) for i in range(3)] + [
      data_fixtures.record(10, image="gone.png"), data_fixtures.record(11, image="broken.png"),
      data_fixtures.record(12, image="../x.png"), {"id": "nokeys"},
      data_fixtures.record(13, image="img0.png", answer="lung " * 100)]
  path = tmp_path / "r.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{oops\n")
  log = dataset_check.check_dataset(path, tmp_path / "images", tokenizer_dir=str(tok),
                                    num_image_tokens=4, max_length=60)
  assert log.seen == 9
  assert log.examples == {bad.MISSING_IMAGE: ["r10"], bad.CORRUPT_IMAGE: ["r11"],
                          bad.PATH_ESCAPES_ROOT: ["r12"], bad.MISSING_KEYS: ["nokeys"],
                          bad.TRUNCATED: ["r13"], bad.MALFORMED_JSON: ["line 9"]}
  result = _check_data(f"--records={path}", f"--images={tmp_path / 'images'}")
  assert "5 of 9 records skipped" in result.stdout and "r11" in result.stdout


def test_check_data_exits_0_on_bytes_that_do_not_decode(tmp_path):
  data_fixtures.make_world(tmp_path, 2)
  rows = json.dumps([data_fixtures.record(0), data_fixtures.record(1)]).encode()
  listed = tmp_path / "r.json"
  listed.write_bytes(rows.replace(b"what", b"wh\xffat", 1))
  images = f"--images={tmp_path / 'images'}"
  result = _check_data(f"--records={listed}", images)
  assert "not UTF-8" in result.stdout and "--to_jsonl" in result.stdout
  result = _check_data(f"--records={listed}", images, f"--to_jsonl={tmp_path / 'r.jsonl'}")
  assert "1 of 2 records skipped" in result.stdout and "not_utf8: 1 (e.g. line 1)" in result.stdout
