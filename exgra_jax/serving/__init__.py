"""Serving: the OpenAI-compatible HTTP server (`python -m exgra_jax.serve`), its dynamic
batching over the KV-cache generation of eval/, and the terminal chat
(`python -m exgra_jax.chat`). Sits above eval/, beside predict.py (docs/serve.md)."""
