"""exgra-jax: ExGra-Med in JAX/Flax (see README.md)."""
from exgra_jax import startup_noise

startup_noise.install()
