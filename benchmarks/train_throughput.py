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

from ddst_jax import train
from experiments.configs import cifar10 as cifar10_config

_METHODS = flags.DEFINE_list(
    "methods", ["dense", "static", "sdst", "adapt"], "Methods to time (dense first: ratios).")
_REPS = flags.DEFINE_integer("reps", 3, "Timed repetitions per kind of iteration.")
_G_CH = flags.DEFINE_integer("g_ch", 256, "G width.")
_D_CH = flags.DEFINE_integer("d_ch", 128, "D width.")
_BATCH_G = flags.DEFINE_integer("batch_g", 128, "G batch.")
_BATCH_D = flags.DEFINE_integer("batch_d", 64, "D batch.")
_DEVICES = flags.DEFINE_integer("num_devices", 1, "Devices of the data mesh.")
_DTYPE = flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"],
                          "Models' computation dtype (config.model.compute_dtype).")


def _config(method: str):
    c = cifar10_config.get_config()
    c.model.g_ch, c.model.d_ch = _G_CH.value, _D_CH.value
    c.train.batch_size_g, c.train.batch_size_d = _BATCH_G.value, _BATCH_D.value
    c.sparsity.method = method
    c.data.source = "synthetic"
    c.parallel.num_devices = _DEVICES.value
    c.model.compute_dtype = _DTYPE.value
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


def bench(method: str, reps: int) -> dict[str, float]:
    config = _config(method)
    spec = train.validate_config(config)
    setup = train.build_setup(config, spec)
    mesh = train.make_mesh(config.parallel.num_devices)
    init_fn, iterate, _ = train.compile_fns(setup, config, mesh)
    state = init_fn(jax.random.key(0))
    real = jax.random.uniform(jax.random.key(1), (config.train.n_dis, config.train.batch_size_d,
                                                  32, 32, 3), minval=-1.0, maxval=1.0)
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
          f"G ch {_G_CH.value} / D ch {_D_CH.value}, batch G {_BATCH_G.value} / "
          f"D {_BATCH_D.value}, n_dis 5, {_DTYPE.value} compute, medians of {_REPS.value}")
    print(f"{'method':<8} {'compile s':>10} {'iter s':>9} {'it/s':>7} {'vs first':>9} "
          f"{'+BR s':>8} {'+BR+mask upd s':>15}", flush=True)
    base = None
    for m in _METHODS.value:  # one row as soon as a method is done: full size is slow on CPU
        r = bench(m, _REPS.value)
        base = base or r["plain_s"]
        print(f"{m:<8} {r['compile_s']:>10.1f} {r['plain_s']:>9.3f} {1 / r['plain_s']:>7.3f} "
              f"{r['plain_s'] / base:>9.3f} {r['br_s']:>8.3f} {r['update_s']:>15.3f}", flush=True)


if __name__ == "__main__":
    app.run(main)
