"""One request's answer, built token by token: what may be streamed now, and when it is final.

Why apart from the engine: the answer is cleaned as `generate` cleans answers (leading
`###` / `Assistant:` / `Response:` tags stripped, cut at `###`) and then cut at the
request's stop strings, so text that is already generated may still vanish (a `#` that
becomes `###`, `Assis` that becomes a stripped `Assistant:`, a byte that completes a
character). Streaming sends only the part that can no longer change: the answer so far
less a trailing piece that is the start of a stop string or an incomplete character (with
the whitespace before it, which the cleaning strips if the piece becomes `###`), or the
whole of it while it is still the start of a leading tag. The chunks therefore
concatenate to exactly the non-streamed answer, and the answer is final (the request can
leave the batch) as soon as eos is drawn or a stop string appears.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

from exgra_jax.inference import generate

_RELEASE_STOP = "###"
_LEADING_TAGS = ("###", "Assistant:", "Response:")
_INCOMPLETE = "\ufffd"  # what a tokenizer decodes an unfinished UTF-8 sequence to


def _cut(text: str, stops: Sequence[str]) -> tuple[str, bool]:
  """(text before the first stop string, whether one was found)."""
  cuts = [text.index(s) for s in stops if s in text]
  return (text[:min(cuts)], True) if cuts else (text, False)


def _unsettled(text: str, stops: Sequence[str]) -> int:
  """How many trailing characters of the unfinished answer `text` a later token may change."""
  if any(tag.startswith(text) for tag in _LEADING_TAGS):
    return len(text)  # may still turn out to be a leading tag that clean_answer strips
  held = len(text) - len(text.rstrip(_INCOMPLETE))
  for stop in stops:
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
      if stop.startswith(text[-n:]):
        held = max(held, n)
        break
  if held:  # the whitespace before it too: if it becomes `###`, the cleaned answer strips it
    held = len(text) - len(text[:len(text) - held].rstrip())
  return held


class AnswerText:
  """Generated tokens -> the answer (`finish_reason` "stop" | "length") and its stable part.

  `detokenize`: token ids -> text (special tokens skipped). `stops`: the request's stop
  strings, applied to the cleaned answer after the release's `###`.

  Detokenization is incremental, with a prefix offset (as TGI and vLLM do): each token
  decodes only the tokens since the last settled character boundary, together with the
  few before them (`tokens[prefix:]` less `tokens[prefix:read]`, so that a decoder that
  strips the leading space of its first token strips it from both); the cost per token
  does not grow with the answer. A piece that ends in an incomplete character waits for
  the token that completes it.
  """

  def __init__(self, detokenize: Callable[[Sequence[int]], str], eos_id: int,
               max_tokens: int, stops: Sequence[str] = ()):
    self._detokenize, self._eos_id, self._max_tokens = detokenize, eos_id, max_tokens
    self._user_stops = tuple(stops)
    self._stops = (_RELEASE_STOP, *stops)
    self.tokens: list[int] = []
    self.text = ""          # the answer if generation ended now
    self.finish_reason: str | None = None
    self._sent = 0           # characters of `text` handed out by `new_text`
    self._raw = ""           # the decoded text of tokens[:_read]
    self._prefix = self._read = 0  # tokens[_prefix:_read]: the decoding context of the rest

  def _pending(self) -> str:
    """The text of the tokens after `_read`; moves the offsets on once it ends in a
    complete character."""
    before = self._detokenize(self.tokens[self._prefix:self._read])
    after = self._detokenize(self.tokens[self._prefix:])
    piece = after[len(before):]
    if len(after) > len(before) and not after.endswith(_INCOMPLETE):
      self._raw += piece
      self._prefix, self._read = self._read, len(self.tokens)
      return ""
    return piece

  def add(self, token: int) -> None:
    """Takes the next generated token; sets `finish_reason` when the answer is final."""
    if self.finish_reason is not None:
      raise ValueError("the answer is already final")
    if token == self._eos_id:
      self.finish_reason = "stop"
      return
    self.tokens.append(token)
    # clean_answer(raw, "###") is this cleaned text cut at "###" and stripped: cleaning once
    # gives both the answer and whether the release's stop has appeared.
    pending = self._pending()
    cleaned = generate.clean_answer(self._raw + pending, "")
    released, released_stop = _cut(cleaned, (_RELEASE_STOP,))
    self.text, stopped = _cut(released.strip(), self._user_stops)
    if stopped or released_stop:
      self.finish_reason = "stop"
    elif len(self.tokens) >= self._max_tokens:
      self.finish_reason = "length"

  def new_text(self) -> str:
    """The answer's text that is settled and not yet handed out (all of it once final)."""
    end = len(self.text)
    if self.finish_reason is None:
      end -= _unsettled(self.text, self._stops)
    if end <= self._sent:
      return ""
    piece, self._sent = self.text[self._sent:end], end
    return piece
