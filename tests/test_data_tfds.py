"""TFDS builders on release-format VQA files: splits, answer types, SLAKE English only."""
import json

import numpy as np
import tensorflow_datasets as tfds

import data_fixtures
from exgra_jax.data import tfds_builders


def _item(i, question, answer, answer_type="OPEN", **extra):
  return {"id": f"q{i}", "image": f"img{i % 2}.png", "answer_type": answer_type,
          "conversations": [{"from": "human", "value": question + "\n<image>"},
                            {"from": "gpt", "value": answer}], **extra}


def _manual(tmp_path):
  manual = tmp_path / "manual"
  (manual / "images").mkdir(parents=True)
  rng = np.random.default_rng(0)
  for i in range(2):
    (manual / "images" / f"img{i}.png").write_bytes(
        data_fixtures.png_bytes(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)))
  train = [_item(0, "is it normal ?", "Yes", "CLOSED"), _item(1, "what organ ?", "lung"),
           _item(2, "这是什么", "肺", q_lang="zh"), _item(3, "which side ?", "no.", "OPEN")]
  (manual / "train_w_options_new.json").write_text(json.dumps(train))
  (manual / "test_w_options_new.json").write_text(json.dumps(train[:2]))
  return manual


def _load(builder_cls, tmp_path, manual):
  builder = builder_cls(data_dir=str(tmp_path / builder_cls.__name__))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(manual)))
  return {split: {ex["id"].decode(): ex for ex in tfds.as_numpy(builder.as_dataset(split))}
          for split in builder.info.splits}


def test_builders_answer_types_and_languages(tmp_path):
  manual = _manual(tmp_path)
  rad = _load(tfds_builders.VqaRad, tmp_path, manual)
  assert set(rad) == {"train", "test"} and len(rad["train"]) == 4
  assert rad["train"]["q0"]["answer_type"] == 1 and rad["train"]["q3"]["answer_type"] == 0
  assert rad["train"]["q1"]["question"].decode() == "what organ ?"
  assert rad["train"]["q0"]["image"].shape == (9, 7, 3)
  slake = _load(tfds_builders.Slake, tmp_path, manual)
  assert sorted(slake["train"]) == ["q0", "q1", "q3"]
  path = _load(tfds_builders.PathVqa, tmp_path, manual)
  assert path["train"]["q3"]["answer_type"] == 1  # "no." is a yes/no answer: CLOSED
  assert path["train"]["q1"]["answer_type"] == 0
