"""The FID Inception-v3 (TensorFlow graph of 2015-12-05) in Flax, with pytorch-fid's weights.

This is the network of TTUR's FID and of the original Inception Score, in the layout of
pytorch-fid's port (``FIDInceptionA/C/E_1/E_2`` on torchvision's Inception-v3), NHWC inside:

* every convolution is bias-free, followed by BatchNorm (eps 0.001) and ReLU;
* the pool branches of the A and C blocks and of ``Mixed_7b`` (E_1) average over a 3x3 window
  *without* counting padding (``count_include_pad=False``), as TensorFlow does;
* the pool branch of ``Mixed_7c`` (E_2) is a 3x3 *max* pool (a quirk of the TF graph);
* the head is a global average pool (``pool_3``, 2048 features, used by FID) and a 1008-way
  linear layer (``fc``, the ``softmax/logits`` layer, used by the Inception Score). By default
  the logits leave out ``fc.bias``, as the original Inception Score code (improved-gan, also
  used by TTUR-era GAN code) reads ``softmax/logits/MatMul``; ``logits_bias=True`` adds it.

Inputs are uint8 NHWC images of any size: they are scaled to [0, 1], resized to 299x299 with
bilinear interpolation (``F.interpolate(..., align_corners=False)``, no antialiasing), then
mapped to [-1, 1], exactly as ``pytorch_fid.InceptionV3`` does.

Typical use::

    variables = load_weights()                      # ~/.cache/ddst_jax, or download once
    pool, logits = features_batched(variables, images, batch_size=100)   # numpy, float32
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import pathlib
import shutil
import tempfile
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util

from ddst_jax.metrics import torch_weights

__all__ = [
    "FID_WEIGHTS_FILE",
    "FID_WEIGHTS_SHA256_PREFIX",
    "FID_WEIGHTS_SIZE",
    "FID_WEIGHTS_URL",
    "INPUT_SIZE",
    "NUM_FEATURES",
    "NUM_LOGITS",
    "BasicConv2d",
    "InceptionA",
    "InceptionB",
    "InceptionC",
    "InceptionD",
    "InceptionE",
    "InceptionV3",
    "Logits",
    "WeightsUnavailableError",
    "default_cache_dir",
    "expected_state_dict_shapes",
    "features",
    "features_batched",
    "load_weights",
    "num_parameters",
    "preprocess",
    "state_dict_to_variables",
]

FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)
FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_SIZE = 95_628_359  # bytes
FID_WEIGHTS_SHA256_PREFIX = "6726825d"  # Only the prefix is published (in the file name).

INPUT_SIZE = 299  # Side length the network sees, in pixels.
NUM_FEATURES = 2048  # pool_3 features (FID).
NUM_LOGITS = 1008  # softmax/logits classes (IS): 1000 ImageNet classes + 8 unused.

_BN_EPS = 1e-3
Variables = dict[str, Any]


class WeightsUnavailableError(FileNotFoundError):
    """The FID Inception weights are not on disk and cannot be downloaded here."""


# ------------------------------------------------------------------------------------------
# Network
# ------------------------------------------------------------------------------------------


class BasicConv2d(nn.Module):
    """Bias-free convolution + BatchNorm (running statistics) + ReLU, as torchvision's.

    Attributes:
      features: output channels.
      kernel_size: (kh, kw).
      strides: (sh, sw).
      padding: symmetric zero padding (ph, pw), in pixels.
    """

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    precision: jax.lax.PrecisionLike = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ph, pw = self.padding
        x = nn.Conv(
            self.features,
            self.kernel_size,
            strides=self.strides,
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            precision=self.precision,
            name="conv",
        )(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=_BN_EPS, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3_same(x: jax.Array) -> jax.Array:
    # TensorFlow's average pool divides by the number of *valid* inputs at the border.
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_same(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def _max_pool_3x3_stride2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
    """``Mixed_5b/c/d`` (35x35): 1x1, 5x5, double 3x3 and avg-pool branches."""

    pool_features: int
    precision: jax.lax.PrecisionLike = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        b1 = conv(64, (1, 1), name="branch1x1")(x)
        b5 = conv(48, (1, 1), name="branch5x5_1")(x)
        b5 = conv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = conv(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = conv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """``Mixed_6a``: grid reduction 35x35 -> 17x17."""

    precision: jax.lax.PrecisionLike = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        b3 = conv(384, (3, 3), strides=(2, 2), name="branch3x3")(x)
        bd = conv(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = conv(96, (3, 3), strides=(2, 2), name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionC(nn.Module):
    """``Mixed_6b..e`` (17x17): factorised 7x7 convolutions (1x7 then 7x1)."""

    channels_7x7: int
    precision: jax.lax.PrecisionLike = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        c7 = self.channels_7x7
        b1 = conv(192, (1, 1), name="branch1x1")(x)
        b7 = conv(c7, (1, 1), name="branch7x7_1")(x)
        b7 = conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = conv(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = conv(192, (1, 1), name="branch_pool")(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """``Mixed_7a``: grid reduction 17x17 -> 8x8."""

    precision: jax.lax.PrecisionLike = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        b3 = conv(192, (1, 1), name="branch3x3_1")(x)
        b3 = conv(320, (3, 3), strides=(2, 2), name="branch3x3_2")(b3)
        b7 = conv(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = conv(192, (3, 3), strides=(2, 2), name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionE(nn.Module):
    """``Mixed_7b`` (pool="avg", FIDInceptionE_1) and ``Mixed_7c`` (pool="max", E_2), 8x8."""

    pool: str  # "avg" (count_include_pad=False) or "max".
    precision: jax.lax.PrecisionLike = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        b1 = conv(320, (1, 1), name="branch1x1")(x)
        b3 = conv(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate(
            [
                conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
            ],
            axis=-1,
        )
        bd = conv(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = conv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate(
            [
                conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
            ],
            axis=-1,
        )
        if self.pool == "avg":
            pooled = _avg_pool_3x3_same(x)
        elif self.pool == "max":
            pooled = _max_pool_3x3_same(x)
        else:
            raise ValueError(f"InceptionE.pool={self.pool!r} must be 'avg' or 'max'.")
        bp = conv(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class Logits(nn.Module):
    """The 1008-way ``softmax/logits`` layer: ``x @ kernel (+ bias)``.

    Attributes:
      features: number of classes.
      use_bias: add the bias. The original Inception Score code (improved-gan, TTUR) takes the
        ``softmax/logits/MatMul`` output, i.e. *no* bias; pytorch-fid's ``fc`` adds it.
    """

    features: int = NUM_LOGITS
    use_bias: bool = False
    precision: jax.lax.PrecisionLike = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features), jnp.float32
        )
        # The bias always exists, so that the variables match the weights file either way.
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        y = jnp.dot(x, kernel, precision=self.precision)
        return y + bias if self.use_bias else y


class InceptionV3(nn.Module):
    """FID Inception-v3 on preprocessed images.

    Call with float32 (N, H, W, 3) in [-1, 1], H, W >= 75 (299 for the FID protocol; see
    :func:`preprocess`). Returns ``(pool (N, 2048), logits (N, 1008))``. Inference only:
    BatchNorm always uses the stored running statistics.

    Attributes:
      logits_bias: include ``fc.bias`` in the logits (see :class:`Logits`).
      precision: matmul/conv precision; HIGHEST keeps float32 on accelerators whose default is
        a lower precision (TPU bf16 passes, TF32), so the statistics do not depend on hardware.
    """

    logits_bias: bool = False
    precision: jax.lax.PrecisionLike = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        p = self.precision
        conv = functools.partial(BasicConv2d, precision=p)
        x = conv(32, (3, 3), strides=(2, 2), name="Conv2d_1a_3x3")(x)  # 149
        x = conv(32, (3, 3), name="Conv2d_2a_3x3")(x)  # 147
        x = conv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)  # 147
        x = _max_pool_3x3_stride2(x)  # 73
        x = conv(80, (1, 1), name="Conv2d_3b_1x1")(x)  # 73
        x = conv(192, (3, 3), name="Conv2d_4a_3x3")(x)  # 71
        x = _max_pool_3x3_stride2(x)  # 35
        x = InceptionA(32, precision=p, name="Mixed_5b")(x)  # 35 x 35 x 256
        x = InceptionA(64, precision=p, name="Mixed_5c")(x)  # 288
        x = InceptionA(64, precision=p, name="Mixed_5d")(x)  # 288
        x = InceptionB(precision=p, name="Mixed_6a")(x)  # 17 x 17 x 768
        x = InceptionC(128, precision=p, name="Mixed_6b")(x)
        x = InceptionC(160, precision=p, name="Mixed_6c")(x)
        x = InceptionC(160, precision=p, name="Mixed_6d")(x)
        x = InceptionC(192, precision=p, name="Mixed_6e")(x)
        x = InceptionD(precision=p, name="Mixed_7a")(x)  # 8 x 8 x 1280
        x = InceptionE("avg", precision=p, name="Mixed_7b")(x)  # 8 x 8 x 2048
        x = InceptionE("max", precision=p, name="Mixed_7c")(x)
        pool = jnp.mean(x, axis=(1, 2))  # pool_3
        logits = Logits(NUM_LOGITS, use_bias=self.logits_bias, precision=p, name="fc")(pool)
        return pool, logits


# ------------------------------------------------------------------------------------------
# Preprocessing and the functional API
# ------------------------------------------------------------------------------------------


#: How images are resized to 299x299: pytorch-fid's convention, or TensorFlow 1's (TTUR).
RESIZE_MODES = ("pytorch", "tf1")


def _resize_tf1(x: jax.Array, size: int) -> jax.Array:
    """TensorFlow 1's ``resize_bilinear`` (align_corners=False, no half-pixel centres): output
    pixel i samples input coordinate ``i * in / out``, the right neighbour clamped at the edge.
    This is what the TTUR Inception graph (and so the paper's FID) applies to its input."""

    def axis(in_size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
        src = jnp.arange(size, dtype=jnp.float32) * (in_size / size)
        lo = jnp.floor(src).astype(jnp.int32)
        return lo, jnp.minimum(lo + 1, in_size - 1), src - lo

    h0, h1, wh = axis(x.shape[1])
    w0, w1, ww = axis(x.shape[2])
    wh, ww = wh[None, :, None, None], ww[None, None, :, None]
    rows = x[:, h0] * (1.0 - wh) + x[:, h1] * wh
    return rows[:, :, w0] * (1.0 - ww) + rows[:, :, w1] * ww


def preprocess(images: jax.Array, resize: str = "pytorch") -> jax.Array:
    """uint8 (N, H, W, C) images -> float32 (N, 299, 299, 3) in [-1, 1].

    ``x / 255`` -> bilinear resize to 299 -> ``2 x - 1``; C = 1 is repeated to RGB. ``resize``:
    ``"pytorch"`` is pytorch-fid's ``F.interpolate(mode="bilinear", align_corners=False)``
    (half-pixel centres, edge clamping, no antialiasing); ``"tf1"`` is TensorFlow 1's legacy
    ``resize_bilinear`` (see ``_resize_tf1``), as in the TTUR graph the paper's FID used.
    """
    if resize not in RESIZE_MODES:
        raise ValueError(f"Unknown resize mode {resize!r}; use one of {RESIZE_MODES}.")
    if images.dtype != jnp.uint8:
        raise TypeError(
            f"Inception features need uint8 images (0..255), got {images.dtype}. Quantise "
            "generator output first, e.g. jnp.round((x + 1) * 127.5).clip(0, 255).astype(uint8) "
            "for x in [-1, 1] (FID is defined on 8-bit images)."
        )
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be NHWC with 1 or 3 channels, got shape {images.shape}.")
    if images.shape[-1] == 1:
        images = jnp.repeat(images, 3, axis=-1)
    x = images.astype(jnp.float32) / 255.0
    n = x.shape[0]
    if resize == "tf1":
        x = _resize_tf1(x, INPUT_SIZE)
    else:
        # With antialias=False, jax's triangle kernel is torch's 2-tap bilinear with
        # align_corners=False, including the clamped borders (checked in the tests).
        x = jax.image.resize(x, (n, INPUT_SIZE, INPUT_SIZE, 3), "bilinear", antialias=False)
    return 2.0 * x - 1.0


@functools.partial(jax.jit, static_argnames=("logits_bias", "resize"))
def features(
    variables: Variables, images: jax.Array, *, logits_bias: bool = False,
    resize: str = "pytorch",
) -> tuple[jax.Array, jax.Array]:
    """Inception features of a batch of images (jitted; one compile per input shape).

    Args:
      variables: from :func:`load_weights` (``{"params", "batch_stats"}``).
      images: uint8 (N, H, W, 3) (or (N, H, W, 1)), any H, W.
      logits_bias: add ``fc.bias`` to the logits (pytorch-fid's ``fc``); the default leaves it
        out, as the original Inception Score code does.
      resize: ``RESIZE_MODES`` (see :func:`preprocess`).

    Returns:
      ``(pool, logits)``: float32 (N, 2048) pool_3 features and (N, 1008) logits.
    """
    return InceptionV3(logits_bias=logits_bias).apply(variables, preprocess(images, resize))


def batched(
    features_fn: Callable[[Any], tuple[jax.Array, jax.Array]],
    make_batch: Callable[[int, int], Any],
    total: int,
    batch_size: int,
    *,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """The one batching path for Inception features (real images, generated ones, files).

    ``make_batch(start, batch_size)`` returns the inputs of rows ``start, start + 1, ...`` as a
    full batch of ``batch_size`` rows (the caller pads the last one however suits its source:
    black images, wrapped indices, extra samples), so ``features_fn`` compiles once; only the
    first ``total`` rows are kept. One batch is computed while the previous one is copied to
    host memory.

    Args:
      features_fn: batch -> ``(pool (B, 2048), logits (B, 1008))`` (e.g. ``features`` with
        its variables bound, or a sharded version).
      make_batch: ``(start, batch_size) -> batch``.
      total: rows to return.
      batch_size: rows per call.
      progress: show a tqdm progress bar.

    Returns:
      numpy float32 ``(pool (total, 2048), logits (total, 1008))``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1.")
    # Sized from the first batch's outputs, so stand-in feature networks of any width work.
    out_arrays: list[np.ndarray] = []
    starts = range(0, total, batch_size)
    if progress:
        from tqdm import tqdm  # Local import: only for interactive use.

        starts = tqdm(starts, desc="Inception features", unit="batch")
    pending: tuple[int, int, jax.Array, jax.Array] | None = None
    for start in starts:
        out = (start, min(batch_size, total - start),
               *features_fn(make_batch(start, batch_size)))
        if pending is not None:
            _store(pending, out_arrays, total)
        pending = out
    if pending is not None:
        _store(pending, out_arrays, total)
    if not out_arrays:
        return (np.empty((0, NUM_FEATURES), np.float32), np.empty((0, NUM_LOGITS), np.float32))
    return out_arrays[0], out_arrays[1]


def features_batched(
    variables: Variables,
    images: Any,
    *,
    batch_size: int = 100,
    logits_bias: bool = False,
    progress: bool = False,
    resize: str = "pytorch",
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`features` over many images (``batched``; the last batch padded with black
    images, whose outputs are dropped).

    Args:
      variables: from :func:`load_weights`.
      images: uint8 (N, H, W, C) array, or anything with ``len`` and slicing that returns such
        arrays (e.g. a memory-mapped file).
      batch_size: images per forward pass.
      logits_bias: see :func:`features`.
      progress: show a tqdm progress bar.
      resize: see :func:`preprocess`.

    Returns:
      numpy float32 ``(pool (N, 2048), logits (N, 1008))``.
    """

    def make_batch(start: int, size: int) -> np.ndarray:
        batch = np.asarray(images[start : start + size])
        if batch.shape[0] < size:  # Same shape for every call: one compile.
            pad = np.zeros((size - batch.shape[0], *batch.shape[1:]), batch.dtype)
            batch = np.concatenate([batch, pad])
        return batch

    return batched(lambda b: features(variables, b, logits_bias=logits_bias, resize=resize),
                   make_batch, len(images), batch_size, progress=progress)


def _store(item: tuple[int, int, jax.Array, jax.Array], out_arrays: list[np.ndarray],
           total: int) -> None:
    """Copies one batch's (pool, logits) rows into ``out_arrays`` (allocated on first use)."""
    start, count, *batch = item
    host = [np.asarray(jax.device_get(x)) for x in batch]
    if not out_arrays:
        out_arrays.extend(np.empty((total, *x.shape[1:]), np.float32) for x in host)
    for array, x in zip(out_arrays, host, strict=True):
        array[start : start + count] = x[:count]


# ------------------------------------------------------------------------------------------
# pytorch-fid state dict <-> Flax variables
# ------------------------------------------------------------------------------------------

# Flax (collection, leaf) -> torch suffix. A module path maps to torch's dotted name as is,
# because the Flax modules are named like torchvision's.
_LEAF_TO_TORCH = {
    ("params", "kernel"): "weight",  # conv OIHW / linear (out, in); transposed on load.
    ("params", "scale"): "weight",  # BatchNorm gamma.
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
_NUM_BATCHES_TRACKED = "num_batches_tracked"  # A BatchNorm counter; present but unused.


def _torch_layout(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Flax kernel shape -> torch weight shape (HWIO -> OIHW; (in, out) -> (out, in))."""
    if len(shape) == 4:
        kh, kw, i, o = shape
        return (o, i, kh, kw)
    if len(shape) == 2:
        return (shape[1], shape[0])
    return shape


def _flax_layout(array: np.ndarray) -> np.ndarray:
    """Torch weight -> Flax kernel (OIHW -> HWIO; (out, in) -> (in, out))."""
    if array.ndim == 4:
        return np.transpose(array, (2, 3, 1, 0))
    if array.ndim == 2:
        return array.T
    return array


@functools.cache
def _variable_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flat ``{(collection, *module_path, leaf): shape}`` of the model's variables."""
    shapes = jax.eval_shape(
        InceptionV3().init, jax.random.key(0), jax.ShapeDtypeStruct((1, 75, 75, 3), jnp.float32)
    )
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes).items()}


def _torch_name(flax_key: tuple[str, ...]) -> str:
    collection, *path, leaf = flax_key
    return ".".join([*path, _LEAF_TO_TORCH[(collection, leaf)]])


def expected_state_dict_shapes() -> dict[str, tuple[int, ...]]:
    """The state dict the model needs, derived from its own variables: ``{torch key: shape}``.

    Equals the table of pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (566 entries:
    94 conv+BN units of 6 entries each, and ``fc.weight``/``fc.bias``).
    """
    table = {}
    for key, shape in _variable_shapes().items():
        table[_torch_name(key)] = _torch_layout(shape)
        if key[0] == "batch_stats" and key[-1] == "mean":
            table[".".join([*key[1:-1], _NUM_BATCHES_TRACKED])] = ()
    return dict(sorted(table.items()))


def _check_state_dict(state_dict: Mapping[str, np.ndarray], source: str) -> None:
    expected = expected_state_dict_shapes()
    for key in sorted(set(expected) | set(state_dict)):
        if key not in state_dict:
            raise ValueError(
                f"{source} is not pytorch-fid's FID Inception state dict: missing key {key!r} "
                f"(expected shape {expected[key]}). Use {FID_WEIGHTS_FILE} from {FID_WEIGHTS_URL}."
            )
        if key not in expected:
            raise ValueError(
                f"{source} is not pytorch-fid's FID Inception state dict: unexpected key {key!r} "
                f"(shape {tuple(np.shape(state_dict[key]))}). Use {FID_WEIGHTS_FILE}."
            )
        got = tuple(np.shape(state_dict[key]))
        if got != expected[key]:
            raise ValueError(
                f"{source} is not pytorch-fid's FID Inception state dict: {key!r} has shape "
                f"{got}, the model needs {expected[key]}."
            )
        if not key.endswith(_NUM_BATCHES_TRACKED):
            dtype = np.asarray(state_dict[key]).dtype
            if not np.issubdtype(dtype, np.floating) and dtype.name != "bfloat16":
                raise ValueError(f"{source}: {key!r} has dtype {dtype}, expected floating point.")


def state_dict_to_variables(
    state_dict: Mapping[str, np.ndarray], *, source: str = "state dict"
) -> Variables:
    """pytorch-fid's Inception state dict -> Flax ``{"params", "batch_stats"}`` (float32).

    Args:
      state_dict: ``{torch key: array}``, e.g. from :func:`torch_weights.load_state_dict`.
      source: names the origin in error messages (e.g. the file path).

    Raises:
      ValueError: naming the first (in sorted key order) missing key, unexpected key, or shape
        difference (with both shapes).
    """
    _check_state_dict(state_dict, source)
    flat = {
        key: jnp.asarray(_flax_layout(np.asarray(state_dict[_torch_name(key)], np.float32)))
        for key in _variable_shapes()
    }
    return traverse_util.unflatten_dict(flat)


# ------------------------------------------------------------------------------------------
# Weight acquisition
# ------------------------------------------------------------------------------------------


def default_cache_dir() -> pathlib.Path:
    """``$DDST_JAX_CACHE`` if set, else ``$XDG_CACHE_HOME/ddst_jax`` or ``~/.cache/ddst_jax``."""
    if os.environ.get("DDST_JAX_CACHE"):
        return pathlib.Path(os.environ["DDST_JAX_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return pathlib.Path(base).expanduser() / "ddst_jax"


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _verify(path: pathlib.Path, size: int, sha256_prefix: str) -> str | None:
    """Returns why ``path`` is not the expected file, or None when it is."""
    got_size = path.stat().st_size
    if got_size != size:
        return f"it has {got_size:,} bytes, expected {size:,}"
    digest = _sha256(path)
    if not digest.startswith(sha256_prefix):
        return f"its sha256 is {digest}, expected a hash starting with {sha256_prefix}"
    return None


def _missing_weights_message(target: pathlib.Path, why: str) -> str:
    return (
        f"The FID Inception weights are not available: {why}.\n"
        f"Download {FID_WEIGHTS_FILE} ({FID_WEIGHTS_SIZE:,} bytes, sha256 starting with "
        f"{FID_WEIGHTS_SHA256_PREFIX}) from\n  {FID_WEIGHTS_URL}\n"
        f"on a machine with network and put it at\n  {target}\n"
        "(or pass its location explicitly: load_weights(path=...), or --weights=PATH in the "
        "experiment scripts; the cache folder can be moved with $DDST_JAX_CACHE)."
    )


def _download(
    url: str, target: pathlib.Path, size: int, sha256_prefix: str, timeout_s: float = 60.0
) -> None:
    """Downloads ``url`` to ``target`` atomically, keeping it only if size and hash match."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".part")
    tmp = pathlib.Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout_s) as resp:
            shutil.copyfileobj(resp, out, length=1 << 20)
        problem = _verify(tmp, size, sha256_prefix)
        if problem is not None:
            raise WeightsUnavailableError(
                _missing_weights_message(target, f"the download from {url} is corrupt ({problem})")
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _cached_weights_path(cache_dir: str | os.PathLike[str] | None) -> pathlib.Path:
    """The verified cached file, downloading it first when absent."""
    folder = pathlib.Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    target = folder / FID_WEIGHTS_FILE
    if target.exists():
        problem = _verify(target, FID_WEIGHTS_SIZE, FID_WEIGHTS_SHA256_PREFIX)
        if problem is not None:
            raise WeightsUnavailableError(
                _missing_weights_message(target, f"the cached file is not the right one: {problem}")
            )
        return target
    logging.info("Downloading %s to %s", FID_WEIGHTS_URL, target)
    try:
        _download(FID_WEIGHTS_URL, target, FID_WEIGHTS_SIZE, FID_WEIGHTS_SHA256_PREFIX)
    except WeightsUnavailableError:
        raise
    except OSError as e:  # URLError, HTTPError, timeouts and disk errors are all OSErrors.
        raise WeightsUnavailableError(
            _missing_weights_message(target, f"downloading failed ({type(e).__name__}: {e})")
        ) from e
    return target


def weights_file(
    path: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> pathlib.Path:
    """The ``.pth`` file :func:`load_weights` reads for these arguments (downloading it into
    the cache if needed)."""
    if path is None:
        return _cached_weights_path(cache_dir)
    file = pathlib.Path(path).expanduser()
    if not file.is_file():
        why = f"load_weights(path={os.fspath(path)!r}): no such file"
        raise WeightsUnavailableError(_missing_weights_message(file, why))
    return file


def load_weights(
    path: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Variables:
    """Loads pytorch-fid's FID Inception weights as Flax variables (no PyTorch needed).

    Args:
      path: a ``.pth`` file to read. It must hold exactly the expected state dict (keys and
        shapes); its pickle is read with an allowlist, so no code from it runs.
      cache_dir: used when ``path`` is None: ``<cache_dir>/pt_inception-2015-12-05-6726825d.pth``
        is read if present (size and sha256 prefix checked), else downloaded there from
        :data:`FID_WEIGHTS_URL`. Default :func:`default_cache_dir`.

    Returns:
      ``{"params": ..., "batch_stats": ...}`` for :class:`InceptionV3` / :func:`features`.

    Raises:
      WeightsUnavailableError: no file and no download; the message says what to fetch and
        where to put it.
      ValueError: the file holds a different state dict (first mismatch named).
      torch_weights.UnsafeCheckpointError: the file's pickle references forbidden globals.
    """
    file = weights_file(path, cache_dir)
    state_dict = torch_weights.load_state_dict(file)
    return state_dict_to_variables(state_dict, source=os.fspath(file))


def num_parameters(variables: Variables) -> int:
    """Number of scalars in ``variables`` (23,885,392 for the FID Inception)."""
    return sum(math.prod(np.shape(x)) for x in jax.tree.leaves(variables))
