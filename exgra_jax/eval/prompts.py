"""Inference prompts (SPEC.md section 5) and the `<image>` expansion they need.

`simple` is the release's inference conversation (LLaVA-Med `simple_conv`, sep "###"):
the prompt ends with "###" and the model writes "Assistant: ..." itself, which
`generate.clean_answer` strips. `train` is the training template opened for the
assistant's turn; `none` takes the question as the whole prompt. In `simple` the image
goes after the question (as the release's model_vqa.py does); elsewhere `<image>` is
expanded where it stands.
"""
from __future__ import annotations

SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The "
          "assistant gives helpful, detailed, and polite answers to the human's questions.")
IMAGE = "<image>"
TEMPLATES = ("simple", "train", "none")


def image_tokens(num_image_tokens: int) -> str:
  """`<im_start>` + N x `<im_patch>` + `<im_end>`."""
  return "<im_start>" + "<im_patch>" * num_image_tokens + "<im_end>"


def build_prompt(question: str, template: str, num_image_tokens: int) -> str:
  """A question (with or without `<image>`) -> the full prompt text for `template`."""
  if template not in TEMPLATES:
    raise ValueError(f"unknown template {template!r}; expected one of {TEMPLATES}")
  if question.count(IMAGE) > 1:
    raise ValueError(f"question holds {question.count(IMAGE)} {IMAGE} tokens, at most 1")
  image = image_tokens(num_image_tokens)
  if template == "none":
    return question.replace(IMAGE, image)
  if template == "simple":
    text = question.replace(IMAGE, "").strip()
    return (f"{SYSTEM}###Human: Hi!###Assistant: Hi there!  How can I help you today?\n"
            f"###Human: {text}\n{image}###")
  return f"{SYSTEM}\n\n### Human: {question.replace(IMAGE, image)}\n### Assistant:"
