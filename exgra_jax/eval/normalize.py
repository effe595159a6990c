"""The VQA-v2 answer normaliser as the LLaVA-Med release applies it (docs/eval.md).

Both the reference and the prediction go through `normalize_answer` before any metric, so
that "The Left Lung." and "left lung" compare equal. Each rule is a separate function so
that tests can check them one by one; `normalize_answer` chains them in the release's
order. Two deliberate differences from the release's code, both documented in
docs/eval.md: the release passes `re.UNICODE` as the *count* of `re.sub` (so only the
first 32 periods are removed); we remove all of them. The VQA-v2 contraction map
("dont" -> "don't") is not part of the release's normaliser and is not applied.
"""
from __future__ import annotations

import re

PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">",
               "<", "@", "`", ",", "?", "!")
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9",
                "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})

_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")


def strip_punctuation(text: str) -> str:
  """Deletes or blanks each punctuation mark.

  A mark is deleted when it stands next to a space anywhere in `text` (as typed, before
  any other mark was changed) or when `text` has a digit-comma-digit pattern; otherwise
  every occurrence becomes a space ("left/right" -> "left right", "1,000" -> "1000").
  """
  has_number_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
  out = text
  for mark in PUNCTUATION:
    if mark + " " in text or " " + mark in text or has_number_comma:
      out = out.replace(mark, "")
    else:
      out = out.replace(mark, " ")
  return out


def strip_periods(text: str) -> str:
  """Deletes every '.' that is not followed by a digit ("3.5" keeps its period)."""
  return _PERIOD_NOT_BEFORE_DIGIT.sub("", text)


def map_words(text: str) -> str:
  """Lower-cases, splits on whitespace, maps number words to digits, drops articles, joins."""
  words = (NUMBER_WORDS.get(word, word) for word in text.lower().split())
  return " ".join(word for word in words if word not in ARTICLES)


def normalize_answer(text: str) -> str:
  """Lower-case, punctuation, periods, words, then delete the commas that are left."""
  if not isinstance(text, str):
    raise TypeError(f"answer must be a string, got {type(text).__name__}: {text!r}")
  text = strip_periods(strip_punctuation(text.lower()))
  return map_words(text).replace(",", "")
