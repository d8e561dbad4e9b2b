"""One entry point for every benchmark architecture (SNGAN 32/48, BigGAN 32/64).

``build(name)`` returns a ``ModelPair``: the two networks plus what the rest of the library needs
to know about them, so no other module knows model names: the model's maskable predicate (the
library default, or BigGAN's, which keeps its class-conditional BatchNorm maps and classifier
head dense), example inputs for ``init`` and tracing, and per-sample layer FLOPs.

>>> pair = build("sngan32", g_ch=8, d_ch=8)
>>> pair.image_size, pair.num_classes, pair.is_maskable is None
(32, 0, True)
>>> [x.shape for x in pair.example_inputs()[1]]
[(1, 32, 32, 3)]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

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
      is_maskable: the model's maskable predicate ``(path, leaf) -> bool``; None: the library
        default (``sparsity.default_is_maskable``).
    """

    generator: nn.Module
    discriminator: nn.Module
    num_classes: int
    image_size: int
    z_dim: int
    is_maskable: Callable[..., bool] | None = None

    def example_inputs(self, batch: int = 1, *, abstract: bool = False
                       ) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        """(G's positional inputs, D's): zeros, or ``ShapeDtypeStruct``s when ``abstract``."""
        def make(shape, dtype):
            return jax.ShapeDtypeStruct(shape, dtype) if abstract else jnp.zeros(shape, dtype)

        z = make((batch, self.z_dim), jnp.float32)
        x = make((batch, self.image_size, self.image_size, 3), jnp.float32)
        if not self.num_classes:
            return (z,), (x,)
        y = make((batch,), jnp.int32)
        return (z, y), (x, y)

    def abstract_params(self) -> tuple[Any, Any]:
        """G's and D's ``params`` trees as ``ShapeDtypeStruct``s (nothing allocated)."""
        g_in, d_in = self.example_inputs(abstract=True)
        key = jax.random.key(0)
        g = jax.eval_shape(lambda *a: self.generator.init(key, *a, train=False), *g_in)
        d = jax.eval_shape(lambda *a: self.discriminator.init(key, *a, update_stats=False), *d_in)
        return g["params"], d["params"]

    def layer_flops(self) -> tuple[list[Any], list[Any]]:
        """Per-sample forward FLOPs of every counted layer of G (train mode) and D (real-size
        images), as ``metrics.flops.layer_flops`` counts them."""
        from ddst_jax.metrics import flops  # noqa: PLC0415 (metrics import no GAN code)

        g_in, d_in = self.example_inputs(abstract=True)
        return (flops.layer_flops(self.generator, *g_in, train=True),
                flops.layer_flops(self.discriminator, *d_in, update_stats=True))


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
        return ModelPair(g, d, d.num_classes, biggan.image_size(name), g.z_dim,
                         biggan.is_maskable)
    if name in models.MODEL_NAMES:
        g, d = models.build_models(name, z_dim=128 if z_dim is None else z_dim, g_ch=g_ch,
                                   d_ch=d_ch, compute_dtype=compute_dtype, **init)
        return ModelPair(g, d, 0, models.image_size(name), g.z_dim)
    raise ValueError(f"Unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}.")
