"""Train-iteration throughput per method, full-size CIFAR-10 SNGAN by default.

Prints a table: compile time, median seconds per ordinary iteration (n_dis D steps + G step, no
BR measurement, no mask update), the iteration that also measures BR, the one that also updates
G's masks at t = dT_G (which is also a BR step: dT_G is a multiple of br_every), and the ratio to
the dense iteration measured in the same run. Methods run one after another (not interleaved);
``benchmarks.overheads`` interleaves them and isolates each overhead.

    python -m benchmarks.train_throughput                      # full size, all methods
    python -m benchmarks.train_throughput --methods=dense,adapt --reps=5
    python -m benchmarks.train_throughput --g_ch=32 --d_ch=32  # quick look
    python -m benchmarks.train_throughput --compute_dtype=bfloat16  # bf16 activations
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from benchmarks import overheads
from ddst_jax import train

FLAGS = flags.FLAGS


def _define_flags() -> None:
    # Defined only when run as a script, so benchmarks.accelerator can import bench.
    flags.DEFINE_list("methods", ["dense", "static", "sdst", "adapt"],
                      "Methods to time (dense first: ratios).")
    flags.DEFINE_integer("reps", 3, "Timed repetitions per kind of iteration.")
    flags.DEFINE_integer("g_ch", 256, "G width.")
    flags.DEFINE_integer("d_ch", 128, "D width.")
    flags.DEFINE_integer("batch_g", 128, "G batch.")
    flags.DEFINE_integer("batch_d", 64, "D batch.")
    flags.DEFINE_integer("num_devices", 1, "Devices of the data mesh.")
    flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"],
                      "Models' computation dtype (config.model.compute_dtype).")


def make_config(method: str, *, g_ch: int, d_ch: int, batch_g: int, batch_d: int,
                n_dis: int = 5, num_devices: int = 1, compute_dtype: str = "float32"):
    """The CIFAR-10 config (schedules untouched) at these sizes, synthetic data, on
    ``num_devices`` devices with ``compute_dtype`` activations."""
    c = overheads.make_config(method, g_ch, d_ch, batch_g, batch_d, n_dis)
    c.parallel.num_devices = num_devices
    c.model.compute_dtype = compute_dtype
    return c


def _time(fn, state, real, reps: int):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        state, metrics = fn(state, real)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
    return state, statistics.median(times)


def _at_step(state, step: int):
    return state.replace(step=jnp.asarray(step, jnp.int32))


def bench(config, reps: int) -> dict[str, float]:
    """Compile ``config``'s iteration (as the runner does) and time three kinds of iteration.

    Returns seconds: ``compile_s`` and the medians over ``reps`` calls of an ordinary iteration
    (``plain_s``), one that measures BR (``br_s``) and one that also updates G's masks
    (``update_s``; = an ordinary+BR iteration for methods whose G masks do not move).
    """
    spec = train.validate_config(config)
    setup = train.build_setup(config, spec)
    mesh = train.make_mesh(config.parallel.num_devices)
    init_fn, iterate, _ = train.compile_fns(setup, config, mesh)
    state = init_fn(jax.random.key(0))
    size = config.data.image_size
    real = jax.random.uniform(jax.random.key(1), (config.train.n_dis, config.train.batch_size_d,
                                                  size, size, 3), minval=-1.0, maxval=1.0)
    labels = jnp.zeros(real.shape[:2], jnp.int32)
    t0 = time.perf_counter()
    compiled = iterate.lower(state, real, labels).compile()
    compile_s = time.perf_counter() - t0
    state, _ = jax.block_until_ready(compiled(_at_step(state, 1), real, labels))  # warm-up
    # Step s -> the iteration computes t = s + 1; choose t to hit (or avoid) scheduled work.
    ordinary = 1  # t = 2: no BR (br_every 10), no mask update (500), no decision (1000)
    state, plain = _time(lambda s, r: compiled(_at_step(s, ordinary), r, labels), state, real,
                         reps)
    state, with_br = _time(lambda s, r: compiled(_at_step(s, 9), r, labels), state, real, reps)
    every = config.sparsity.g_update_every
    state, with_update = _time(lambda s, r: compiled(_at_step(s, every - 1), r, labels), state,
                               real, reps)
    return {"compile_s": compile_s, "plain_s": plain, "br_s": with_br, "update_s": with_update}


def main(argv):
    del argv
    print(f"backend={jax.default_backend()} devices={jax.device_count()} "
          f"G ch {FLAGS.g_ch} / D ch {FLAGS.d_ch}, batch G {FLAGS.batch_g} / "
          f"D {FLAGS.batch_d}, n_dis 5, {FLAGS.compute_dtype} compute, medians of {FLAGS.reps}")
    print(f"{'method':<8} {'compile s':>10} {'iter s':>9} {'it/s':>7} {'vs first':>9} "
          f"{'+BR s':>8} {'+BR+mask upd s':>15}", flush=True)
    base = None
    for m in FLAGS.methods:  # one row as soon as a method is done: full size is slow on CPU
        r = bench(make_config(m, g_ch=FLAGS.g_ch, d_ch=FLAGS.d_ch, batch_g=FLAGS.batch_g,
                              batch_d=FLAGS.batch_d, num_devices=FLAGS.num_devices,
                              compute_dtype=FLAGS.compute_dtype), FLAGS.reps)
        base = base or r["plain_s"]
        print(f"{m:<8} {r['compile_s']:>10.1f} {r['plain_s']:>9.3f} {1 / r['plain_s']:>7.3f} "
              f"{r['plain_s'] / base:>9.3f} {r['br_s']:>8.3f} {r['update_s']:>15.3f}", flush=True)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
