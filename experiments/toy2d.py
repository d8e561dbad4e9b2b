r"""2-D balance benchmark on a CPU: ``python -m experiments.toy2d [--json] [--workdir=DIR]``.

Trains sparse MLP GANs on a ring of 8 Gaussians (``--dataset=grid``: a 5x5 grid) with the image
runs' iteration (``ddst_jax.gan.steps.train_iteration``: ERK masks, G RigL drop-and-grow, the BR
window, ADAPT's D-density control) for five methods at one G density, over several seeds:

- ``dense``: no masks;
- ``static_balance``: G and D masks fixed, d_D = d_G;
- ``sdst_strong``: G dynamic, D dense (relaxed setting);
- ``adapt``: G dynamic, D starts at d_G and is moved by BR (relaxed setting, the paper's band);
- ``adapt_relative``: ``adapt`` with the band measured from the run (``control`` "relative":
  0.9 and 1.1 times the windowed BR of the first decision; docs/method.md section 9).

Prints a markdown table (mean +- std over seeds) of: modes covered, share of high-quality
samples (within 3 std of a mode centre), final windowed BR, the median BR measurement of the
run's second half (robust to the rare huge ratio of a near-zero gap), final D density. Writes into
``--workdir`` (default ``/tmp/ddst_toy2d``): ``samples_<method>.png`` (one panel per seed),
``curves.png`` (windowed BR and D density over iterations) and ``results.json`` (per-seed values,
means, stds, the configuration). ``--json`` also prints, as the last line of stdout, one object::

    {"<method>": {"modes_covered": ..., "high_quality": ..., "br": ..., "d_density": ...}, ...}

with means over seeds (a non-finite mean is ``null``). The default (ring, 5 methods, 3 seeds,
2000 iterations) takes about 2 minutes on a 2-core CPU; run ``--dataset=grid`` separately.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import app, flags, logging

from ddst_jax import reporting, storage, toy2d

_DEFAULTS = toy2d.ToyConfig()
METRIC_KEYS = ("modes_covered", "high_quality", "br", "d_density")
#: Reported in the table and results.json, not in the --json line.
EXTRA_KEYS = ("br_median_late",)

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/ddst_toy2d", "Where plots and results go.")
_JSON = flags.DEFINE_bool("json", False, "Also print the means as one JSON object (last line).")
_DATASET = flags.DEFINE_enum("dataset", _DEFAULTS.dataset, list(toy2d.DATASETS),
                             "Mixture: ring of 8 (std 0.02) or 5x5 grid (std 0.05).")
_METHODS = flags.DEFINE_list("methods", list(toy2d.METHODS), "Methods to compare.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds per method (0, 1, ...).")
_G_DENSITY = flags.DEFINE_float("g_density", _DEFAULTS.g_density, "d_G of the sparse methods.")
_ITERATIONS = flags.DEFINE_integer("iterations", _DEFAULTS.iterations, "Iterations per run.")
_N_DIS = flags.DEFINE_integer("n_dis", _DEFAULTS.n_dis, "D steps per iteration.")
_BATCH = flags.DEFINE_integer("batch_size", _DEFAULTS.batch_size, "Batch of G and D steps.")
_Z_DIM = flags.DEFINE_integer("z_dim", _DEFAULTS.z_dim, "Noise dimension.")
_HIDDEN = flags.DEFINE_list("hidden", [str(w) for w in _DEFAULTS.g_hidden],
                            "Hidden widths of both MLPs.")
_SN = flags.DEFINE_bool("d_spectral_norm", _DEFAULTS.d_spectral_norm,
                        "Spectral norm on D's kernels.")
_LR = flags.DEFINE_float("lr", _DEFAULTS.lr_g, "Adam learning rate of G and D.")
_BETA1 = flags.DEFINE_float("beta1", _DEFAULTS.beta1, "Adam beta1.")
_BETA2 = flags.DEFINE_float("beta2", _DEFAULTS.beta2, "Adam beta2.")
_EMA = flags.DEFINE_float("ema_decay", _DEFAULTS.ema_decay, "Decay of G's sparse EMA.")
_G_EVERY = flags.DEFINE_integer("g_update_every", _DEFAULTS.g_update_every, "dT_G.")
_D_EVERY = flags.DEFINE_integer("d_update_every", _DEFAULTS.d_update_every, "dT_D (ADAPT).")
_BR_EVERY = flags.DEFINE_integer("br_every", _DEFAULTS.br_every, "Iterations per BR measure.")
_BR_WINDOW = flags.DEFINE_integer("br_window", _DEFAULTS.br_window, "BR window (iterations).")
_BAND = flags.DEFINE_list("band", [str(b) for b in _DEFAULTS.band], "ADAPT's band B-,B+.")
_DELTA = flags.DEFINE_float("delta", _DEFAULTS.delta, "ADAPT's D density step.")
_D_MIN = flags.DEFINE_float("d_min", _DEFAULTS.d_min, "ADAPT's D density floor.")
_SAMPLES = flags.DEFINE_integer("num_samples", 10_000, "Generated points per evaluation.")
_MIN_FRACTION = flags.DEFINE_float(
    "min_mode_fraction", 0.1,
    "A mode is covered with at least this fraction of N / num_modes high-quality samples.")
_EVAL_EMA = flags.DEFINE_bool("eval_ema", True, "Evaluate the EMA generator (else the raw G).")
_CHUNK = flags.DEFINE_integer("chunk", 500, "Iterations per compiled lax.scan.")


def config_from_flags() -> toy2d.ToyConfig:
    """The run configuration; raises ValueError naming the flag on a bad value."""
    try:
        hidden = tuple(int(w) for w in _HIDDEN.value)
        band = tuple(float(b) for b in _BAND.value)
    except ValueError as e:
        raise ValueError(f"--hidden and --band take comma-separated numbers: {e}") from None
    if len(band) != 2:
        raise ValueError(f"--band needs two numbers B-,B+; got {_BAND.value}.")
    unknown = [m for m in _METHODS.value if m not in toy2d.METHODS]
    if unknown or not _METHODS.value:
        raise ValueError(f"--methods: unknown {unknown}; use some of {list(toy2d.METHODS)}.")
    if _SEEDS.value < 1 or _CHUNK.value < 1 or _SAMPLES.value < 1:
        raise ValueError("--seeds, --chunk and --num_samples must be positive.")
    return toy2d.ToyConfig(
        dataset=_DATASET.value, g_density=_G_DENSITY.value, iterations=_ITERATIONS.value,
        n_dis=_N_DIS.value, batch_size=_BATCH.value, z_dim=_Z_DIM.value, g_hidden=hidden,
        d_hidden=hidden, d_spectral_norm=_SN.value, lr_g=_LR.value, lr_d=_LR.value,
        beta1=_BETA1.value, beta2=_BETA2.value, ema_decay=_EMA.value,
        g_update_every=_G_EVERY.value, br_every=_BR_EVERY.value, br_window=_BR_WINDOW.value,
        d_update_every=_D_EVERY.value, band=band, delta=_DELTA.value, d_min=_D_MIN.value)


# ----------------------------------------------------------------------------- plots


def plot_samples(path: str, dataset: str, runs: Sequence[Mapping[str, Any]],
                 title: str) -> str:
    """Scatter of each seed's samples over the mode centres and their 3-std circles."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Circle

    centres, radius = toy2d.mode_centres(dataset), 3.0 * toy2d.mode_std(dataset)
    extent = float(np.abs(centres).max()) + 1.0
    figure = Figure(figsize=(3.2 * len(runs), 3.4), layout="constrained")
    for i, r in enumerate(runs):
        ax = figure.add_subplot(1, len(runs), i + 1)
        pts = r["samples"][:2500]
        ax.scatter(pts[:, 0], pts[:, 1], s=1.5, alpha=0.4, color="tab:blue", linewidths=0)
        for c in centres:
            ax.add_patch(Circle(c, radius, fill=False, color="tab:red", linewidth=0.8))
        ax.set(xlim=(-extent, extent), ylim=(-extent, extent), aspect="equal",
               title=f"seed {r['seed']}: {r['modes_covered']} modes, "
                     f"{100 * r['high_quality']:.0f}% HQ")
        ax.title.set_fontsize(8)
        ax.tick_params(labelsize=7)
    figure.suptitle(title, fontsize=10)
    return storage.atomic_write(path, lambda f: figure.savefig(f, format="png", dpi=110))


def plot_curves(path: str, curves: Mapping[str, Sequence[Mapping[str, np.ndarray]]],
                band: tuple[float, float]) -> str:
    """Windowed BR and D density over iterations: per method, mean over seeds (min-max band)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), layout="constrained")
    axes = figure.subplots(1, 2)
    for method, runs in curves.items():
        for ax, key in zip(axes, ("br/windowed", "density/d"), strict=True):
            values = np.stack([c[key] for c in runs]).astype(np.float64)
            steps = np.arange(1, values.shape[1] + 1)
            with warnings.catch_warnings():  # all-NaN columns before the first measurement
                warnings.simplefilter("ignore", RuntimeWarning)
                mean = np.nanmean(values, axis=0)
                low, high = np.nanmin(values, axis=0), np.nanmax(values, axis=0)
            (line,) = ax.plot(steps, mean, label=method, linewidth=1.5)
            ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
    for level in band:
        axes[0].axhline(level, color="gray", linestyle="--", linewidth=1)
    axes[0].set(xlabel="iteration", ylabel="windowed BR", ylim=(-1.0, 2.0))
    axes[1].set(xlabel="iteration", ylabel="D density", ylim=(0.0, 1.05))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return storage.atomic_write(path, lambda f: figure.savefig(f, format="png", dpi=110))


# ----------------------------------------------------------------------------- report


def summarise(per_seed: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Means and (population) stds over seeds of ``METRIC_KEYS`` and ``EXTRA_KEYS``."""
    values = {k: np.array([r[k] for r in per_seed], np.float64)
              for k in (*METRIC_KEYS, *EXTRA_KEYS)}
    return {"mean": {k: float(np.mean(v)) for k, v in values.items()},
            "std": {k: float(np.std(v)) for k, v in values.items()}}


def markdown_table(summaries: Mapping[str, Mapping[str, Mapping[str, float]]],
                   num_modes: int) -> str:
    """One row per method: mean +- std of the four metrics."""
    lines = [f"| method | modes covered (of {num_modes}) | high quality (%) | BR (windowed) "
             "| BR (median, 2nd half) | D density |", "|---|---|---|---|---|---|"]
    for method, s in summaries.items():
        m, d = s["mean"], s["std"]
        lines.append(
            f"| {method} | {m['modes_covered']:.2f} +- {d['modes_covered']:.2f} "
            f"| {100 * m['high_quality']:.1f} +- {100 * d['high_quality']:.1f} "
            f"| {m['br']:.3f} +- {d['br']:.3f} "
            f"| {m['br_median_late']:.3f} +- {d['br_median_late']:.3f} "
            f"| {m['d_density']:.3f} +- {d['d_density']:.3f} |")
    return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        config = config_from_flags()
        toy2d.build_setup(config, _METHODS.value[0])  # validates densities, band, schedules
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    workdir = _WORKDIR.value
    storage.makedirs(workdir)
    seeds = range(_SEEDS.value)
    start = time.perf_counter()
    per_seed: dict[str, list[dict[str, Any]]] = {}
    curves: dict[str, list[dict[str, np.ndarray]]] = {}
    for method in _METHODS.value:
        t0 = time.perf_counter()
        runs = []
        for seed in seeds:
            r = toy2d.run(config, method, seed, num_samples=_SAMPLES.value, ema=_EVAL_EMA.value,
                          min_fraction=_MIN_FRACTION.value, chunk=_CHUNK.value)
            keep = (*METRIC_KEYS, *EXTRA_KEYS, "samples", "curves")
            runs.append({"seed": seed, **{k: r[k] for k in keep}})
        per_seed[method] = [{k: r[k] for k in ("seed", *METRIC_KEYS, *EXTRA_KEYS)} for r in runs]
        curves[method] = [r["curves"] for r in runs]
        plot_samples(storage.join(workdir, f"samples_{method}.png"), config.dataset, runs,
                     f"{method} ({config.dataset}, d_G = {config.g_density})")
        logging.info("%s: %d seeds in %.1f s", method, len(runs), time.perf_counter() - t0)
    plot_curves(storage.join(workdir, "curves.png"), curves, config.band)
    summaries = {m: summarise(rows) for m, rows in per_seed.items()}
    num_modes = len(toy2d.mode_centres(config.dataset))
    reporting.write_summary(storage.join(workdir, "results.json"), {
        "config": {**vars(config), "seeds": _SEEDS.value, "num_samples": _SAMPLES.value,
                   "min_mode_fraction": _MIN_FRACTION.value, "eval_ema": _EVAL_EMA.value},
        "per_seed": per_seed, "summary": summaries,
        "wall_seconds": time.perf_counter() - start})
    print(markdown_table(summaries, num_modes))
    print(f"\n{config.dataset}, d_G = {config.g_density}, {config.iterations} iterations, "
          f"{len(seeds)} seeds, {time.perf_counter() - start:.0f} s; plots in {workdir}")
    if _JSON.value:
        means = {m: {k: s["mean"][k] for k in METRIC_KEYS} for m, s in summaries.items()}
        print(json.dumps(reporting.to_jsonable(means), allow_nan=False))


if __name__ == "__main__":
    app.run(main)
