"""TFDS builders for the VQA fine-tuning sets, read from the user's local manual dir.

Nothing is downloaded: the user places the released files in the manual dir
(`~/tensorflow_datasets/downloads/manual/<name>/` or `--manual_dir`):

    train_w_options_new.json  val_w_options_new.json (optional)  test_w_options_new.json
    images/<paths named by the records>

Each item becomes `{id, image (RGB uint8, decoded by data/images.py), image_path,
question, answer, answer_type ('OPEN' | 'CLOSED')}`; the question keeps its options
and the closed-question suffix but loses `<image>`. Answer types follow docs/data.md:
VQA-RAD and SLAKE keep the released `answer_type`; SLAKE keeps English only (items with
`q_lang` other than "en", or with CJK characters, are left out); PathVQA marks yes/no
answers CLOSED and the rest OPEN.
"""
import re

import tensorflow_datasets as tfds
from etils import epath

from exgra_jax.data import images, records

_SPLITS = {"train": "train_w_options_new.json", "validation": "val_w_options_new.json",
           "test": "test_w_options_new.json"}
_CJK = re.compile(r"[\u3000-\u9fff\uac00-\ud7af]")


def _is_english(raw: dict) -> bool:
  values = " ".join(t.get("value", "") for t in raw.get("conversations", []))
  return raw.get("q_lang", "en") == "en" and not _CJK.search(values)


def _pathvqa_answer_type(answer: str) -> str:
  return "CLOSED" if answer.strip().lower().rstrip(".") in ("yes", "no") else "OPEN"


class _VqaBuilder(tfds.core.GeneratorBasedBuilder):
  """Shared reading of `*_w_options_new.json` + images; subclasses set the rules."""

  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Place train/val/test_w_options_new.json and the images/ folder of the release "
      "in the manual dir.")
  ENGLISH_ONLY = False
  YES_NO_CLOSED = False
  # TFDS locates a builder's source through the optional `importlib_resources` backport,
  # which this environment lacks; stating the path directly avoids that look-up.
  code_path = epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
        "id": tfds.features.Text(),
        "image": tfds.features.Image(shape=(None, None, 3)),
        "image_path": tfds.features.Text(),
        "question": tfds.features.Text(),
        "answer": tfds.features.Text(),
        "answer_type": tfds.features.ClassLabel(names=list(records.ANSWER_TYPES)),
    }))

  def _split_generators(self, dl_manager):
    root = epath.Path(dl_manager.manual_dir)
    return {split: self._generate_examples(root, root / name)
            for split, name in _SPLITS.items() if (root / name).exists()}

  def _generate_examples(self, root: epath.Path, path: epath.Path):
    recs, log = records.load_records(path)
    if log.skipped:
      raise ValueError(f"{path}: {log.summary()}")
    for record in recs:
      if self.ENGLISH_ONLY and not _is_english(record.to_json()):
        continue
      question = record.conversations[0].value.replace(records.IMAGE_TOKEN, "").strip()
      answer = record.conversations[1].value
      answer_type = (_pathvqa_answer_type(answer) if self.YES_NO_CLOSED
                     else record.answer_type)
      if answer_type not in records.ANSWER_TYPES:
        raise ValueError(f"{path}: record {record.id!r} has no answer_type")
      yield record.id, {
          "id": record.id, "image_path": record.image, "question": question,
          "answer": answer, "answer_type": answer_type,
          "image": images.decode_image((root / "images" / record.image).read_bytes()),
      }


class VqaRad(_VqaBuilder):
  """VQA-RAD (radiology): released answer types."""


class Slake(_VqaBuilder):
  """SLAKE, English questions only."""
  ENGLISH_ONLY = True


class PathVqa(_VqaBuilder):
  """PathVQA: yes/no answers CLOSED, the rest OPEN."""
  YES_NO_CLOSED = True
