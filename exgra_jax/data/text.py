"""Training template, `<image>` expansion, tokenisation and label masks (docs/data.md), and
the alignment texts of f_S / f_L (docs/align.md, `alignment_text`).

(The inference prompts of docs/eval.md live in `inference/prompts.py`.)

Training template: the system line + "\\n\\n", then every turn as "### Human: ...\\n" or
"### Assistant: ...\\n", then a final "### " (the stop signal the model learns to emit;
the release appends it too). Labels are -100 on the system header and the human turns;
the assistant turns, role tag included, and the final "### " are supervised.

Two label modes:
- `per_turn` (default, clean): the whole conversation is tokenised once and a token is
  supervised iff its first character lies in an assistant turn (character offsets of
  the fast tokenizer), so the mask follows the real token boundaries exactly.
- `release`: LLaVA-Med's `_mask_targets`. The header and every turn are tokenised
  *separately* (each with its own BOS) and those lengths are laid over the ids of the
  whole conversation; human turns are masked from their third token on. The separate
  BOS tokens make every boundary drift by one token per turn, and the "+2" leaves the
  first two tokens of each human turn ("###", " Human" or so) supervised. Offered so
  that a run reproduces the release's loss exactly.

Speed: the text is tokenised with a single patch token per image and that id is then
repeated N times (with its label). The image tokens are added tokens, which the
tokenizer matches before it splits the text between them, so the ids equal those of the
fully expanded text (tested against it) while the tokenizer and the label loop see
~N fewer tokens (N = 256 is two thirds of a typical conversation).

Image-token styles (`image_tokens`, from `config.model.image_tokens`, which the importer
reads from the checkpoint and every checkpoint saves): `im_start_end` (LLaVA v1 /
LLaVA-Med: `<image>` -> `<im_start>` + N x `<im_patch>` + `<im_end>`, docs/models.md) and
`image` (LLaVA-1.5 / llava-hf: `<image>` -> N x `<image>`). The "patch token" is the one
repeated N times, whose positions take the projector output.

`data/` knows no model: the number of image tokens N and the style are passed in by the
caller (`exgra_jax.models.config.num_image_tokens(config.model)`, `config.model.image_tokens`).
"""
import dataclasses

import numpy as np
import tokenizers
import transformers
from etils import epath

from exgra_jax.data import bad_records as bad
from exgra_jax.data.records import IMAGE_TOKEN, Turn

SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")
IM_START, IM_PATCH, IM_END = "<im_start>", "<im_patch>", "<im_end>"
ROLE_NAMES = {"human": "Human", "gpt": "Assistant"}
BEGIN_SIGNAL, END_SIGNAL = "### ", "\n"
IGNORE = -100
ALIGNMENT_TEXT_MODES = ("default", "release")  # config.align.text_mode


# style -> (before, patch token, after) of one image's placeholder
IMAGE_TOKEN_STYLES = {"im_start_end": (IM_START, IM_PATCH, IM_END),
                      "image": ("", IMAGE_TOKEN, "")}
DEFAULT_IMAGE_TOKENS = "im_start_end"


def _style(image_tokens: str) -> tuple[str, str, str]:
  if image_tokens not in IMAGE_TOKEN_STYLES:
    raise ValueError(f"image_tokens={image_tokens!r} is not one of {list(IMAGE_TOKEN_STYLES)}")
  return IMAGE_TOKEN_STYLES[image_tokens]


def patch_token(image_tokens: str = DEFAULT_IMAGE_TOKENS) -> str:
  """The token repeated N times per image (its positions take the image features)."""
  return _style(image_tokens)[1]


def style_tokens(image_tokens: str = DEFAULT_IMAGE_TOKENS) -> tuple[str, ...]:
  """The tokens a tokenizer needs for `image_tokens` (the added tokens of a recipe)."""
  return tuple(t for t in _style(image_tokens) if t)


def image_placeholder(num_image_tokens: int, image_tokens: str = DEFAULT_IMAGE_TOKENS) -> str:
  before, patch, after = _style(image_tokens)
  return before + patch * num_image_tokens + after


def placeholder_length(num_image_tokens: int,
                       image_tokens: str = DEFAULT_IMAGE_TOKENS) -> int:
  """Tokens one image takes in `input_ids`: its N patch tokens, plus `<im_start>` and
  `<im_end>` in the im_start_end style (N + 2), N alone in the image style."""
  return num_image_tokens + len(style_tokens(image_tokens)) - 1


def expand_image_token(text: str, num_image_tokens: int,
                       image_tokens: str = DEFAULT_IMAGE_TOKENS) -> str:
  """`<image>` -> its placeholder with N patch tokens (see the module doc), in place."""
  return text.replace(IMAGE_TOKEN, image_placeholder(num_image_tokens, image_tokens))


def training_pieces(turns: tuple[Turn, ...], num_image_tokens: int,
                    image_tokens: str = DEFAULT_IMAGE_TOKENS) -> tuple[str, list[str]]:
  """(header, [one string per turn]) of the training template, images expanded."""
  header = SYSTEM + "\n\n"
  pieces = [BEGIN_SIGNAL + ROLE_NAMES[t.role] + ": "
            + expand_image_token(t.value, num_image_tokens, image_tokens) + END_SIGNAL
            for t in turns]
  return header, pieces


def training_text(turns: tuple[Turn, ...], num_image_tokens: int,
                  image_tokens: str = DEFAULT_IMAGE_TOKENS) -> str:
  header, pieces = training_pieces(turns, num_image_tokens, image_tokens)
  return header + "".join(pieces) + BEGIN_SIGNAL


def chat_template(image_tokens: str = DEFAULT_IMAGE_TOKENS) -> str:
  """The training template as a transformers chat template (Jinja), for exported models.

  Messages render as `training_pieces` renders turns ("### Human: ...\n", "### Assistant:
  ...\n" after the system line; a `system` message replaces the system line), the parts of
  a message joined by "\n", an image (an image part, or `<image>` in a text message) as
  its placeholder with one patch token (`<im_start><im_patch><im_end>` or `<image>`), which
  the exported LlavaProcessor expands to N patch tokens; `add_generation_prompt` opens the
  assistant's turn as the `train` inference prompt does (inference/prompts.py). So `[image,
  question]` gives the prompt of `build_prompt("<image>\nquestion", "train", N)`.
  """
  roles = {"user": ROLE_NAMES["human"], "assistant": ROLE_NAMES["gpt"]}
  image = repr(image_placeholder(1, image_tokens))
  return (
      "{%- set system = messages[0]['content'] if messages and messages[0]['role'] == "
      "'system' and messages[0]['content'] is string else " + repr(SYSTEM) + " -%}"
      "{{- system + " + repr("\n\n") + " -}}"
      "{%- for message in messages if message['role'] != 'system' -%}"
      "{{- " + repr(BEGIN_SIGNAL) + " + " + repr(roles) + "[message['role']] + ': ' -}}"
      "{%- if message['content'] is string -%}"
      "{{- message['content'] | replace(" + repr(IMAGE_TOKEN) + ", " + image + ") -}}"
      "{%- else -%}{%- for part in message['content'] -%}"
      "{%- if not loop.first -%}{{- " + repr("\n") + " -}}{%- endif -%}"
      "{%- if part['type'] == 'image' -%}{{- " + image + " -}}"
      "{%- else -%}{{- part['text'] -}}{%- endif -%}"
      "{%- endfor -%}{%- endif -%}"
      "{{- " + repr(END_SIGNAL) + " -}}"
      "{%- endfor -%}"
      "{%- if add_generation_prompt -%}{{- " + repr(BEGIN_SIGNAL + ROLE_NAMES["gpt"] + ":")
      + " -}}{%- endif -%}")


def alignment_text(turns: tuple[Turn, ...], mode: str = "default") -> str:
  """The text whose LLM states give f_S (of the turns) or f_L (of the extended turns).

  Both modes join answers with ". " (an answer ending in "." thus gives "..") and remove
  the image tokens; they differ where the release is careless (docs/align.md):
  - `default`: the assistant turns (by role); a newline becomes a space and whitespace
    runs collapse, so that the words on either side of a newline are not glued into one;
    empty answers are left out;
  - `release`: the release's `merge_sentences_preprocess`: every second turn (1, 3, ...),
    `<image>` expanded and then deleted with the other image tokens (which leaves the
    spaces around it), every "\\n" deleted with nothing in its place, empty answers
    kept, nothing stripped.
  """
  if mode == "release":
    answers = []
    for t in turns[1::2]:
      value = t.value.replace(IMAGE_TOKEN, image_placeholder(1)).replace("\n", "")
      for token in (IM_PATCH, IM_END, IM_START):
        value = value.replace(token, "")
      answers.append(value)
    return ". ".join(answers)
  if mode != "default":
    raise ValueError(f"alignment text mode {mode!r} not in {ALIGNMENT_TEXT_MODES}")
  answers = []
  for t in turns:
    if t.role != "gpt":
      continue
    value = t.value
    for token in (IMAGE_TOKEN, IM_START, IM_PATCH, IM_END):
      value = value.replace(token, "")
    answers.append(" ".join(value.replace("\n", " ").split()))
  return ". ".join(a for a in answers if a)


def load_tokenizer(directory: str | epath.Path, image_tokens: str = DEFAULT_IMAGE_TOKENS
                   ) -> transformers.PreTrainedTokenizerFast:
  """A local HF fast tokenizer (never remote code) with the image tokens and a pad token."""
  tok = transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
  check_tokenizer(tok, image_tokens)
  # `encode` calls the Rust tokenizer directly: it must not truncate or pad on its own.
  tok.backend_tokenizer.no_truncation()
  tok.backend_tokenizer.no_padding()
  return tok


def check_tokenizer(tok, image_tokens: str = DEFAULT_IMAGE_TOKENS) -> None:
  """Raises ValueError naming what the tokenizer lacks for this pipeline."""
  problems = []
  if not getattr(tok, "is_fast", False):
    problems.append("not a fast tokenizer (character offsets are needed)")
  vocab = tok.get_vocab()
  for token in style_tokens(image_tokens):
    if token not in vocab:
      problems.append(f"token {token} is missing (image_tokens={image_tokens!r})")
  if tok.pad_token_id is None:
    problems.append("no pad token")
  if problems:
    raise ValueError("tokenizer unusable: " + "; ".join(problems))


@dataclasses.dataclass(frozen=True)
class TokenizedConversation:
  input_ids: np.ndarray    # [L] int32
  labels: np.ndarray       # [L] int32, IGNORE where not supervised
  image_mask: np.ndarray   # [L] bool, True at the N patch-token positions
  truncated: bool          # the text was cut at max_length


def encode(tok, text: str) -> tokenizers.Encoding:
  """`tok(text)` (special tokens added), straight from the Rust tokenizer: the Python
  wrapper costs as much again per call as the encoding of a short text."""
  return tok.backend_tokenizer.encode(text)


def _expand_patches(ids: np.ndarray | list[int], patch_id: int, num_image_tokens: int
                    ) -> np.ndarray:
  """Index map that repeats every patch-token position N times (others once)."""
  ids = np.asarray(ids, np.int64)
  return np.repeat(np.arange(len(ids)), np.where(ids == patch_id, num_image_tokens, 1))


def _per_turn_labels(tok, turns, num_image_tokens, patch_id, image_tokens
                     ) -> tuple[np.ndarray, np.ndarray]:
  header, pieces = training_pieces(turns, 1, image_tokens)
  text = header + "".join(pieces) + BEGIN_SIGNAL
  spans, start = [], len(header)
  for turn, piece in zip(turns, pieces):
    if turn.role == "gpt":
      spans.append((start, start + len(piece)))
    start += len(piece)
  spans.append((start, len(text)))  # the final stop signal
  enc = encode(tok, text)
  ids = np.asarray(enc.ids, np.int64)
  offsets = np.asarray(enc.offsets, np.int64).reshape(-1, 2)
  first = offsets[:, 0]
  in_span = np.zeros(len(ids), bool)
  for a, b in spans:
    in_span |= (a <= first) & (first < b)
  labels = np.where(in_span & (offsets[:, 1] > first), ids, IGNORE)
  index = _expand_patches(ids, patch_id, num_image_tokens)
  return ids[index], labels[index]


def _release_labels(tok, turns, num_image_tokens, patch_id, image_tokens
                    ) -> tuple[np.ndarray, np.ndarray]:
  header, pieces = training_pieces(turns, 1, image_tokens)
  compact = encode(tok, header + "".join(pieces) + BEGIN_SIGNAL).ids
  ids = np.asarray(compact, np.int64)[_expand_patches(compact, patch_id, num_image_tokens)]
  labels = ids.copy()
  extra = num_image_tokens - 1  # each piece's length as if tokenised with N patches
  lengths = [len(piece_ids) + extra * piece_ids.count(patch_id)
             for piece_ids in (encode(tok, p).ids for p in [header] + pieces)]
  cur = lengths[0]
  labels[:cur] = IGNORE
  for length, turn in zip(lengths[1:], turns):
    if turn.role == "human":
      labels[cur + 2:cur + length] = IGNORE
    cur += length
  return ids, labels


def tokenize_conversation(tok, turns: tuple[Turn, ...], *, num_image_tokens: int,
                          max_length: int, label_mode: str, record_id: str = "",
                          image_tokens: str = DEFAULT_IMAGE_TOKENS) -> TokenizedConversation:
  """Template, tokenise, mask and truncate one conversation.

  Raises BadRecordError(TEXT_TOO_LONG) when truncation would cut into the image tokens
  (the model needs all N of them); a cut after the image only sets `truncated`.
  """
  patch_id = tok.convert_tokens_to_ids(patch_token(image_tokens))
  if label_mode == "per_turn":
    ids, labels = _per_turn_labels(tok, turns, num_image_tokens, patch_id, image_tokens)
  elif label_mode == "release":
    ids, labels = _release_labels(tok, turns, num_image_tokens, patch_id, image_tokens)
  else:
    raise ValueError(f"label_mode {label_mode!r} not in ('per_turn', 'release')")
  truncated = len(ids) > max_length
  input_ids = ids[:max_length].astype(np.int32)
  image_mask = input_ids == patch_id
  if int(image_mask.sum()) != num_image_tokens:
    raise bad.BadRecordError(bad.TEXT_TOO_LONG, record_id,
                             f"{len(ids)} tokens; the image would not fit in {max_length}")
  return TokenizedConversation(input_ids, labels[:max_length].astype(np.int32),
                               image_mask, truncated)


def tokenize_alignment_text(tok, text: str, max_length: int, mode: str = "default"
                            ) -> tuple[np.ndarray, np.ndarray]:
  """Alignment text -> (ids [max_length] int32, mask [max_length] int32), right-padded.

  BOS, no EOS, cut at max_length. The mask marks the text's tokens (`default`) or, as the
  release's collator computes it, every id that is not the pad id (`release`: a pad
  token inside the text is masked too).
  """
  ids = encode(tok, text).ids[:max_length]
  out = np.full((max_length,), tok.pad_token_id, np.int32)
  out[:len(ids)] = ids
  if mode == "release":
    return out, (out != tok.pad_token_id).astype(np.int32)
  mask = np.zeros((max_length,), np.int32)
  mask[:len(ids)] = 1
  return out, mask
