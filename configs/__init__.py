"""ml_collections config files of exgra-jax (`get_config(arg)` each); run from the repo root."""
