"""Layers shared by the GAN models."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax


class SpectralNorm(nn.SpectralNorm):
    """``nn.SpectralNorm`` that keeps the wrapped layer's raw weights in ``params``.

    Flax's wrapper maps the layer's variables through the normalisation with a mutable map whose
    output side is the identity, so ``init`` stores W / sigma (spectral norm ~1) instead of the
    initializer's draw. PyTorch's ``spectral_norm`` keeps the raw ``weight_orig``, and that scale
    matters: Adam's steps have a fixed size, so it sets how fast the weights move (N(0, 0.02)
    kernels would start 5-15x larger; orthogonal ones are unaffected, their sigma is 1). Here the
    output side returns the variables that went in. Same state (``u``, ``sigma`` in
    ``batch_stats``) and same outputs as ``nn.SpectralNorm``.

    Mixed precision: the power iteration reads the stored float32 weights and ``u``
    (``param_dtype``), so ``u``, ``sigma`` and W / sigma are float32 whatever the wrapped layer's
    ``dtype`` is; the layer casts W / sigma to its own computation dtype. Leave this wrapper's
    ``dtype`` at None (inferred: float32), so that sigma is never computed from rounded weights.
    """

    @nn.compact
    def __call__(self, *args, update_stats: bool, **kwargs) -> jax.Array:
        seen = []  # the raw variables of the current call (the map runs twice under init)

        def normalize(variables):
            seen.append(variables)
            sn = functools.partial(self._spectral_normalize, update_stats=update_stats)
            return jax.tree_util.tree_map_with_path(sn, variables)

        def restore(variables):
            return seen[-1] if seen else variables

        return nn.map_variables(
            lambda layer: layer(*args, **kwargs),
            trans_in_fn=normalize,
            trans_out_fn=restore,
            init=self.is_initializing(),
            mutable=True,
        )(self.layer_instance)
