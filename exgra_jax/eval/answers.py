"""Answers files in the LLaVA-Med release's jsonl format, written resumably.

One line per question: `{"question_id", "prompt", "text", "answer_id", "model_id",
"metadata"}` (model_vqa.py's fields; `answer_id` is a random id there, here a stable hash
of model, question and answer so that reruns are reproducible). Questions are answered in
chunks and each finished chunk is appended at once, so an interrupted VQA or chatbot run
resumes where it stopped.

With several processes every one answers every chunk (generation is one sharded
computation) and gets the same answers; process 0 alone writes the file, so that each
answer is in it once. All must skip the same questions: they read the file (the workdir is
on a file system every process sees, as for checkpoints) and check that they agree before
process 0 appends anything.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from exgra_jax.eval.jsonl_store import JsonlStore
from exgra_jax.inference import generate

ANSWERS_FILE = "answers.jsonl"


def answer_record(question_id: str, prompt: str, text: str, model_id: str,
                  metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """One line of the answers file."""
  answer_id = hashlib.sha256(f"{model_id}\0{question_id}\0{text}".encode()).hexdigest()[:22]
  return {"question_id": question_id, "prompt": prompt, "text": text, "answer_id": answer_id,
          "model_id": model_id, "metadata": dict(metadata or {})}


def _require_same_todo(todo: Sequence[tuple[str, str]], path: str) -> None:
  """Raises unless every process has the same questions left (also a barrier: everyone has
  read the file before process 0 appends to it)."""
  if jax.process_count() == 1:
    return
  digest = np.frombuffer(hashlib.sha256("\0".join(q for q, _ in todo).encode()).digest(),
                         np.uint8)
  if not (multihost_utils.process_allgather(digest) == digest).all():
    raise RuntimeError(f"the processes see different answers in {path}: the workdir must be "
                       "on a file system that every process sees")


def answer_all(questions: Sequence[tuple[str, str]],
               answer_batch: Callable[[Sequence[tuple[str, str]]], Sequence[str]], path: str,
               model_id: str, chunk_size: int) -> list[dict[str, Any]]:
  """(question id, prompt) pairs -> answers file at `path`, skipping ids already there.

  `answer_batch` maps a list of (question id, prompt) pairs to as many answers (e.g.
  `generate.generate` behind a tokenizer and an image loader). Returns the records of all questions, in question order.
  """
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  store = JsonlStore(path, key="question_id", persist=jax.process_index() == 0)
  todo = [(str(qid), prompt) for qid, prompt in questions if str(qid) not in store]
  _require_same_todo(todo, path)
  for start in range(0, len(todo), chunk_size):
    chunk = todo[start:start + chunk_size]
    texts = answer_batch(chunk)
    if len(texts) != len(chunk):
      raise ValueError(f"answer_batch returned {len(texts)} answers for {len(chunk)} prompts")
    for (qid, prompt), text in zip(chunk, texts):
      store.add(answer_record(qid, prompt, text, model_id))
  return [store.records[str(qid)] for qid, _ in questions]


def answer_about_images(questions: Sequence[tuple[str, str]],
                        items: Mapping[str, Mapping[str, Any]],
                        load_pixels: Callable[[Mapping[str, Any]], np.ndarray],
                        model, params, tokenizer, settings: generate.GenerationSettings,
                        output_dir: str, model_id: str,
                        batch_sharding: jax.sharding.Sharding | None = None
                        ) -> list[dict[str, Any]]:
  """(question id, prompt) pairs about the image of `items[question id]` -> their records
  (`answer_all`), `settings.batch_size` prompts per `generate.answer_prompts` call,
  written resumably to `output_dir/answers.jsonl`.

  `load_pixels(item)` returns the item's CLIP-preprocessed image [S, S, 3].
  """
  def answer_batch(chunk: Sequence[tuple[str, str]]) -> list[str]:
    pixels = np.stack([load_pixels(items[qid]) for qid, _ in chunk])
    return generate.answer_prompts(model, params, tokenizer, [p for _, p in chunk], pixels,
                                   settings, batch_sharding=batch_sharding)

  os.makedirs(output_dir, exist_ok=True)
  return answer_all(questions, answer_batch, os.path.join(output_dir, ANSWERS_FILE),
                    model_id, chunk_size=settings.batch_size)
