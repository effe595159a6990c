"""Templates, label masks (hand-worked, both modes), alignment texts, truncation."""
import numpy as np
import pytest
import tokenizers
import transformers

import data_fixtures
from exgra_jax.data import bad_records as bad
from exgra_jax.data import text
from exgra_jax.data.records import Turn

TURNS = (Turn("human", "what is this ?\n<image>"), Turn("gpt", "a lung"),
         Turn("human", "left ?"), Turn("gpt", "yes"))
HEADER = ("<s> A chat between a curious human and an artificial intelligence assistant . "
          "The assistant gives helpful , detailed , and polite answers to the human ' s "
          "questions .")
# Hand-worked masks; "*" marks a supervised token (label = its own id).
PER_TURN = HEADER + (" # # # Human : what is this ? <im_start> <im_patch> <im_patch> <im_end>"
                     " #* #* #* Assistant* :* a* lung* # # # Human : left ?"
                     " #* #* #* Assistant* :* yes* #* #* #*")
# The release: pieces tokenised separately (each with a BOS) drift the boundaries by one
# token per piece, and human turns stay supervised on their first two tokens.
RELEASE = (HEADER
           + " #* #* # Human : what is this ? <im_start> <im_patch> <im_patch> <im_end>"
             " # #* #* Assistant* :* a* lung* #* #* #* Human* : left ? # # #"
             " Assistant* :* yes* #* #* #*")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return text.load_tokenizer(data_fixtures.make_tokenizer(tmp_path_factory.mktemp("tok")))


def _render(tok, tokenized) -> str:
  tokens = tok.convert_ids_to_tokens(tokenized.input_ids.tolist())
  return " ".join(t + ("*" if label != text.IGNORE else "")
                  for t, label in zip(tokens, tokenized.labels.tolist()))


def test_training_text_is_the_spec_template():
  assert text.training_text(TURNS, 2) == (
      text.SYSTEM + "\n\n### Human: what is this ?\n<im_start><im_patch><im_patch><im_end>\n"
      "### Assistant: a lung\n### Human: left ?\n### Assistant: yes\n### ")


@pytest.mark.parametrize("mode,expected", [("per_turn", PER_TURN), ("release", RELEASE)])
def test_label_masks_hand_worked(tok, mode, expected):
  out = text.tokenize_conversation(tok, TURNS, num_image_tokens=2, max_length=200,
                                   label_mode=mode)
  assert _render(tok, out) == expected
  supervised = out.labels != text.IGNORE
  np.testing.assert_array_equal(out.labels[supervised], out.input_ids[supervised])
  assert out.image_mask.sum() == 2 and not out.truncated
  assert out.input_ids.dtype == np.int32


def test_truncation_counted_and_image_cut_rejected(tok):
  out = text.tokenize_conversation(tok, TURNS, num_image_tokens=2, max_length=50,
                                   label_mode="per_turn")
  assert out.truncated and len(out.input_ids) == 50 == len(out.labels)
  with pytest.raises(bad.BadRecordError) as e:
    text.tokenize_conversation(tok, TURNS, num_image_tokens=2, max_length=40,
                               label_mode="per_turn", record_id="x")
  assert e.value.reason == bad.TEXT_TOO_LONG and e.value.record_id == "x"


def test_unknown_label_mode(tok):
  with pytest.raises(ValueError, match="label_mode"):
    text.tokenize_conversation(tok, TURNS, num_image_tokens=2, max_length=9,
                               label_mode="fastchat")


def test_alignment_text_and_padding(tok):
  turns = (Turn("human", "<image>\nwhat ?"), Turn("gpt", "a lung\nct scan"),
           Turn("human", "and ?"), Turn("gpt", " yes <image> "))
  assert text.alignment_text(turns) == "a lung ct scan. yes"
  ids, mask = text.tokenize_alignment_text(tok, "a lung", 6)
  assert tok.convert_ids_to_tokens(ids[:3].tolist()) == ["<s>", "a", "lung"]
  np.testing.assert_array_equal(mask, [1, 1, 1, 0, 0, 0])
  assert (ids[3:] == tok.pad_token_id).all()


def test_tokenizer_without_image_tokens_is_refused(tmp_path):
  raw = tokenizers.Tokenizer(
      tokenizers.models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>")
  fast.save_pretrained(tmp_path)
  with pytest.raises(ValueError, match=r"<im_start> is missing.*no pad token"):
    text.load_tokenizer(tmp_path)


def _expanded_reference(tok, turns, n, mode, image_tokens="im_start_end"):
  """The straightforward algorithm: tokenise the text with all N patches written out."""
  header, pieces = text.training_pieces(turns, n, image_tokens)
  full = header + "".join(pieces) + text.BEGIN_SIGNAL
  if mode == "per_turn":
    spans, start = [], len(header)
    for turn, piece in zip(turns, pieces):
      if turn.role == "gpt":
        spans.append((start, start + len(piece)))
      start += len(piece)
    spans.append((start, len(full)))
    enc = tok(full, return_offsets_mapping=True)
    return enc["input_ids"], [i if e > s and any(a <= s < b for a, b in spans) else -100
                              for i, (s, e) in zip(enc["input_ids"], enc["offset_mapping"])]
  ids = tok(full)["input_ids"]
  labels = list(ids)
  lengths = [len(tok(p)["input_ids"]) for p in [header] + pieces]
  cur = lengths[0]
  labels[:cur] = [-100] * min(cur, len(labels))
  for length, turn in zip(lengths[1:], turns):
    if turn.role == "human":
      lo, hi = min(cur + 2, len(labels)), min(cur + length, len(labels))
      labels[lo:hi] = [-100] * (hi - lo)
    cur += length
  return ids, labels


CONVERSATIONS = [
    TURNS,
    (Turn("human", "<image>\nwhat is this?"), Turn("gpt", "a lung, left side")),
    (Turn("human", "what is this?"), Turn("gpt", "the scan"), Turn("human", "and<image>here?"),
     Turn("gpt", "an opacity\nin the right lower lobe")),
    (Turn("human", "describe"), Turn("gpt", "<image> a lung")),
]


@pytest.mark.parametrize("image_tokens", list(text.IMAGE_TOKEN_STYLES))
@pytest.mark.parametrize("mode", ["per_turn", "release"])
def test_single_patch_expansion_equals_the_expanded_text(tok, tmp_path, mode, image_tokens):
  """Both image-token styles: <im_start> N x <im_patch> <im_end>, and N x <image>."""
  for t in (tok, data_fixtures.sentencepiece_tokenizer(tmp_path / "sp")):
    for turns in CONVERSATIONS:
      ids, labels = _expanded_reference(t, turns, 7, mode, image_tokens)
      out = text.tokenize_conversation(t, turns, num_image_tokens=7, max_length=10_000,
                                       label_mode=mode, image_tokens=image_tokens)
      assert out.input_ids.tolist() == ids
      assert out.labels.tolist() == labels
      patch = t.convert_tokens_to_ids(text.patch_token(image_tokens))
      assert (out.image_mask == (out.input_ids == patch)).all()
      assert out.image_mask.sum() == 7 * sum("<image>" in x.value for x in turns)
