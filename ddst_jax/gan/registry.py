"""One entry point for every benchmark architecture (SNGAN 32/48, BigGAN 32/64)."""

from __future__ import annotations

import dataclasses

import flax.linen as nn

from ddst_jax.gan import biggan, models

MODEL_NAMES = (*models.MODEL_NAMES, *biggan.MODEL_NAMES)
COMPUTE_DTYPES = models.COMPUTE_DTYPES  # "float32", "bfloat16"


@dataclasses.dataclass(frozen=True)
class ModelPair:
    """A generator/discriminator pair and what the train step needs to know about it.

    Attributes:
      generator: ``G(z, train)`` or, when conditional, ``G(z, y, train)``.
      discriminator: ``D(x, update_stats)`` or ``D(x, y, update_stats)``; raw scores (B,).
      num_classes: 0 for unconditional models, else the number of classes of ``y``.
      image_size: side length in pixels.
      z_dim: noise dimension.
    """

    generator: nn.Module
    discriminator: nn.Module
    num_classes: int
    image_size: int
    z_dim: int


def image_size(name: str) -> int:
    """Side length of the images of model ``name``."""
    if name in biggan.MODEL_NAMES:
        return biggan.image_size(name)
    if name in models.MODEL_NAMES:
        return models.image_size(name)
    raise ValueError(f"Unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}.")


def init_schemes(name: str) -> tuple[str, ...]:
    """The init schemes model ``name`` accepts (besides ``"reference"``, the authors' own)."""
    if name in biggan.MODEL_NAMES:
        return biggan._INIT_SCHEMES
    if name in models.MODEL_NAMES:
        return models._INIT_SCHEMES
    raise ValueError(f"Unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}.")


def build(name: str, *, z_dim: int | None = None, g_ch: int | None = None,
          d_ch: int | None = None, num_classes: int | None = None,
          compute_dtype: str = "float32", init_scheme: str | None = None) -> ModelPair:
    """Build a named architecture; ``None`` fields take the benchmark's full-size values.

    ``compute_dtype`` (one of ``COMPUTE_DTYPES``) is the activations' dtype; params, optimizer
    state and statistics stay float32 either way. ``init_scheme`` None (or ``"reference"``)
    initialises as the authors' code does for that benchmark; otherwise one of the model
    family's schemes (``models.kernel_init`` / ``biggan.weight_init``).
    """
    init = {} if init_scheme in (None, "reference") else {"init_scheme": init_scheme}
    if name in biggan.MODEL_NAMES:
        g, d = biggan.build_biggan(name, num_classes=num_classes, g_ch=g_ch, d_ch=d_ch,
                                   z_dim=z_dim, compute_dtype=compute_dtype, **init)
        return ModelPair(g, d, d.num_classes, biggan.image_size(name), g.z_dim)
    if name in models.MODEL_NAMES:
        g, d = models.build_models(name, z_dim=128 if z_dim is None else z_dim, g_ch=g_ch,
                                   d_ch=d_ch, compute_dtype=compute_dtype, **init)
        return ModelPair(g, d, 0, models.image_size(name), g.z_dim)
    raise ValueError(f"Unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}.")
