"""Class-conditional BigGAN generators and projection discriminators (Brock et al., 2019), NHWC.

One generic implementation covers both BigGAN benchmarks of the paper (docs/method.md section
7). With default arguments, ``build_biggan`` gives the models that the authors' code (ADAPT)
builds for ``--model biggan.32`` and ``--model biggan.64``, layer for layer, including
initialisation:

  * ``biggan32`` (CIFAR-10, 10 classes): ADAPT's ``Generator32`` / ``Discriminator32``
    (``sparselearning/backbones/biggan.py``, BigGAN-PyTorch's CIFAR layout, ch 64 x 4). G: z (128)
    -> SN dense 4x4x256 -> 3 up-blocks of 256 channels whose conditional BatchNorm gains and
    offsets are per-class tables (no SN) -> BN, ReLU, SN 3x3 conv, tanh. D: 256-channel blocks
    (optimized down, down, no-down, no-down: 32 -> 16 -> 8 -> 8 -> 8; the last two with identity
    shortcuts), ReLU, global sum pool, SN dense to 1, plus the SN projection term. Spectral norm
    eps 1e-12 everywhere (G's convs and dense and D's projection embedding: ``biggan.py``'s
    ``sn``; D's convs and classifier: ``main.py``'s ``add_sn``, PyTorch's default eps; no layer
    is normalised twice), BatchNorm eps 1e-5. Init ``"res32"``: every conv/linear weight and
    every embedding N(0, 0.02), biases left at PyTorch's default U(+-1/sqrt(fan_in)).
  * ``biggan64`` (TinyImageNet, 200 classes): ADAPT's copy of StudioGAN's ``big_resnet`` at
    64x64. G: z (100) split in 5 chunks of 20; chunk 0 -> SN dense 4x4x1280; up-blocks
    1280 -> 640 -> 320 -> 160 -> 80 whose conditional BN reads [shared class embedding (128, no
    SN), chunk i] through bias-free SN linear maps; SN self-attention after block 3 (32x32). D:
    80 -> 160 -> 320 -> 640 (down) -> 1280 (no down, learned shortcut), SN self-attention after
    block 1, global sum pool, SN dense to 1 plus the SN projection term. The shortcuts of D's
    blocks 2-5 read ReLU(x), not x: StudioGAN's in-place ReLU rewrites the tensor the shortcut
    holds (``DBlock.relu_shortcut``); the residual-path order is unchanged. Spectral norm eps 1e-6,
    BatchNorm eps 1e-4. Init ``"ortho"``: every conv/linear weight and every embedding
    orthogonal, biases zero.

In both, every block conv, the 1x1 shortcuts, G's input dense and output conv and D's classifier
have biases; attention convs and the CBN linear maps have none. BatchNorm momentum is PyTorch's
0.1, the conditional BNs have no affine parameters (gain ``1 + g``), G's last BN has them, and
running variances follow PyTorch's unbiased convention (``layers.BatchNorm``). The other init
schemes (``"n02"``: N(0, 0.02) with zero biases; ``"torch"``: PyTorch's defaults throughout)
are options of ``build_biggan``. The one layout difference is G's input dense layer: its output
is read as (4, 4, C) here and as (C, 4, 4) in PyTorch, a fixed permutation of its units that
leaves the i.i.d. / orthogonal init distribution and spectral norm unchanged. Checked once
against the reference modules (PyTorch, weights copied in, at full size): G's images in train
and eval mode, BN running statistics and D's scores agree to float32 rounding (~1e-5).

Conventions (as ``ddst_jax.gan.models``):
  * ``Generator.__call__(z (B, z_dim), y (B,) int, train) -> (B, S, S, 3)`` in [-1, 1];
    ``Discriminator.__call__(x (B, S, S, 3), y (B,) int, update_stats=True) -> (B,)`` raw scores.
    Label values are not checked (they may be traced): y >= num_classes gives NaN outputs, a
    negative y indexes from the end of the class tables.
  * ``params``: every conv/dense weight is a leaf named ``kernel``; class embeddings (G's shared
    embedding ``embed_shared``, per-class CBN tables, D's projection ``embed_y``) are leaves named
    ``embedding``; attention gates ``gamma``; biases ``bias``; BN ``scale``/``bias``.
  * ``batch_stats``: BatchNorm running ``mean``/``var`` (G) and the spectral-norm ``u``/``sigma``
    of every SN kernel and embedding (G and D). Spectral norm is on every conv and dense of both
    networks and on D's projection embedding, as in BigGAN.

Mixed precision (as ``ddst_jax.gan.models``): ``dtype`` is the computation dtype of every conv,
dense, embedding and BatchNorm layer; params, BN running statistics and spectral-norm
``u``/``sigma`` stay float32. Attention logits and softmax, D's global pooling, classifier and
projection run in float32; G's images and D's scores are float32.

Maskable (docs/method.md section 1; ``is_maskable``, which ``gan.registry`` hands the runner):
every conv and dense ``kernel`` except D's unconditional head ``classifier`` and the
conditional-BN gain and offset maps (modules ``gain_embed`` / ``bias_embed``). The authors'
masking code drops every parameter whose name contains ``gain``, ``bias`` or ``classifier`` and
every ``nn.Embedding``, which removes these (in ``biggan.64`` their D head is named
``linear1``, which the name filter does not catch, and the attention gate is a maskable
1-element parameter there; ERK's density cap leaves both dense in the initial masks).
``maskable_including_cbn`` is the predicate that masks the CBN maps too (they are dense kernels
in ``biggan64``).

Typical use::

    G, D = build_biggan("biggan32")
    g_vars = G.init(key_g, jnp.zeros((1, G.z_dim)), jnp.zeros((1,), jnp.int32), train=False)
    d_vars = D.init(key_d, jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,), jnp.int32))
    fake, g_upd = G.apply(g_vars, z, y, train=True, mutable=["batch_stats"])
    scores, d_upd = D.apply(d_vars, fake, y, mutable=["batch_stats"])  # power iteration step
    scores = D.apply(d_vars, fake, y, update_stats=False)               # no state change
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.typing import Dtype

from ddst_jax.gan import conv
from ddst_jax.gan.layers import BatchNorm, SpectralNorm
from ddst_jax.gan.models import avg_pool2, compute_dtype_of, upsample_nearest
from ddst_jax.sparsity.masks import default_is_maskable, key_name

InitScheme = Literal["ortho", "n02", "res32", "torch"]

_INIT_SCHEMES = ("ortho", "n02", "res32", "torch")
# PyTorch BatchNorm2d momentum 0.1 on the new batch statistic.
_BN_MOMENTUM = 0.9
#: Module names of the conditional-BN gain/offset maps (per-class tables or SN linear maps).
CBN_MODULE_NAMES: tuple[str, ...] = ("gain_embed", "bias_embed")


def weight_init(scheme: InitScheme) -> jax.nn.initializers.Initializer:
    """Initializer of conv/dense kernels (and, except under ``"torch"``, of class embeddings).

    Args:
      scheme: ``"ortho"`` (StudioGAN's ``init_weights(..., "ortho")``, the authors'
        ``biggan.64``): a (semi-)orthogonal matrix once the weight is read as ``(-1, out)``,
        gain 1, as ``torch.nn.init.orthogonal_`` on the ``(out, -1)`` PyTorch weight.
        ``"n02"`` (StudioGAN's ``"N02"``) and ``"res32"`` (the authors' ``res32_weights_init``,
        ``biggan.32``): N(0, 0.02). ``"torch"``: PyTorch's own default for ``nn.Conv2d`` /
        ``nn.Linear``, ``kaiming_uniform_(a=sqrt(5))`` = U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
        fan_in = in_features * kh * kw.

    Returns:
      A Flax initializer. Biases: see ``bias_init``; embeddings: ``embedding_init``.
    """
    if scheme == "ortho":
        return nn.initializers.orthogonal()
    if scheme in ("n02", "res32"):
        return nn.initializers.normal(0.02)
    if scheme == "torch":
        # Var of U(-b, b) is b^2 / 3; b = 1 / sqrt(fan_in) is variance scale 1/3 on fan_in.
        return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
    raise ValueError(f"Unknown init scheme {scheme!r}; use one of {_INIT_SCHEMES}.")


def embedding_init(scheme: InitScheme) -> jax.nn.initializers.Initializer:
    """Initializer of class-embedding tables (G's shared embedding and CBN tables, D's ``embed_y``).

    ``weight_init(scheme)`` for ``"ortho"``, ``"n02"`` and ``"res32"`` (their reference code
    re-initialises ``nn.Embedding`` weights like the conv/linear ones); N(0, 1), PyTorch's
    ``nn.Embedding`` default, for ``"torch"``.
    """
    if scheme == "torch":
        return nn.initializers.normal(1.0)
    return weight_init(scheme)


def bias_init(scheme: InitScheme, fan_in: int) -> jax.nn.initializers.Initializer:
    """Initializer of the bias of a conv/dense layer whose weight has ``fan_in`` inputs per unit.

    ``"ortho"`` and ``"n02"``: zeros (StudioGAN's ``init_weights`` fills biases with 0).
    ``"res32"`` and ``"torch"``: PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in =
    in_features * kh * kw; the authors' ``res32_weights_init`` leaves biases at this default.
    """
    if scheme in ("ortho", "n02"):
        return nn.initializers.zeros_init()
    if scheme in ("res32", "torch"):
        if int(fan_in) != fan_in or fan_in < 1:
            raise ValueError(f"bias_init needs a positive fan_in, got {fan_in!r}.")
        bound = 1.0 / float(np.sqrt(fan_in))

        def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
            return jax.random.uniform(key, shape, dtype, -bound, bound)

        return init
    raise ValueError(f"Unknown init scheme {scheme!r}; use one of {_INIT_SCHEMES}.")


def max_pool2(x: jax.Array) -> jax.Array:
    """2x2 max pooling, stride 2: (B, H, W, C) -> (B, H//2, W//2, C)."""
    return nn.max_pool(x, (2, 2), strides=(2, 2))


def _sn(layer: nn.Module, x: jax.Array, update_stats: bool, epsilon: float) -> jax.Array:
    """Applies ``layer`` with every weight matrix divided by its largest singular value.

    ``u``/``sigma`` live in ``batch_stats`` under a wrapper named ``<layer name>_sn``; the raw
    weights stay in ``params`` under the layer's own name. With ``update_stats=False`` the same
    power iteration runs (same output) and nothing is written. The power iteration runs in
    float32 whatever ``layer.dtype`` is (see ``layers.SpectralNorm``).
    """
    wrapper = SpectralNorm(layer, epsilon=epsilon, name=f"{layer.name}_sn")
    return wrapper(x, update_stats=update_stats)


def _conv(features: int, size: int, scheme: InitScheme, *, in_features: int, name: str,
          bias: bool = True, dtype: Dtype = jnp.float32) -> nn.Conv:
    """A size x size, stride-1, SAME-padded convolution (PyTorch padding size // 2).

    ``in_features`` (the input channels) sets the bias init's fan_in, ``in_features * size**2``.
    ``conv.conv_general_dilated`` computes the same convolution with GEMM gradients on CPU.
    ``dtype`` is the computation dtype; the kernel and bias are stored float32.
    """
    return nn.Conv(
        features, (size, size), use_bias=bias, kernel_init=weight_init(scheme),
        bias_init=bias_init(scheme, in_features * size * size), name=name,
        conv_general_dilated=conv.conv_general_dilated, dtype=dtype,
    )


def _dense(features: int, scheme: InitScheme, *, in_features: int, name: str,
           bias: bool = True, dtype: Dtype = jnp.float32) -> nn.Dense:
    """A dense layer with the scheme's kernel init and a bias init of fan_in ``in_features``."""
    return nn.Dense(
        features, use_bias=bias, kernel_init=weight_init(scheme),
        bias_init=bias_init(scheme, in_features), name=name, dtype=dtype,
    )


def _check_labels(y: jax.Array, batch: int, num_classes: int) -> None:
    if y.shape != (batch,) or not jnp.issubdtype(y.dtype, jnp.integer):
        raise ValueError(
            f"Expected class labels of shape ({batch},) and an integer dtype (values in "
            f"[0, {num_classes})), got shape {y.shape} and dtype {y.dtype}."
        )


def _check_common(what: str, channels: Sequence[int], num_classes: int, scheme: str) -> None:
    if len(channels) < 2 or any(int(c) != c or c < 1 for c in channels):
        raise ValueError(f"{what}.channels must hold at least 2 positive ints, got {channels!r}.")
    if int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"{what}.num_classes must be a positive int, got {num_classes!r}.")
    if scheme not in _INIT_SCHEMES:
        raise ValueError(f"Unknown init scheme {scheme!r}; use one of {_INIT_SCHEMES}.")


def _check_attention(what: str, after: int | None, widths: Sequence[int]) -> None:
    """``after`` is 1-based; the attended map has ``widths[after - 1]`` channels."""
    if after is None:
        return
    if not 1 <= after <= len(widths):
        raise ValueError(f"{what}.attention_after={after!r} must be in [1, {len(widths)}].")
    if widths[after - 1] < 8:
        raise ValueError(
            f"{what}: self-attention needs at least 8 channels (query/key width C // 8), got "
            f"{widths[after - 1]} after block {after}."
        )


# --------------------------------------------------------------------------------------------
# Shared layers
# --------------------------------------------------------------------------------------------


class ConditionalBatchNorm(nn.Module):
    """BatchNorm without affine parameters, then a per-sample gain ``1 + g`` and offset ``b``.

    The BatchNorm is ``layers.BatchNorm`` (PyTorch's running-variance convention), momentum 0.1
    in PyTorch's terms.

    ``(g, b)`` come from per-class tables (``num_classes`` set; ``cond`` is labels (B,)) or from
    bias-free SN linear maps of a conditioning vector (``num_classes=None``; ``cond`` is
    (B, D), BigGAN's [shared embedding, z chunk]). ``1 + g`` (BigGAN) keeps the layer a plain BN
    when the maps output zero. Input and output (B, H, W, C).
    """

    num_classes: int | None
    init_scheme: InitScheme = "ortho"
    bn_epsilon: float = 1e-5
    sn_epsilon: float = 1e-12
    dtype: Dtype = jnp.float32  # computation dtype (params stay float32)

    @nn.compact
    def __call__(self, x: jax.Array, cond: jax.Array, train: bool) -> jax.Array:
        features = x.shape[-1]
        h = BatchNorm(
            use_running_average=not train,
            momentum=_BN_MOMENTUM,
            epsilon=self.bn_epsilon,
            use_scale=False,
            use_bias=False,
            name="bn",
            dtype=self.dtype,
        )(x)
        if self.num_classes is None:
            dense = functools.partial(_dense, features, self.init_scheme, bias=False,
                                      in_features=cond.shape[-1], dtype=self.dtype)
            gain = _sn(dense(name="gain_embed"), cond, train, self.sn_epsilon)
            bias = _sn(dense(name="bias_embed"), cond, train, self.sn_epsilon)
        else:
            embed = functools.partial(nn.Embed, self.num_classes, features,
                                      embedding_init=embedding_init(self.init_scheme),
                                      dtype=self.dtype)
            gain, bias = embed(name="gain_embed")(cond), embed(name="bias_embed")(cond)
        return h * (1.0 + gain[:, None, None, :]) + bias[:, None, None, :]


class SelfAttention(nn.Module):
    """SAGAN self-attention as in BigGAN/StudioGAN: (B, H, W, C) -> (B, H, W, C).

    Query/key 1x1 convs to C // 8, value to C // 2 (all SN, no bias); keys and values are 2x2
    max-pooled, so each of the H*W queries attends over H*W/4 positions. The output (1x1 conv back
    to C) is added to the input scaled by a learned ``gamma`` that starts at 0. H, W even.
    """

    init_scheme: InitScheme = "ortho"
    sn_epsilon: float = 1e-12
    dtype: Dtype = jnp.float32  # computation dtype (params stay float32)

    @nn.compact
    def __call__(self, x: jax.Array, update_stats: bool) -> jax.Array:
        b, h, w, c = x.shape
        conv = functools.partial(_conv, size=1, scheme=self.init_scheme, bias=False,
                                 dtype=self.dtype)
        sn = functools.partial(_sn, update_stats=update_stats, epsilon=self.sn_epsilon)
        query = sn(conv(c // 8, in_features=c, name="query"), x).reshape(b, h * w, c // 8)
        key = sn(conv(c // 8, in_features=c, name="key"), x)
        key = max_pool2(key).reshape(b, h * w // 4, c // 8)
        value = sn(conv(c // 2, in_features=c, name="value"), x)
        value = max_pool2(value).reshape(b, h * w // 4, c // 2)
        # Logits and softmax in float32 (no-ops under float32): the exp of bfloat16 logits
        # loses most of their precision.
        logits = jnp.einsum("bqc,bkc->bqk", query, key, preferred_element_type=jnp.float32)
        attn = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bqk,bkc->bqc", attn, value).reshape(b, h, w, c // 2)
        out = sn(conv(c, in_features=c // 2, name="out"), out)
        gamma = self.param("gamma", nn.initializers.zeros_init(), (), jnp.float32)
        # gamma is a float32 param; cast it so that it does not promote the activations.
        return x + gamma.astype(self.dtype) * out


# --------------------------------------------------------------------------------------------
# Generator
# --------------------------------------------------------------------------------------------


class GBlock(nn.Module):
    """Up-sampling residual block with conditional BN: (B, H, W, C_in) -> (B, 2H, 2W, C_out).

    Residual: CBN, ReLU, nearest x2, SN 3x3 conv, CBN, ReLU, SN 3x3 conv. Shortcut: nearest x2,
    SN 1x1 conv. ``cond`` feeds both CBNs (labels (B,) or vectors (B, D), see
    ``ConditionalBatchNorm``).
    """

    features: int
    num_classes: int | None
    init_scheme: InitScheme = "ortho"
    bn_epsilon: float = 1e-5
    sn_epsilon: float = 1e-12
    dtype: Dtype = jnp.float32  # computation dtype (params stay float32)

    @nn.compact
    def __call__(self, x: jax.Array, cond: jax.Array, train: bool) -> jax.Array:
        cbn = functools.partial(
            ConditionalBatchNorm,
            self.num_classes,
            init_scheme=self.init_scheme,
            bn_epsilon=self.bn_epsilon,
            sn_epsilon=self.sn_epsilon,
            dtype=self.dtype,
        )
        conv = functools.partial(_conv, self.features, scheme=self.init_scheme, dtype=self.dtype)
        sn = functools.partial(_sn, update_stats=train, epsilon=self.sn_epsilon)
        c_in = x.shape[-1]
        h = upsample_nearest(nn.relu(cbn(name="bn1")(x, cond, train)))
        h = sn(conv(3, in_features=c_in, name="conv1"), h)
        h = nn.relu(cbn(name="bn2")(h, cond, train))
        h = sn(conv(3, in_features=self.features, name="conv2"), h)
        return h + sn(conv(1, in_features=c_in, name="shortcut"), upsample_nearest(x))


class Generator(nn.Module):
    """Class-conditional BigGAN generator: (z (B, z_dim), y (B,)) -> images (B, S, S, 3).

    With ``shared_dim == 0`` (``biggan32``) the whole z feeds the input dense layer and each
    block's CBN reads per-class tables. With ``shared_dim > 0`` (``biggan64``) z is split into
    ``num_blocks + 1`` equal chunks: chunk 0 feeds the dense layer and block i's CBN reads
    ``[embed_shared(y), chunk i]`` (BigGAN's shared embedding and hierarchical z). Then BN, ReLU,
    SN 3x3 conv to 3 channels, tanh. S = bottom_width * 2 ** num_blocks.

    Attributes:
      channels: width at the bottom, then the output width of each up-block.
      num_classes: number of classes; labels lie in [0, num_classes).
      z_dim: noise dimension (a multiple of num_blocks + 1 when shared_dim > 0).
      shared_dim: width of the shared class embedding; 0 for per-class CBN tables.
      attention_after: 1-based index of the block followed by self-attention; None for none.
      bottom_width: spatial size after the input dense layer.
      init_scheme: see ``weight_init``, ``bias_init`` and ``embedding_init``.
      bn_epsilon: BatchNorm epsilon (PyTorch default 1e-5; StudioGAN 1e-4).
      sn_epsilon: spectral-norm epsilon (PyTorch default 1e-12; StudioGAN 1e-6).
      dtype: computation dtype (float32 or bfloat16); params, statistics and images float32.
    """

    channels: Sequence[int]
    num_classes: int
    z_dim: int = 128
    shared_dim: int = 0
    attention_after: int | None = None
    bottom_width: int = 4
    init_scheme: InitScheme = "ortho"
    bn_epsilon: float = 1e-5
    sn_epsilon: float = 1e-12
    dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        _check_common("Generator", self.channels, self.num_classes, self.init_scheme)
        _check_attention("Generator", self.attention_after, self.channels[1:])
        if self.shared_dim < 0 or (self.shared_dim and self.z_dim % (self.num_blocks + 1)):
            raise ValueError(
                f"Generator: with a shared embedding z is split into {self.num_blocks + 1} equal "
                f"chunks (one for the input layer, one per block), so z_dim must be a multiple "
                f"of {self.num_blocks + 1}; got z_dim={self.z_dim}, shared_dim={self.shared_dim}."
            )
        super().__post_init__()

    @property
    def num_blocks(self) -> int:
        """Number of up-sampling blocks."""
        return len(self.channels) - 1

    @property
    def image_size(self) -> int:
        """Side length S of the generated images, in pixels."""
        return self.bottom_width * 2**self.num_blocks

    @nn.compact
    def __call__(self, z: jax.Array, y: jax.Array, train: bool) -> jax.Array:
        """Generates images of the classes ``y``.

        Args:
          z: noise, (B, z_dim).
          y: int labels, (B,), in [0, num_classes).
          train: True: BatchNorm uses batch statistics and spectral norm runs one power-iteration
            step, both written to ``batch_stats`` (call ``apply`` with
            ``mutable=["batch_stats"]``). False: running statistics, nothing written.

        Returns:
          (B, S, S, 3) float32 images in [-1, 1].
        """
        if z.ndim != 2 or z.shape[-1] != self.z_dim:
            raise ValueError(
                f"Generator expects noise of shape (batch, {self.z_dim}), got {z.shape}."
            )
        batch = z.shape[0]
        _check_labels(y, batch, self.num_classes)
        sn = functools.partial(_sn, update_stats=train, epsilon=self.sn_epsilon)

        if self.shared_dim:
            z_in, *z_chunks = jnp.split(z, self.num_blocks + 1, axis=-1)
            shared = nn.Embed(
                self.num_classes, self.shared_dim, embedding_init=embedding_init(self.init_scheme),
                name="embed_shared", dtype=self.dtype,
            )(y)
            conds = [jnp.concatenate([shared, chunk], axis=-1) for chunk in z_chunks]
            cbn_classes = None
        else:
            z_in, conds, cbn_classes = z, [y] * self.num_blocks, self.num_classes

        width, c0 = self.bottom_width, self.channels[0]
        dense = _dense(width * width * c0, self.init_scheme, in_features=z_in.shape[-1],
                       name="dense", dtype=self.dtype)
        h = sn(dense, z_in)
        h = h.reshape(batch, width, width, c0)
        for i, (features, cond) in enumerate(zip(self.channels[1:], conds, strict=True), 1):
            h = GBlock(
                features,
                cbn_classes,
                init_scheme=self.init_scheme,
                bn_epsilon=self.bn_epsilon,
                sn_epsilon=self.sn_epsilon,
                dtype=self.dtype,
                name=f"block{i}",
            )(h, cond, train)
            if i == self.attention_after:
                h = SelfAttention(self.init_scheme, self.sn_epsilon, dtype=self.dtype,
                                  name="attention")(h, train)
        h = BatchNorm(
            use_running_average=not train,
            momentum=_BN_MOMENTUM,
            epsilon=self.bn_epsilon,
            name="bn_out",
            dtype=self.dtype,
        )(h)
        conv_out = _conv(3, 3, self.init_scheme, in_features=h.shape[-1], name="conv_out",
                         dtype=self.dtype)
        h = sn(conv_out, nn.relu(h))
        # float32 out (a no-op under float32): losses, BR and FID never see bfloat16 pixels.
        return jnp.tanh(h.astype(jnp.float32))


# --------------------------------------------------------------------------------------------
# Discriminator
# --------------------------------------------------------------------------------------------


class DBlock(nn.Module):
    """D residual block: (B, H, W, C_in) -> (B, H', W', C_out), H' = H // 2 if downsample.

    Residual: [ReLU], SN 3x3 conv, ReLU, SN 3x3 conv, [avg-pool]. Shortcut: SN 1x1 conv then
    [avg-pool] when the shape changes, identity otherwise. ``optimized`` (the first block, which
    sees the image): no leading ReLU and the shortcut pools *before* its conv, as in BigGAN.

    ``relu_shortcut`` (not for the optimized block): the shortcut reads ReLU(x) instead of x.
    StudioGAN's ``DiscBlock`` (the authors' ``biggan.64`` D) computes this without meaning to:
    its leading ``nn.ReLU(inplace=True)`` overwrites the tensor that the shortcut branch kept
    a reference to, so its 1x1 conv (or identity) sees the rectified input.
    """

    features: int
    downsample: bool
    optimized: bool = False
    relu_shortcut: bool = False
    init_scheme: InitScheme = "ortho"
    sn_epsilon: float = 1e-12
    dtype: Dtype = jnp.float32  # computation dtype (params stay float32)

    @nn.compact
    def __call__(self, x: jax.Array, update_stats: bool) -> jax.Array:
        conv = functools.partial(_conv, self.features, scheme=self.init_scheme, dtype=self.dtype)
        sn = functools.partial(_sn, update_stats=update_stats, epsilon=self.sn_epsilon)
        c_in = x.shape[-1]
        h = sn(conv(3, in_features=c_in, name="conv1"), x if self.optimized else nn.relu(x))
        h = sn(conv(3, in_features=self.features, name="conv2"), nn.relu(h))
        if self.downsample:
            h = avg_pool2(h)
        if self.optimized:
            return h + sn(conv(1, in_features=c_in, name="shortcut"), avg_pool2(x))
        shortcut = nn.relu(x) if self.relu_shortcut else x
        if self.downsample or c_in != self.features:
            shortcut = sn(conv(1, in_features=c_in, name="shortcut"), shortcut)
            if self.downsample:
                shortcut = avg_pool2(shortcut)
        return h + shortcut


class Discriminator(nn.Module):
    """Projection discriminator (Miyato & Koyama, 2018) with SN everywhere: (x, y) -> scores.

    Blocks (the first one optimized), optional self-attention, ReLU, global sum pool to
    h (B, C); score = classifier(h) + <embed_y(y), h>, with SN on the dense ``classifier`` and
    on the class embedding ``embed_y`` (both named so that the default maskable predicate keeps
    them dense).

    Attributes:
      channels: output width of each block.
      downsample: per block, whether it halves the resolution; ``downsample[0]`` must be True.
      num_classes: number of classes; labels lie in [0, num_classes).
      attention_after: 1-based index of the block followed by self-attention; None for none.
      relu_shortcut: the blocks after the first feed ReLU(x) to their shortcut (StudioGAN's
        in-place ReLU; see ``DBlock``).
      init_scheme: see ``weight_init``, ``bias_init`` and ``embedding_init``.
      sn_epsilon: spectral-norm epsilon.
      dtype: computation dtype of the blocks (float32 or bfloat16); the pooling, classifier
        and projection run in float32 (negligible cost) and scores are float32.
    """

    channels: Sequence[int]
    downsample: Sequence[bool]
    num_classes: int
    attention_after: int | None = None
    relu_shortcut: bool = False
    init_scheme: InitScheme = "ortho"
    sn_epsilon: float = 1e-12
    dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        _check_common("Discriminator", self.channels, self.num_classes, self.init_scheme)
        if len(self.downsample) != len(self.channels) or not self.downsample[0]:
            raise ValueError(
                "Discriminator.downsample needs one bool per block with downsample[0] True (the "
                f"optimized first block always halves the resolution), got {self.downsample!r} "
                f"for {len(self.channels)} blocks."
            )
        _check_attention("Discriminator", self.attention_after, self.channels)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, y: jax.Array, update_stats: bool = True) -> jax.Array:
        """Scores images as samples of the classes ``y``.

        Args:
          x: images (B, H, W, C), values in [-1, 1].
          y: int labels, (B,), in [0, num_classes).
          update_stats: True: one power-iteration step per SN weight, written to
            ``batch_stats`` (call ``apply`` with ``mutable=["batch_stats"]``). False: the same
            computation and output, nothing written (side-effect free, e.g. for the BR forwards).

        Returns:
          (B,) float32 raw scores.
        """
        if x.ndim != 4:
            raise ValueError(
                f"Discriminator expects NHWC images (batch, height, width, channels), got shape "
                f"{x.shape}."
            )
        _check_labels(y, x.shape[0], self.num_classes)
        sn = functools.partial(_sn, update_stats=update_stats, epsilon=self.sn_epsilon)
        h = x
        for i, (features, down) in enumerate(zip(self.channels, self.downsample, strict=True), 1):
            h = DBlock(
                features,
                down,
                optimized=i == 1,
                relu_shortcut=self.relu_shortcut and i > 1,
                init_scheme=self.init_scheme,
                sn_epsilon=self.sn_epsilon,
                dtype=self.dtype,
                name=f"block{i}",
            )(h, update_stats)
            if i == self.attention_after:
                h = SelfAttention(self.init_scheme, self.sn_epsilon, dtype=self.dtype,
                                  name="attention")(h, update_stats)
        # Pool and score in float32 (no-ops under float32): a bfloat16 sum over H*W positions
        # and bfloat16-rounded scores would feed their rounding straight into losses and BR.
        h = jnp.sum(nn.relu(h).astype(jnp.float32), axis=(1, 2))
        classifier = _dense(1, self.init_scheme, in_features=h.shape[-1], name="classifier",
                            dtype=jnp.float32)
        score = sn(classifier, h)[:, 0]
        embed = nn.Embed(self.num_classes, h.shape[-1],
                         embedding_init=embedding_init(self.init_scheme), name="embed_y",
                         dtype=jnp.float32)
        return score + jnp.sum(sn(embed, y) * h, axis=-1)


# --------------------------------------------------------------------------------------------
# Maskable predicate with the CBN maps
# --------------------------------------------------------------------------------------------


#: Modules whose kernels the authors' masking code keeps dense: D's unconditional head and the
#: conditional-BN gain/offset maps (it skips names containing "classifier" or "gain"/"bias").
DENSE_MODULES: tuple[str, ...] = ("classifier", *CBN_MODULE_NAMES)


def _in_modules(path: tuple[Any, ...], modules: Sequence[str]) -> bool:
    return any(key_name(k) in modules for k in path[:-1])


def is_maskable(path: tuple[Any, ...], leaf: Any) -> bool:
    """BigGAN's maskable predicate: the library default minus ``DENSE_MODULES``' kernels.

    Class embeddings (leaves named ``embedding``) are never maskable anyway.
    """
    return default_is_maskable(path, leaf) and not _in_modules(path, DENSE_MODULES)


def maskable_including_cbn(path: tuple[Any, ...], leaf: Any) -> bool:
    """``is_maskable``, plus the conditional-BN gain/offset linear kernels.

    The literal reading of docs/method.md section 1 (every dense kernel is maskable); the
    default follows the authors' code, which keeps them dense. Only ``biggan64`` has such
    kernels (``biggan32``'s CBN maps are per-class tables, leaves named ``embedding``).
    """
    return default_is_maskable(path, leaf) and not _in_modules(path, ("classifier",))


# --------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Architecture:
    """Layout of one named model; widths are functions of the base widths g_ch / d_ch."""

    image_size: int
    num_classes: int
    z_dim: int
    shared_dim: int
    g_ch: int  # default generator base width
    d_ch: int  # default discriminator base width
    g_channels: Callable[[int], tuple[int, ...]]
    d_channels: Callable[[int], tuple[int, ...]]
    d_downsample: tuple[bool, ...]
    g_attention: int | None
    d_attention: int | None
    g_min: int  # smallest base widths (attention needs >= 8 channels)
    d_min: int
    bn_epsilon: float
    sn_epsilon: float
    init_scheme: InitScheme  # the reference code's init (see weight_init / bias_init)
    d_relu_shortcut: bool  # D blocks after the first feed ReLU(x) to their shortcut


_ARCHITECTURES: dict[str, _Architecture] = {
    # BigGAN-PyTorch CIFAR / the authors' biggan.32 (ch 64 x 4): every layer 256 wide.
    "biggan32": _Architecture(
        image_size=32,
        num_classes=10,
        z_dim=128,
        shared_dim=0,
        g_ch=256,
        d_ch=256,
        g_channels=lambda c: (c, c, c, c),
        d_channels=lambda c: (c, c, c, c),
        d_downsample=(True, True, False, False),
        g_attention=None,
        d_attention=None,
        g_min=1,
        d_min=1,
        bn_epsilon=1e-5,
        sn_epsilon=1e-12,
        init_scheme="res32",
        d_relu_shortcut=False,  # ADAPT's DisBlock: nn.ReLU() not in place
    ),
    # StudioGAN big_resnet at 64x64 (the authors' biggan.64): ch 80, G x16 8 4 2 1 from 4x4,
    # D x1 2 4 8 16 with the last block not down-sampling (64 -> 32 -> 16 -> 8 -> 4 -> 4).
    "biggan64": _Architecture(
        image_size=64,
        num_classes=200,
        z_dim=100,
        shared_dim=128,
        g_ch=80,
        d_ch=80,
        g_channels=lambda c: (16 * c, 8 * c, 4 * c, 2 * c, c),
        d_channels=lambda c: (c, 2 * c, 4 * c, 8 * c, 16 * c),
        d_downsample=(True, True, True, True, False),
        g_attention=3,  # after the block that outputs 32x32 (2 * g_ch channels)
        d_attention=1,  # after the optimized block (32x32, d_ch channels)
        g_min=4,
        d_min=8,
        bn_epsilon=1e-4,
        sn_epsilon=1e-6,
        init_scheme="ortho",
        d_relu_shortcut=True,  # StudioGAN's DiscBlock: in-place ReLU aliases the shortcut input
    ),
}

MODEL_NAMES: tuple[str, ...] = tuple(_ARCHITECTURES)


def _architecture(name: str) -> _Architecture:
    try:
        return _ARCHITECTURES[name]
    except KeyError:
        raise ValueError(
            f"Unknown BigGAN model {name!r}; known models: {', '.join(MODEL_NAMES)}."
        ) from None


def _positive(what: str, name: str, value: int | None, default: int, minimum: int) -> int:
    result = default if value is None else value
    if isinstance(result, bool) or int(result) != result or result < minimum:
        raise ValueError(
            f"{what}={value!r} is invalid for {name!r}: it must be an int >= {minimum} "
            f"(full size: {default})."
        )
    return int(result)


def image_size(name: str) -> int:
    """Side length in pixels of the images model ``name`` generates and scores (32 or 64)."""
    return _architecture(name).image_size


def build_biggan(
    name: str,
    *,
    num_classes: int | None = None,
    g_ch: int | None = None,
    d_ch: int | None = None,
    z_dim: int | None = None,
    init_scheme: InitScheme | None = None,
    compute_dtype: Dtype = jnp.float32,
) -> tuple[Generator, Discriminator]:
    """Builds the generator and discriminator of a named BigGAN benchmark architecture.

    Args:
      name: ``"biggan32"`` (CIFAR-10) or ``"biggan64"`` (TinyImageNet).
      num_classes: number of classes (default 10 / 200).
      g_ch: generator base width (``biggan32``: every layer, default 256; ``biggan64``: the
        narrowest (last) block, 16 * g_ch at the bottom, default 80, at least 4). None: full size.
      d_ch: discriminator base width (``biggan32``: every block, default 256; ``biggan64``: the
        first block, 16 * d_ch at the last, default 80, at least 8). None: full size.
      z_dim: noise dimension (default 128 / 100; ``biggan64``: a multiple of 5).
      init_scheme: kernel, bias and embedding init of both networks, see ``weight_init``,
        ``bias_init`` and ``embedding_init``. None (default): the reference code's,
        ``"res32"`` for ``biggan32`` and ``"ortho"`` for ``biggan64``.
      compute_dtype: computation dtype of both networks (``jnp.float32`` or ``jnp.bfloat16``,
        or their names); params and statistics stay float32, see the module docstring.

    Returns:
      ``(generator, discriminator)`` Flax modules (unbound; call ``init``/``apply``).
    """
    arch = _architecture(name)
    num_classes = _positive("num_classes", name, num_classes, arch.num_classes, 1)
    g_ch = _positive("g_ch", name, g_ch, arch.g_ch, arch.g_min)
    d_ch = _positive("d_ch", name, d_ch, arch.d_ch, arch.d_min)
    z_dim = _positive("z_dim", name, z_dim, arch.z_dim, 1)
    init_scheme = arch.init_scheme if init_scheme is None else init_scheme
    dtype = compute_dtype_of(compute_dtype)
    generator = Generator(
        channels=arch.g_channels(g_ch),
        num_classes=num_classes,
        z_dim=z_dim,
        shared_dim=arch.shared_dim,
        attention_after=arch.g_attention,
        init_scheme=init_scheme,
        bn_epsilon=arch.bn_epsilon,
        sn_epsilon=arch.sn_epsilon,
        dtype=dtype,
    )
    discriminator = Discriminator(
        channels=arch.d_channels(d_ch),
        downsample=arch.d_downsample,
        num_classes=num_classes,
        attention_after=arch.d_attention,
        relu_shortcut=arch.d_relu_shortcut,
        init_scheme=init_scheme,
        sn_epsilon=arch.sn_epsilon,
        dtype=dtype,
    )
    return generator, discriminator
