r"""What sets BR's scale: ``python -m experiments.br_scaling [--json]``.

Trains the mini-CIFAR-10 SNGAN of ``experiments.mini_cifar10`` (real CIFAR-10 pixels, the
image runner) with G dynamic at d_G = 0.1 (SDST, RigL) and D *static* at a chosen density, so
that BR is measured without a controller moving it, and varies one factor at a time around a
base setting (width 16, lr 2e-4, n_dis 5, batches 32 / 16):

- ``d_D`` in {0.05, 0.1, 0.3, 1.0} (base: 0.1);
- width in {8, 16, 32};
- learning rate (G and D) in {1e-4, 2e-4, 4e-4};
- n_dis in {1, 2, 5}.

For each run it reports the windowed BR (window = ``--window`` iterations, every BR measured
every 5) averaged over each quarter of the run, so the table also shows how BR moves with the
stage of training. Prints a markdown table and, with ``--json``, one JSON object on the last
line ``{"<variant>": [BR of quarter 1, ..., 4], ...}``. Writes its runs and ``results.json``
into ``--workdir`` (default ``/tmp/ddst_br_scaling``). The default (10 runs of 1,000
iterations) takes about 30 minutes on a 2-core CPU.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import app, flags

from experiments import mini_cifar10 as mini

#: Base setting and the one-factor-at-a-time variants: name -> overrides of the base.
BASE = {"d_density": 0.1, "width": 16, "lr": 2e-4, "n_dis": 5}
VARIANTS: dict[str, dict[str, float]] = {
    "base": {},  # d_D 0.1, width 16, lr 2e-4, n_dis 5
    "d_D 0.05": {"d_density": 0.05},
    "d_D 0.3": {"d_density": 0.3},
    "d_D 1.0": {"d_density": 1.0},
    "width 8": {"width": 8},
    "width 32": {"width": 32},
    "lr 1e-4": {"lr": 1e-4},
    "lr 4e-4": {"lr": 4e-4},
    "n_dis 1": {"n_dis": 1},
    "n_dis 2": {"n_dis": 2},
}

FLAGS = flags.FLAGS


def _define_flags() -> None:
    flags.DEFINE_string("workdir", "/tmp/ddst_br_scaling", "Runs and results.")
    flags.DEFINE_bool("json", False, "Also print the results as one JSON object.")
    flags.DEFINE_string("data", mini.DEFAULT_DATA, "npz with uint8 train_images.")
    flags.DEFINE_integer("iterations", 1000, "Iterations per run.")
    flags.DEFINE_integer("window", 200, "BR window in iterations.")
    flags.DEFINE_list("variants", list(VARIANTS), "Variants to run (names above).")
    flags.DEFINE_integer("seed", 0, "Seed of every run.")


def variant_config(name: str, iterations: int, window: int, data_path: str, seed: int) -> Any:
    """The runner config of one variant: SDST (G RigL at d_G 0.1), D static at its d_D."""
    setting = BASE | VARIANTS[name]
    settings = mini.scale_settings(False, iterations=iterations, width=int(setting["width"]))
    settings["br_window"], settings["br_every"] = window, 5
    c = mini.make_config("sdst_strong_rigl", seed, settings, g_density=0.1,
                         lr=float(setting["lr"]), data_path=data_path)
    c.sparsity.d_density = float(setting["d_density"])
    c.train.n_dis = int(setting["n_dis"])
    return c


def quarter_means(steps: np.ndarray, values: np.ndarray, window: int,
                  iterations: int) -> list[float]:
    """Mean of the finite values logged in each quarter of the run once the window is full
    (from iteration ``window`` on); NaN where there is none.

    >>> quarter_means(np.arange(10, 110, 10), np.arange(10.0), 30, 100)
    [nan, 3.0, 5.5, 8.0]
    """
    out = []
    for q in range(4):
        sel = ((steps > q * iterations / 4) & (steps <= (q + 1) * iterations / 4)
               & (steps >= window) & np.isfinite(values))
        out.append(float(np.mean(values[sel])) if sel.any() else float("nan"))
    return out


def markdown_table(results: Mapping[str, Sequence[float]]) -> str:
    lines = ["| variant | BR, 1st quarter | 2nd | 3rd | 4th |", "|---|---|---|---|---|"]
    for name, qs in results.items():
        lines.append(f"| {name} | " + " | ".join("-" if not np.isfinite(v) else f"{v:.3f}"
                                                  for v in qs) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from experiments import runner

    runner.quiet_libraries()  # orbax's INFO lines would bury the progress lines
    unknown = [v for v in FLAGS.variants if v not in VARIANTS]
    if unknown:
        print(f"error: --variants: unknown {unknown}; use some of {list(VARIANTS)}.",
              file=sys.stderr)
        sys.exit(1)
    from ddst_jax import reporting, storage, train

    start = time.perf_counter()
    results: dict[str, list[float]] = {}
    for i, name in enumerate(FLAGS.variants):
        config = variant_config(name, FLAGS.iterations, FLAGS.window, FLAGS.data, FLAGS.seed)
        workdir = storage.join(FLAGS.workdir, f"variant{VARIANTS_INDEX[name]}")
        summary = train.train_and_evaluate(config, workdir)
        if not summary.get("finished", False):
            # A stop (Ctrl-C, SIGTERM) ends the study; the run resumes on the next call.
            print(f"stopped in {workdir}; re-run the same command to resume the study.",
                  file=sys.stderr)
            sys.exit(1)
        rows = reporting.read_jsonl(storage.join(workdir, "metrics.jsonl"))
        steps, br = reporting.scalar_series(rows, "br/windowed")
        results[name] = quarter_means(steps, br, FLAGS.window, FLAGS.iterations)
        reporting.say(f"[{i + 1}/{len(FLAGS.variants)}] {name}: "
                      + ", ".join(f"{v:.3f}" for v in results[name]))
    reporting.write_summary(storage.join(FLAGS.workdir, "results.json"), {
        "base": BASE, "iterations": FLAGS.iterations, "window": FLAGS.window,
        "seed": FLAGS.seed, "results": results, "wall_seconds": time.perf_counter() - start})
    print(markdown_table(results))
    print(f"\n{FLAGS.iterations} iterations per run, window {FLAGS.window}, seed {FLAGS.seed}, "
          f"{time.perf_counter() - start:.0f} s")
    if FLAGS.json:
        print(json.dumps(reporting.to_jsonable(results), allow_nan=False))


VARIANTS_INDEX = {name: i for i, name in enumerate(VARIANTS)}

if __name__ == "__main__":
    _define_flags()
    app.run(main)
