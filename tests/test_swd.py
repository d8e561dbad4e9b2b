"""Tests of the multi-scale sliced Wasserstein distance (ddst_jax.metrics.swd)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
import scipy.stats

from ddst_jax.metrics import swd

N = 128  # Images per set: 16384 descriptors per level, enough to separate the strengths below.
KEY = jax.random.key(7)
# Fewer directions than the default 512 keep the tests fast; every score in a test uses the
# same directions (same key), so comparisons between strengths are not blurred by them.
FAST = {"num_projections": 128, "num_repeats": 2}


def _images(seed: int, n: int = N, size: int = 32) -> np.ndarray:
    """uint8 (n, size, size, 3): smooth random colour fields with three flat-coloured discs."""
    rng = np.random.default_rng(seed)
    field = scipy.ndimage.gaussian_filter(
        rng.standard_normal((n, size, size, 3)), sigma=(0, 3, 3, 0), mode="wrap"
    )
    x = 128.0 + 40.0 * field / field.std(axis=(1, 2, 3), keepdims=True)
    yy, xx = np.mgrid[:size, :size]
    for img in x:
        for _ in range(3):
            cy, cx = rng.uniform(0, size, 2)
            inside = (yy - cy) ** 2 + (xx - cx) ** 2 < rng.uniform(3, 8) ** 2
            img[inside] = rng.uniform(0, 255, 3)
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


_pyramid = jax.jit(swd.laplacian_pyramid, static_argnums=1)
_down2 = jax.jit(lambda x: swd.pyr_down(swd.pyr_down(x)))


def _u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def sets() -> tuple[np.ndarray, np.ndarray, swd.Descriptors]:
    """Reference set, an independent sample of the same distribution, reference descriptors."""
    a, b = _images(0), _images(1)
    return a, b, swd.compute_descriptors(a, KEY)


def _score(ref: swd.Descriptors, images: np.ndarray, **kwargs) -> dict[str, float]:
    db = images if isinstance(images, swd.Descriptors) else swd.compute_descriptors(images, KEY)
    return swd.swd_from_descriptors(ref, db, KEY, **(FAST | kwargs))


def _assert_increasing(values: list[float], what: str) -> None:
    assert all(x < y for x, y in zip(values, values[1:], strict=False)), f"{what}: {values}"


# ------------------------------------------------------------------------------------------
# Laplacian pyramid
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, expected",
    [
        ((32, 32), [(32, 32), (16, 16)]),
        ((48, 48), [(48, 48), (24, 24)]),
        ((64, 64), [(64, 64), (32, 32), (16, 16)]),
        ((37, 29), [(37, 29)]),  # Next level would be 19x15 < 16.
        ((8, 8), [(8, 8)]),
    ],
)
def test_pyramid_resolutions(size, expected):
    assert swd.pyramid_resolutions(*size) == expected


@pytest.mark.parametrize("size", [(32, 32), (48, 48), (64, 64), (37, 29)])
def test_laplacian_pyramid_shapes_and_reconstruction(size):
    x = swd.to_float_images(_images(3, n=4, size=max(size))[:, : size[0], : size[1]])
    num_levels = 3
    levels = _pyramid(x, num_levels)
    shapes = [lv.shape for lv in levels]
    h, w = size
    expected = []
    for _ in range(num_levels):
        expected.append((4, h, w, 3))
        h, w = (h + 1) // 2, (w + 1) // 2
    assert shapes == expected
    # The coarsest level is the twice-downsampled Gaussian level, not a band.
    np.testing.assert_allclose(levels[-1], _down2(x), rtol=0, atol=1e-4)
    np.testing.assert_allclose(jax.jit(swd.reconstruct_laplacian)(levels), x, rtol=0, atol=1e-3)


def test_pyramid_of_constant_image_has_zero_bands():
    # Checks the filter gains and the reflect padding at the borders (even and odd sizes).
    for size in ((32, 32), (33, 17)):
        x = jnp.full((2, *size, 3), 77.0)
        levels = _pyramid(x, 3)
        for band in levels[:-1]:
            np.testing.assert_allclose(band, 0.0, atol=1e-4)
        np.testing.assert_allclose(levels[-1], 77.0, rtol=1e-6)


def test_to_float_images_range():
    np.testing.assert_array_equal(swd.to_float_images(np.array([0, 128, 255], np.uint8)),
                                  [0.0, 128.0, 255.0])
    np.testing.assert_allclose(swd.to_float_images(np.array([-1.0, 0.0, 1.0])),
                               [0.0, 127.5, 255.0])


# ------------------------------------------------------------------------------------------
# Sliced Wasserstein distance of point sets
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("host_sort", [False, True])
def test_sliced_wasserstein_in_1d_is_wasserstein_1(host_sort):
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(500), rng.exponential(2.0, 500)
    # In one dimension every unit direction is +1 or -1: the SWD is W1 itself.
    got = swd.sliced_wasserstein(jnp.asarray(a[:, None], jnp.float32),
                                 jnp.asarray(b[:, None], jnp.float32), KEY,
                                 num_projections=8, num_repeats=2, host_sort=host_sort)
    assert float(got) == pytest.approx(scipy.stats.wasserstein_distance(a, b), rel=1e-5)


@pytest.mark.parametrize("c", [0.5, 3.0])
def test_sliced_wasserstein_of_shifted_points(c):
    """b = a + c * e_0: each projection on u is shifted by c * u_0, so SWD = c * mean |u_0|."""
    dim, num = 147, 512
    a = jax.random.normal(jax.random.key(1), (1000, dim))
    b = a.at[:, 0].add(c)
    got = float(swd.sliced_wasserstein(a, b, KEY, num_projections=num, num_repeats=4,
                                       host_sort=True))
    dirs = swd.random_directions(KEY, num, dim)
    assert got == pytest.approx(c * float(jnp.mean(jnp.abs(dirs[:, 0]))), rel=1e-4)
    # ... which estimates c * E|u_0| for u uniform on the sphere S^(D-1).
    expected = c * math.exp(math.lgamma(dim / 2) - math.lgamma((dim + 1) / 2)) / math.sqrt(math.pi)
    assert got == pytest.approx(expected, rel=0.08)


def test_sliced_wasserstein_host_sort_matches_xla_sort():
    a = jax.random.normal(jax.random.key(2), (1000, 20))
    b = jax.random.laplace(jax.random.key(3), (1000, 20))
    f = jax.jit(swd.sliced_wasserstein, static_argnames=("num_projections", "num_repeats",
                                                          "host_sort"))
    xla = f(a, b, KEY, num_projections=64, num_repeats=4, host_sort=False)
    host = f(a, b, KEY, num_projections=64, num_repeats=4, host_sort=True)
    assert float(host) == pytest.approx(float(xla), rel=1e-6)


def test_sliced_wasserstein_checks_arguments():
    a = jnp.zeros((10, 3))
    with pytest.raises(ValueError, match="same shape"):
        swd.sliced_wasserstein(a, jnp.zeros((11, 3)), KEY)
    with pytest.raises(ValueError, match="multiple of num_repeats"):
        swd.sliced_wasserstein(a, a, KEY, num_projections=10, num_repeats=4)


# ------------------------------------------------------------------------------------------
# SWD of image sets: known answers
# ------------------------------------------------------------------------------------------


def test_identical_sets_give_exactly_zero(sets):
    a, _, _ = sets
    # Default settings (512 directions in 4 groups, 128 patches of 7x7 per image and level).
    assert swd.swd(a, a, KEY) == {"swd/32": 0.0, "swd/16": 0.0, "swd/avg": 0.0}


def test_same_distribution_is_small_compared_with_degraded(sets):
    a, b, ref = sets
    same = _score(ref, b)
    degraded = {
        "blur": _score(ref, _u8(scipy.ndimage.gaussian_filter(b.astype(float), (0, 1, 1, 0)))),
        "noise": _score(ref, _u8(b + np.random.default_rng(0).normal(0, 16, b.shape))),
    }
    assert 0 < same["swd/avg"]
    for name, d in degraded.items():
        assert same["swd/avg"] < 0.5 * d["swd/avg"], (name, same, d)
    # Another independent sample is as far as the first (sampling noise, not bias).
    other = _score(ref, _images(2))
    assert other["swd/avg"] == pytest.approx(same["swd/avg"], rel=0.5)


def test_monotone_in_gaussian_blur(sets):
    _, b, ref = sets
    bf = b.astype(np.float64)
    res = [_score(ref, b)] + [
        _score(ref, _u8(scipy.ndimage.gaussian_filter(bf, (0, s, s, 0)))) for s in (0.5, 1, 2)
    ]
    _assert_increasing([r["swd/avg"] for r in res], "blur, avg")
    _assert_increasing([r["swd/32"] for r in res], "blur, finest level")


def test_monotone_in_additive_noise(sets):
    _, b, ref = sets
    noise = np.random.default_rng(1).standard_normal(b.shape)
    res = [_score(ref, _u8(b + s * noise)) for s in (0, 4, 8, 16)]
    _assert_increasing([r["swd/avg"] for r in res], "noise, avg")
    _assert_increasing([r["swd/32"] for r in res], "noise, finest level")


def test_monotone_in_desaturation(sets):
    """A colour change that mixes channels: per-channel normalisation cannot undo it."""
    _, b, ref = sets
    bf = b.astype(np.float64)
    gray = bf.mean(axis=-1, keepdims=True)
    res = [_score(ref, _u8((1 - s) * bf + s * gray)) for s in (0, 0.25, 0.5, 1)]
    for k in ("swd/32", "swd/16", "swd/avg"):
        _assert_increasing([r[k] for r in res], f"desaturation, {k}")


def test_monotone_in_clipped_brightness_shift(sets):
    """Brightening saturates pixels at 255, which changes structure the SWD sees."""
    _, b, ref = sets
    res = [_score(ref, _u8(b.astype(np.float64) + s)) for s in (0, 40, 80, 120)]
    # The finest band changes little (and not monotonically at large shifts): it is the
    # coarse level, where whole regions saturate, that moves.
    for k in ("swd/16", "swd/avg"):
        _assert_increasing([r[k] for r in res], f"brightness, {k}")


def test_pooled_normalisation_sees_an_unclipped_brightness_shift(sets):
    _, b, ref = sets
    # Float input in [-1, 1] shifted beyond 1: no clipping.
    shifted = [swd.compute_descriptors((b.astype(np.float32) + s) / 127.5 - 1.0, KEY)
               for s in (0, 20, 40, 80)]
    pooled = [_score(ref, x, normalization="pooled") for x in shifted]
    _assert_increasing([r["swd/avg"] for r in pooled], "pooled brightness, avg")
    # The paper's per-set normalisation removes the shift (up to patch-sampling noise).
    per_set = [_score(ref, x)["swd/avg"] for x in shifted]
    assert max(per_set) < 1.2 * min(per_set), per_set


def test_per_set_normalisation_is_invariant_to_channel_affine_maps(sets):
    """x -> alpha_c x + beta_c scales every band by alpha_c and the coarsest level affinely."""
    a, b, ref = sets
    db = swd.compute_descriptors(b, KEY)
    alpha, beta = np.array([0.5, 1.5, 2.0], np.float32), np.array([30.0, -10.0, 5.0], np.float32)
    levels = [lv * alpha for lv in db.levels[:-1]] + [db.levels[-1] * alpha + beta]
    mapped = swd.Descriptors(tuple(levels), db.resolutions, db.hashes)
    base = swd.swd_from_descriptors(ref, db, KEY)
    got = swd.swd_from_descriptors(ref, mapped, KEY)
    for k in base:
        assert got[k] == pytest.approx(base[k], rel=1e-4), k
    pooled = swd.swd_from_descriptors(ref, mapped, KEY, normalization="pooled")
    assert pooled["swd/avg"] > 2 * base["swd/avg"]


# ------------------------------------------------------------------------------------------
# Invariances, determinism and bookkeeping
# ------------------------------------------------------------------------------------------


def test_permutation_symmetry_and_batching_invariance(sets):
    """Patch positions follow image content, so order and batching change only summation
    order (float32 round-off); the SWD is also symmetric in its two arguments."""
    a, b, _ = sets
    base = swd.swd(a, b, KEY, **FAST)
    rng = np.random.default_rng(5)
    variants = {
        "shuffled": swd.swd(a[rng.permutation(N)], b[rng.permutation(N)], KEY, **FAST),
        "swapped": swd.swd(b, a, KEY, **FAST),
        "batch 40": swd.swd(a, b, KEY, batch_size=40, **FAST),  # padded last batch
    }
    for name, got in variants.items():
        for k in base:
            assert got[k] == pytest.approx(base[k], rel=1e-5), (name, k)
    # A different key draws other patches and directions: a different, similar value.
    other = swd.swd(a, b, jax.random.key(8), **FAST)
    assert other["swd/avg"] != base["swd/avg"]
    assert other["swd/avg"] == pytest.approx(base["swd/avg"], rel=0.3)


def test_shuffled_copy_gives_zero_up_to_round_off(sets):
    a, _, _ = sets
    got = swd.swd(a, a[np.random.default_rng(0).permutation(N)], KEY, **FAST)
    assert max(got.values()) < 1e-3  # x 1e3 scale; exactly 0 up to summation order


def test_uint8_and_float_inputs_agree(sets):
    a, b, _ = sets
    base = swd.swd(a, b, KEY, **FAST)
    got = swd.swd(a.astype(np.float32) / 127.5 - 1.0, b, KEY, **FAST)
    for k in base:
        assert got[k] == pytest.approx(base[k], rel=1e-4), k


def test_unequal_sizes_are_subsampled_order_independently(sets):
    a, b, _ = sets
    da, db = swd.compute_descriptors(a, KEY), swd.compute_descriptors(b[:96], KEY)
    base = _score(da, db)
    shuffled = _score(swd.compute_descriptors(a[np.random.default_rng(3).permutation(N)], KEY),
                      db)
    for k in base:
        assert shuffled[k] == pytest.approx(base[k], rel=1e-5), k
    assert 0 < base["swd/avg"] < 2 * _score(da, b)["swd/avg"]
    # It is the same as scoring the hash-chosen subset of the larger set explicitly.
    salt = int(jax.random.bits(jax.random.fold_in(KEY, 2), (), jnp.uint32))
    keep = np.sort(np.argsort(swd._fmix32_np(da.hashes ^ np.uint32(salt)), kind="stable")[:96])
    explicit = _score(swd.compute_descriptors(a[keep], KEY), db)
    for k in base:
        assert explicit[k] == pytest.approx(base[k], rel=1e-5), k


def test_scale_and_level_names_at_48_and_64_pixels():
    small = dict(patches_per_image=16, num_projections=32, num_repeats=2)
    a48, b48 = _images(10, n=16, size=48), _images(11, n=16, size=48)
    r48 = swd.swd(a48, b48, KEY, **small)
    assert list(r48) == ["swd/48", "swd/24", "swd/avg"]
    assert r48["swd/avg"] == pytest.approx((r48["swd/48"] + r48["swd/24"]) / 2)
    raw = swd.swd(a48, b48, KEY, scale=1.0, **small)
    assert raw["swd/avg"] * 1e3 == pytest.approx(r48["swd/avg"], rel=1e-6)
    r64 = swd.swd(_images(10, n=16, size=64), _images(11, n=16, size=64), KEY, **small)
    assert list(r64) == ["swd/64", "swd/32", "swd/16", "swd/avg"]


def test_descriptor_layout():
    imgs = _images(4, n=5)
    d = swd.compute_descriptors(imgs, KEY, patches_per_image=3, batch_size=2)
    assert d.resolutions == ((32, 32), (16, 16))
    assert [lv.shape for lv in d.levels] == [(15, 7, 7, 3), (15, 7, 7, 3)]
    assert d.num_images == 5 and d.patches_per_image == 3
    # Every descriptor of the coarsest level is a 7x7 window of that image's Gaussian level.
    coarse = np.asarray(_pyramid(swd.to_float_images(imgs), 2)[-1])
    for row, patch in enumerate(d.levels[-1]):
        img = coarse[row // 3]
        windows = np.lib.stride_tricks.sliding_window_view(img, (7, 7), axis=(0, 1))
        diffs = np.abs(windows - patch.transpose(2, 0, 1)[None, None]).max(axis=(2, 3, 4))
        assert diffs.min() < 1e-4


def test_argument_errors():
    a = _images(4, n=4)
    with pytest.raises(ValueError, match="differ in"):
        swd.swd(a, a[:, :16], KEY)
    with pytest.raises(ValueError, match="patch_size"):
        swd.swd(a, a, KEY, patch_size=17)
    with pytest.raises(ValueError, match="normalization"):
        swd.swd(a, a, KEY, normalization="global")
