"""ddst_jax: balanced dynamic sparse training of GANs in JAX."""

__version__ = "0.1.0"
