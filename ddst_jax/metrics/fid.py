"""Frechet Inception Distance and Inception Score from Inception outputs (numpy, float64).

FID follows TTUR / pytorch-fid: Gaussian statistics (mean, covariance with ``N - 1``) of the
pool_3 features, and

    d^2 = ||mu1 - mu2||^2 + tr(S1 + S2 - 2 sqrtm(S1 S2)),

with ``eps * I`` added to both covariances when ``sqrtm`` of the product is not finite, and a
tiny imaginary part of ``sqrtm`` dropped after a check. The Inception Score follows the original
code (improved-gan): softmax over the 1008 logits, then per split ``exp(E_x KL(p(y|x) || p(y)))``
with ``p(y)`` the split's mean prediction; the mean and standard deviation over splits.

Reference statistics are stored in TTUR's ``.npz`` format: arrays ``mu`` (D,) and ``sigma``
(D, D).
"""

from __future__ import annotations

import io
import os
import warnings
from typing import Any

import numpy as np
import scipy.linalg
import scipy.special

from ddst_jax import storage

__all__ = [
    "feature_statistics",
    "frechet_distance",
    "inception_score",
    "load_statistics",
    "save_statistics",
    "statistics_of_images",
    "trace_sqrt_product",
]

_METHODS = ("sqrtm", "eigh")


def feature_statistics(features: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of features, in float64.

    Args:
      features: (N, D) array, N >= 2 (e.g. pool_3 features, D = 2048).

    Returns:
      ``(mu (D,), sigma (D, D))``; ``sigma`` is ``np.cov(features, rowvar=False)`` (divides by
      N - 1), as TTUR and pytorch-fid.
    """
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2 samples, got shape {x.shape}.")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or inf (did the generator diverge?).")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _check_statistics(
    mu1: Any, sigma1: Any, mu2: Any, sigma2: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    mu1, mu2 = (np.atleast_1d(np.asarray(m, np.float64)) for m in (mu1, mu2))
    s1, s2 = (np.atleast_2d(np.asarray(s, np.float64)) for s in (sigma1, sigma2))
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors must be 1-D of equal length, got {mu1.shape}, {mu2.shape}.")
    d = mu1.shape[0]
    if s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(
            f"covariances must be ({d}, {d}) to match the means, got {s1.shape} and {s2.shape}."
        )
    for name, a in (("mu1", mu1), ("sigma1", s1), ("mu2", mu2), ("sigma2", s2)):
        if not np.isfinite(a).all():
            raise ValueError(f"{name} contains NaN or inf.")
    return mu1, s1, mu2, s2


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a (numerically) PSD matrix; tiny negative eigenvalues -> 0."""
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(
    sigma1: np.ndarray, sigma2: np.ndarray, *, eps: float = 1e-6, method: str = "sqrtm"
) -> float:
    """``tr(sqrtm(sigma1 @ sigma2))`` for covariance matrices (D, D).

    Args:
      sigma1, sigma2: symmetric PSD (D, D) arrays.
      eps: with ``method="sqrtm"``, added to both diagonals when ``sqrtm`` of the product is
        not finite (pytorch-fid's fallback for near-singular products).
      method: ``"sqrtm"``: ``scipy.linalg.sqrtm`` of the product, the reference algorithm of
        TTUR/pytorch-fid; ``"eigh"``: ``sum(sqrt(eig(A sigma2 A)))`` with ``A = sigma1^(1/2)``,
        the same quantity (``sigma1 sigma2`` is similar to ``A sigma2 A``) from two symmetric
        eigendecompositions, several times faster at D = 2048 and free of imaginary parts.

    Raises:
      ValueError: unknown method, or ``sqrtm`` gives a large imaginary component (the
        covariances are not valid, e.g. not PSD).
    """
    if method == "eigh":
        root = _psd_sqrt(sigma1)
        m = root @ sigma2 @ root
        w = np.linalg.eigvalsh((m + m.T) / 2)
        return float(np.sqrt(np.clip(w, 0.0, None)).sum())
    if method != "sqrtm":
        raise ValueError(f"method={method!r} is not one of {_METHODS}.")
    with warnings.catch_warnings():  # A singular product is handled (and reported) below.
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(
            f"FID: sqrtm(sigma1 @ sigma2) is not finite (near-singular product); adding {eps} "
            "to the diagonal of both covariances.",
            RuntimeWarning,
            stacklevel=2,
        )
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        # Round-off gives a tiny imaginary part; a large one means invalid covariances.
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(
                f"FID: sqrtm has an imaginary component of {np.max(np.abs(covmean.imag)):.3g}; "
                "the covariances are probably not positive semi-definite."
            )
        covmean = covmean.real
    return float(np.trace(covmean))


def frechet_distance(
    mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, eps: float = 1e-6, *, method: str = "sqrtm"
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    Args:
      mu1, mu2: (D,) means.
      sigma1, sigma2: (D, D) covariances.
      eps: diagonal offset used only when the matrix square root is not finite.
      method: ``"sqrtm"`` (reference, default) or ``"eigh"`` (faster); see
        :func:`trace_sqrt_product`.

    Returns:
      The squared Frechet distance (what is reported as "FID"), a Python float. Identical
      statistics give 0 up to round-off (which may be slightly negative, as in pytorch-fid).
    """
    mu1, s1, mu2, s2 = _check_statistics(mu1, sigma1, mu2, sigma2)
    diff = mu1 - mu2
    tr_covmean = trace_sqrt_product(s1, s2, eps=eps, method=method)
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def inception_score(logits: Any, splits: int = 10) -> tuple[float, float]:
    """Inception Score of (N, C) logits, as the original code: mean and std over splits.

    Split ``i`` holds rows ``[i N // splits, (i + 1) N // splits)``; its score is
    ``exp(mean_x KL(p(y|x) || p(y)))`` with ``p(y|x) = softmax(logits)`` and ``p(y)`` the split
    mean. Computed in float64 with log-probabilities, so saturated softmaxes give no NaN.

    Args:
      logits: (N, C), e.g. the 1008 Inception logits; N >= splits.
      splits: number of splits (10 in the literature).

    Returns:
      ``(mean, std)`` of the per-split scores (``np.std``, ddof 0, as the original code).
    """
    x = np.asarray(logits, np.float64)
    if x.ndim != 2:
        raise ValueError(f"logits must be (N, C), got shape {x.shape}.")
    n = x.shape[0]
    if not 1 <= splits <= n:
        raise ValueError(f"splits={splits} must be in [1, N] with N={n} samples.")
    if not np.isfinite(x).all():
        raise ValueError("logits contain NaN or inf.")
    log_p = scipy.special.log_softmax(x, axis=1)
    scores = []
    for i in range(splits):
        part = log_p[i * n // splits : (i + 1) * n // splits]
        log_py = scipy.special.logsumexp(part, axis=0) - np.log(part.shape[0])  # log mean p(y|x)
        kl = np.sum(np.exp(part) * (part - log_py), axis=1)
        scores.append(np.exp(np.mean(kl)))
    return float(np.mean(scores)), float(np.std(scores))


def save_statistics(path: str | os.PathLike[str], mu: Any, sigma: Any) -> None:
    """Writes reference statistics in TTUR's format: an ``.npz`` with ``mu`` and ``sigma``.

    The file is written exactly at ``path`` (no ``.npz`` suffix is appended), atomically; it
    may be a bucket URI (``ddst_jax.storage``).
    """
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    d = mu.shape[0] if mu.ndim == 1 else -1
    if mu.ndim != 1 or sigma.shape != (d, d):
        raise ValueError(f"expected mu (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}.")
    storage.atomic_write(path, lambda f: np.savez(f, mu=mu, sigma=sigma))


def load_statistics(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Reads ``mu`` (D,) and ``sigma`` (D, D) (float64) from a TTUR/pytorch-fid ``.npz`` file
    (a local path or a bucket URI)."""
    if not storage.isfile(path):
        raise FileNotFoundError(
            f"FID reference statistics {os.fspath(path)!r} do not exist; compute them with "
            "python -m experiments.fid_stats --dataset=... --output=FILE.npz"
        )
    with np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False) as f:
        missing = [k for k in ("mu", "sigma") if k not in f.files]
        if missing:
            raise ValueError(
                f"{os.fspath(path)} lacks {missing} (it has {sorted(f.files)}); FID statistics "
                "files hold 'mu' (D,) and 'sigma' (D, D)."
            )
        mu, sigma = np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)
    d = mu.shape[0] if mu.ndim == 1 else -1
    if mu.ndim != 1 or sigma.shape != (d, d):
        raise ValueError(
            f"{os.fspath(path)}: mu {mu.shape} and sigma {sigma.shape} are not (D,) and (D, D)."
        )
    return mu, sigma


def statistics_of_images(
    variables: Any, images: Any, *, batch_size: int = 100, progress: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """FID statistics ``(mu, sigma)`` of uint8 NHWC images under the FID Inception.

    Args:
      variables: from :func:`ddst_jax.metrics.inception.load_weights`.
      images: uint8 (N, H, W, 3), or anything with ``len`` and slicing (see
        :func:`ddst_jax.metrics.inception.features_batched`).
      batch_size: images per forward pass.
      progress: show a progress bar.
    """
    from ddst_jax.metrics import inception  # Local import: the numpy functions need no JAX.

    pool, _ = inception.features_batched(
        variables, images, batch_size=batch_size, progress=progress
    )
    return feature_statistics(pool)
