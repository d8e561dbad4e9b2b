"""One D step and one G step of full-size SNGAN-32, timed like ../shared/reference/sngan_torch.py.

D step: hinge loss of D on B real + B fake images in one batch (forward + backward), as the
timing reference does; "D step 2fwd" scores them in two forwards (real, then fake, two power
iterations), as the paper's training code and ddst_jax's default ``train.d_forward`` do.
G step: G forward on B noise vectors, D forward, G hinge loss, backward to G's params.
No optimizer update (the reference's Adam step is a small share). Each convolution
implementation (``ddst_jax.gan.conv``: "xla" = ``lax.conv`` and its autodiff, "gemm" = GEMM
gradients) is compiled once and the timed calls are interleaved round by round, in an order
rotated every round (a call right after other jitted work runs slower), so the ratio between
them is measured under the same machine load. Process CPU seconds per call are reported beside
wall seconds: on a shared machine they move less with other jobs' load. Run it right next to
the PyTorch reference on the same machine and quote ratios:

    python -m benchmarks.gan_steps --batch=64 --reps=5
    python ../shared/reference/sngan_torch.py --bs 64 --gbs 64 --threads 2 --reps 5 --modes dense
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from benchmarks.common import interleaved_times
from ddst_jax.gan import conv, losses
from ddst_jax.gan.models import build_models

FLAGS = flags.FLAGS


def _define_flags() -> None:
    # Defined only when run as a script, so benchmarks.accelerator can import make_steps.
    flags.DEFINE_integer("batch", 64, "B: real and fake images of the D step; G batch.")
    flags.DEFINE_integer("reps", 5, "Timed rounds (median reported).")
    flags.DEFINE_list("impls", ["xla", "gemm"], "Convolution implementations to compare.")
    flags.DEFINE_integer("g_ch", 256, "G width.")
    flags.DEFINE_integer("d_ch", 128, "D width.")


def make_steps(batch: int, g_ch: int, d_ch: int):
    """(D step, G step) functions and their arguments; trace them inside ``conv.auto_impl``."""
    G, D = build_models("sngan32", g_ch=g_ch, d_ch=d_ch)
    g_vars = G.init(jax.random.key(0), jnp.zeros((1, 128)), train=False)
    d_vars = D.init(jax.random.key(1), jnp.zeros((1, 32, 32, 3)))
    z = jax.random.normal(jax.random.key(2), (batch, 128))
    x = jax.random.uniform(jax.random.key(3), (2 * batch, 32, 32, 3), minval=-1.0, maxval=1.0)

    def d_step(d_params):
        def loss(p):
            scores, _ = D.apply({"params": p, "batch_stats": d_vars["batch_stats"]}, x,
                                mutable=["batch_stats"])
            return losses.d_hinge_loss(scores[:batch], scores[batch:])

        return jax.value_and_grad(loss)(d_params)

    def d_step_two_forwards(d_params):
        def loss(p):
            s_real, upd = D.apply({"params": p, "batch_stats": d_vars["batch_stats"]},
                                  x[:batch], mutable=["batch_stats"])
            s_fake, _ = D.apply({"params": p, "batch_stats": upd["batch_stats"]}, x[batch:],
                                mutable=["batch_stats"])
            return losses.d_hinge_loss(s_real, s_fake)

        return jax.value_and_grad(loss)(d_params)

    def g_step(g_params):
        def loss(p):
            fake, _ = G.apply({"params": p, "batch_stats": g_vars["batch_stats"]}, z,
                              train=True, mutable=["batch_stats"])
            return losses.g_hinge_loss(D.apply(d_vars, fake, update_stats=False))

        return jax.value_and_grad(loss)(g_params)

    return {"D step": (d_step, d_vars["params"]),
            "D step 2fwd": (d_step_two_forwards, d_vars["params"]),
            "G step": (g_step, g_vars["params"])}


def compile_steps(steps: dict, impls: list[str]) -> tuple[dict, dict]:
    """Each step of ``make_steps`` compiled per convolution implementation, and warmed up.

    Returns ``(compiled, compile_s)``, both keyed by ``(step name, impl)``.
    """
    compiled, compile_s = {}, {}
    for impl in impls:
        for name, (fn, arg) in steps.items():
            with conv.auto_impl(impl):
                t0 = time.perf_counter()
                # A fresh function per implementation: jit caches traces by function identity.
                compiled[name, impl] = jax.jit(lambda a, f=fn: f(a)).lower(arg).compile()
                compile_s[name, impl] = time.perf_counter() - t0
            jax.block_until_ready(compiled[name, impl](arg))  # warm-up
    return compiled, compile_s


def time_steps(steps: dict, compiled: dict, reps: int) -> tuple[dict, dict]:
    """Wall and CPU seconds per call of every compiled step, interleaved (``interleaved_times``)."""
    return interleaved_times(
        {key: (lambda f=fn, a=steps[key[0]][1]: f(a)) for key, fn in compiled.items()}, reps)


def main(argv):
    del argv
    steps = make_steps(FLAGS.batch, FLAGS.g_ch, FLAGS.d_ch)
    compiled, compile_s = compile_steps(steps, FLAGS.impls)
    times, cpu = time_steps(steps, compiled, FLAGS.reps)
    print(f"backend={jax.default_backend()} batch={FLAGS.batch} G ch {FLAGS.g_ch} / D ch "
          f"{FLAGS.d_ch}, medians of {FLAGS.reps} interleaved rounds")
    first = FLAGS.impls[0]
    print(f"{'step':<12} {'conv impl':<10} {'median ms':>10} {'vs ' + first:>9} "
          f"{'CPU ms':>8} {'vs ' + first:>9} {'compile s':>10}  all ms")
    for (name, impl), ts in times.items():
        med = statistics.median(ts)
        ratio = med / statistics.median(times[name, first])
        cpu_med = statistics.median(cpu[name, impl])
        cpu_ratio = cpu_med / statistics.median(cpu[name, first])
        print(f"{name:<12} {impl:<10} {med * 1e3:>10.0f} {ratio:>9.2f} {cpu_med * 1e3:>8.0f} "
              f"{cpu_ratio:>9.2f} {compile_s[name, impl]:>10.1f}  {[round(t * 1e3) for t in ts]}",
              flush=True)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
