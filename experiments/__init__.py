"""Experiments built on the library (not part of the `exgra_jax` package)."""
