"""Tests of FID, Inception Score, statistics files and the reference-statistics script."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
from hypothesis import given, settings
from hypothesis import strategies as st

from ddst_jax import data, datasets
from ddst_jax.metrics import fid, inception
from experiments import fid_stats

METHODS = ["sqrtm", "eigh"]


def _random_spd(rng: np.random.Generator, d: int, n: int | None = None) -> np.ndarray:
    """Sample covariance of n >= d standard-normal draws: SPD, realistically conditioned."""
    n = n or 4 * d
    x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d))
    return np.atleast_2d(np.cov(x, rowvar=False))


# ------------------------------------------------------------------------------------------
# Frechet distance
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_fid_of_diagonal_gaussians_is_closed_form(method):
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    # ||mu1 - mu2||^2 + sum (sqrt a - sqrt b)^2 = (1 + 0 + 4) + (1 + 1 + 0) = 7
    got = fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b), method=method)
    assert got == pytest.approx(7.0, abs=1e-10)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("c", [0.25, 1.0, 3.0])
def test_fid_of_scaled_covariance_is_closed_form(method, c):
    rng = np.random.default_rng(0)
    sigma = _random_spd(rng, 16)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    # sigma and c * sigma commute: tr(S + cS - 2 sqrt(c) S) = (1 - sqrt c)^2 tr S.
    want = np.sum((mu1 - mu2) ** 2) + (1 - np.sqrt(c)) ** 2 * np.trace(sigma)
    got = fid.frechet_distance(mu1, sigma, mu2, c * sigma, method=method)
    assert got == pytest.approx(want, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_fid_of_identical_statistics_is_zero(method):
    rng = np.random.default_rng(1)
    mu, sigma = fid.feature_statistics(rng.standard_normal((300, 64)) * 3 + 1)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma, method=method)) < 1e-8


def test_fid_of_sampled_gaussian_features_matches_closed_form():
    rng = np.random.default_rng(2)
    mu1, mu2 = np.array([0.0, 0.5, -1.0]), np.array([0.3, 0.5, 0.0])
    sd1, sd2 = np.array([1.0, 2.0, 0.5]), np.array([1.5, 2.0, 1.0])
    n = 200_000
    stats1 = fid.feature_statistics(mu1 + sd1 * rng.standard_normal((n, 3)))
    stats2 = fid.feature_statistics(mu2 + sd2 * rng.standard_normal((n, 3)))
    want = np.sum((mu1 - mu2) ** 2) + np.sum((sd1 - sd2) ** 2)  # 1.09 + 0.5
    assert fid.frechet_distance(*stats1, *stats2) == pytest.approx(want, rel=2e-2)


@settings(max_examples=20, deadline=None)
@given(d=st.integers(1, 24), seed=st.integers(0, 2**32 - 1))
def test_eigh_trace_matches_scipy_sqrtm(d, seed):
    rng = np.random.default_rng(seed)
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    want = np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
    got = fid.trace_sqrt_product(s1, s2, method="eigh")
    assert got == pytest.approx(want, rel=1e-7, abs=1e-9)
    assert fid.trace_sqrt_product(s1, s2, method="sqrtm") == pytest.approx(want, rel=1e-12)


def test_non_finite_sqrtm_falls_back_to_eps_offset():
    # sqrtm([[0, 1], [0, 0]]) does not exist (scipy returns inf). With eps on both diagonals the
    # product is [[l, 1 + eps], [0, l]], l = eps (1 + eps), whose square root has trace 2 sqrt(l).
    eps = 1e-6
    sigma1, sigma2 = np.array([[0.0, 1.0], [0.0, 0.0]]), np.eye(2)
    with pytest.warns(RuntimeWarning, match="adding 1e-06"):
        got = fid.frechet_distance(np.zeros(2), sigma1, np.zeros(2), sigma2, eps=eps)
    assert got == pytest.approx(0.0 + 2.0 - 4.0 * np.sqrt(eps * (1 + eps)), abs=1e-9)


def test_large_imaginary_component_is_an_error():
    with pytest.raises(ValueError, match="imaginary component"):
        fid.frechet_distance(np.zeros(2), -np.eye(2), np.zeros(2), np.eye(2))


@pytest.mark.parametrize(
    "args, message",
    [
        ((np.zeros(3), np.eye(3), np.zeros(2), np.eye(2)), "equal length"),
        ((np.zeros(3), np.eye(2), np.zeros(3), np.eye(3)), r"must be \(3, 3\)"),
        ((np.zeros(2), np.full((2, 2), np.nan), np.zeros(2), np.eye(2)), "sigma1 contains NaN"),
    ],
)
def test_frechet_distance_rejects_bad_statistics(args, message):
    with pytest.raises(ValueError, match=message):
        fid.frechet_distance(*args)


def test_unknown_method_is_an_error():
    with pytest.raises(ValueError, match="method='svd'"):
        fid.frechet_distance(np.zeros(1), np.eye(1), np.zeros(1), np.eye(1), method="svd")


def test_feature_statistics_are_float64_mean_and_unbiased_covariance():
    x = np.array([[1.0, 2.0], [3.0, 6.0], [5.0, 10.0]], np.float32)
    mu, sigma = fid.feature_statistics(x)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, [3.0, 6.0])
    np.testing.assert_allclose(sigma, [[4.0, 8.0], [8.0, 16.0]])  # Divides by N - 1 = 2.
    with pytest.raises(ValueError, match="N >= 2"):
        fid.feature_statistics(x[:1])


# ------------------------------------------------------------------------------------------
# Statistics files (TTUR format)
# ------------------------------------------------------------------------------------------


def test_statistics_round_trip_in_ttur_format(tmp_path):
    rng = np.random.default_rng(3)
    mu, sigma = rng.normal(size=5), _random_spd(rng, 5)
    path = tmp_path / "stats"  # No suffix: the file must land exactly here.
    fid.save_statistics(path, mu, sigma)
    with np.load(path) as f:
        assert sorted(f.files) == ["mu", "sigma"]
    got_mu, got_sigma = fid.load_statistics(path)
    np.testing.assert_array_equal(got_mu, mu)
    np.testing.assert_array_equal(got_sigma, sigma)


def test_load_statistics_reads_ttur_files_and_names_problems(tmp_path):
    ttur = tmp_path / "fid_stats_cifar10_train.npz"
    np.savez_compressed(ttur, mu=np.zeros(4, np.float32), sigma=np.eye(4, dtype=np.float32))
    mu, sigma = fid.load_statistics(ttur)
    assert mu.dtype == np.float64 and sigma.shape == (4, 4)

    bad = tmp_path / "bad.npz"
    np.savez(bad, mu=np.zeros(4))
    with pytest.raises(ValueError, match=r"lacks \['sigma'\]"):
        fid.load_statistics(bad)
    with pytest.raises(FileNotFoundError, match="experiments.fid_stats"):
        fid.load_statistics(tmp_path / "missing.npz")


# ------------------------------------------------------------------------------------------
# Inception Score
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 10])
def test_is_of_balanced_one_hot_predictions_is_the_number_of_classes(k):
    labels = np.arange(1000) % k  # Every split of 100 sees each class equally often.
    logits = np.zeros((1000, 1008))
    logits[np.arange(1000), labels] = 1e4  # Saturated softmax: must not give NaN.
    mean, std = fid.inception_score(logits, splits=10)
    assert mean == pytest.approx(k, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)


def test_is_of_a_hand_computed_pair():
    # p(y|x) = (3/4, 1/4) and (1/4, 3/4); p(y) = (1/2, 1/2);
    # KL = 3/4 ln(3/2) + 1/4 ln(1/2) for both, IS = exp(KL).
    logits = np.array([[np.log(3.0), 0.0], [0.0, np.log(3.0)]])
    mean, std = fid.inception_score(logits, splits=1)
    assert mean == pytest.approx(1.5**0.75 * 0.5**0.25, rel=1e-12) and std == 0.0


def test_is_splits_are_contiguous_blocks():
    # Split 0 = rows 0, 1 (both class 0): IS 1. Split 1 = rows 2, 3 (classes 0, 1): IS 2.
    logits = np.full((4, 3), -1e4)
    logits[[0, 1, 2, 3], [0, 0, 0, 1]] = 0.0
    mean, std = fid.inception_score(logits, splits=2)
    assert mean == pytest.approx(1.5) and std == pytest.approx(0.5)


def test_is_of_identical_predictions_is_one_and_class_order_is_irrelevant():
    rng = np.random.default_rng(4)
    same = np.tile(rng.normal(size=(1, 7)), (50, 1))
    assert fid.inception_score(same, splits=5)[0] == pytest.approx(1.0, rel=1e-12)
    logits = rng.normal(size=(60, 7)) * 3
    perm = rng.permutation(7)
    assert fid.inception_score(logits[:, perm], splits=3) == pytest.approx(
        fid.inception_score(logits, splits=3), rel=1e-12
    )


@pytest.mark.parametrize(
    "logits, splits, message",
    [(np.zeros((5, 3)), 6, r"splits=6 must be in \[1, N\]"), (np.zeros(5), 1, r"\(N, C\)")],
)
def test_is_rejects_bad_input(logits, splits, message):
    with pytest.raises(ValueError, match=message):
        fid.inception_score(logits, splits=splits)


# ------------------------------------------------------------------------------------------
# Reference-statistics script (random weights; the reader is tested in test_inception.py)
# ------------------------------------------------------------------------------------------


def test_reference_statistics_of_an_image_source(tmp_path, monkeypatch):
    # The network itself is tested in test_inception.py; here a stand-in "network" whose
    # features are the first 2048 pixel values checks the plumbing: reading the source in
    # batches, padding the last one, dropping the padding, and the statistics.
    def fake_features(variables, images, *, logits_bias=False, resize="pytorch"):
        flat = images.reshape(images.shape[0], -1)[:, :2048].astype(np.float32)
        return flat, np.zeros((images.shape[0], 1008), np.float32)

    monkeypatch.setattr(inception, "features", fake_features)
    images = np.random.default_rng(5).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    path = tmp_path / "images.npz"
    np.savez(path, train_images=images)
    source = fid_stats.open_images(
        source="npz", dataset="", split="", data_dir=None, path=str(path), image_size=32
    )
    mu, sigma = fid_stats.compute_reference_statistics(source, variables=None, batch_size=2)
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048) and mu.dtype == np.float64
    want_mu, want_sigma = fid.feature_statistics(images.reshape(5, -1)[:, :2048])
    np.testing.assert_array_equal(mu, want_mu)
    np.testing.assert_allclose(sigma, want_sigma, rtol=1e-12)


def test_missing_datasets_give_one_clear_message(tmp_path, monkeypatch):
    def offline(url):
        raise OSError("no network")

    monkeypatch.setattr(datasets, "check_reachable", offline)  # cifar10 would be downloaded
    with pytest.raises(data.DatasetUnavailableError, match="--path"):
        fid_stats.open_images(
            source="npz", dataset="", split="", data_dir=None, path=None, image_size=32
        )
    with pytest.raises(data.DatasetUnavailableError, match="does not exist"):
        fid_stats.open_images(
            source="npz",
            dataset="",
            split="",
            data_dir=None,
            path=str(tmp_path / "none.npz"),
            image_size=32,
        )
    with pytest.raises(data.DatasetUnavailableError, match="--data_dir=DIR"):
        fid_stats.open_images(
            source="tfds",
            dataset="cifar10",
            split="train",
            data_dir=str(tmp_path),
            path=None,
            image_size=32,
        )
