"""Hinge GAN losses (Lim & Ye, 2017; Miyato et al., 2018) as pure functions of raw D scores.

Scores are the discriminator's raw outputs (no sigmoid), shape (B,) as returned by
``Discriminator``; any shape works, every entry counts once in the mean.
"""

import jax
import jax.numpy as jnp


def d_hinge_loss(d_real: jax.Array, d_fake: jax.Array) -> jax.Array:
    """Discriminator hinge loss: mean(relu(1 - d_real)) + mean(relu(1 + d_fake)).

    Args:
      d_real: raw D scores of real images, (B_real,).
      d_fake: raw D scores of generated images, (B_fake,); the two batches may differ in size.

    Returns:
      Scalar loss (each term averaged over its own batch).
    """
    return jnp.mean(jax.nn.relu(1.0 - d_real)) + jnp.mean(jax.nn.relu(1.0 + d_fake))


def g_hinge_loss(d_fake: jax.Array) -> jax.Array:
    """Generator hinge loss: -mean(d_fake).

    Args:
      d_fake: raw D scores of generated images, (B,).

    Returns:
      Scalar loss.
    """
    return -jnp.mean(d_fake)
