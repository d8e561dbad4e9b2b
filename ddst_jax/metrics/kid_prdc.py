"""Kernel Inception Distance and precision / recall / density / coverage (numpy, float64).

Both metrics work on feature vectors (e.g. Inception pool_3 features, shape (N, 2048)) and are
computed on the host in float64.

**KID** (Binkowski et al., "Demystifying MMD GANs", ICLR 2018) is the unbiased estimate of the
squared MMD under the cubic polynomial kernel ``k(x, y) = (x . y / d + 1) ** 3``:

    MMD^2_u = (sum_{i != j} k(x_i, x_j) + sum_{i != j} k(y_i, y_j)) / (m (m - 1))
              - 2 sum_{i, j} k(x_i, y_j) / m^2,

averaged over ``num_subsets`` pairs of random subsets of size ``m`` (drawn without replacement,
one from each set). The reported spread is the population standard deviation (``ddof=0``) of the
per-subset values, i.e. the spread of one subset's estimate, not the standard error of the mean.
This matches the authors' code and torch-fidelity, including the order of random draws: with
``np.random.RandomState(seed)`` the real subset is drawn before the fake one in every round, so
the same seed selects the same subsets as torch-fidelity's ``rng_seed``.

**PRDC** (Naeem et al., "Reliable Fidelity and Diversity Metrics for Generative Models",
ICML 2020). With ``r(x)`` the distance from ``x`` to its k-th nearest neighbour within its own
set (the point itself does not count) and ``B(x) = {z : ||z - x|| < r(x)}``:

- precision: fraction of fake points lying in at least one real ball;
- recall: fraction of real points lying in at least one fake ball;
- density: ``sum_fake #{real balls containing it} / (k * M)``, M the number of fake points;
- coverage: fraction of real balls containing at least one fake point.

Conventions (the same as the authors' reference code, clovaai/generative-evaluation-prdc):
balls are *open* (strict ``<``), and self-distances are excluded when ranking neighbours. These
make identical real and fake sets in general position score exactly 1 on all four metrics: each
fake point coincides with a real point (distance 0 < radius), so precision, recall and coverage
are 1, and each real ball holds its centre plus the k - 1 neighbours strictly inside the k-th
neighbour distance, i.e. exactly k points, so density = k M / (k M) = 1. With closed balls
(``<=``) the k-th neighbour would also be counted and density would come out as (k + 1) / k.
Consequences of open balls: tied distances (e.g. points on a regular grid) put boundary
neighbours outside, and a ball of radius 0 (k or more duplicates of its centre) holds nothing.

Distances are never materialised as an (N, M, D) tensor: squared distances are formed from
``||a||^2 - 2 a . b + ||b||^2`` in float64, one block of ``chunk`` rows at a time, so memory is
O(chunk * max(N, M)). Comparisons are made on squared distances, which orders points exactly as
the distances do.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

__all__ = ["kid", "knn_radii", "pairwise_distances", "prdc"]

_DEFAULT_CHUNK = 1024


def _as_features(x: Any, name: str) -> np.ndarray:
    """Validates an (N, D) feature array and returns it as C-contiguous float64."""
    arr = np.ascontiguousarray(np.asarray(x, dtype=np.float64))
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty (N, D) array, got shape {arr.shape}.")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf.")
    return arr


def _check_pair(real: np.ndarray, fake: np.ndarray) -> None:
    if real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"feature dimensions differ: real {real.shape[1]} vs fake {fake.shape[1]}."
        )


# ------------------------------------------------------------------------------------------
# KID
# ------------------------------------------------------------------------------------------


def _cubic_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(a b^T / d + 1)^3 for a: (m, d), b: (n, d) -> (m, n)."""
    # ``a @ a.T`` on the same buffer lets numpy use a symmetric rank-k update (half the work).
    g = a @ b.T
    g /= a.shape[1]
    g += 1.0
    # Cube in place: much cheaper than ``np.power`` and avoids two (m, n) temporaries.
    return g * g * g


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased squared MMD with the cubic kernel for x, y: (m, d), m >= 2."""
    m = x.shape[0]
    k_xx = _cubic_kernel(x, x)
    k_yy = _cubic_kernel(y, y)
    k_xy = _cubic_kernel(x, y)
    # Dropping the diagonals (the i == j terms) is what makes the within-set means unbiased.
    within = (k_xx.sum() - np.trace(k_xx)) + (k_yy.sum() - np.trace(k_yy))
    return float(within / (m * (m - 1)) - 2.0 * k_xy.sum() / (m * m))


def kid(
    real_features: Any,
    fake_features: Any,
    *,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance: mean and std of the unbiased cubic-kernel MMD^2 over subsets.

    Args:
      real_features: (N, D) array of real-image features.
      fake_features: (M, D) array of generated-image features.
      num_subsets: number of random subset pairs to average over.
      subset_size: points per subset; clipped to ``min(N, M)`` (must end up >= 2).
      seed: seed of the ``np.random.RandomState`` that draws the subsets; the result is a
        deterministic function of the inputs and the seed.

    Returns:
      ``(mean, std)`` over the subsets, as Python floats; ``std`` uses ``ddof=0``. Values are in
      raw units (papers often quote KID x 1e3). The estimate is unbiased, so it can be slightly
      negative when the two distributions match.

    Example:
      >>> rng = np.random.default_rng(0)
      >>> real = rng.standard_normal((200, 8))
      >>> mean_same, _ = kid(real, rng.standard_normal((200, 8)), num_subsets=10, subset_size=100)
      >>> mean_far, _ = kid(real, rng.standard_normal((200, 8)) + 1.0, num_subsets=10)
      >>> abs(mean_same) < 0.05 < mean_far
      True
    """
    real = _as_features(real_features, "real_features")
    fake = _as_features(fake_features, "fake_features")
    _check_pair(real, fake)
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be >= 1, got {num_subsets}.")
    m = min(int(subset_size), real.shape[0], fake.shape[0])
    if m < 2:
        raise ValueError(f"KID needs subsets of at least 2 points, got subset size {m}.")

    # RandomState (not Generator) and the real-then-fake draw order reproduce torch-fidelity's
    # subset choice for the same seed.
    rng = np.random.RandomState(seed)
    values = np.empty(num_subsets, dtype=np.float64)
    for i in range(num_subsets):
        x = real[rng.choice(real.shape[0], m, replace=False)]
        y = fake[rng.choice(fake.shape[0], m, replace=False)]
        values[i] = _mmd2_unbiased(x, y)
    return float(values.mean()), float(values.std())


# ------------------------------------------------------------------------------------------
# Chunked distances
# ------------------------------------------------------------------------------------------


def _sq_distance_blocks(
    a: np.ndarray, b: np.ndarray, chunk: int
) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yields ``(start, stop, sq)`` with sq = squared distances of a[start:stop] to all of b.

    Args:
      a: (N, D) float64, C-contiguous.
      b: (M, D) float64, C-contiguous.
      chunk: rows of ``a`` per block; each block is a (<= chunk, M) float64 array.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}.")
    a_sq = np.einsum("ij,ij->i", a, a)
    b_sq = np.einsum("ij,ij->i", b, b)
    # A private copy of b.T: numpy computes ``x @ x.T`` on one buffer with a symmetric
    # rank-k update, whose rounding differs from the general product used for two buffers.
    # PRDC compares real-real radii with real-fake distances, so both must round alike
    # (else a fake set identical to the real one gets a density above 1).
    b_t = np.array(b.T, order="C")
    for start in range(0, a.shape[0], chunk):
        stop = min(start + chunk, a.shape[0])
        sq = a[start:stop] @ b_t
        sq *= -2.0
        sq += a_sq[start:stop, None]
        sq += b_sq[None, :]
        # Cancellation in the expansion can leave tiny negatives for (near-)coincident points.
        np.maximum(sq, 0.0, out=sq)
        yield start, stop, sq


def pairwise_distances(a: Any, b: Any, *, chunk: int = _DEFAULT_CHUNK) -> np.ndarray:
    """Euclidean distances between the rows of a and b, computed block by block in float64.

    The full (N, M) result is returned, so this is meant for checks and small sets; ``prdc``
    consumes the blocks directly without storing them.

    Args:
      a: (N, D) array.
      b: (M, D) array.
      chunk: rows of ``a`` per block.

    Returns:
      (N, M) float64 array of distances.

    Example:
      >>> pairwise_distances([[0.0, 0.0], [1.0, 1.0]], [[3.0, 4.0]], chunk=1)
      array([[5.        ],
             [3.60555128]])
    """
    a64 = _as_features(a, "a")
    b64 = _as_features(b, "b")
    _check_pair(a64, b64)
    out = np.empty((a64.shape[0], b64.shape[0]), dtype=np.float64)
    for start, stop, sq in _sq_distance_blocks(a64, b64, chunk):
        out[start:stop] = np.sqrt(sq)
    return out


def _knn_sq_radii(x: np.ndarray, k: int, chunk: int) -> np.ndarray:
    """Squared distance from each row of x: (N, D) to its k-th nearest other row -> (N,)."""
    n = x.shape[0]
    if not 1 <= k <= n - 1:
        raise ValueError(f"k must be in [1, N - 1] = [1, {n - 1}], got k = {k}.")
    radii = np.empty(n, dtype=np.float64)
    for start, stop, sq in _sq_distance_blocks(x, x, chunk):
        rows = np.arange(stop - start)
        # Exclude each point from its own neighbour list explicitly (rather than taking the
        # (k+1)-th value and hoping self is the minimum), so duplicates are handled exactly.
        sq[rows, start + rows] = np.inf
        radii[start:stop] = np.partition(sq, k - 1, axis=1)[:, k - 1]
    return radii


def knn_radii(features: Any, k: int = 5, *, chunk: int = _DEFAULT_CHUNK) -> np.ndarray:
    """Distance from each point to its k-th nearest neighbour in the same set, excluding itself.

    Args:
      features: (N, D) array, N > k.
      k: neighbour rank (1 = nearest other point).
      chunk: rows per distance block.

    Returns:
      (N,) float64 radii.

    Example:
      >>> knn_radii([[0.0], [1.0], [3.0], [7.0]], k=1)
      array([1., 1., 2., 4.])
    """
    x = _as_features(features, "features")
    return np.sqrt(_knn_sq_radii(x, k, chunk))


# ------------------------------------------------------------------------------------------
# PRDC
# ------------------------------------------------------------------------------------------


def prdc(
    real_features: Any,
    fake_features: Any,
    *,
    k: int = 5,
    chunk: int = _DEFAULT_CHUNK,
) -> dict[str, float]:
    """Precision, recall, density and coverage of fake features against real ones.

    Balls are open and self-distances are excluded from neighbour ranking (see the module
    docstring); these are the reference implementation's conventions.

    Args:
      real_features: (N, D) array, N > k.
      fake_features: (M, D) array, M > k.
      k: nearest-neighbour rank that sets each ball's radius (the paper uses 5).
      chunk: rows per distance block; peak memory is a few (chunk, max(N, M)) float64 arrays.

    Returns:
      Dict with float values under ``precision``, ``recall``, ``density`` (can exceed 1) and
      ``coverage``.

    Example:
      >>> rng = np.random.default_rng(0)
      >>> real = rng.standard_normal((100, 4))
      >>> prdc(real, real.copy(), k=3)
      {'precision': 1.0, 'recall': 1.0, 'density': 1.0, 'coverage': 1.0}
      >>> prdc(real, real + 100.0, k=3)
      {'precision': 0.0, 'recall': 0.0, 'density': 0.0, 'coverage': 0.0}
    """
    real = _as_features(real_features, "real_features")
    fake = _as_features(fake_features, "fake_features")
    _check_pair(real, fake)
    real_r2 = _knn_sq_radii(real, k, chunk)
    fake_r2 = _knn_sq_radii(fake, k, chunk)

    # One pass over real-vs-fake blocks: rows are real points, columns fake points.
    balls_per_fake = np.zeros(fake.shape[0], dtype=np.int64)
    covered = np.empty(real.shape[0], dtype=bool)
    recalled = np.empty(real.shape[0], dtype=bool)
    for start, stop, sq in _sq_distance_blocks(real, fake, chunk):
        in_real_ball = sq < real_r2[start:stop, None]
        balls_per_fake += in_real_ball.sum(axis=0)
        covered[start:stop] = in_real_ball.any(axis=1)
        recalled[start:stop] = (sq < fake_r2[None, :]).any(axis=1)

    return {
        "precision": float(np.mean(balls_per_fake > 0)),
        "recall": float(np.mean(recalled)),
        "density": float(balls_per_fake.sum() / (k * fake.shape[0])),
        "coverage": float(np.mean(covered)),
    }
