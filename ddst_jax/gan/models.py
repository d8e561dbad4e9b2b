"""ResNet SNGAN generator and discriminator (Miyato et al., 2018) in Flax, layout NHWC.

One generic implementation, parameterised by channel lists, covers both SNGAN benchmarks of the
paper: ``sngan32`` (CIFAR-10, 32x32) and ``sngan48`` (STL-10, 48x48). ``build_models`` returns
them at full size or at any width (tests use tiny ones), by default exactly as the authors' code
builds them (initialisation, pooling and head bias per model; see ``build_models``).

Variables:
  * ``params``: every convolution and dense weight is a leaf named ``kernel`` (the project's
    default maskable predicate selects exactly these), biases ``bias``, BatchNorm ``scale`` and
    ``bias``.
  * ``batch_stats``: BatchNorm running ``mean``/``var`` of G (``var`` updated with the unbiased
    batch variance, as PyTorch does; ``layers.BatchNorm``), and the spectral-norm power-iteration
    state of D (``u`` and ``sigma``, one pair per kernel, kept there by
    ``layers.SpectralNorm``, which keeps the raw initial weights in ``params`` as PyTorch does).

Masks are applied to ``params`` before ``apply``; spectral norm then normalises the masked kernel.

Mixed precision: ``dtype`` (default float32) is the computation dtype of every convolution,
dense and BatchNorm layer and so of the activations between them; parameters, BatchNorm running
statistics and the spectral-norm ``u``/``sigma`` stay float32 whatever ``dtype`` is (Flax casts
the float32 params to ``dtype`` inside each layer, so their gradients come back float32). Images
out of G and scores out of D are float32, and D's global pooling and head run in float32, so
losses and the balance ratio never see bfloat16 rounding beyond the activations'.

Typical use::

    G, D = build_models("sngan32")
    g_vars = G.init(key_g, jnp.zeros((1, G.z_dim)), train=False)
    d_vars = D.init(key_d, jnp.zeros((1, 32, 32, 3)))
    fake, g_upd = G.apply(g_vars, z, train=True, mutable=["batch_stats"])
    scores, d_upd = D.apply(d_vars, fake, mutable=["batch_stats"])   # power iteration step
    scores = D.apply(d_vars, fake, update_stats=False)                 # no state change
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype

from ddst_jax.gan import conv
from ddst_jax.gan.layers import BatchNorm, SpectralNorm

InitScheme = Literal["torch", "kaiming", "xavier"]
PoolMode = Literal["sum", "mean"]

_INIT_SCHEMES = ("torch", "kaiming", "xavier")
_POOL_MODES = ("sum", "mean")
# PyTorch BatchNorm2d defaults (momentum 0.1 on the new batch statistic, eps 1e-5).
_BN_MOMENTUM = 0.9
_BN_EPSILON = 1e-5
#: Names of the computation dtypes the models support (``config.model.compute_dtype``).
COMPUTE_DTYPES: tuple[str, ...] = ("float32", "bfloat16")


def compute_dtype_of(dtype: str | Dtype) -> type:
    """``jnp.float32`` or ``jnp.bfloat16`` from a name in ``COMPUTE_DTYPES`` or a dtype.

    Other dtypes are refused: float16 would need loss scaling, float64 is not a speed option.
    """
    try:
        name = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
    except TypeError:
        name = None
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"Unknown compute dtype {dtype!r}; use one of {COMPUTE_DTYPES}.")
    return getattr(jnp, name)



def kernel_init(scheme: InitScheme, *, residual: bool) -> jax.nn.initializers.Initializer:
    """Kernel initializer of a convolution or dense layer.

    Args:
      scheme: ``"torch"``: PyTorch's default ``reset_parameters`` (kaiming-uniform with
        a = sqrt(5)), U(-1/sqrt(fan_in), 1/sqrt(fan_in)); what the paper's CIFAR-10 model
        (the authors' ``lottery`` SNGAN, which sets no init of its own) trains with.
        ``"kaiming"``: He normal, fan-in, gain sqrt(2), untruncated; what the authors'
        ``resnet.*`` models (their STL-10 model ``resnet.48``) set for every layer.
        ``"xavier"``: the SNGAN convention (Chainer SNGAN, Mimicry): Glorot uniform with gain
        sqrt(2) for the 3x3 convolutions inside residual branches and gain 1 elsewhere.
      residual: whether the layer sits on a residual branch (only matters for ``"xavier"``).

    Returns:
      A Flax initializer of kernels in Flax layout (fan_in = kh * kw * C_in, or the dense
      input size). Biases: see ``bias_init``.
    """
    if scheme == "torch":
        return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
    if scheme == "kaiming":
        return nn.initializers.variance_scaling(2.0, "fan_in", "normal")
    if scheme == "xavier":
        gain = math.sqrt(2.0) if residual else 1.0
        return nn.initializers.variance_scaling(gain**2, "fan_avg", "uniform")
    raise ValueError(f"Unknown init scheme {scheme!r}; use one of {_INIT_SCHEMES}.")


def bias_init(scheme: InitScheme, fan_in: int) -> jax.nn.initializers.Initializer:
    """Bias initializer: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) under ``"torch"`` (PyTorch's
    default, nonzero), zeros under ``"kaiming"`` and ``"xavier"`` (the reference code zeroes
    them explicitly). ``fan_in`` is the layer's (kh * kw * C_in, or the dense input size)."""
    if scheme == "torch":
        bound = 1.0 / math.sqrt(fan_in)
        return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
            key, shape, dtype, -bound, bound)
    return nn.initializers.zeros


def upsample_nearest(x: jax.Array) -> jax.Array:
    """Nearest-neighbour x2 upsampling: (B, H, W, C) -> (B, 2H, 2W, C)."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def avg_pool2(x: jax.Array) -> jax.Array:
    """2x2 average pooling, stride 2, odd sizes floored (as torch AvgPool2d(2)): (B, H, W, C)."""
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


def _conv(features: int, size: int, scheme: InitScheme, *, in_features: int, residual: bool,
          name: str, dtype: Dtype = jnp.float32) -> nn.Conv:
    """A size x size, stride-1, SAME-padded convolution with bias and the scheme's init.

    ``in_features`` (the input's channels) sets the bias init's fan-in.
    ``conv.conv_general_dilated`` computes the same convolution with GEMM gradients on CPU.
    ``dtype`` is the computation dtype; the kernel and bias are stored float32.
    """
    return nn.Conv(
        features, (size, size), kernel_init=kernel_init(scheme, residual=residual),
        bias_init=bias_init(scheme, size * size * in_features), name=name,
        conv_general_dilated=conv.conv_general_dilated, dtype=dtype,
    )


def _spectral_norm(layer: nn.Module, x: jax.Array, update_stats: bool) -> jax.Array:
    """Applies ``layer`` with its kernel divided by its largest singular value.

    The kernel is read as a (-1, out) matrix; ``u`` and ``sigma`` live in ``batch_stats`` under a
    wrapper named ``<layer name>_sn``. With ``update_stats=False`` the same power iteration runs
    (same output) but nothing is written, so the call needs no mutable collection. The power
    iteration runs in float32 on the float32 kernel whatever ``layer.dtype`` is (see
    ``layers.SpectralNorm``); the layer then casts the normalised kernel to its own dtype.
    """
    return SpectralNorm(layer, name=f"{layer.name}_sn")(x, update_stats=update_stats)


def _check_init(scheme: str) -> None:
    if scheme not in _INIT_SCHEMES:
        raise ValueError(f"Unknown init scheme {scheme!r}; use one of {_INIT_SCHEMES}.")


def _check_channels(what: str, channels: Sequence[int], min_len: int) -> None:
    if len(channels) < min_len or any(int(c) != c or c < 1 for c in channels):
        raise ValueError(
            f"{what} must be a sequence of at least {min_len} positive ints, got {channels!r}."
        )


# --------------------------------------------------------------------------------------------
# Generator
# --------------------------------------------------------------------------------------------


class GBlock(nn.Module):
    """Up-sampling residual block of the SNGAN generator: (B, H, W, C_in) -> (B, 2H, 2W, C_out).

    Residual: BN, ReLU, nearest x2, 3x3 conv, BN, ReLU, 3x3 conv. Shortcut: nearest x2, 1x1 conv
    (always learnable, with bias, as in the reference). Hidden width = output width.
    """

    features: int
    init_scheme: InitScheme = "torch"
    dtype: Dtype = jnp.float32  # computation dtype (params stay float32)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        bn = functools.partial(
            BatchNorm,
            use_running_average=not train,
            momentum=_BN_MOMENTUM,
            epsilon=_BN_EPSILON,
            dtype=self.dtype,
        )
        conv = functools.partial(_conv, self.features, scheme=self.init_scheme, dtype=self.dtype)
        c_in = x.shape[-1]
        h = upsample_nearest(nn.relu(bn(name="bn1")(x)))
        h = conv(3, in_features=c_in, residual=True, name="conv1")(h)
        h = nn.relu(bn(name="bn2")(h))
        h = conv(3, in_features=self.features, residual=True, name="conv2")(h)
        shortcut = conv(1, in_features=c_in, residual=False, name="shortcut")
        return h + shortcut(upsample_nearest(x))


class Generator(nn.Module):
    """ResNet SNGAN generator: z (B, z_dim) -> images (B, S, S, 3) in [-1, 1].

    Dense z -> (bottom_width, bottom_width, channels[0]), one ``GBlock`` per further entry of
    ``channels`` (each doubles the resolution), then BN, ReLU, 3x3 conv to 3 channels, tanh.
    S = bottom_width * 2 ** (len(channels) - 1).

    Attributes:
      channels: width at the bottom, then the output width of each up-block.
      bottom_width: spatial size after the input dense layer.
      z_dim: noise dimension (checked against the input).
      init_scheme: kernel init scheme, see ``kernel_init``.
      dtype: computation dtype of the layers (float32 or bfloat16); params, BN statistics and
        the output images are float32.
    """

    channels: Sequence[int]
    bottom_width: int = 4
    z_dim: int = 128
    init_scheme: InitScheme = "torch"
    dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        _check_channels("Generator.channels", self.channels, min_len=1)
        _check_init(self.init_scheme)
        super().__post_init__()

    @property
    def image_size(self) -> int:
        """Side length S of the generated images, in pixels."""
        return self.bottom_width * 2 ** (len(self.channels) - 1)

    @nn.compact
    def __call__(self, z: jax.Array, train: bool) -> jax.Array:
        """Generates images.

        Args:
          z: noise, (B, z_dim).
          train: BatchNorm uses batch statistics and updates the running ones (call ``apply``
            with ``mutable=["batch_stats"]``) when True; uses the running ones when False.

        Returns:
          (B, S, S, 3) float32 images in [-1, 1].
        """
        if z.ndim != 2 or z.shape[-1] != self.z_dim:
            raise ValueError(
                f"Generator expects noise of shape (batch, {self.z_dim}), got {z.shape}; "
                f"sample z with shape (batch, z_dim) or build the model with z_dim={z.shape[-1]}."
            )
        width, c0 = self.bottom_width, self.channels[0]
        h = nn.Dense(
            width * width * c0,
            kernel_init=kernel_init(self.init_scheme, residual=False),
            bias_init=bias_init(self.init_scheme, self.z_dim),
            name="dense",
            dtype=self.dtype,
        )(z)
        h = h.reshape(z.shape[0], width, width, c0)
        for i, features in enumerate(self.channels[1:], start=1):
            h = GBlock(features, init_scheme=self.init_scheme, dtype=self.dtype,
                       name=f"block{i}")(h, train)
        h = BatchNorm(
            use_running_average=not train,
            momentum=_BN_MOMENTUM,
            epsilon=_BN_EPSILON,
            name="bn_out",
            dtype=self.dtype,
        )(h)
        h = _conv(3, 3, self.init_scheme, in_features=h.shape[-1], residual=False,
                  name="conv_out", dtype=self.dtype)(nn.relu(h))
        # float32 out (a no-op under float32): losses, BR and FID never see bfloat16 pixels.
        return jnp.tanh(h.astype(jnp.float32))


# --------------------------------------------------------------------------------------------
# Discriminator
# --------------------------------------------------------------------------------------------


class OptimizedDBlock(nn.Module):
    """First D block, always down-sampling: (B, H, W, C_in) -> (B, H//2, W//2, C_out).

    Residual: SN 3x3 conv, ReLU, SN 3x3 conv, avg-pool. Shortcut: avg-pool, SN 1x1 conv. No
    pre-activation (the input is the image).
    """

    features: int
    init_scheme: InitScheme = "torch"
    dtype: Dtype = jnp.float32  # computation dtype (params stay float32)

    @nn.compact
    def __call__(self, x: jax.Array, update_stats: bool) -> jax.Array:
        conv = functools.partial(_conv, self.features, scheme=self.init_scheme, dtype=self.dtype)
        c_in, c_out = x.shape[-1], self.features
        h = _spectral_norm(conv(3, in_features=c_in, residual=True, name="conv1"), x,
                           update_stats)
        h = _spectral_norm(conv(3, in_features=c_out, residual=True, name="conv2"), nn.relu(h),
                           update_stats)
        shortcut = _spectral_norm(
            conv(1, in_features=c_in, residual=False, name="shortcut"), avg_pool2(x), update_stats
        )
        return avg_pool2(h) + shortcut


class DBlock(nn.Module):
    """Pre-activation D block: (B, H, W, C_in) -> (B, H', W', C_out), H' = H//2 if downsample.

    Residual: ReLU, SN 3x3 conv (C_in -> C_out), ReLU, SN 3x3 conv, [avg-pool]. Shortcut: SN 1x1
    conv then [avg-pool] when the shape changes, identity otherwise.
    """

    features: int
    downsample: bool
    init_scheme: InitScheme = "torch"
    dtype: Dtype = jnp.float32  # computation dtype (params stay float32)

    @nn.compact
    def __call__(self, x: jax.Array, update_stats: bool) -> jax.Array:
        conv = functools.partial(_conv, self.features, scheme=self.init_scheme, dtype=self.dtype)
        c_in, c_out = x.shape[-1], self.features
        h = _spectral_norm(conv(3, in_features=c_in, residual=True, name="conv1"), nn.relu(x),
                           update_stats)
        h = _spectral_norm(conv(3, in_features=c_out, residual=True, name="conv2"), nn.relu(h),
                           update_stats)
        shortcut = x
        if self.downsample or c_in != c_out:
            shortcut = _spectral_norm(conv(1, in_features=c_in, residual=False, name="shortcut"),
                                      x, update_stats)
        if self.downsample:
            h, shortcut = avg_pool2(h), avg_pool2(shortcut)
        return h + shortcut


class Discriminator(nn.Module):
    """ResNet SNGAN discriminator with spectral norm on every conv and dense: images -> scores.

    ``OptimizedDBlock(channels[0])``, then ``DBlock(channels[i], downsample[i])``, ReLU, global
    pooling over space, dense to one raw score (no sigmoid).

    Attributes:
      channels: output width of each block.
      downsample: per block, whether it halves the resolution; the first (optimized) block always
        does, so ``downsample[0]`` must be True.
      pool: ``"sum"`` (SNGAN, the authors' ``lottery`` CIFAR-10 model) or ``"mean"`` (their
        ``resnet.*`` models) over H, W.
      head_bias: whether the final dense layer has a bias.
      init_scheme: kernel init scheme, see ``kernel_init``.
      dtype: computation dtype of the blocks (float32 or bfloat16); the pooling and the head
        run in float32 (a (B, C) x (C, 1) product, negligible cost) and scores are float32.
    """

    channels: Sequence[int]
    downsample: Sequence[bool]
    pool: PoolMode = "sum"
    head_bias: bool = False
    init_scheme: InitScheme = "torch"
    dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        _check_channels("Discriminator.channels", self.channels, min_len=1)
        if len(self.downsample) != len(self.channels) or not self.downsample[0]:
            raise ValueError(
                "Discriminator.downsample needs one bool per block with downsample[0] True (the "
                f"optimized first block always halves the resolution), got {self.downsample!r} "
                f"for {len(self.channels)} blocks."
            )
        if self.pool not in _POOL_MODES:
            raise ValueError(f"Unknown pool {self.pool!r}; use one of {_POOL_MODES}.")
        _check_init(self.init_scheme)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, update_stats: bool = True) -> jax.Array:
        """Scores images.

        Args:
          x: images (B, H, W, C), values in [-1, 1].
          update_stats: True: one power-iteration step per kernel, written to ``batch_stats``
            (call ``apply`` with ``mutable=["batch_stats"]``). False: the same computation and
            output, nothing written (side-effect free, e.g. for the balance-ratio forwards).

        Returns:
          (B,) float32 raw scores.
        """
        if x.ndim != 4:
            raise ValueError(
                f"Discriminator expects NHWC images (batch, height, width, channels), got shape "
                f"{x.shape}; add the missing axes (a single image needs a batch axis of 1)."
            )
        scheme = self.init_scheme
        h = OptimizedDBlock(self.channels[0], init_scheme=scheme, dtype=self.dtype,
                            name="block1")(x, update_stats)
        for i in range(1, len(self.channels)):
            block = DBlock(
                self.channels[i], self.downsample[i], init_scheme=scheme, dtype=self.dtype,
                name=f"block{i + 1}",
            )
            h = block(h, update_stats)
        # Pool and score in float32 (no-ops under float32): a bfloat16 sum over H*W positions
        # and bfloat16-rounded scores would feed their rounding straight into losses and BR.
        h = nn.relu(h).astype(jnp.float32)
        h = jnp.sum(h, axis=(1, 2)) if self.pool == "sum" else jnp.mean(h, axis=(1, 2))
        head = nn.Dense(
            1,
            use_bias=self.head_bias,
            kernel_init=kernel_init(scheme, residual=False),
            bias_init=bias_init(scheme, h.shape[-1]),
            name="head",
            dtype=jnp.float32,
        )
        return _spectral_norm(head, h, update_stats)[:, 0]


# --------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Architecture:
    """Layout of one named model; widths are functions of the base widths g_ch / d_ch."""

    image_size: int
    bottom_width: int
    g_ch: int  # default generator base width
    d_ch: int  # default discriminator base width
    g_channels: Callable[[int], tuple[int, ...]]
    d_channels: Callable[[int], tuple[int, ...]]
    d_downsample: tuple[bool, ...]
    g_divisor: int  # g_ch must be a multiple of this (widths are halved down the network)
    d_divisor: int
    # What the authors' code for this benchmark uses (the defaults of ``build_models``).
    init_scheme: InitScheme
    d_pool: PoolMode
    d_head_bias: bool


_ARCHITECTURES: dict[str, _Architecture] = {
    # CIFAR-10 SNGAN: G 256 ch everywhere (4 -> 8 -> 16 -> 32), D 128 ch (32 -> 16 -> 8 -> 8 -> 8).
    # The authors' `lottery` SNGAN: PyTorch's default init (nonzero biases), sum pool, no head
    # bias.
    "sngan32": _Architecture(
        image_size=32,
        bottom_width=4,
        g_ch=256,
        d_ch=128,
        g_channels=lambda c: (c, c, c, c),
        d_channels=lambda c: (c, c, c, c),
        d_downsample=(True, True, False, False),
        g_divisor=1,
        d_divisor=1,
        init_scheme="torch",
        d_pool="sum",
        d_head_bias=False,
    ),
    # STL-10 SNGAN as in the authors' code: G 512 -> 256 -> 128 -> 64 (6 -> 12 -> 24 -> 48);
    # D 64 -> 128 -> 256 -> 512 -> 1024, all five blocks down-sample (48 -> 24 -> ... -> 3 -> 1).
    # Their `resnet.48`: He-normal init with zero biases everywhere, mean pool, head bias.
    "sngan48": _Architecture(
        image_size=48,
        bottom_width=6,
        g_ch=512,
        d_ch=1024,
        g_channels=lambda c: (c, c // 2, c // 4, c // 8),
        d_channels=lambda c: (c // 16, c // 8, c // 4, c // 2, c),
        d_downsample=(True, True, True, True, True),
        g_divisor=8,
        d_divisor=16,
        init_scheme="kaiming",
        d_pool="mean",
        d_head_bias=True,
    ),
}

MODEL_NAMES: tuple[str, ...] = tuple(_ARCHITECTURES)


def _architecture(name: str) -> _Architecture:
    try:
        return _ARCHITECTURES[name]
    except KeyError:
        raise ValueError(
            f"Unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}."
        ) from None


def _base_width(what: str, name: str, value: int | None, default: int, divisor: int) -> int:
    width = default if value is None else value
    if int(width) != width or width < divisor or width % divisor:
        rule = "a positive int" if divisor == 1 else f"a positive multiple of {divisor}"
        raise ValueError(
            f"{what}={value!r} is invalid for {name!r}: it must be {rule} (full size: {default})."
        )
    return int(width)


def image_size(name: str) -> int:
    """Side length in pixels of the images model ``name`` generates and scores (32 or 48)."""
    return _architecture(name).image_size


def build_models(
    name: str,
    *,
    z_dim: int = 128,
    g_ch: int | None = None,
    d_ch: int | None = None,
    init_scheme: InitScheme | None = None,
    d_pool: PoolMode | None = None,
    d_head_bias: bool | None = None,
    compute_dtype: Dtype = jnp.float32,
) -> tuple[Generator, Discriminator]:
    """Builds the generator and discriminator of a named benchmark architecture.

    With the defaults, each model is the one the authors' code trains for that benchmark:
    ``sngan32`` is their ``lottery`` SNGAN (PyTorch default init, sum pool, no head bias),
    ``sngan48`` their ``resnet.48`` (He-normal init, zero biases, mean pool, head bias).

    Args:
      name: ``"sngan32"`` (CIFAR-10) or ``"sngan48"`` (STL-10).
      z_dim: noise dimension.
      g_ch: generator base width (``sngan32``: every layer, default 256; ``sngan48``: the widest
        layer, halved per block, default 512). None: full size.
      d_ch: discriminator base width (``sngan32``: every block, default 128; ``sngan48``: the
        widest (last) block, d_ch/16 at the first, default 1024). None: full size.
      init_scheme: init scheme of both networks, see ``kernel_init``; None: the reference's.
      d_pool: D's global pooling, ``"sum"`` or ``"mean"``; None: the reference's.
      d_head_bias: whether D's final dense layer has a bias; None: the reference's.
      compute_dtype: computation dtype of both networks (``jnp.float32`` or ``jnp.bfloat16``,
        or their names); params and statistics stay float32, see the module docstring.

    Returns:
      ``(generator, discriminator)`` Flax modules (unbound; call ``init``/``apply``).
    """
    arch = _architecture(name)
    g_ch = _base_width("g_ch", name, g_ch, arch.g_ch, arch.g_divisor)
    d_ch = _base_width("d_ch", name, d_ch, arch.d_ch, arch.d_divisor)
    dtype = compute_dtype_of(compute_dtype)
    init_scheme = arch.init_scheme if init_scheme is None else init_scheme
    d_pool = arch.d_pool if d_pool is None else d_pool
    d_head_bias = arch.d_head_bias if d_head_bias is None else d_head_bias
    generator = Generator(
        channels=arch.g_channels(g_ch),
        bottom_width=arch.bottom_width,
        z_dim=z_dim,
        init_scheme=init_scheme,
        dtype=dtype,
    )
    discriminator = Discriminator(
        channels=arch.d_channels(d_ch),
        downsample=arch.d_downsample,
        pool=d_pool,
        head_bias=d_head_bias,
        init_scheme=init_scheme,
        dtype=dtype,
    )
    return generator, discriminator
