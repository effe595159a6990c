"""One image + one question -> one answer: the body of `python -m exgra_jax.predict`.

Kept apart from the command line so that it works on any loaded model (our checkpoint or
an imported HF directory): the image file is decoded by data/ (JPEG, PNG, 16-bit,
DICOM), CLIP-preprocessed, the question wrapped in the chosen template, and the answer
decoded greedily with the stop string and clean-up of `generate`.
"""
from __future__ import annotations

import numpy as np

from exgra_jax.data import images
from exgra_jax.data.records import IMAGE_TOKEN
from exgra_jax.eval import generate, prompts
from exgra_jax.models.config import num_image_tokens
from exgra_jax.models.llava import LlavaModel


def load_pixels(path: str, image_size: int) -> np.ndarray:
  """An image file (any format data/ decodes, DICOM included) -> [S, S, 3] float32."""
  with open(path, "rb") as f:
    return images.clip_preprocess(images.decode_image(f.read()), image_size)


def answer_question(model: LlavaModel, params, tokenizer, image_path: str, question: str, *,
                    template: str, max_new_tokens: int, stop: str = "###",
                    temperature: float = 0.0) -> str:
  """The model's cleaned answer; `<image>` is added to the question when missing."""
  if IMAGE_TOKEN not in question:
    question = f"{question}\n{IMAGE_TOKEN}"
  prompt = prompts.build_prompt(question, template, num_image_tokens(model.cfg))
  settings = generate.GenerationSettings(batch_size=1,
                                         length_buckets=(len(tokenizer(prompt).input_ids),),
                                         max_new_tokens=max_new_tokens,
                                         temperature=temperature, stop=stop)
  pixels = load_pixels(image_path, model.cfg.vision.image_size)[None]
  (answer,) = generate.answer_prompts(model, params, tokenizer, [prompt], pixels, settings)
  return answer
