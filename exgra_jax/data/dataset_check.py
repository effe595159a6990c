"""Validation of a whole dataset before training: every record, image and conversation.

Runs the same checks as the pipeline (record format, path inside the root, image
readable, conversation fits max_length with its image) in one pass, in-process, and
returns the `BadRecordLog`, so that problems are found before a run rather than inside it.
"""
from etils import epath

from exgra_jax.data import bad_records as bad
from exgra_jax.data import images, records, text
from exgra_jax.data.sources import RecordImageSource


def check_dataset(records_path: str | epath.Path, image_root: str | epath.Path, *,
                  tokenizer_dir: str = "", num_image_tokens: int = 256,
                  max_length: int = 2048,
                  image_tokens: str = text.DEFAULT_IMAGE_TOKENS) -> bad.BadRecordLog:
  """Counts every problem (with example ids); conversations are checked with a tokenizer
  (images written in the model's style `image_tokens`, data/text.py)."""
  recs, log = records.load_records(records_path)
  tok = text.load_tokenizer(tokenizer_dir, image_tokens) if tokenizer_dir else None
  source = RecordImageSource(recs, image_root)
  for i, record in enumerate(recs):
    element = source[i]
    if "bad_reason" in element:
      log.add(element["bad_reason"], record.id)
      continue
    try:
      images.decode_image(element["image"])
      if tok is not None:
        tokenized = text.tokenize_conversation(
            tok, record.conversations, num_image_tokens=num_image_tokens,
            max_length=max_length, label_mode="per_turn", record_id=record.id,
            image_tokens=image_tokens)
        if tokenized.truncated:
          log.add(bad.TRUNCATED, record.id)
    except images.ImageDecodeError:
      log.add(bad.CORRUPT_IMAGE, record.id)
    except bad.BadRecordError as e:
      log.add_error(e)
  return log
