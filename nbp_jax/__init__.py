"""nbp-jax: Next-Block Prediction (semi-autoregressive video generation) in JAX/Flax."""

__version__ = '0.1.0'
