"""Clients of outside LLM endpoints (an OpenAI-compatible chat API).

`chat_client.py` (the HTTP client), `caption_extension.py` (data preparation: the extended
captions of stage 2) and `judge.py` (the GPT-4-style review of free-text answers). Nothing
in training or evaluation needs them; the commands are in docs/eval.md.
"""
