"""Inference prompts (docs/eval.md) built from data/'s template pieces.

`simple` is the release's inference conversation (LLaVA-Med `simple_conv`, sep "###"):
the prompt ends with "###" and the model writes "Assistant: ..." itself, which
`generate.clean_answer` strips; the image goes after the question, as the release's
model_vqa.py puts it. `train` is the training template (data/text.py) opened for the
assistant's turn; `none` takes the question as the whole prompt. Outside `simple`,
`<image>` is expanded where it stands.

`chat_prompt` is the multi-turn form (the server and the terminal chat): the same
templates with earlier turns in between, so that a one-question conversation is exactly
`build_prompt`'s prompt.
"""
from __future__ import annotations

from collections.abc import Sequence

from exgra_jax.data import text
from exgra_jax.data.records import IMAGE_TOKEN, Turn

TEMPLATES = ("simple", "train", "none")
CHAT_TEMPLATES = ("simple", "train")
_SIMPLE_GREETING = "###Human: Hi!###Assistant: Hi there!  How can I help you today?\n"


def build_prompt(question: str, template: str, num_image_tokens: int,
                 image_tokens: str = text.DEFAULT_IMAGE_TOKENS) -> str:
  """A question (with or without `<image>`) -> the full prompt text for `template`, the
  image in the model's style `image_tokens` (data/text.py)."""
  if template not in TEMPLATES:
    raise ValueError(f"unknown template {template!r}; expected one of {TEMPLATES}")
  if question.count(IMAGE_TOKEN) > 1:
    raise ValueError(f"question holds {question.count(IMAGE_TOKEN)} {IMAGE_TOKEN} tokens, "
                     "at most 1")
  if template == "none":
    return text.expand_image_token(question, num_image_tokens, image_tokens)
  if template == "simple":
    question = f"{question.replace(IMAGE_TOKEN, '').strip()}\n{IMAGE_TOKEN}"
  return chat_prompt((Turn("human", question),), template, num_image_tokens,
                     image_tokens=image_tokens)


def chat_prompt(turns: Sequence[Turn], template: str, num_image_tokens: int,
                system: str | None = None,
                image_tokens: str = text.DEFAULT_IMAGE_TOKENS) -> str:
  """A conversation (human and gpt turns alternating, ending with a human turn; `<image>`
  at most once, where the image goes) -> the prompt for the assistant's next answer.

  `system` replaces the template's system line when given.
  """
  if template not in CHAT_TEMPLATES:
    raise ValueError(f"unknown chat template {template!r}; expected one of {CHAT_TEMPLATES}")
  if not turns or turns[-1].role != "human":
    raise ValueError("a conversation must end with a human turn")
  if sum(t.value.count(IMAGE_TOKEN) for t in turns) > 1:
    raise ValueError(f"a conversation holds at most one {IMAGE_TOKEN}")
  system = text.SYSTEM if system is None else system
  if template == "simple":
    body = "".join(f"###{text.ROLE_NAMES[t.role]}: "
                   f"{text.expand_image_token(t.value, num_image_tokens, image_tokens)}"
                   for t in turns)
    return f"{system}{_SIMPLE_GREETING}{body}###"
  _, pieces = text.training_pieces(tuple(turns), num_image_tokens, image_tokens)
  return (system + "\n\n" + "".join(pieces) + text.BEGIN_SIGNAL + text.ROLE_NAMES["gpt"]
          + ":")
