r"""Real-image balance benchmark on a CPU: ``python -m experiments.mini_cifar10 [--quick]``.

Trains a reduced-width SNGAN on real CIFAR-10 pixels with the image runner itself
(``train.train_and_evaluate``: the jitted iteration, ERK masks, G's RigL drop-and-grow, the BR
window and the D-density controller of a full run), for these methods at one G density over
several seeds:

- ``dense``: no masks;
- ``static_balance``: G and D masks fixed, d_D = d_G;
- ``static_strong``: G masks fixed, D dense;
- ``sdst_strong_rigl``: G dynamic (RigL), D dense (the relaxed setting's strong D);
- ``adapt``: ADAPT relaxed with the paper's band [0.45, 0.55];
- ``adapt_relative``: ADAPT relaxed with the band measured from the run (``control.controller
  = "relative"``: 0.9 and 1.1 times the windowed BR of the first decision, see
  docs/method.md section 9).

Each run's EMA generator then draws ``--num_eval`` images (BN in train mode, as the paper
samples) and is scored against held-out real images (the npz's ``test_images``, else the second
half of its ``train_images``) with the multi-scale sliced Wasserstein distance
(``metrics.swd``, x 1e3, lower is better; no downloaded weights). The ``real`` row scores as
many *training* images against the same held-out set: the floor no generator can beat at this
sample size. With ``--inception_weights`` FID and KID are reported beside it.

Why these sizes (the default): width 16 for G and D (1/16 and 1/8 of the paper's 256 / 128),
batches 32 (G) / 16 (D), n_dis 5, lr 2e-4, 1,000 iterations, 3 seeds. On the 2-core
development CPU a run took 263-302 s measured alone (training at ~4-5.6 it/s; width 32 would
run at ~2.8), compile (~25 s, shared by a method's seeds through the compilation cache),
sampling and scoring included: 6 methods x 3 seeds take ~80 minutes (``--seeds=2``: ~55). The
schedules keep the paper's shape at this length: dT_G 100 (10 G updates), dT_D 100 (9 ADAPT
decisions), a BR window of 100 iterations measured every 5 (20 ratios). ``--quick`` (width 8,
250 iterations, dT_G = dT_D = 50, 1 seed, 500 images scored) runs in ~8-9 minutes: it checks
that everything works, not which method wins.

Writes into ``--workdir`` (default ``/tmp/ddst_mini_cifar10``): one run directory per method and
seed, ``results.json`` (per-seed values, means, stds, configuration), ``curves.png`` (windowed
BR and D density) and ``samples_<method>.png``. Prints a markdown table (mean +- std over
seeds); ``--json`` also prints, as the last line, one object ``{"<method>": {"swd": ...,
"swd_32": ..., "swd_16": ..., "br": ..., "d_density": ...}, ..., "real": {...}}`` of means.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import app, flags

from ddst_jax import storage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(REPO, "..", "shared", "data", "cifar10_subset.npz")

#: Config overrides of each method (on top of ``experiments/configs/cifar10.py``).
METHODS: dict[str, dict[str, Any]] = {
    "dense": {"sparsity.method": "dense"},
    "static_balance": {"sparsity.method": "static", "sparsity.d_mode": "balance"},
    "static_strong": {"sparsity.method": "static", "sparsity.d_mode": "strong"},
    "sdst_strong_rigl": {"sparsity.method": "sdst", "sparsity.d_mode": "strong",
                         "sparsity.regrow": "rigl"},
    "adapt": {"sparsity.method": "adapt", "sparsity.setting": "relaxed"},
    "adapt_relative": {"sparsity.method": "adapt", "sparsity.setting": "relaxed",
                       "control.controller": "relative"},
}
#: Benchmark scales: --quick checks the pipeline; --full (default) is the measured benchmark.
SCALES: dict[str, dict[str, int]] = {
    "full": {"width": 16, "iterations": 1000, "seeds": 3, "g_update_every": 100,
             "d_update_every": 100, "br_window": 100, "br_every": 5, "num_eval": 1000},
    "quick": {"width": 8, "iterations": 250, "seeds": 1, "g_update_every": 50,
              "d_update_every": 50, "br_window": 50, "br_every": 5, "num_eval": 500},
}
METRIC_KEYS = ("swd", "swd_32", "swd_16", "br", "d_density")

FLAGS = flags.FLAGS


def _define_flags() -> None:
    # Defined only when run as a script, so tests and experiments.br_scaling can import this.
    flags.DEFINE_string("workdir", "/tmp/ddst_mini_cifar10", "Runs, plots and results.")
    flags.DEFINE_bool("quick", False, "The <10 min pipeline check instead of the benchmark.")
    flags.DEFINE_bool("json", False, "Also print the means as one JSON object (last line).")
    flags.DEFINE_string("data", DEFAULT_DATA,
                        "npz with uint8 train_images (and test_images); or 'tfds'.")
    flags.DEFINE_list("methods", list(METHODS), "Methods to compare.")
    flags.DEFINE_float("g_density", 0.1, "d_G of the sparse methods.")
    flags.DEFINE_integer("seeds", None, "Seeds per method (default: the scale's).")
    flags.DEFINE_integer("iterations", None, "Iterations (default: the scale's).")
    flags.DEFINE_integer("width", None, "G and D width (default: the scale's).")
    flags.DEFINE_integer("num_eval", None, "Generated / real images per score.")
    flags.DEFINE_float("lr", 2e-4, "Adam learning rate of G and D.")
    flags.DEFINE_string("inception_weights", None,
                        "pytorch-fid Inception .pth: also report FID and KID.")


def scale_settings(quick: bool, **overrides: int | None) -> dict[str, int]:
    """The scale's settings with the flags that were given replacing them."""
    settings = dict(SCALES["quick" if quick else "full"])
    iterations = overrides.get("iterations")
    if iterations is not None and iterations > 0:
        # A shorter or longer run keeps the schedules' fractions of its length.
        ratio = iterations / settings["iterations"]
        for k in ("g_update_every", "d_update_every", "br_every"):
            settings[k] = max(1, round(settings[k] * ratio))
        settings["br_window"] = settings["d_update_every"]
    settings.update({k: v for k, v in overrides.items() if v is not None})
    for k in ("width", "iterations", "seeds", "num_eval"):
        if settings[k] < 1:
            raise ValueError(f"--{k} must be positive, got {settings[k]}.")
    return settings


def make_config(method: str, seed: int, settings: Mapping[str, int], *, g_density: float,
                lr: float, data_path: str) -> Any:
    """The runner config of one run: the CIFAR-10 config at this benchmark's scale."""
    from experiments.configs import cifar10

    c = cifar10.get_config()
    c.seed = seed
    c.model.g_ch = c.model.d_ch = settings["width"]
    if data_path == "tfds":
        c.data.source = "tfds"
    else:
        c.data.source, c.data.path = "npz", data_path
    t = c.train
    t.iterations = settings["iterations"]
    t.batch_size_g, t.batch_size_d, t.n_dis = 32, 16, 5
    t.lr_g = t.lr_d = lr
    t.log_every = settings["br_every"] * 4
    t.checkpoint_every = t.sample_every = settings["iterations"]
    t.num_samples = 64
    t.progress_bar = False
    c.sparsity.g_density = g_density
    c.sparsity.g_update_every = settings["g_update_every"]
    c.control.d_update_every = settings["d_update_every"]
    c.balance.window = settings["br_window"]
    c.balance.br_every = settings["br_every"]
    c.eval.every = 0
    c.health.pinned_iterations = 0
    for dotted, value in METHODS[method].items():
        section, field = dotted.split(".")
        c[section][field] = value
    return c


def real_sets(data_path: str, num_eval: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(held-out reference images, as many training images): uint8 (num_eval, H, W, 3) each.

    The reference is the npz's ``test_images`` when it has at least ``num_eval`` of them, else
    the second half of ``train_images`` (the training set is then the first half's sample);
    the two sets never share an image.
    """
    if data_path == "tfds":
        from ddst_jax import data

        c = data.default_config()
        train = data.load_source(c, seed=seed)
        images, _ = train.read(np.arange(len(train)))
        held_out = None
    else:
        with np.load(io.BytesIO(storage.read_bytes(data_path))) as f:
            images = f["train_images"]
            held_out = f["test_images"] if "test_images" in f else None
    rng = np.random.default_rng(seed)
    if held_out is not None and len(held_out) >= num_eval:
        reference = held_out[np.sort(rng.choice(len(held_out), num_eval, replace=False))]
        train_pool = images
    else:
        half = len(images) // 2
        if half < num_eval:
            raise ValueError(f"--num_eval={num_eval} needs {2 * num_eval} real images; the data "
                             f"has {len(images)}.")
        reference, train_pool = images[half:][:num_eval], images[:half]
    train_sample = train_pool[np.sort(rng.choice(len(train_pool), num_eval, replace=False))]
    return np.asarray(reference), np.asarray(train_sample)


def br_summary(workdir: str, settings: Mapping[str, int]) -> dict[str, Any]:
    """Median windowed BR over the run's second half, final D density, and the curves."""
    from ddst_jax import reporting

    rows = reporting.read_jsonl(storage.join(workdir, "metrics.jsonl"))
    steps, br = reporting.scalar_series(rows, "br/windowed")
    _, density = reporting.scalar_series(rows, "density/d")
    # The window is full from iteration br_window on.
    late = ((steps > settings["iterations"] // 2) & (steps >= settings["br_window"])
            & np.isfinite(br))
    # The median, not the mean: one near-zero real-fake gap in a window makes that window's
    # BR huge (a --quick run's mean was -330), and the median ignores a few such windows.
    return {"br": float(np.median(br[late])) if late.any() else float("nan"),
            "d_density": float(density[-1]) if len(density) else float("nan"),
            "curves": {"step": steps.tolist(), "br/windowed": br.tolist(),
                       "density/d": density.tolist()}}


def swd_scores(images: np.ndarray, reference: Any, key_seed: int = 0) -> dict[str, float]:
    """``metrics.swd`` of ``images`` against precomputed reference descriptors, renamed."""
    import jax

    from ddst_jax.metrics import swd

    key = jax.random.key(key_seed)
    out = swd.swd_from_descriptors(reference, swd.compute_descriptors(images, key), key)
    return {"swd": out["swd/avg"], **{k.replace("/", "_"): v for k, v in out.items()
                                      if k != "swd/avg"}}


def inception_scores(images: np.ndarray, reference_images: np.ndarray,
                     weights: str) -> dict[str, float]:
    """FID and KID (x 1e3) of ``images`` against ``reference_images`` (pytorch-fid weights)."""
    from ddst_jax.metrics import fid, inception, kid_prdc

    variables = inception.load_weights(weights)
    fake = inception.features_batched(variables, images, batch_size=50)[0]
    real = inception.features_batched(variables, reference_images, batch_size=50)[0]
    kid_mean, _ = kid_prdc.kid(real, fake, subset_size=min(1000, len(real)))
    return {"fid": fid.frechet_distance(*fid.feature_statistics(real),
                                        *fid.feature_statistics(fake)),
            "kid_x1e3": 1e3 * kid_mean}


def run_one(method: str, seed: int, settings: Mapping[str, int], workdir: str, *,
            g_density: float, lr: float, data_path: str) -> dict[str, Any]:
    """Train (or resume / reuse) one run; its EMA samples, BR summary and wall time."""
    from ddst_jax import scoring, train

    config = make_config(method, seed, settings, g_density=g_density, lr=lr,
                         data_path=data_path)
    t0 = time.perf_counter()
    summary = train.train_and_evaluate(config, workdir)
    if not summary.get("finished", False):
        raise RuntimeError(f"{workdir} stopped before its last iteration.")
    train_s = time.perf_counter() - t0
    run = scoring.load_run(workdir)
    samples = np.asarray(scoring.sample_uint8(run, 0, settings["num_eval"], seed=10_000 + seed))
    return {"samples": samples, "train_seconds": train_s, **br_summary(workdir, settings)}


def summarise(per_seed: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean and sample std over seeds of every numeric key the runs share (std NaN for one
    seed), computed as ``experiments.report`` does for every other table."""
    from experiments.report import seed_statistics

    keys = [k for k in per_seed[0] if k != "seed" and isinstance(per_seed[0][k], float | int)]
    stats = {k: seed_statistics([float(r[k]) for r in per_seed]) for k in keys}
    return {"n": len(per_seed), "mean": {k: s[0] for k, s in stats.items()},
            "std": {k: float("nan") if s[1] is None else s[1] for k, s in stats.items()}}


def markdown_table(summaries: Mapping[str, Mapping[str, Any]]) -> str:
    """One row per method (and ``real``): mean +- sample std over seeds (mean alone for n = 1)."""
    extra = [k for k in ("fid", "kid_x1e3") if any(k in s["mean"] for s in summaries.values())]
    cols = ["swd", "swd_32", "swd_16", *extra, "br", "d_density"]
    names = {"swd": "SWD x1e3 (avg)", "swd_32": "SWD 32", "swd_16": "SWD 16", "fid": "FID",
             "kid_x1e3": "KID x1e3", "br": "BR (windowed, 2nd half)", "d_density": "final d_D"}
    lines = ["| method | n | " + " | ".join(names[c] for c in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for method, s in summaries.items():
        cells = []
        for c in cols:
            if c not in s["mean"] or not np.isfinite(s["mean"][c]):
                cells.append("-")
            else:
                digits = 3 if c in ("br", "d_density") else 2
                std = s["std"].get(c, float("nan"))
                spread = f" +- {std:.{digits}f}" if np.isfinite(std) else ""  # n = 1: no std
                cells.append(f"{s['mean'][c]:.{digits}f}{spread}")
        lines.append(f"| {method} | {s['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(path: str, curves: Mapping[str, Sequence[Mapping[str, list[float]]]],
                band: tuple[float, float]) -> str:
    """Windowed BR and D density over iterations, one line per method and seed."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), layout="constrained")
    axes = figure.subplots(1, 2)
    colours = {}
    for method, runs in curves.items():
        for i, c in enumerate(runs):
            for ax, key in zip(axes, ("br/windowed", "density/d"), strict=True):
                kwargs = {"color": colours.get(method), "linewidth": 1.2, "alpha": 0.8}
                (line,) = ax.plot(c["step"], c[key], label=method if i == 0 else None, **kwargs)
                colours.setdefault(method, line.get_color())
    for level in band:
        axes[0].axhline(level, color="grey", linestyle="--", linewidth=0.8)
    axes[0].set(xlabel="iteration", ylabel="windowed BR", yscale="log")
    axes[1].set(xlabel="iteration", ylabel="D density")
    axes[1].legend(fontsize=7)
    return storage.atomic_write(path, lambda f: figure.savefig(f, format="png", dpi=110))


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from experiments import runner

    runner.quiet_libraries()  # orbax's INFO lines would bury the progress lines
    from ddst_jax import reporting

    try:
        settings = scale_settings(FLAGS.quick, seeds=FLAGS.seeds, iterations=FLAGS.iterations,
                                  width=FLAGS.width, num_eval=FLAGS.num_eval)
        unknown = [m for m in FLAGS.methods if m not in METHODS]
        if unknown or not FLAGS.methods:
            raise ValueError(f"--methods: unknown {unknown}; use some of {list(METHODS)}.")
        if FLAGS.data != "tfds" and not storage.exists(FLAGS.data):
            raise ValueError(f"--data={FLAGS.data}: no such file. Give an npz with uint8 "
                             "train_images (N, 32, 32, 3) (and test_images), or --data=tfds.")
        from ddst_jax import train

        for method in FLAGS.methods:  # every config valid before the first compile
            train.validate_config(make_config(method, 0, settings, g_density=FLAGS.g_density,
                                              lr=FLAGS.lr, data_path=FLAGS.data))
        reference_images, train_images = real_sets(FLAGS.data, settings["num_eval"])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)

    import jax

    from ddst_jax.metrics import swd

    workdir = FLAGS.workdir
    storage.makedirs(workdir)
    # Seeds of one method compile the same programs: reuse them across runs (JAX's cache
    # takes a gs:// folder too).
    jax.config.update("jax_compilation_cache_dir", storage.join(workdir, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    start = time.perf_counter()
    reference = swd.compute_descriptors(reference_images, jax.random.key(0))
    per_seed: dict[str, list[dict[str, Any]]] = {}
    curves: dict[str, list[dict[str, list[float]]]] = {}
    for method in FLAGS.methods:
        rows, grids = [], []
        for seed in range(settings["seeds"]):
            r = run_one(method, seed, settings, storage.join(workdir, f"{method}_seed{seed}"),
                        g_density=FLAGS.g_density, lr=FLAGS.lr, data_path=FLAGS.data)
            row = {"seed": seed, **swd_scores(r["samples"], reference), "br": r["br"],
                   "d_density": r["d_density"], "train_seconds": r["train_seconds"]}
            if FLAGS.inception_weights:
                row.update(inception_scores(r["samples"], reference_images,
                                            FLAGS.inception_weights))
            rows.append(row)
            grids.append(r["samples"][:64])
            curves.setdefault(method, []).append(r["curves"])
            reporting.say(f"{method} seed {seed}: SWD {row['swd']:.2f}, BR {row['br']:.3f}, "
                          f"d_D {row['d_density']:.3f} ({r['train_seconds']:.0f} s)")
        per_seed[method] = rows
        reporting.save_image_grid(np.concatenate(grids),
                                  storage.join(workdir, f"samples_{method}.png"), nrow=8)
    real = {"seed": 0, **swd_scores(train_images, reference)}
    if FLAGS.inception_weights:
        real.update(inception_scores(train_images, reference_images, FLAGS.inception_weights))
    per_seed["real"] = [real]
    plot_curves(storage.join(workdir, "curves.png"), curves, (0.45, 0.55))
    summaries = {m: summarise(rows) for m, rows in per_seed.items()}
    reporting.write_summary(storage.join(workdir, "results.json"), {
        "settings": {**settings, "g_density": FLAGS.g_density, "lr": FLAGS.lr,
                     "data": FLAGS.data, "methods": FLAGS.methods},
        "per_seed": per_seed, "summary": summaries,
        "wall_seconds": time.perf_counter() - start})
    print(markdown_table(summaries))
    print(f"\nwidth {settings['width']}, d_G = {FLAGS.g_density}, {settings['iterations']} "
          f"iterations, {settings['seeds']} seed(s), SWD on {settings['num_eval']} images, "
          f"{time.perf_counter() - start:.0f} s; runs and plots in {workdir}")
    if FLAGS.json:
        means = {m: {k: s["mean"].get(k) for k in METRIC_KEYS if k in s["mean"]}
                 for m, s in summaries.items()}
        print(json.dumps(reporting.to_jsonable(means), allow_nan=False))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
