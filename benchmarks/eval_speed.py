"""Speed of evaluation: Inception features (images/s) and the metrics on their features.

Rows:

- ``inception <resize>``: jitted ``inception.features`` on uint8 32x32 batches (random-valued
  weights: the cost does not depend on their values), compile excluded, median seconds per
  batch over interleaved rounds (both resize modes once per round, order rotated); images/s
  and the time a 50k-sample evaluation (50k generated + 50k reference images) would take.
- ``FID`` / ``KID`` / ``PRDC`` on random float32 (N, 2048) feature sets of ``--features`` rows
  each (one timed call: NumPy/SciPy on the host, no compile), with the 50k extrapolation:
  FID is O(D^3) and independent of N; KID with a fixed subset count is O(subsets * m^2 D) and
  also independent of N; PRDC is O(N^2 D), so it is scaled by (50k/N)^2.

    python -m benchmarks.eval_speed                       # 3 rounds of 4 batches of 50
    python -m benchmarks.eval_speed --batch=100 --reps=5
    python -m benchmarks.eval_speed --features=2000       # quick look at the metrics

Prints the table and, as its last line, a JSON object of the same numbers.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks.common import interleaved_times
from ddst_jax.metrics import fid, inception, kid_prdc

FLAGS = flags.FLAGS
EVAL_IMAGES = 50_000


def _define_flags() -> None:
    # Defined only when run as a script, so tests can import this module beside other benchmarks.
    flags.DEFINE_integer("batch", 50, "Images per Inception call.")
    flags.DEFINE_integer("batches", 4, "Inception calls per timed round.")
    flags.DEFINE_integer("reps", 3, "Timed rounds (median).")
    flags.DEFINE_integer("image_size", 32, "Side of the generated images, pixels.")
    flags.DEFINE_integer("features", 10_000, "Rows per feature set for FID/KID/PRDC (0: skip).")


def random_variables(key: jax.Array) -> dict[str, Any]:
    """InceptionV3 variables with random values, shaped like the FID weights."""
    return jax.jit(inception.InceptionV3().init)(
        key, jnp.zeros((1, inception.INPUT_SIZE, inception.INPUT_SIZE, 3)))


def inception_rows(variables: Any, batch: int, batches: int, reps: int, size: int,
                   modes: tuple[str, ...] = inception.RESIZE_MODES) -> list[dict[str, Any]]:
    """images/s of ``inception.features`` per resize mode in ``modes`` (compile excluded; the
    compile and first call, in ``compile_s``)."""
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (batch, size, size, 3),
                                                            dtype=np.uint8))
    calls, first_call_s = {}, {}
    for mode in modes:
        fn = jax.jit(lambda v, x, mode=mode: inception.features(v, x, resize=mode))
        t0 = time.perf_counter()
        jax.block_until_ready(fn(variables, images))  # compile + warm-up
        first_call_s[mode] = time.perf_counter() - t0

        def run(fn=fn):
            return [fn(variables, images) for _ in range(batches)]

        calls[mode] = run
    wall, _ = interleaved_times(calls, reps)
    rows = []
    for mode, times in wall.items():
        per_image = statistics.median(times) / (batch * batches)
        rows.append({"row": f"inception {mode}", "seconds": statistics.median(times),
                     "images_per_s": 1.0 / per_image,
                     "eval_50k_hours": 2 * EVAL_IMAGES * per_image / 3600,
                     "compile_s": first_call_s[mode]})  # compile + first call
    return rows


def metric_rows(n: int, dim: int = inception.NUM_FEATURES) -> list[dict[str, Any]]:
    """One timed call of FID (eigh and sqrtm), KID and PRDC on (n, dim) random features."""
    rng = np.random.default_rng(0)
    real = rng.standard_normal((n, dim)).astype(np.float32)
    fake = (rng.standard_normal((n, dim)) + 0.1).astype(np.float32)
    mu_r, sig_r = fid.feature_statistics(real)
    mu_f, sig_f = fid.feature_statistics(fake)
    jobs = {
        "FID (eigh)": (lambda: fid.frechet_distance(mu_r, sig_r, mu_f, sig_f, method="eigh"), 1),
        "FID (sqrtm)": (lambda: fid.frechet_distance(mu_r, sig_r, mu_f, sig_f), 1),
        "KID": (lambda: kid_prdc.kid(real, fake), 1),
        "PRDC": (lambda: kid_prdc.prdc(real, fake), (EVAL_IMAGES / n) ** 2),
    }
    rows = []
    for name, (job, scale) in jobs.items():
        t0 = time.perf_counter()
        job()
        seconds = time.perf_counter() - t0
        rows.append({"row": f"{name} n={n}", "seconds": seconds, "images_per_s": None,
                     "eval_50k_hours": seconds * scale / 3600})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'row':<22} {'median s':>9} {'images/s':>9} {'50k eval h':>11}"]
    for r in rows:
        ips = "-" if r["images_per_s"] is None else f"{r['images_per_s']:.1f}"
        lines.append(f"{r['row']:<22} {r['seconds']:>9.2f} {ips:>9} {r['eval_50k_hours']:>11.2f}")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    del argv
    print(f"backend {jax.default_backend()}, {jax.device_count()} device(s); batch "
          f"{FLAGS.batch} x {FLAGS.batches} calls, {FLAGS.reps} rounds; "
          f"{FLAGS.image_size}x{FLAGS.image_size} images resized to 299")
    variables = random_variables(jax.random.key(0))
    rows = inception_rows(variables, FLAGS.batch, FLAGS.batches, FLAGS.reps, FLAGS.image_size)
    if FLAGS.features:
        rows += metric_rows(FLAGS.features)
    print(format_table(rows))
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
