"""Two real training iterations of every shipped experiment config, at reduced width.

The test suite checks that each config's data, model and iteration fit together by tracing
(``tests/test_train.py``, no compilation); compiling BigGAN-64 or SNGAN-48 for two steps costs
1-5 minutes of CPU, so the runs themselves live here. Each config runs through
``train.train_and_evaluate`` (the runner users call) on stand-in data: TFDS-mocked images for
the TFDS sources (CIFAR-10, STL-10), the synthetic source for TinyImageNet (its builder has no
mock metadata). The table gives wall seconds (almost all compilation) and whether the run
finished and wrote its sample grid; the exit status is 1 if any config failed::

    python -m benchmarks.config_runs [--configs=stl10,tiny_imagenet]
"""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
import time
from collections.abc import Sequence

from absl import app, flags

# Config module -> (G width, D width, data source) used here.
CONFIGS = {
    "cifar10": ((16, 16), "tfds"),
    "cifar10_biggan": ((8, 8), "tfds"),
    "stl10": ((16, 32), "tfds"),  # sngan48 on mocked STL-10 (96x96 unlabelled, resized to 48)
    "tiny_imagenet": ((4, 8), "synthetic"),  # biggan64
}


def small_config(module: str, widths: tuple[int, int], source: str):
    """The module's smoke config at ``widths``, 2 iterations of batch 8, on ``source``."""
    config = importlib.import_module(f"experiments.configs.{module}").get_config("smoke")
    config.model.g_ch, config.model.d_ch = widths
    config.data.source = source
    config.data.prefetch = 0
    config.train.iterations = 2
    config.train.batch_size_g = config.train.batch_size_d = 8
    config.train.progress_bar = False
    return config


def run_config(module: str) -> dict[str, object]:
    """Trains ``module``'s small config for 2 iterations in a temporary workdir."""
    import tensorflow_datasets as tfds

    from ddst_jax import train

    widths, source = CONFIGS[module]
    config = small_config(module, widths, source)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir, tfds.testing.mock_data(num_examples=16):
        summary = train.train_and_evaluate(config, workdir)
        sample = os.path.exists(os.path.join(workdir, "samples", "iter_0000002.png"))
    return {"config": module, "model": config.model.name, "size": config.data.image_size,
            "seconds": time.perf_counter() - t0,
            "ok": bool(summary.get("finished")) and summary.get("iteration") == 2 and sample}


def table(rows: Sequence[dict[str, object]]) -> str:
    """The printed table, one line per ``run_config`` row.

    >>> print(table([{"config": "stl10", "model": "sngan48", "size": 48, "seconds": 146.04,
    ...               "ok": False}]))
    config          model         size   wall s  result
    stl10           sngan48         48    146.0  FAILED
    """
    lines = [f"{'config':<16}{'model':<12}{'size':>6}{'wall s':>9}  result"]
    lines += [f"{r['config']:<16}{r['model']:<12}{r['size']:>6}{r['seconds']:>9.1f}  "
              f"{'ok' if r['ok'] else 'FAILED'}" for r in rows]
    return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
    del argv
    unknown = sorted(set(flags.FLAGS.configs) - set(CONFIGS))
    if unknown:
        sys.exit(f"error: --configs: unknown {unknown}; choose from {sorted(CONFIGS)}.")
    rows = [run_config(m) for m in flags.FLAGS.configs]
    print(table(rows))
    if not all(r["ok"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    flags.DEFINE_list("configs", list(CONFIGS), "Experiment configs to run.")
    app.run(main)
