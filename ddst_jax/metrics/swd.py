"""Multi-scale sliced Wasserstein distance (SWD) on Laplacian-pyramid patches, in JAX.

The image-quality metric of Karras et al., "Progressive Growing of GANs for Improved Quality,
Stability, and Variation" (ICLR 2018, appendix D.1). It compares the distributions of local
image patches of two image sets, scale by scale, and needs no pretrained network.

Procedure, per image set:

1. **Pixels.** uint8 (or any integer) images are read as values in [0, 255]; floating images
   are taken to be in [-1, 1] (this library's convention for data batches and generator
   output) and mapped to [0, 255] by ``(x + 1) * 127.5``. All arithmetic is float32. Because
   of the per-set normalisation in step 4, the SWD does not depend on this choice of range.
2. **Laplacian pyramid.** A Gaussian pyramid is built with the separable 5-tap binomial
   filter ``(1, 4, 6, 4, 1) / 16`` (reflect padding, ``numpy``'s ``"reflect"``: the edge
   pixel is not repeated), keeping every second row and column. Level ``l`` of the Laplacian
   pyramid is ``G_l - up(G_{l+1})``, where ``up`` puts the pixels on the even positions of a
   zero image twice the size and filters with ``2 * (1, 4, 6, 4, 1) / 16`` per axis; the
   coarsest level is the Gaussian level itself, so adding the levels back up from the coarsest
   gives the image again (to float32 round-off). Levels are kept while the smaller side is at
   least ``min_resolution`` (16, as in the paper): a 32x32 image gives levels 32 and 16, 48x48
   gives 48 and 24, 64x64 gives 64, 32 and 16.
3. **Descriptors.** From every level of every image, ``patches_per_image`` (128) patches of
   ``patch_size`` x ``patch_size`` (7x7) pixels lying fully inside the level are taken at
   uniformly random positions; each is a descriptor of ``7 * 7 * C`` = 147 values (C = 3).
   The positions come from a PRNG key folded with the level index and a 32-bit hash of the
   image's (rounded) pixels, so they are a function of the image's content, not of its index
   or batch: the same image gets the same patches in either set, and shuffling or re-batching
   a set leaves its descriptor multiset unchanged. (The paper draws positions independently
   of the image; a hash collision merely gives two images the same positions.)
4. **Normalisation** (``normalization="per_set"``, the paper's choice): each set's descriptors
   of a level are standardised by that set's own per-channel mean and standard deviation
   (population std, pooled over descriptors and the 7x7 positions; a constant channel is only
   centred). Consequence: the SWD is blind to any per-channel affine change of the pixels
   (global brightness, contrast, white balance); it sees only changes in structure, texture
   and colour *correlations*. ``normalization="pooled"`` instead standardises both sets with
   the statistics of their union, so that such shifts count too (not in the paper).
5. **Sliced Wasserstein distance.** ``num_projections`` (512) random unit directions in
   descriptor space, drawn in ``num_repeats`` (4) groups of equal size (128 each, as NVIDIA's
   code; the groups bound the memory of the projections and do not change the value, since
   the average over equal groups is the average over all directions). Both sets are projected
   on each direction, the projections sorted, and the mean absolute difference of the sorted
   values (the exact 1-D Wasserstein-1 distance between two equal-size empirical
   distributions) is averaged over all directions.

The result is a dict ``{"swd/32": ..., "swd/16": ..., "swd/avg": ...}`` of Python floats
(keys name each level by its height, or ``"HxW"`` for non-square levels; ``avg`` is the mean
over levels), multiplied by ``scale`` = 1e3 as Karras et al. report it (their tables list
"SWD x 10^3"). Lower is better; identical sets give exactly 0.

Equal set sizes are required by the sorted-difference formula. If the two sets have different
numbers of images, the larger one is subsampled to the size of the smaller: the images kept
are those with the smallest key-salted content hashes, a choice that is deterministic and,
like everything else here, independent of the order of the images.

Cost and memory: descriptors take ``patches_per_image * patch_size**2 * C * 4`` bytes per
image and level (75 KB at the defaults), kept on the host and moved to the device one level at
a time (150 MB for 2 x 1000 images); the projections of one group take
``2 * N * patches_per_image * num_projections / num_repeats * 4`` bytes (130 MB for 1000
images per set). Sorting the projections dominates the run time; on the CPU backend it is done
by NumPy through a host callback (``host_sort``), ~40x faster than XLA's CPU sort. On a busy
2-core CPU, 2 x 1000 images of 32x32x3 take about 4.5 s (7 s with compilation).

The JAX core functions (:func:`laplacian_pyramid`, :func:`extract_descriptors`,
:func:`sliced_wasserstein`) have static shapes and can be jitted; :func:`swd` and
:func:`compute_descriptors` are the NumPy-facing wrappers that batch large image sets. To
score many generated sets against one reference set, compute the reference's
:class:`Descriptors` once and call :func:`swd_from_descriptors`.

>>> import numpy as np, jax
>>> rng = np.random.default_rng(0)
>>> a = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
>>> result = swd(a, a, jax.random.key(0), num_projections=16, num_repeats=2)
>>> sorted(result), result["swd/avg"]
(['swd/16', 'swd/32', 'swd/avg'], 0.0)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "NORMALIZATIONS",
    "Descriptors",
    "compute_descriptors",
    "extract_descriptors",
    "image_hash",
    "laplacian_pyramid",
    "normalize_descriptors",
    "pyr_down",
    "pyr_up",
    "pyramid_resolutions",
    "random_directions",
    "reconstruct_laplacian",
    "sliced_wasserstein",
    "swd",
    "swd_from_descriptors",
    "to_float_images",
]

NORMALIZATIONS = ("per_set", "pooled")

# Binomial approximation of a Gaussian (sigma ~ 1 pixel), applied separably.
_BINOMIAL = (1 / 16, 4 / 16, 6 / 16, 4 / 16, 1 / 16)
# Sub-keys of the user's key: patch positions and projection directions must not share one.
_PATCH_STREAM, _PROJECTION_STREAM, _SUBSAMPLE_STREAM = 0, 1, 2


# ------------------------------------------------------------------------------------------
# Pixels and the Laplacian pyramid
# ------------------------------------------------------------------------------------------


def to_float_images(images: Any) -> jax.Array:
    """Images -> float32 values in [0, 255].

    Args:
      images: (N, H, W, C) integer images in [0, 255] (uint8), or floating images in [-1, 1].

    Returns:
      float32 (N, H, W, C); integers unchanged in value, floats mapped by ``(x + 1) * 127.5``.
    """
    x = jnp.asarray(images)
    if jnp.issubdtype(x.dtype, jnp.floating):
        return (x.astype(jnp.float32) + 1.0) * 127.5
    return x.astype(jnp.float32)


def _filter_axis(x: jax.Array, axis: int, gain: float) -> jax.Array:
    """5-tap binomial filter of ``x`` along ``axis``, same size, reflect padding."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (2, 2)
    xp = jnp.pad(x, pad, mode="reflect")
    n = x.shape[axis]
    # Five shifted slices instead of a convolution: cheap at these sizes and exact in float32.
    return sum(
        (gain * w) * lax.slice_in_dim(xp, k, k + n, axis=axis) for k, w in enumerate(_BINOMIAL)
    )


def pyr_down(x: jax.Array) -> jax.Array:
    """One Gaussian-pyramid step: blur, then keep even rows and columns.

    Args:
      x: float (N, H, W, C), H, W >= 3.

    Returns:
      (N, ceil(H / 2), ceil(W / 2), C).
    """
    return _filter_axis(_filter_axis(x, 1, 1.0), 2, 1.0)[:, ::2, ::2]


def pyr_up(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Upsampling that inverts the geometry of :func:`pyr_down`: zero-insert, then blur.

    Args:
      x: float (N, h, w, C).
      size: output (H, W) with ``ceil(H / 2) == h`` and ``ceil(W / 2) == w``.

    Returns:
      (N, H, W, C). The gain of 2 per axis restores the mean lost to the inserted zeros.
    """
    n, h, w, c = x.shape
    if ((size[0] + 1) // 2, (size[1] + 1) // 2) != (h, w):
        raise ValueError(f"pyr_up: cannot upsample ({h}, {w}) to {tuple(size)}.")
    z = jnp.zeros((n, size[0], size[1], c), x.dtype).at[:, ::2, ::2].set(x)
    return _filter_axis(_filter_axis(z, 1, 2.0), 2, 2.0)


def pyramid_resolutions(height: int, width: int, min_resolution: int = 16) -> list[tuple[int, int]]:
    """(H, W) of each pyramid level, finest first.

    The full size always counts; each further level halves it (rounding up) and is kept while
    its smaller side is at least ``min_resolution``.

    >>> pyramid_resolutions(32, 32), pyramid_resolutions(48, 48)
    ([(32, 32), (16, 16)], [(48, 48), (24, 24)])
    >>> len(pyramid_resolutions(64, 64)), pyramid_resolutions(64, 64, min_resolution=64)
    (3, [(64, 64)])
    """
    if min_resolution < 1:
        raise ValueError(f"min_resolution must be >= 1, got {min_resolution}.")
    sizes = [(int(height), int(width))]
    while True:
        h, w = ((s + 1) // 2 for s in sizes[-1])
        if min(h, w) < min_resolution or (h, w) == sizes[-1]:
            return sizes
        sizes.append((h, w))


def laplacian_pyramid(images: jax.Array, num_levels: int) -> list[jax.Array]:
    """Laplacian pyramid, finest level first; the last level is the coarsest Gaussian level.

    Args:
      images: float (N, H, W, C), e.g. from :func:`to_float_images` (values in [0, 255]).
      num_levels: number of levels (e.g. ``len(pyramid_resolutions(H, W))``); 1 returns the
        images themselves.

    Returns:
      ``num_levels`` float arrays (N, H_l, W_l, C), sizes as :func:`pyramid_resolutions`.
    """
    if num_levels < 1:
        raise ValueError(f"num_levels must be >= 1, got {num_levels}.")
    gaussian = [images]
    for _ in range(num_levels - 1):
        gaussian.append(pyr_down(gaussian[-1]))
    pairs = zip(gaussian[:-1], gaussian[1:], strict=True)
    bands = [g - pyr_up(g_next, g.shape[1:3]) for g, g_next in pairs]
    return [*bands, gaussian[-1]]


def reconstruct_laplacian(levels: Sequence[jax.Array]) -> jax.Array:
    """Inverse of :func:`laplacian_pyramid`: upsample from the coarsest level and add.

    Args:
      levels: Laplacian pyramid, finest first.

    Returns:
      float (N, H, W, C) images equal to the pyramid's input up to float round-off.
    """
    image = levels[-1]
    for band in reversed(levels[:-1]):
        image = band + pyr_up(image, band.shape[1:3])
    return image


# ------------------------------------------------------------------------------------------
# Patch descriptors
# ------------------------------------------------------------------------------------------


def _fmix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: spreads every input bit over the output (uint32)."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def image_hash(images: Any) -> jax.Array:
    """32-bit hash of each image's pixels rounded to integers in [0, 255].

    Rounding makes a uint8 image and its float [-1, 1] version hash alike.

    Args:
      images: (N, H, W, C), as :func:`to_float_images` accepts.

    Returns:
      uint32 (N,).
    """
    x = to_float_images(images)
    q = jnp.round(jnp.clip(x, 0.0, 255.0)).astype(jnp.uint32).reshape(x.shape[0], -1)
    index = jnp.arange(q.shape[1], dtype=jnp.uint32)
    weights = _fmix32(index * jnp.uint32(0x9E3779B9) + jnp.uint32(1)) | jnp.uint32(1)
    # Sum of position-weighted pixels, wrapping modulo 2**32, then mixed.
    h = jnp.sum((q + jnp.uint32(1)) * weights, axis=1, dtype=jnp.uint32)
    return _fmix32(h ^ jnp.uint32(q.shape[1]))


def extract_descriptors(
    images: Any,
    key: jax.Array,
    *,
    num_levels: int,
    patches_per_image: int = 128,
    patch_size: int = 7,
) -> list[jax.Array]:
    """Random patches of each Laplacian level of each image (jittable; shapes static).

    Args:
      images: (N, H, W, C) uint8 in [0, 255] or float in [-1, 1].
      key: PRNG key for the patch positions (a level's positions for an image depend only on
        the key, the level index and :func:`image_hash` of the image).
      num_levels: pyramid levels, e.g. ``len(pyramid_resolutions(H, W, min_resolution))``.
      patches_per_image: patches per image and level.
      patch_size: side of the square patches, in pixels of the level; at most the coarsest
        level's smaller side.

    Returns:
      ``num_levels`` float32 arrays (N * patches_per_image, patch_size, patch_size, C) of
      unnormalised Laplacian values (pixel units of [0, 255]); image i owns rows
      ``i * patches_per_image`` to ``(i + 1) * patches_per_image - 1``.
    """
    x = to_float_images(images)
    n, c = x.shape[0], x.shape[3]
    hashes = image_hash(images)
    p = patch_size
    out = []
    for level_index, level in enumerate(laplacian_pyramid(x, num_levels)):
        h, w = level.shape[1:3]
        if min(h, w) < p:
            raise ValueError(f"patch_size {p} exceeds pyramid level {h}x{w}.")
        level_key = jax.random.fold_in(key, level_index)
        keys = jax.vmap(lambda hsh, k=level_key: jax.random.fold_in(k, hsh))(hashes)
        # Top-left corners such that the patch lies inside the level (no padding).
        limits = jnp.array([h - p + 1, w - p + 1], jnp.int32)
        corners = jax.vmap(
            lambda k, lim=limits: jax.random.randint(k, (patches_per_image, 2), 0, lim)
        )(keys)

        def patches(img: jax.Array, yx: jax.Array, c: int = c) -> jax.Array:
            return jax.vmap(lambda t: lax.dynamic_slice(img, (t[0], t[1], 0), (p, p, c)))(yx)

        out.append(jax.vmap(patches)(level, corners).reshape(n * patches_per_image, p, p, c))
    return out


def normalize_descriptors(
    descriptors: jax.Array, reference: jax.Array | None = None
) -> jax.Array:
    """Standardises descriptors per channel.

    Args:
      descriptors: float (M, p, p, C).
      reference: descriptors (M', p, p, C) whose per-channel mean and population std are used;
        ``None``: those of ``descriptors`` (the paper's per-set normalisation).

    Returns:
      float32 (M, p * p * C) flattened descriptors; a channel with zero std is only centred.
    """
    ref = descriptors if reference is None else reference
    mean = jnp.mean(ref, axis=(0, 1, 2))
    std = jnp.std(ref, axis=(0, 1, 2))
    std = jnp.where(std > 0, std, 1.0)
    z = (descriptors - mean) / std
    return z.reshape(z.shape[0], -1).astype(jnp.float32)


# ------------------------------------------------------------------------------------------
# Sliced Wasserstein distance
# ------------------------------------------------------------------------------------------


def random_directions(key: jax.Array, num: int, dim: int) -> jax.Array:
    """``num`` directions uniform on the unit sphere in ``dim`` dimensions: float32 (num, dim)."""
    v = jax.random.normal(key, (num, dim), jnp.float32)
    return v / jnp.linalg.norm(v, axis=1, keepdims=True)


def _host_sort(x: jax.Array) -> jax.Array:
    """``jnp.sort(x, axis=-1)`` computed by NumPy on the host (usable under jit)."""
    return jax.pure_callback(
        lambda v: np.sort(np.asarray(v), axis=-1),
        jax.ShapeDtypeStruct(x.shape, x.dtype),
        x,
        vmap_method="sequential",
    )


def sliced_wasserstein(
    a: jax.Array,
    b: jax.Array,
    key: jax.Array,
    *,
    num_projections: int = 512,
    num_repeats: int = 4,
    host_sort: bool = False,
) -> jax.Array:
    """Sliced Wasserstein-1 distance between two equal-size point sets (jittable).

    The mean over ``num_projections`` random unit directions of the 1-D Wasserstein-1 distance
    between the projected sets (mean absolute difference of the sorted projections). The
    directions are ``random_directions(key, num_projections, D)``, processed in
    ``num_repeats`` groups of equal size to bound memory.

    Args:
      a, b: float (M, D) with the same M (each row a point).
      key: PRNG key of the directions.
      num_projections: directions in all; a multiple of ``num_repeats``.
      num_repeats: groups the directions are processed in.
      host_sort: sort with NumPy through a host callback instead of XLA's sort. Same values;
        on the CPU backend NumPy's vectorised sort is ~40x faster than XLA's, which would
        otherwise take most of the time.

    Returns:
      float32 scalar, in the units of the points (not scaled by 1e3).

    >>> import jax.numpy as jnp, jax
    >>> a = jnp.array([[0.0], [1.0], [2.0], [3.0]])
    >>> b = jnp.array([[5.0], [3.0], [1.0], [7.0]])   # sorted 1, 3, 5, 7
    >>> float(sliced_wasserstein(a, b, jax.random.key(0), num_projections=4, num_repeats=2))
    2.5
    """
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(
            f"sliced_wasserstein needs two (M, D) arrays of the same shape (equal set sizes), "
            f"got {a.shape} and {b.shape}."
        )
    if num_repeats < 1 or num_projections % num_repeats:
        raise ValueError(
            f"num_projections ({num_projections}) must be a positive multiple of num_repeats "
            f"({num_repeats})."
        )
    dirs = random_directions(key, num_projections, a.shape[1])
    dirs = dirs.reshape(num_repeats, num_projections // num_repeats, a.shape[1])

    sort = _host_sort if host_sort else functools.partial(jnp.sort, axis=-1)

    def group(d: jax.Array) -> jax.Array:
        # (K, M) so that the sort runs along the contiguous axis; HIGHEST avoids TF32 on GPUs.
        pa = sort(jnp.matmul(d, a.T, precision=lax.Precision.HIGHEST))
        pb = sort(jnp.matmul(d, b.T, precision=lax.Precision.HIGHEST))
        return jnp.mean(jnp.abs(pa - pb), axis=-1)

    return jnp.mean(lax.map(group, dirs))


@functools.partial(
    jax.jit, static_argnames=("num_projections", "num_repeats", "normalization", "host_sort")
)
def _level_swd(
    da: jax.Array,
    db: jax.Array,
    key: jax.Array,
    *,
    num_projections: int,
    num_repeats: int,
    normalization: str,
    host_sort: bool,
) -> jax.Array:
    """SWD (unscaled) of one pyramid level's raw descriptors (M, p, p, C) of two sets."""
    if normalization == "pooled":
        union = jnp.concatenate([da, db])
        za, zb = normalize_descriptors(da, union), normalize_descriptors(db, union)
    else:
        za, zb = normalize_descriptors(da), normalize_descriptors(db)
    return sliced_wasserstein(
        za, zb, key, num_projections=num_projections, num_repeats=num_repeats, host_sort=host_sort
    )


# ------------------------------------------------------------------------------------------
# NumPy-facing wrappers
# ------------------------------------------------------------------------------------------


class Descriptors(NamedTuple):
    """Raw patch descriptors of one image set (host memory).

    Attributes:
      levels: per pyramid level, finest first, float32 (N * patches_per_image, p, p, C).
      resolutions: (H, W) of each level.
      hashes: uint32 (N,) :func:`image_hash` of each image (used to subsample).
    """

    levels: tuple[np.ndarray, ...]
    resolutions: tuple[tuple[int, int], ...]
    hashes: np.ndarray

    @property
    def num_images(self) -> int:
        return int(self.hashes.shape[0])

    @property
    def patches_per_image(self) -> int:
        return self.levels[0].shape[0] // max(self.num_images, 1)


_extract_jit = jax.jit(
    extract_descriptors, static_argnames=("num_levels", "patches_per_image", "patch_size")
)
_hash_jit = jax.jit(image_hash)


def compute_descriptors(
    images: Any,
    key: jax.Array,
    *,
    min_resolution: int = 16,
    patches_per_image: int = 128,
    patch_size: int = 7,
    batch_size: int = 256,
) -> Descriptors:
    """:func:`extract_descriptors` over a large image set, ``batch_size`` images at a time.

    Args:
      images: (N, H, W, C) uint8 in [0, 255] or float in [-1, 1]: an array, or anything with
        ``len`` and slicing that returns one (e.g. a memory-mapped file).
      key: the same key as given to :func:`swd_from_descriptors` (positions use a sub-key).
      min_resolution, patches_per_image, patch_size: as :func:`swd`.
      batch_size: images per compiled call (the last batch is padded; one compile).

    Returns:
      :class:`Descriptors`; independent of ``batch_size`` and of the order of the images up
      to that order.
    """
    n = len(images)
    if n < 1:
        raise ValueError("compute_descriptors needs at least one image.")
    first = np.asarray(images[0:1])
    if first.ndim != 4:
        raise ValueError(f"images must be (N, H, W, C), got a batch of shape {first.shape}.")
    resolutions = tuple(pyramid_resolutions(first.shape[1], first.shape[2], min_resolution))
    if min(resolutions[-1]) < patch_size:
        raise ValueError(
            f"patch_size {patch_size} exceeds the coarsest pyramid level {resolutions[-1]}."
        )
    patch_key = jax.random.fold_in(key, _PATCH_STREAM)
    size = min(batch_size, n)
    levels: list[list[np.ndarray]] = [[] for _ in resolutions]
    hashes = []
    for start in range(0, n, size):
        batch = np.asarray(images[start : start + size])
        count = batch.shape[0]
        if count < size:  # Same shape for every call: one compile. Padding rows are dropped.
            batch = np.concatenate([batch, np.zeros((size - count, *batch.shape[1:]), batch.dtype)])
        out = _extract_jit(batch, patch_key, num_levels=len(resolutions),
                           patches_per_image=patches_per_image, patch_size=patch_size)
        for store, level in zip(levels, out, strict=True):
            store.append(np.asarray(level)[: count * patches_per_image])
        hashes.append(np.asarray(_hash_jit(batch))[:count])
    return Descriptors(
        levels=tuple(np.concatenate(s) for s in levels),
        resolutions=resolutions,
        hashes=np.concatenate(hashes),
    )


def _fmix32_np(h: np.ndarray) -> np.ndarray:
    h = h.astype(np.uint64)  # Products are taken modulo 2**32 below.
    mask = np.uint64(0xFFFFFFFF)
    h ^= h >> np.uint64(16)
    h = (h * np.uint64(0x85EBCA6B)) & mask
    h ^= h >> np.uint64(13)
    h = (h * np.uint64(0xC2B2AE35)) & mask
    h ^= h >> np.uint64(16)
    return h.astype(np.uint32)


def _subsample(d: Descriptors, count: int, salt: int) -> Descriptors:
    """The ``count`` images of ``d`` with the smallest salted hashes (order-independent)."""
    rank = _fmix32_np(d.hashes ^ np.uint32(salt))
    keep = np.sort(np.argsort(rank, kind="stable")[:count])
    ppi = d.patches_per_image
    rows = (keep[:, None] * ppi + np.arange(ppi)[None, :]).reshape(-1)
    return Descriptors(tuple(lv[rows] for lv in d.levels), d.resolutions, d.hashes[keep])


def _level_name(resolution: tuple[int, int]) -> str:
    h, w = resolution
    return f"swd/{h}" if h == w else f"swd/{h}x{w}"


def swd_from_descriptors(
    a: Descriptors,
    b: Descriptors,
    key: jax.Array,
    *,
    num_projections: int = 512,
    num_repeats: int = 4,
    normalization: str = "per_set",
    scale: float = 1e3,
    host_sort: bool | None = None,
) -> dict[str, float]:
    """SWD per level and its mean from precomputed descriptors (see :func:`swd`).

    Args:
      a, b: from :func:`compute_descriptors` with the same settings and ``key``.
      key, num_projections, num_repeats, normalization, scale, host_sort: as :func:`swd`.

    Returns:
      As :func:`swd`.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization={normalization!r} is not one of {NORMALIZATIONS}.")
    if a.resolutions != b.resolutions:
        raise ValueError(f"pyramid levels differ: {a.resolutions} vs {b.resolutions}.")
    if a.levels[0].shape[1:] != b.levels[0].shape[1:]:
        raise ValueError(
            f"descriptor shapes differ: {a.levels[0].shape[1:]} vs {b.levels[0].shape[1:]}."
        )
    if a.patches_per_image != b.patches_per_image:
        raise ValueError(
            f"patches_per_image differ: {a.patches_per_image} vs {b.patches_per_image}."
        )
    if a.num_images != b.num_images:
        # Equal sizes are needed for the sorted differences: keep a hash-chosen subset.
        salt = int(jax.random.bits(jax.random.fold_in(key, _SUBSAMPLE_STREAM), (), jnp.uint32))
        count = min(a.num_images, b.num_images)
        a, b = (_subsample(d, count, salt) if d.num_images > count else d for d in (a, b))
    if host_sort is None:
        host_sort = jax.default_backend() == "cpu"
    proj_key = jax.random.fold_in(key, _PROJECTION_STREAM)
    result = {}
    for i, (res, da, db) in enumerate(zip(a.resolutions, a.levels, b.levels, strict=True)):
        value = _level_swd(jnp.asarray(da), jnp.asarray(db), jax.random.fold_in(proj_key, i),
                           num_projections=num_projections, num_repeats=num_repeats,
                           normalization=normalization, host_sort=host_sort)
        result[_level_name(res)] = float(value) * scale
    result["swd/avg"] = float(np.mean(list(result.values())))
    return result


def swd(
    images_a: Any,
    images_b: Any,
    key: jax.Array,
    *,
    min_resolution: int = 16,
    patches_per_image: int = 128,
    patch_size: int = 7,
    num_projections: int = 512,
    num_repeats: int = 4,
    normalization: str = "per_set",
    scale: float = 1e3,
    batch_size: int = 256,
    host_sort: bool | None = None,
) -> dict[str, float]:
    """Multi-scale sliced Wasserstein distance between two image sets (Karras et al. 2018).

    Args:
      images_a, images_b: (N_a, H, W, C) and (N_b, H, W, C) images, uint8 in [0, 255] or
        float in [-1, 1] (arrays, or sliceable sequences of batches such as memory maps).
        If N_a != N_b the larger set is subsampled (see the module docstring).
      key: PRNG key; the result is a deterministic function of the key and the two sets
        (independent of the order of the images and of ``batch_size``).
      min_resolution: coarsest pyramid level's smaller side is at least this (paper: 16).
      patches_per_image: patches per image and level (paper: 128).
      patch_size: patch side in pixels (paper: 7).
      num_projections: random directions per level in all (paper: 512).
      num_repeats: groups the directions are drawn and processed in (paper code: 4 x 128).
      normalization: ``"per_set"`` (paper) or ``"pooled"``; see the module docstring.
      scale: factor applied to the distances (1e3: "SWD x 10^3" as in the paper).
      batch_size: images per compiled descriptor-extraction call.
      host_sort: sort projections with NumPy (see :func:`sliced_wasserstein`); ``None``: when
        JAX's default backend is the CPU.

    Returns:
      ``{"swd/<H>": float, ... finest first, "swd/avg": mean over levels}``, times ``scale``.
    """
    shapes = [np.asarray(x[0:1]).shape[1:] for x in (images_a, images_b)]
    if shapes[0] != shapes[1]:
        raise ValueError(f"image sets differ in (H, W, C): {shapes[0]} vs {shapes[1]}.")
    kwargs = dict(min_resolution=min_resolution, patches_per_image=patches_per_image,
                  patch_size=patch_size, batch_size=batch_size)
    da = compute_descriptors(images_a, key, **kwargs)
    db = compute_descriptors(images_b, key, **kwargs)
    return swd_from_descriptors(da, db, key, num_projections=num_projections,
                                num_repeats=num_repeats, normalization=normalization, scale=scale,
                                host_sort=host_sort)
