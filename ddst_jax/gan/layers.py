"""Layers shared by the GAN models."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp


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


class BatchNorm(nn.BatchNorm):
    """``nn.BatchNorm`` over every axis but the last, with PyTorch's ``BatchNorm2d`` statistics.

    Normalisation is the same as Flax's (biased batch variance, two-pass, in float32). The one
    difference is the running variance: PyTorch updates it with the *unbiased* batch variance
    (``n / (n - 1)`` times the biased one, n = B*H*W values per channel), Flax with the biased
    one. Only eval-mode outputs (``use_running_average=True``) see the difference; at the
    paper's batch 64 on a 4x4 map it is a factor 1.001. ``unbiased_running_var=False`` gives
    Flax's convention. Variables, names and FLOP counting are those of ``nn.BatchNorm``
    (``params``: ``scale``/``bias``; ``batch_stats``: ``mean``/``var``); ``momentum`` is Flax's
    decay (0.9 = PyTorch's momentum 0.1). Cross-device statistics come from the global view of
    a sharded batch under ``jit`` (``axis_name`` is not supported).
    """

    unbiased_running_var: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool | None = None,
                 *, mask: jax.Array | None = None) -> jax.Array:
        if self.axis != -1 or self.axis_name is not None or mask is not None:
            raise NotImplementedError("layers.BatchNorm normalises the last axis only, without "
                                      "axis_name or mask; use flax.linen.BatchNorm for those.")
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average)
        features = x.shape[-1]
        reduce_axes = tuple(range(x.ndim - 1))
        ra_mean = self.variable("batch_stats", "mean",
                                lambda s: jnp.zeros(s, jnp.float32), (features,))
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32),
                               (features,))
        xf = x.astype(jnp.float32)
        if use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            mean = jnp.mean(xf, reduce_axes)
            var = jnp.mean(jnp.square(xf - mean), reduce_axes)
            if not self.is_initializing():
                n = x.size // features
                running = var * (n / max(n - 1, 1)) if self.unbiased_running_var else var
                ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * mean
                ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * running
        y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
        if self.use_scale:
            y = y * self.param("scale", self.scale_init, (features,), self.param_dtype)
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (features,), self.param_dtype)
        return y.astype(self.dtype or x.dtype)
