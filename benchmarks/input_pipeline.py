"""Input-pipeline throughput: does the runner's data path keep up with the train iteration?

Measures how many iterations' worth of real batches per second ``ddst_jax.data`` delivers, at
the runner's shapes (one item = ``n_dis`` stacked batches of ``batch_size`` images, 5 x 64 x
32x32x3 by default), for every source, at three stages of the path the runner uses
(``train_and_evaluate`` reads ``data.BatchIterator(..., stack=n_dis, prefetch=config.data.
prefetch, mesh=mesh)``):

  host      ``get_stacked_batch``: read, flip, stack, uint8 -> float32 (one thread, no device);
  device    + ``shard_batch`` onto the data mesh, on the calling thread (``prefetch=0``);
  runner    ``BatchIterator`` with ``--prefetch`` items prepared ahead on its background thread,
            consumed back to back: the runner's own object at its steady-state rate.

Sources: ``synthetic`` (the runner's 1024-image pool), ``npz`` (``--npz``, default the shared
CIFAR-10 subset; skipped if absent), ``tfds_mock`` (``data.load_source`` on
``tfds.testing.mock_data``: TFDS's random-access path, one ``__getitem__`` per example, but
no image decoding) and ``tfds_png`` (the shape of a real ``tfds.data_source`` read: every
example PNG-decoded by TFDS's own ``Image.decode_example_np`` on each read, array_record I/O
left out; ``config.data.in_memory=True`` decodes once and reads like ``npz``).

Columns: batches/s and iterations/s supplied, ms per iteration, and ``x iter`` = iterations
supplied during one iteration of ``--iteration_s`` (the full-size CPU iteration) and of
``--fast_iteration_s`` (an accelerator iteration): above 1 the pipeline keeps up. Finally, a
loop that "trains" with a ``--fast_iteration_s`` sleep per iteration (an accelerator step
keeps the host idle the same way) shows how much input time each iteration still waits for
with and without prefetching.

    python -m benchmarks.input_pipeline                     # all sources, full-size shapes
    python -m benchmarks.input_pipeline --sources=synthetic,npz --seconds=2
    python -m benchmarks.input_pipeline --iteration_s=12.3 --fast_iteration_s=0.02
"""

from __future__ import annotations

import contextlib
import io
import os
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
from absl import app, flags

from ddst_jax import data, train

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SOURCES = flags.DEFINE_list("sources", ["synthetic", "npz", "tfds_mock", "tfds_png"],
                             "Sources to measure.")
_N_DIS = flags.DEFINE_integer("n_dis", 5, "Batches per iteration (D steps).")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Images per batch (D batch).")
_SIZE = flags.DEFINE_integer("image_size", 32, "Image side length.")
_PREFETCH = flags.DEFINE_integer("prefetch", 2, "BatchIterator prefetch (config.data.prefetch).")
_SECONDS = flags.DEFINE_float("seconds", 3.0, "Minimum measuring time per row.")
_ITERATION_S = flags.DEFINE_float(
    "iteration_s", 37.0, "Seconds per train iteration to compare against (default: the "
    "full-size ADAPT iteration measured on the 2-core development machine, BUILD_NOTES.md).")
_FAST_S = flags.DEFINE_float("fast_iteration_s", 0.05,
                             "A fast accelerator iteration (s) to compare against.")
_NPZ = flags.DEFINE_string("npz", os.path.join(_REPO, "..", "shared", "data",
                                               "cifar10_subset.npz"), "npz source file.")
_NUM_EXAMPLES = flags.DEFINE_integer("num_examples", 50_000,
                                     "Examples of the tfds sources (CIFAR-10 train: 50k).")


class _PngExamples(Sequence):
    """Example dicts whose image is PNG bytes decoded on every read, as a TFDS data source does.

    ``num_examples`` examples cycle over the encoded pool (real pixels, so real PNG sizes).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, num_examples: int):
        import tensorflow_datasets as tfds
        from PIL import Image

        def png(im: np.ndarray) -> bytes:
            buf = io.BytesIO()
            Image.fromarray(im).save(buf, format="PNG")
            return buf.getvalue()

        self._png = [png(im) for im in images]
        self._labels = labels
        self._feature = tfds.features.Image(shape=images.shape[1:])
        self._n = num_examples

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> dict:
        j = i % len(self._png)
        return {"image": self._feature.decode_example_np(self._png[j]),
                "label": int(self._labels[j])}


def _real_images() -> tuple[np.ndarray, np.ndarray] | None:
    if not os.path.isfile(_NPZ.value):
        return None
    source = data.load_npz(_NPZ.value, _SIZE.value)
    return source.images, source.labels


def _open(name: str, stack: contextlib.ExitStack) -> data.ImageSource | None:
    """The source ``name`` (entering any context it needs on ``stack``), or None if absent."""
    c = data.default_config()
    c.image_size = _SIZE.value
    if name == "synthetic":
        c.source = "synthetic"
        return data.load_source(c, seed=0)
    if name == "npz":
        if not os.path.isfile(_NPZ.value):
            return None
        c.source, c.path = "npz", _NPZ.value
        return data.load_source(c, seed=0)
    if name == "tfds_mock":
        import tensorflow_datasets as tfds

        stack.enter_context(tfds.testing.mock_data(num_examples=_NUM_EXAMPLES.value))
        c.source, c.name = "tfds", "cifar10"
        return data.load_source(c, seed=0)
    if name == "tfds_png":
        real = _real_images()
        if real is None:  # Real pixels give real PNG sizes; fall back to the synthetic pool.
            real = data.synthetic_images(0, 1024, _SIZE.value)
        return data.TfdsSource(_PngExamples(*real, _NUM_EXAMPLES.value), _SIZE.value)
    raise ValueError(f"--sources: unknown source {name!r}.")


def _rate(make: Callable[[], object], seconds: float) -> float:
    """Items per second of ``make()`` (each result waited for), after one warm-up item."""
    jax.block_until_ready(make())
    n, t0 = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - t0 < seconds:
        jax.block_until_ready(make())
        n += 1
    return n / (time.perf_counter() - t0)


def _stages(source: data.ImageSource, mesh) -> dict[str, float]:
    n, b, s = _N_DIS.value, _BATCH.value, _SECONDS.value
    pos = iter(range(0, 10**9, n))
    out = {"host": _rate(lambda: data.get_stacked_batch(source, next(pos), b, n, seed=0), s)}
    with data.BatchIterator(source, 0, b, seed=0, stack=n, prefetch=0, mesh=mesh) as it:
        out["device"] = _rate(lambda: next(it)[1], s)
    with data.BatchIterator(source, 0, b, seed=0, stack=n, prefetch=_PREFETCH.value,
                            mesh=mesh) as it:
        out[f"runner (prefetch {_PREFETCH.value})"] = _rate(lambda: next(it)[1], s)
    return out


def _exposed_wait(source: data.ImageSource, mesh, prefetch: int, step_s: float) -> float:
    """Mean seconds per iteration spent waiting for input, with a ``step_s`` device step."""
    n, b = _N_DIS.value, _BATCH.value
    iters = max(10, int(_SECONDS.value / step_s))
    with data.BatchIterator(source, 0, b, seed=0, stack=n, prefetch=prefetch, mesh=mesh) as it:
        jax.block_until_ready(next(it)[1])
        time.sleep(step_s * (prefetch + 1))  # Let the prefetch queue fill, as during compile.
        t0 = time.perf_counter()
        for _ in range(iters):
            jax.block_until_ready(next(it)[1])
            time.sleep(step_s)  # The accelerator computes; the host thread only waits.
        return (time.perf_counter() - t0) / iters - step_s


def main(argv):
    del argv
    mesh = train.make_mesh(1)
    n, b, size = _N_DIS.value, _BATCH.value, _SIZE.value
    slow, fast = _ITERATION_S.value, _FAST_S.value
    mib = n * b * size * size * 3 * 4 / 2**20
    print(f"backend={jax.default_backend()}, 1-device data mesh, {os.cpu_count()} CPUs, "
          f"iteration = {n} batches of {b}x{size}x{size}x3 ({mib:.1f} MiB float32), "
          f">= {_SECONDS.value:g} s per row", flush=True)
    print(f"{'source':<10} {'stage':<20} {'batches/s':>10} {'it/s':>8} {'ms/it':>8} "
          f"{f'x {slow:g} s it':>12} {f'x {fast:g} s it':>12}", flush=True)
    waits = []
    for name in _SOURCES.value:
        with contextlib.ExitStack() as stack:
            source = _open(name, stack)
            if source is None:
                print(f"{name:<10} (skipped: {_NPZ.value} not found)", flush=True)
                continue
            for stage, rate in _stages(source, mesh).items():
                print(f"{name:<10} {stage:<20} {rate * n:>10.1f} {rate:>8.2f} "
                      f"{1e3 / rate:>8.1f} {rate * slow:>12.1f} {rate * fast:>12.2f}", flush=True)
            waits.append((name, _exposed_wait(source, mesh, 0, fast),
                          _exposed_wait(source, mesh, _PREFETCH.value, fast)))
    print(f"\ninput wait per iteration with a {fast:g} s device step (ms; 0 = fully hidden)")
    print(f"{'source':<10} {'prefetch 0':>11} {f'prefetch {_PREFETCH.value}':>11}")
    for name, w0, wp in waits:
        print(f"{name:<10} {max(w0, 0) * 1e3:>11.1f} {max(wp, 0) * 1e3:>11.1f}")


if __name__ == "__main__":
    app.run(main)
