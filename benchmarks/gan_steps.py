"""One D step and one G step of full-size SNGAN-32, timed like ../shared/reference/sngan_torch.py.

D step: hinge loss of D on B real + B fake images in one batch (forward + backward).
G step: G forward on B noise vectors, D forward, G hinge loss, backward to G's params.
No optimizer update (the reference's Adam step is a small share). Run it right next to the
PyTorch reference on the same machine and quote ratios:

    python -m benchmarks.gan_steps --batch=64 --reps=3
    python ../shared/reference/sngan_torch.py --bs 64 --gbs 64 --threads 2 --reps 3 --modes dense
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from ddst_jax.gan import losses
from ddst_jax.gan.models import build_models

_BATCH = flags.DEFINE_integer("batch", 64, "B: real and fake images of the D step; G batch.")
_REPS = flags.DEFINE_integer("reps", 3, "Timed repetitions (median reported).")


def main(argv):
    del argv
    b = _BATCH.value
    G, D = build_models("sngan32")
    g_vars = G.init(jax.random.key(0), jnp.zeros((1, 128)), train=False)
    d_vars = D.init(jax.random.key(1), jnp.zeros((1, 32, 32, 3)))
    z = jax.random.normal(jax.random.key(2), (b, 128))
    x = jax.random.uniform(jax.random.key(3), (2 * b, 32, 32, 3), minval=-1.0, maxval=1.0)

    @jax.jit
    def d_step(d_params):
        def loss(p):
            scores, _ = D.apply({"params": p, "batch_stats": d_vars["batch_stats"]}, x,
                                mutable=["batch_stats"])
            return losses.d_hinge_loss(scores[:b], scores[b:])

        return jax.value_and_grad(loss)(d_params)

    @jax.jit
    def g_step(g_params):
        def loss(p):
            fake, _ = G.apply({"params": p, "batch_stats": g_vars["batch_stats"]}, z,
                              train=True, mutable=["batch_stats"])
            return losses.g_hinge_loss(D.apply(d_vars, fake, update_stats=False))

        return jax.value_and_grad(loss)(g_params)

    print(f"backend={jax.default_backend()} batch={b} reps={_REPS.value}")
    for name, fn, arg in (("D step", d_step, d_vars["params"]), ("G step", g_step,
                                                                  g_vars["params"])):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(arg))
        first = time.perf_counter() - t0
        times = []
        for _ in range(_REPS.value):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(arg))
            times.append(time.perf_counter() - t0)
        print(f"{name}: median {statistics.median(times) * 1e3:.0f} ms  "
              f"(all {[round(t * 1e3) for t in times]}, first incl. compile {first:.1f} s)",
              flush=True)


if __name__ == "__main__":
    app.run(main)
