"""serving/answer.AnswerText against the non-streamed answer, on random token streams.

The promise the server makes: the streamed chunks of a request concatenate to exactly the
answer `predict` gives for the same tokens (the release's cleaning: `generate.clean_answer`
with `###`, then the request's stop strings), and generation ends at the first token that
makes the answer final. Streams are drawn from two real tokenizers: the demo's byte-level
BPE (multi-byte characters arrive byte by byte) and a LLaMA-shaped sentencepiece BPE; the
draws favour the pieces where streaming is delicate (`#`, `###`, whitespace before them,
the leading tags, partial stop strings).
"""
from collections.abc import Sequence

import numpy as np
import pytest

import data_fixtures
from exgra_jax.data import demo_tokenizer
from exgra_jax.inference import generate
from exgra_jax.serving.answer import AnswerText

_TEXTS = ["the scan shows a lung, left side", "yes\n###", "no ### Human:", "Assistant: 3 µm",
          "Response: größer als 5 mm", "a lesion ° of 2 cm\n\n", "Assistant:### x",
          "肺 结节 lung"]
_STOPS = ("lung", "\n\n", "Human", "mm")


@pytest.fixture(scope="module", params=["byte_level_bpe", "sentencepiece"])
def tokenizer(request, tmp_path_factory):
  directory = tmp_path_factory.mktemp(request.param)
  if request.param == "byte_level_bpe":
    return demo_tokenizer.train_demo_tokenizer(_TEXTS * 3, str(directory))
  return data_fixtures.sentencepiece_tokenizer(directory)


def _pieces(tokenizer) -> list[int]:
  """Token ids of the delicate pieces, and of single characters (bytes, for byte level)."""
  ids: list[int] = []
  for piece in ("#", "##", "###", " ", "\n", " #", "Assistant", ":", "Response", "l", "un",
                "g", "mm", "µ", "ö", "肺", "Human", "yes"):
    ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
  return sorted(set(ids) - set(tokenizer.all_special_ids))


def _reference(decoded: str, stops: Sequence[str]) -> str:
  """The non-streamed answer: predict's cleaning, then the request's stop strings."""
  answer = generate.clean_answer(decoded, "###")
  cuts = [answer.index(s) for s in stops if s in answer]
  return answer[:min(cuts)] if cuts else answer


def _stream(tokenizer, tokens: Sequence[int], stops: Sequence[str], max_tokens: int
            ) -> tuple[AnswerText, str, int]:
  """Feeds `tokens` until the answer is final; (answer, chunks joined, tokens consumed)."""
  detokenize = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
  answer = AnswerText(detokenize, tokenizer.eos_token_id, max_tokens, stops)
  chunks, used = [], 0
  for token in tokens:
    answer.add(token)
    used += 1
    chunks.append(answer.new_text())
    if answer.finish_reason:
      break
  return answer, "".join(chunks), used


def test_streams_join_to_the_non_streamed_answer_and_end_at_the_first_stop(tokenizer):
  rng = np.random.default_rng(0)
  delicate = _pieces(tokenizer)
  ordinary = [i for i in range(len(tokenizer)) if i not in set(tokenizer.all_special_ids)]
  detokenize = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
  finishes = {"stop": 0, "length": 0}
  for trial in range(400):
    length = int(rng.integers(1, 24))
    tokens = [int(rng.choice(delicate if rng.random() < 0.7 else ordinary))
              for _ in range(length)]
    if rng.random() < 0.1:
      tokens.insert(int(rng.integers(0, length)), tokenizer.eos_token_id)
    stops = tuple(s for s in _STOPS if rng.random() < 0.3)
    answer, joined, used = _stream(tokenizer, tokens, stops, max_tokens=length)
    assert answer.finish_reason, (trial, tokens)
    finishes[answer.finish_reason] += 1
    kept = answer.tokens
    expected = _reference(detokenize(kept), stops)
    context = (trial, tokens, stops, detokenize(kept))
    assert answer.text == expected, context
    assert joined == expected, context
    # A stop string ended it: generating further would not have changed the answer ...
    by_text = tokens[used - 1] != tokenizer.eos_token_id
    if answer.finish_reason == "stop" and by_text and used < len(tokens):
      rest = [t for t in tokens[used:] if t != tokenizer.eos_token_id]
      assert _reference(detokenize(kept + rest), stops) == expected, context
    # ... and it did not end earlier than the first token that made it final.
    if used > 1 and by_text:
      shorter = AnswerText(detokenize, tokenizer.eos_token_id, length, stops)
      for token in tokens[:used - 1]:
        shorter.add(token)
      assert shorter.finish_reason is None, context
  assert min(finishes.values()) >= 40, finishes  # both endings were exercised


@pytest.mark.parametrize("texts,stops,streamed,finish", [
    # Whitespace before a "#" is held: "###" would end the answer and strip it.
    (["yes", "\n", "#", "##"], (), ["yes", "", "", ""], "stop"),
    (["Assistant", ":", " yes"], (), ["", "", "yes"], None),  # a leading tag is never sent
    (["the", " lu", "ng", " x"], ("lung",), ["the", "", " "], "stop"),  # cut at the stop
    (["a", " #", "b"], (), ["a", "", " #b"], None),  # held text is sent once it is safe
])
def test_hand_worked_streams(texts, stops, streamed, finish):
  vocab = {i + 10: piece for i, piece in enumerate(texts)}
  answer = AnswerText(lambda ids: "".join(vocab[i] for i in ids), eos_id=2, max_tokens=10,
                      stops=stops)
  chunks = []
  for token in vocab:
    answer.add(token)
    chunks.append(answer.new_text())
    if answer.finish_reason:
      break
  assert (chunks, answer.finish_reason) == (streamed, finish)
