"""Tests of KID and PRDC (metrics.kid_prdc) against hand-computed and brute-force values."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ddst_jax.metrics.kid_prdc import kid, knn_radii, pairwise_distances, prdc

METRICS = ("precision", "recall", "density", "coverage")


# ------------------------------------------------------------------------------------------
# KID
# ------------------------------------------------------------------------------------------


def _kid_by_loops(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased cubic-kernel MMD^2 written term by term (slow, obviously correct)."""
    m, d = x.shape

    def k(a: np.ndarray, b: np.ndarray) -> float:
        return (float(a @ b) / d + 1.0) ** 3

    xx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(m), 2))
    yy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(m), 2))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return (xx + yy) / (m * (m - 1)) - 2.0 * xy / m**2


def test_kid_hand_computed_positive():
    # d = 2, k(a, b) = (a.b / 2 + 1)^3.
    # X = {(0,0), (2,0)}: x1.x2 = 0 -> k = 1; off-diagonal sum (both orders) = 2.
    # Y = {(4,0), (4,2)}: y1.y2 = 16 -> k = 9^3 = 729; off-diagonal sum = 1458.
    # XY: (0,0) with either y -> 1, 1; (2,0).(4,0) = 8 -> 5^3 = 125; (2,0).(4,2) = 8 -> 125.
    #     sum = 252.
    # MMD^2 = (2 + 1458) / (2 * 1) - 2 * 252 / 4 = 730 - 126 = 604.
    x = np.array([[0.0, 0.0], [2.0, 0.0]])
    y = np.array([[4.0, 0.0], [4.0, 2.0]])
    mean, std = kid(x, y, num_subsets=1, subset_size=2)
    assert mean == pytest.approx(604.0, rel=1e-14)
    assert std == 0.0


def test_kid_hand_computed_negative():
    # The estimator is unbiased, so it can be negative.  d = 2, k(a, b) = (a.b / 2 + 1)^3.
    # X = {(0,0), (2,0), (0,2)}: all pairwise dot products 0 -> k = 1; off-diagonal sum = 6.
    # Y = {(2,2), (0,0), (2,0)}: y1.y2 = 0 -> 1, y1.y3 = 4 -> 27, y2.y3 = 0 -> 1;
    #     off-diagonal sum = 2 * 29 = 58.
    # XY: x1 = (0,0) -> 1, 1, 1; x2 = (2,0) -> 27, 1, 27; x3 = (0,2) -> 27, 1, 1; sum = 87.
    # MMD^2 = (6 + 58) / (3 * 2) - 2 * 87 / 9 = 32/3 - 58/3 = -26/3.
    x = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
    y = np.array([[2.0, 2.0], [0.0, 0.0], [2.0, 0.0]])
    mean, std = kid(x, y, num_subsets=1, subset_size=3)
    assert mean == pytest.approx(-26.0 / 3.0, rel=1e-14)
    assert std == 0.0


def test_kid_matches_term_by_term_sum_on_random_data():
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((6, 5)), rng.standard_normal((6, 5)) + 0.3
    mean, _ = kid(x, y, num_subsets=1, subset_size=6)
    assert mean == pytest.approx(_kid_by_loops(x, y), rel=1e-12)


def test_kid_subset_size_is_clipped_to_smaller_set():
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((7, 3)), rng.standard_normal((5, 3))
    clipped = kid(x, y, num_subsets=4, subset_size=1000, seed=3)
    explicit = kid(x, y, num_subsets=4, subset_size=5, seed=3)
    assert clipped == explicit


def test_kid_same_distribution_is_near_zero_and_grows_with_shift():
    rng = np.random.default_rng(3)
    real = rng.standard_normal((600, 16))
    fake = rng.standard_normal((600, 16))  # independent sample of the same distribution
    mean0, std0 = kid(real, fake, num_subsets=20, subset_size=200, seed=0)
    assert std0 > 0.0
    assert abs(mean0) < 3.0 * std0

    # Same seed -> same subsets at every shift, so only the shift changes between calls.
    shifts = [0.0, 0.1, 0.2, 0.4, 0.8]
    means = [kid(real, fake + s, num_subsets=20, subset_size=200, seed=0)[0] for s in shifts]
    assert means[0] == mean0
    assert all(a < b for a, b in itertools.pairwise(means)), means
    assert means[-1] > 10.0 * std0


def test_kid_is_permutation_invariant_with_full_subsets():
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((40, 6)), rng.standard_normal((40, 6)) * 1.5
    base, _ = kid(x, y, num_subsets=1, subset_size=40)
    # Equal up to the summation order of the kernel sums.
    for xp, yp in [(x[rng.permutation(40)], y), (x, y[rng.permutation(40)])]:
        mean, _ = kid(xp, yp, num_subsets=1, subset_size=40)
        assert mean == pytest.approx(base, rel=1e-12, abs=1e-14)
    # With full subsets every round sees the same sets, whatever the seed.
    mean, std = kid(x, y, num_subsets=5, subset_size=40, seed=9)
    assert mean == pytest.approx(base, rel=1e-12, abs=1e-14)
    assert std < 1e-12


def test_kid_is_deterministic_in_seed():
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((50, 4)), rng.standard_normal((50, 4))
    a = kid(x, y, num_subsets=5, subset_size=20, seed=11)
    assert kid(x, y, num_subsets=5, subset_size=20, seed=11) == a
    assert kid(x, y, num_subsets=5, subset_size=20, seed=12) != a


def test_kid_rejects_bad_inputs():
    x = np.zeros((4, 3))
    with pytest.raises(ValueError, match="dimensions"):
        kid(x, np.zeros((4, 2)))
    with pytest.raises(ValueError, match="at least 2"):
        kid(x, x, subset_size=1)
    with pytest.raises(ValueError, match="NaN"):
        kid(x, np.full((4, 3), np.nan))


# ------------------------------------------------------------------------------------------
# Chunked distances and radii
# ------------------------------------------------------------------------------------------


def _brute_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(axis=-1))


@pytest.mark.parametrize("chunk", [1, 5, 37, 1000])
def test_chunked_distances_match_brute_force(chunk):
    rng = np.random.default_rng(6)
    a = rng.standard_normal((37, 9)).astype(np.float32) * 3.0 + 1.0
    b = rng.standard_normal((23, 9)).astype(np.float32)
    expected = _brute_distances(a.astype(np.float64), b.astype(np.float64))
    got = pairwise_distances(a, b, chunk=chunk)
    assert got.shape == (37, 23) and got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_knn_radii_match_brute_force(k):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((30, 4))
    d = _brute_distances(x, x)
    np.fill_diagonal(d, np.inf)  # a point is not its own neighbour
    expected = np.sort(d, axis=1)[:, k - 1]
    np.testing.assert_allclose(knn_radii(x, k, chunk=4), expected, rtol=1e-10)


def test_knn_radii_exclude_self_but_not_duplicates():
    # Two copies of 0: each copy's nearest *other* point is the other copy, at distance 0.
    x = np.array([[0.0], [0.0], [5.0]])
    np.testing.assert_array_equal(knn_radii(x, 1), [0.0, 0.0, 5.0])
    with pytest.raises(ValueError, match="k must be"):
        knn_radii(x, 3)


# ------------------------------------------------------------------------------------------
# PRDC
# ------------------------------------------------------------------------------------------


def _prdc_brute(real: np.ndarray, fake: np.ndarray, k: int) -> dict[str, float]:
    """The published definitions on full (N, M) distance matrices, open balls."""
    d_rr, d_ff, d_rf = (
        _brute_distances(a, b) for a, b in [(real, real), (fake, fake), (real, fake)]
    )
    r_real = np.sort(d_rr, axis=1)[:, k]  # column 0 is the point itself (distance 0)
    r_fake = np.sort(d_ff, axis=1)[:, k]
    in_real = d_rf < r_real[:, None]  # (N, M): fake j inside real ball i
    return {
        "precision": float(in_real.any(axis=0).mean()),
        "recall": float((d_rf < r_fake[None, :]).any(axis=1).mean()),
        "density": float(in_real.sum() / (k * fake.shape[0])),
        "coverage": float((d_rf.min(axis=1) < r_real).mean()),
    }


def test_prdc_hand_computed_on_a_line():
    # k = 2, 1-D points; r = distance to the 2nd nearest *other* point, balls open.
    # Real  R = {0, 1, 3, 10, 11, 12}:
    #   r(0) = 3 (others at 1, 3, ...), r(1) = 2 (1, 2, ...), r(3) = 3 (2, 3, ...),
    #   r(10) = 2 (1, 2, ...), r(11) = 1 (1, 1, ...), r(12) = 2 (1, 2, ...).
    #   Balls: (-3,3), (-1,3), (0,6), (8,12), (10,12), (10,14).
    # Fake  F = {2, 3, 5, 9, 20, 21, 22}:
    #   r(2) = 3, r(3) = 2, r(5) = 3, r(9) = 6 (4, 6, 7, ...), r(20) = 2, r(21) = 1, r(22) = 2.
    #   Balls: (-1,5), (1,5), (2,8), (3,15), (18,22), (20,22), (20,24).
    # Real balls containing each fake point:
    #   2 -> balls of 0, 1, 3 (3);  3 -> ball of 3 only (|3-0| = 3 and |3-1| = 2 are on the
    #   boundary, so outside); 5 -> ball of 3 (1);  9 -> ball of 10 (1);  20, 21, 22 -> none.
    #   precision = 4/7, density = (3 + 1 + 1 + 1) / (2 * 7) = 3/7.
    # Fake balls containing each real point: 0, 1, 3 lie in the ball of fake 2 (3 also of 5);
    #   10, 11, 12 lie in the ball of fake 9 -> recall = 6/6 = 1.
    # Real balls holding a fake point: 0, 1, 3 (fake 2), 10 (fake 9); 11's (10,12) and
    #   12's (10,14) hold none -> coverage = 4/6.
    real = np.array([0.0, 1.0, 3.0, 10.0, 11.0, 12.0])[:, None]
    fake = np.array([2.0, 3.0, 5.0, 9.0, 20.0, 21.0, 22.0])[:, None]
    np.testing.assert_array_equal(knn_radii(real, 2), [3, 2, 3, 2, 1, 2])
    np.testing.assert_array_equal(knn_radii(fake, 2), [3, 2, 3, 6, 2, 1, 2])
    expected = {"precision": 4 / 7, "recall": 1.0, "density": 3 / 7, "coverage": 4 / 6}
    for chunk in (1, 2, 100):
        got = prdc(real, fake, k=2, chunk=chunk)
        assert got == pytest.approx(expected, rel=1e-15)


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("chunk", [7, 1024])
def test_prdc_identical_sets_score_exactly_one(k, chunk):
    # Each fake point coincides with a real point (distance 0 < radius): precision, recall and
    # coverage are 1.  With open balls and no ties, real ball i holds its centre and its k - 1
    # nearest neighbours (the k-th is on the boundary), i.e. exactly k fake points, so
    # density = k * N / (k * N) = 1.  (Closed balls would give (k + 1) / k.)
    rng = np.random.default_rng(8)
    real = rng.standard_normal((200, 8)).astype(np.float32)
    got = prdc(real, real.copy(), k=k, chunk=chunk)
    assert got == {m: 1.0 for m in METRICS}


def test_prdc_ties_on_a_grid_fall_outside_open_balls():
    # Identical grids 0..9 with k = 2: an interior point's 2nd nearest other is at distance 1
    # (it has two neighbours at 1), so its open ball holds only itself; the end points' balls
    # (radius 2) hold themselves and one neighbour.  density = (8 * 1 + 2 * 2) / (2 * 10).
    grid = np.arange(10.0)[:, None]
    got = prdc(grid, grid, k=2)
    assert got == {"precision": 1.0, "recall": 1.0, "density": 0.6, "coverage": 1.0}


def test_prdc_far_shifted_sets_score_zero():
    rng = np.random.default_rng(9)
    real = rng.standard_normal((150, 6))
    got = prdc(real, real + 100.0, k=5, chunk=32)
    assert got == {m: 0.0 for m in METRICS}


@pytest.mark.parametrize("n_real,n_fake,k", [(60, 45, 1), (45, 60, 5), (50, 50, 3)])
def test_prdc_matches_brute_force_definitions(n_real, n_fake, k):
    rng = np.random.default_rng(n_real + n_fake + k)
    real = rng.standard_normal((n_real, 5))
    fake = 0.8 * rng.standard_normal((n_fake, 5)) + 0.4
    expected = _prdc_brute(real, fake, k)
    assert 0.0 < expected["precision"] < 1.0  # a non-degenerate case
    for chunk in (1, 8, 1000):
        assert prdc(real, fake, k=k, chunk=chunk) == pytest.approx(expected, rel=1e-12)


def test_prdc_rejects_bad_inputs():
    x = np.zeros((5, 2))
    with pytest.raises(ValueError, match="k must be"):
        prdc(x, np.ones((3, 2)), k=3)
    with pytest.raises(ValueError, match="dimensions"):
        prdc(x, np.ones((5, 3)), k=1)
    with pytest.raises(ValueError, match="chunk"):
        prdc(np.arange(10.0)[:, None], np.arange(10.0)[:, None], k=1, chunk=0)


@pytest.mark.parametrize("n,d", [(100, 4), (300, 64)])
def test_prdc_of_a_set_against_its_copy_is_exactly_one_whatever_the_rounding(n, d):
    # Radii (real vs real) and memberships (real vs fake) must round alike: numpy's x @ x.T on
    # one buffer rounds differently from a product of two buffers, which once gave density > 1.
    for seed in range(8):
        real = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
        for k in (3, 5):
            assert prdc(real, real.copy(), k=k) == {
                "precision": 1.0, "recall": 1.0, "density": 1.0, "coverage": 1.0}
