"""Forward, input-gradient and weight-gradient time of the G convolutions, per implementation.

Where a G step's time goes, one convolution at a time: the full-size SNGAN-32 generator's layer
shapes (3x3 and 1x1, 256 -> 256 channels at 32x32 and 16x16, batch 64), each timed as forward
only, forward + input gradient, forward + weight gradient and forward + both (loss
sum(y^2) / 2, as ``(y ** 2).sum()`` in a PyTorch comparison), for the
``ddst_jax.gan.conv`` implementations ("xla": ``lax.conv`` and its autodiff; "gemm": GEMM weight
gradients), interleaved round by round in a rotating order. GFLOP/s counts
2 * B * H * W * k * k * C_in * C_out per pass (forward, each gradient).

    python -m benchmarks.conv_layers --batch=64 --reps=5
"""

from __future__ import annotations

import statistics

import jax
import jax.numpy as jnp
from absl import app, flags

from benchmarks.common import interleaved_times
from ddst_jax.gan import conv

_BATCH = flags.DEFINE_integer("batch", 64, "Batch size.")
_REPS = flags.DEFINE_integer("reps", 5, "Timed rounds (median reported).")
_IMPLS = flags.DEFINE_list("impls", ["xla", "gemm"], "Convolution implementations.")
_SHAPES = flags.DEFINE_list("shapes", ["32:256:256:3", "16:256:256:3", "32:256:256:1"],
                            "Layers as H:C_in:C_out:k (stride 1, SAME).")

# What each timed function computes. The loss sum(y^2) / 2 (cotangent dy = y, as in the PyTorch
# comparison's (y ** 2).sum()) needs the forward: with a loss linear in y, XLA would drop it.
_PASSES = {"fwd": (), "fwd+dx": (0,), "fwd+dW": (1,), "fwd+both": (0, 1)}


def _timed_fns(impl: str, argnums: tuple[int, ...]):
    f = conv.conv_fn(impl)

    def forward(x, w):
        return f(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    if not argnums:
        return jax.jit(forward)
    return jax.jit(jax.grad(lambda x, w: 0.5 * jnp.sum(forward(x, w) ** 2), argnums=argnums))


def main(argv):
    del argv
    b = _BATCH.value
    print(f"backend={jax.default_backend()} batch={b}, medians of {_REPS.value} interleaved "
          f"rounds; ms (GFLOP/s)")
    print(f"{'layer':<22} {'impl':<6} " + " ".join(f"{p:>16}" for p in _PASSES), flush=True)
    for spec in _SHAPES.value:
        h, c_in, c_out, k = map(int, spec.split(":"))
        kx, kw = jax.random.split(jax.random.key(0))
        x = jax.random.normal(kx, (b, h, h, c_in))
        w = jax.random.normal(kw, (k, k, c_in, c_out)) * 0.02
        fns = {(impl, p): _timed_fns(impl, argnums) for impl in _IMPLS.value
               for p, argnums in _PASSES.items()}
        for fn in fns.values():
            jax.block_until_ready(fn(x, w))  # compile + warm up
        calls = {key: (lambda f=fn, x=x, w=w: f(x, w)) for key, fn in fns.items()}
        times, _ = interleaved_times(calls, _REPS.value)
        gflop = 2 * b * h * h * k * k * c_in * c_out / 1e9
        for impl in _IMPLS.value:
            cells = []
            for p, argnums in _PASSES.items():
                med = statistics.median(times[impl, p])
                cells.append(f"{med * 1e3:>7.0f} ({gflop * (1 + len(argnums)) / med:>5.0f})")
            print(f"{f'{h}x{h} {c_in}->{c_out} k{k}':<22} {impl:<6} " + " ".join(
                f"{c:>16}" for c in cells), flush=True)


if __name__ == "__main__":
    app.run(main)
