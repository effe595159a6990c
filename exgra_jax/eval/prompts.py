"""Inference prompts (SPEC.md section 5) built from data/'s template pieces.

`simple` is the release's inference conversation (LLaVA-Med `simple_conv`, sep "###"):
the prompt ends with "###" and the model writes "Assistant: ..." itself, which
`generate.clean_answer` strips; the image goes after the question, as the release's
model_vqa.py puts it. `train` is the training template (data/text.py) opened for the
assistant's turn; `none` takes the question as the whole prompt. Outside `simple`,
`<image>` is expanded where it stands.
"""
from __future__ import annotations

from exgra_jax.data import text
from exgra_jax.data.records import IMAGE_TOKEN, Turn

TEMPLATES = ("simple", "train", "none")


def build_prompt(question: str, template: str, num_image_tokens: int) -> str:
  """A question (with or without `<image>`) -> the full prompt text for `template`."""
  if template not in TEMPLATES:
    raise ValueError(f"unknown template {template!r}; expected one of {TEMPLATES}")
  if question.count(IMAGE_TOKEN) > 1:
    raise ValueError(f"question holds {question.count(IMAGE_TOKEN)} {IMAGE_TOKEN} tokens, "
                     "at most 1")
  if template == "none":
    return text.expand_image_token(question, num_image_tokens)
  if template == "simple":
    bare = question.replace(IMAGE_TOKEN, "").strip()
    return (f"{text.SYSTEM}###Human: Hi!###Assistant: Hi there!  How can I help you today?\n"
            f"###Human: {bare}\n{text.image_placeholder(num_image_tokens)}###")
  header, pieces = text.training_pieces((Turn("human", question),), num_image_tokens)
  return header + pieces[0] + text.BEGIN_SIGNAL + text.ROLE_NAMES["gpt"] + ":"
