"""Visual-chatbot evaluation with an LLM judge, the LLaVA-Med rating protocol (docs/eval.md).

For each question the judge sees the figure context, the question, the reference answer
as "Assistant 1" and the model's answer as "Assistant 2", and must put the two 1-10 scores
(helpfulness, relevance, accuracy, level of detail) on its first line. The relative score
of a group of questions is mean(model score) / mean(reference score) x 100, the ratio of
means that LLaVA's `summarize_gpt_review.py` prints (so numbers compare with published
ones), reported per question type, per domain and overall.

Questions: `{"question_id", "text", "type", "domain", "fig_caption"?}` where `domain` is
one of chest_xray, mri, histology, gross, ct_scan, or the release's dict of booleans.
Answers (reference and model): the release's answers jsonl (`question_id`, `text`).
Reviews are appended to a jsonl as each is finished; a rerun skips reviewed questions.
"""
from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from typing import Any

from exgra_jax.llm_clients.chat_client import ChatClient, ChatError
from exgra_jax.eval.jsonl_store import JsonlStore

DOMAINS = ("chest_xray", "mri", "histology", "gross", "ct_scan")
SYSTEM_PROMPT = "You are a helpful and precise assistant for checking the quality of the answer."
RULE = ("We would like to request your feedback on the performance of two AI assistants in "
        "response to the user question displayed above. The user asks the question on "
        "observing an image. For your reference, the visual content in the image is "
        "represented with the caption describing the same image.\nPlease rate the "
        "helpfulness, relevance, accuracy, level of details of their responses. Each "
        "assistant receives an overall score on a scale of 1 to 10, where a higher score "
        "indicates better overall performance.\nPlease first output a single line "
        "containing only two values indicating the scores for Assistant 1 and 2, "
        "respectively. The two scores are separated by a space.\nIn the subsequent line, "
        "please provide a comprehensive explanation of your evaluation, avoiding any "
        "potential bias and ensuring that the order in which the responses were presented "
        "does not affect your judgment.")


def question_domain(question: Mapping[str, Any]) -> str:
  """The single domain of a question (string, or the release's dict of booleans)."""
  domain = question.get("domain")
  if isinstance(domain, Mapping):
    domain = next((name for name, flag in domain.items() if flag), None)
  if domain not in DOMAINS:
    raise ValueError(f"question {question.get('question_id')!r}: domain must be one of "
                     f"{DOMAINS}, got {question.get('domain')!r}")
  return domain


def review_prompt(question: Mapping[str, Any], reference: str, answer: str) -> str:
  """The user message the judge receives."""
  context = question.get("fig_caption") or question.get("caption") or ""
  return (f"[Context]\n{context}\n\n[Question]\n{question['text']}\n\n"
          f"[Assistant 1]\n{reference}\n\n[End of Assistant 1]\n\n"
          f"[Assistant 2]\n{answer}\n\n[End of Assistant 2]\n\n[System]\n{RULE}\n\n")


def parse_scores(review: str) -> tuple[float, float]:
  """The two scores on the review's first line ("8 7" or "8, 7"); ValueError otherwise."""
  first_line = review.strip().split("\n", 1)[0] if review.strip() else ""
  parts = first_line.replace(",", " ").split()
  try:
    if len(parts) != 2:
      raise ValueError
    scores = float(parts[0]), float(parts[1])
  except ValueError:
    raise ValueError(f"judge's first line is not two scores: {first_line!r}") from None
  return scores


def review_all(questions: Sequence[Mapping[str, Any]], references: Mapping[str, str],
               answers: Mapping[str, str], client: ChatClient, reviews_path: str, *,
               parse_attempts: int = 3) -> dict[str, Any]:
  """Reviews every question not yet in `reviews_path`, then summarises all reviews.

  A reply whose first line does not parse is asked again (up to `parse_attempts`); a
  question that still fails is listed under `failed` and left out of the scores, so a
  rerun tries it again.
  """
  store = JsonlStore(reviews_path, key="question_id")
  failed = []
  for question in questions:
    qid = str(question["question_id"])
    if qid in store:
      continue
    if qid not in references or qid not in answers:
      raise ValueError(f"question {qid!r} lacks a reference or a model answer")
    domain = question_domain(question)
    messages = [{"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": review_prompt(question, references[qid],
                                                          answers[qid])}]
    error = ""
    for _ in range(parse_attempts):
      try:
        content = client.complete(messages)
        scores = parse_scores(content)
      except (ChatError, ValueError) as e:
        error = str(e)
        continue
      store.add({"question_id": qid, "type": question.get("type", "all"),
                 "domain": domain, "content": content,
                 "scores": list(scores)})
      break
    else:
      failed.append({"question_id": qid, "error": error})
  summary = summarize(store.records.values())
  summary["failed"] = failed
  return summary


def summarize(reviews) -> dict[str, Any]:
  """Reviews -> {group: {relative_score, reference_mean, model_mean, count}}."""
  groups: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
  for review in reviews:
    scores = tuple(review["scores"])
    for group in ("overall", f"type/{review['type']}", f"domain/{review['domain']}"):
      groups[group].append(scores)
  result = {}
  for group, scores in sorted(groups.items()):
    reference_mean = sum(s[0] for s in scores) / len(scores)
    model_mean = sum(s[1] for s in scores) / len(scores)
    relative = 100 * model_mean / reference_mean if reference_mean else None
    result[group] = {"relative_score": relative, "reference_mean": reference_mean,
                     "model_mean": model_mean, "count": len(scores)}
  return result
