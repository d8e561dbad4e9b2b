"""The paper's reported numbers as data (Wang et al., NeurIPS 2023; docs/method.md section 7).

``PAPER_FID[benchmark][preset][g_density]``: FID (lower is better) of paper Table 1, the
relaxed setting, with ADAPT strict (d_max 0.5) alongside. Benchmarks are the names of the
entry points (``experiments/<benchmark>.py``), presets those of ``experiments.presets``. The
dense row has one number, stored at g_density 1.0. These are most likely the best FID
over periodic evaluations, and that about +-0.5 FID is run-to-run noise.

The project restates no IS or normalised-FLOPs numbers of the paper, so ``PAPER_IS`` and
``PAPER_FLOPS`` are empty: reports print '-' there. Add ``{benchmark: {preset: {d: value}}}``
entries in the same layout when they are transcribed (and cite the table they come from).
"""

from __future__ import annotations

BENCHMARKS: tuple[str, ...] = ("cifar10", "stl10", "cifar10_biggan", "tiny_imagenet")

#: How the paper names the benchmarks (column headers of docs/method.md section 7).
BENCHMARK_TITLES: dict[str, str] = {
    "cifar10": "CIFAR-10 SNGAN",
    "stl10": "STL-10 SNGAN",
    "cifar10_biggan": "CIFAR-10 BigGAN",
    "tiny_imagenet": "TinyImageNet BigGAN",
}

_DENSITIES = (0.1, 0.2, 0.3, 0.5)


def _row(*values: float) -> dict[float, float]:
    return dict(zip(_DENSITIES, values, strict=True))


#: Paper Table 1 FID (docs/method.md section 7).
PAPER_FID: dict[str, dict[str, dict[float, float]]] = {
    "cifar10": {
        "dense": {1.0: 10.74},
        "static_balance": _row(26.75, 19.04, 15.05, 12.24),
        "sdst_strong_relaxed_rigl": _row(17.02, 13.86, 12.51, 11.35),
        "adapt_relaxed": _row(14.19, 13.19, 12.38, 10.60),
        "adapt_strict": _row(14.53, 12.73, 12.20, 12.11),
    },
    "stl10": {
        "dense": {1.0: 29.71},
        "static_balance": _row(48.18, 44.67, 41.73, 37.68),
        "sdst_strong_relaxed_rigl": _row(53.65, 33.25, 31.41, 30.18),
        "adapt_relaxed": _row(35.98, 33.06, 31.71, 29.96),
        "adapt_strict": _row(41.18, 31.59, 31.16, 29.11),
    },
    "cifar10_biggan": {
        "dense": {1.0: 8.11},
        "static_balance": _row(16.98, 12.81, 10.33, 8.47),
        "sdst_strong_relaxed_rigl": _row(10.58, 9.11, 8.69, 8.33),
        "adapt_relaxed": _row(10.19, 8.56, 8.36, 8.22),
        "adapt_strict": _row(9.29, 8.64, 8.44, 7.90),
    },
    "tiny_imagenet": {
        "dense": {1.0: 15.43},
        "static_balance": _row(28.78, 21.67, 18.86, 17.51),
        "sdst_strong_relaxed_rigl": _row(21.14, 18.95, 17.75, 16.30),
        "adapt_relaxed": _row(19.42, 17.99, 17.06, 14.15),
        "adapt_strict": _row(18.89, 17.37, 16.93, 16.02),
    },
}

#: Inception Scores of the paper: not restated here.
PAPER_IS: dict[str, dict[str, dict[float, float]]] = {}

#: Normalised training FLOPs (percent of dense) of the paper: not restated here.
PAPER_FLOPS: dict[str, dict[str, dict[float, float]]] = {}

PAPER: dict[str, dict[str, dict[str, dict[float, float]]]] = {
    "fid": PAPER_FID, "is": PAPER_IS, "flops": PAPER_FLOPS,
}


def paper_value(metric: str, benchmark: str, preset: str, g_density: float) -> float | None:
    """The paper's number, or None where it has none (dense: the same number at any density).

    >>> paper_value("fid", "cifar10", "adapt_relaxed", 0.1)
    14.19
    >>> paper_value("fid", "cifar10", "dense", 0.3), paper_value("is", "cifar10", "dense", 1.0)
    (10.74, None)
    """
    row = PAPER.get(metric, {}).get(benchmark, {}).get(preset)  # KID, PRDC: not in the paper
    if row is None:
        return None
    if preset == "dense":
        return row.get(1.0)
    for d, value in row.items():
        if abs(d - g_density) < 1e-9:
            return value
    return None
