"""G's drop-and-grow and D's resize alone, on the full-size SNGAN-32 trees: time and memory.

The trees are the real models' (``build_models("sngan32")`` init, ERK masks at d_G = d_D = 0.1
like ``steps.init_state``; G 4.28M and D 1.05M maskable weights at full width). Each row is one
jitted mask update as the iteration runs it on an update step: scores from the weights (and
from a dense stand-in gradient for RigL), exact top-k over the scope, weights re-zeroed:

- ``G global rigl`` / ``G global set`` / ``G layer rigl``: ``sparsity.drop_and_grow_update`` at
  drop fraction f (the cosine schedule's f_0 = 0.5 by default), magnitude drop, gradient (RigL)
  or random (SET) grow, global or per-layer ranking;
- ``D resize grow`` / ``D resize prune``: ``sparsity.resize_update`` by one controller step
  (delta = 0.05 of D's maskable weights), as an ADAPT decision does.

Columns: median wall time of the jitted call over interleaved rounds (every row once per round,
in an order rotated every round), compile time ("same": the executable of the row above), XLA's
buffer assignment of the compiled call (``memory_analysis()``: arguments, outputs, temporaries,
their sum less aliased bytes as an upper bound of what one call holds, XLA's own peak estimate;
'-' where the backend gives none), the device allocator's peak (``memory_stats()``; '-' on CPU,
which keeps none) and the host's peak RSS after the row's compile and first call. Both peaks are
process-wide high-water marks: a row raises them only if it needs more than every row before it.

    python -m benchmarks.mask_update                          # full size
    python -m benchmarks.mask_update --reps=10
    python -m benchmarks.mask_update --g_ch=64 --d_ch=64      # quick look
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from absl import app, flags

from benchmarks.common import interleaved_times, stand_in_grads
from ddst_jax import memory
from ddst_jax import sparsity as sp
from ddst_jax.gan.models import build_models

FLAGS = flags.FLAGS


def _define_flags() -> None:
    # Defined only when run as a script, so tests can import this module beside other benchmarks.
    flags.DEFINE_integer("reps", 5, "Timed rounds, every row once per round (median).")
    flags.DEFINE_integer("g_ch", 256, "G width.")
    flags.DEFINE_integer("d_ch", 128, "D width.")
    flags.DEFINE_float("g_density", 0.1, "d_G of G's ERK masks.")
    flags.DEFINE_float("d_density", 0.1, "d_D of D's ERK masks (ADAPT starts at d_G).")
    flags.DEFINE_float("drop_fraction", 0.5, "Drop fraction f of G's update.")
    flags.DEFINE_float("delta", 0.05, "D resize step, a fraction of D's maskable weights.")


PyTree = Any
COLUMNS = ("row", "N", "active", "compile s", "median ms", "args MB", "out MB", "temp MB",
           "bound MB", "XLA peak MB", "dev peak MB", "RSS peak MB")


def sparse_tree(init: Callable, density: float, key: jax.Array) -> dict[str, PyTree]:
    """Params, ERK masks and a stand-in gradient of one model, as ``steps.init_state`` makes.

    ``init(key) -> variables`` initialises the model (``module.init`` with a dummy input).
    Call it jitted (``init`` and ``density`` static): eagerly, every op compiles on its own.

    Returns ``{"params", "masks", "grads"}``: params with inactive entries 0; grads i.i.d.
    normal like params (only their ranking matters to RigL's grow score).
    """
    k_init, k_mask, k_grad = jax.random.split(key, 3)
    params = init(k_init)["params"]
    masks = sp.init_masks(k_mask, params, sp.layer_densities(params, density, "erk"))
    return {"params": sp.apply_masks(params, masks), "masks": masks,
            "grads": stand_in_grads(params, k_grad)}


def g_drop_and_grow(scope: str, regrow: str) -> Callable:
    """``(params, masks, grads, key, f) -> (params, masks)``: one G update of the iteration."""

    def update(params, masks, grads, key, fraction):
        grow = sp.gradient_scores(grads) if regrow == "rigl" else sp.random_scores(key, masks)
        upd = sp.drop_and_grow_update(masks, sp.magnitude_scores(params), grow, fraction,
                                      scope=scope)
        return sp.params_after_update(params, upd), upd.masks

    return update


def d_resize(params, masks, grads, target):
    """``resize_update`` to ``target`` (int32 scalar) active weights -> (params, masks)."""
    upd = sp.resize_update(masks, target, sp.magnitude_scores(params), sp.gradient_scores(grads))
    return sp.params_after_update(params, upd), upd.masks


def make_rows(g_ch: int, d_ch: int, g_density: float, d_density: float, fraction: float,
              delta: float) -> dict[str, tuple[Callable, tuple, int, int]]:
    """Row name -> (function, arguments, N maskable, active count) on the full G and D trees."""
    G, D = build_models("sngan32", g_ch=g_ch, d_ch=d_ch)
    build = jax.jit(sparse_tree, static_argnums=(0, 1))
    g = build(lambda k: G.init(k, jnp.zeros((1, 128)), train=False), g_density,
              jax.random.key(0))
    d = build(lambda k: D.init(k, jnp.zeros((1, 32, 32, 3))), d_density, jax.random.key(1))
    n_g, n_d = sp.num_maskable(g["masks"]), sp.num_maskable(d["masks"])
    a_g, a_d = int(sp.count_active(g["masks"])), int(sp.count_active(d["masks"]))
    f = jnp.float32(fraction)  # traced, as the cosine schedule's value is in the iteration
    key = jax.random.key(2)
    step = max(1, round(delta * n_d))
    g_args = (g["params"], g["masks"], g["grads"], key, f)
    d_args = (d["params"], d["masks"], d["grads"])
    return {
        "G global rigl": (g_drop_and_grow("global", "rigl"), g_args, n_g, a_g),
        "G global set": (g_drop_and_grow("global", "set"), g_args, n_g, a_g),
        "G layer rigl": (g_drop_and_grow("layer", "rigl"), g_args, n_g, a_g),
        "D resize grow": (d_resize, (*d_args, jnp.int32(min(n_d, a_d + step))), n_d, a_d),
        "D resize prune": (d_resize, (*d_args, jnp.int32(max(1, a_d - step))), n_d, a_d),
    }


def compile_row(fn: Callable, args: tuple) -> dict[str, Any]:
    """Compile ``fn`` on ``args``, call it once; compile seconds and memory after the call."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(*args))  # warm-up; also what the peaks below include
    return {"compiled": compiled, "compile_s": compile_s, **memory.memory_report(compiled)}


def format_table(rows: list[dict[str, Any]]) -> str:
    """The printed table: one line per row dict (keys: ``COLUMNS``' data, see ``run``)."""
    lines = [f"{COLUMNS[0]:<15} {COLUMNS[1]:>9} {COLUMNS[2]:>8} {COLUMNS[3]:>9} "
             + " ".join(f"{c:>11}" for c in COLUMNS[4:])]
    for r in rows:
        cells = [f"{r['median_s'] * 1e3:>11.1f}"] + [
            memory.format_mb(r[k], 11) for k in (
                "compiled_argument_mb", "compiled_output_mb", "compiled_temp_mb", "bound_mb",
                "compiled_peak_memory_mb", "device_peak_mb", "host_peak_rss_mb")]
        compile_s = "same" if r["compile_s"] is None else f"{r['compile_s']:.1f}"
        lines.append(f"{r['row']:<15} {r['n']:>9} {r['active']:>8} {compile_s:>9} "
                     + " ".join(cells))
    return "\n".join(lines)


def run(g_ch: int, d_ch: int, g_density: float, d_density: float, fraction: float,
        delta: float, reps: int) -> str:
    """Build, compile and time every row; returns the header and table as printed."""
    rss_before = memory.host_peak_rss_mb()
    rows = make_rows(g_ch, d_ch, g_density, d_density, fraction, delta)
    info, by_fn = {}, {}
    for name, (fn, args, _, _) in rows.items():
        if fn in by_fn:  # same function and shapes (e.g. grow / prune): one executable
            info[name] = {**by_fn[fn], "compile_s": None}
        else:
            info[name] = by_fn[fn] = compile_row(fn, args)
    times, _ = interleaved_times(
        {n: (lambda f=i["compiled"], a=rows[n][1]: f(*a)) for n, i in info.items()}, reps)
    table = [{"row": name, "n": n, "active": active, "median_s": statistics.median(times[name]),
              "bound_mb": memory.live_bound_mb(info[name]), **info[name]}
             for name, (_, _, n, active) in rows.items()]
    header = (f"backend={jax.default_backend()} sngan32 G ch {g_ch} / D ch {d_ch}, ERK d_G "
              f"{g_density} / d_D {d_density}, f={fraction}, D step {delta}, medians of {reps} "
              f"interleaved rounds; host peak RSS before building the trees "
              f"{rss_before:.0f} MB")
    return header + "\n" + format_table(table)


def main(argv):
    del argv
    print(run(FLAGS.g_ch, FLAGS.d_ch, FLAGS.g_density, FLAGS.d_density, FLAGS.drop_fraction,
              FLAGS.delta, FLAGS.reps), flush=True)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
