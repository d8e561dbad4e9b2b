"""Overheads of the sparse machinery as ratios to a dense iteration timed in the same rounds.

Full-size CIFAR-10 SNGAN by default, at the config's schedule (``experiments/configs/cifar10.py``:
BR every 10 iterations, dT_G = 500, dT_D = 1000 for ADAPT relaxed, EMA decay 0.999). Every
variant below is compiled once and called once per round, rounds interleaved, so all of them
see the same machine load; the table quotes medians over rounds and divides by the median dense
ordinary iteration (n_dis D steps + G step, t = 2: no scheduled work).

Rows (issue #6 targets):

- ``masking`` (<= 5%), per method: its ordinary iteration / dense's - 1. ``iso``: the masks'
  multiplications alone, ``apply_masks`` jitted on the full G and D trees times the number of
  times an ordinary iteration applies them (``apply_masks_per_iteration``).
- ``BR`` (<= 3%): (iteration that measures BR - ordinary) / br_every. ``iso``: the BR forwards
  (``steps.br_forwards``: G_post(z), D on it and on x_r, the ratio, the window push) alone.
- ``G mask update`` (<= 1%): (iteration with G's drop-and-grow - the same without) / dT_G.
  ``iso``: ``steps.g_mask_update`` alone on the full tree (global RigL by default).
- ``D decision`` (<= 1%): (iteration with D's density decision - the same without) / dT_D.
  The BR window is filled with BR = 1000 (>= B+) so the decision is a real resize (grow by
  delta, a sort over all of D) rather than the no-op of an in-band BR. ``iso``:
  ``steps.d_density_update`` alone.
- ``EMA`` (no target): the sparse EMA's tree_map (as in ``steps.train_iteration``) on G alone,
  every iteration.

One compiled iteration per method; ``state.step`` is set so that t = step + 1 hits or avoids
the scheduled work. Events coincide (t = 1000 also measures BR and updates G), so each event's
cost is the difference between two iterations whose scheduled work differs only by that event.
End-to-end differences are at the noise of one full iteration (several % on a shared CPU);
``ok/over`` therefore judges the isolated ratio where there is one, else the end-to-end one.
The isolated G update and D decision rank stand-in gradients (i.i.d. normal): RigL's cost
depends on the sizes only.

Printed: the overheads table (per-event seconds, amortised % of the dense iteration, target,
verdict), every timed call (variant, its t, median, ratio to dense, all rounds) and each
compiled iteration's compile time and XLA buffer sizes, with the process's host peak RSS.

    python -m benchmarks.overheads                                # full size, reps 3
    python -m benchmarks.overheads --methods=adapt --reps=5
    python -m benchmarks.overheads --g_ch=64 --d_ch=64 --batch_g=32 --batch_d=16  # quick look

Full size on the 2-core development CPU: ~30-38 s per iteration, 6 iterations per round plus
one warm-up per method: 14 minutes with --reps=3 with the machine otherwise idle (16 at load 4).
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from absl import app, flags

from benchmarks.common import rotated, stand_in_grads
from ddst_jax import balance, memory, train
from ddst_jax import sparsity as sp
from ddst_jax.gan import setup as setup_lib
from ddst_jax.gan import steps
from experiments.configs import cifar10 as cifar10_config

FLAGS = flags.FLAGS
TARGETS = {"masking": 0.05, "BR": 0.03, "G mask update": 0.01, "D decision": 0.01, "EMA": None}
EVENTS = ("BR", "G mask update", "D decision")
#: BR that fills the window so that the D decision at t = dT_D grows D (any BR >= B+ would do).
WINDOW_BR = 1000.0
COLUMNS = ("overhead", "method", "every", "event s e2e", "event s iso", "e2e", "iso", "target",
           "ok/over")


def _define_flags() -> None:
    # Defined only when run as a script, so tests can import this module beside other benchmarks.
    flags.DEFINE_list("methods", ["static", "adapt"],
                      "Masked methods compared with dense (always timed); the scheduled work "
                      "(BR, G update, D decision) and the isolated pieces use the last one.")
    flags.DEFINE_integer("reps", 3, "Interleaved rounds of the end-to-end iterations (median).")
    flags.DEFINE_integer("iso_reps", 3, "Calls of each isolated piece per round.")
    flags.DEFINE_integer("g_ch", 256, "G width.")
    flags.DEFINE_integer("d_ch", 128, "D width.")
    flags.DEFINE_integer("batch_g", 128, "G batch.")
    flags.DEFINE_integer("batch_d", 64, "D batch.")
    flags.DEFINE_integer("n_dis", 5, "D steps per iteration.")


def make_config(method: str, g_ch: int, d_ch: int, batch_g: int, batch_d: int, n_dis: int):
    """The CIFAR-10 config (its schedules untouched) at the given widths, batches and n_dis."""
    c = cifar10_config.get_config()
    c.model.g_ch, c.model.d_ch = g_ch, d_ch
    c.train.batch_size_g, c.train.batch_size_d, c.train.n_dis = batch_g, batch_d, n_dis
    c.sparsity.method = method
    c.data.source = "synthetic"
    c.parallel.num_devices = 1
    return c


def scheduled_events(setup: setup_lib.GanSetup) -> dict[str, int]:
    """Event name -> interval in iterations, for the events this method's iteration has."""
    events = {"BR": setup.balance.every}
    if setup.sparsity.method.g_dynamic:
        events["G mask update"] = setup.sparsity.g_update_every
    if setup.sparsity.method.d_control != "static":
        events["D decision"] = setup.control.every
    return events


def fired(t: int, events: dict[str, int], total: int) -> frozenset[str]:
    """The events iteration ``t`` (1-based) runs, by the iteration's own schedule predicates."""
    out = set()
    for name, every in events.items():
        hit = (balance.is_measure_step(t, every) if name == "BR"
               else sp.is_update_step(t, every, total))
        if hit:
            out.add(name)
    return frozenset(out)


def first_step_with(work: frozenset[str], events: dict[str, int], total: int) -> int | None:
    """Smallest t >= 2 whose scheduled work is exactly ``work`` (None if there is none)."""
    return next((t for t in range(2, total) if fired(t, events, total) == work), None)


def event_pairs(events: dict[str, int], total: int
                ) -> dict[str, tuple[frozenset[str], frozenset[str]]]:
    """Event -> (work with it, the same work without it), from the first t that runs it."""
    pairs = {}
    for name in events:
        t = next(t for t in range(2, total) if name in fired(t, events, total))
        work = fired(t, events, total)
        pairs[name] = (work, work - {name})
    return pairs


def variant_name(work: frozenset[str]) -> str:
    """'ordinary' or '+BR+G mask update'-style label, in ``EVENTS`` order."""
    return "ordinary" if not work else "".join(f"+{e}" for e in EVENTS if e in work)


def apply_masks_per_iteration(setup: setup_lib.GanSetup) -> tuple[int, int]:
    """Calls of ``apply_masks`` on (G, D) in one ordinary iteration of ``steps.train_iteration``.

    G: its effective weights for the D steps and for the G step, and the re-zeroing after its
    optimizer step (3). D: per D step its effective weights and the re-zeroing (2 n_dis), plus
    its effective weights in the G step (1). The RigL optimizer policy also masks the gradients
    (G +1, D +n_dis). Dense: none. ``tests/test_benchmarks.py`` checks this against a trace.
    """
    if not setup.sparsity.method.masked:
        return 0, 0
    rigl = int(setup.sparsity.method.policy == "rigl")
    return 3 + rigl, 2 * setup.train.n_dis + 1 + rigl * setup.train.n_dis


@dataclasses.dataclass
class MethodBench:
    """One method's compiled iteration, its prepared state and the step of each variant."""

    name: str
    setup: setup_lib.GanSetup
    compiled: Any
    compile_s: float
    state: steps.TrainState
    variants: dict[frozenset[str], int]  # scheduled work -> state.step giving it
    pairs: dict[str, tuple[frozenset[str], frozenset[str]]]


def full_window(state: steps.TrainState) -> steps.TrainState:
    """``state`` with a full BR window of ``WINDOW_BR``: the controller's decision then acts."""
    window = state.br_window
    full = balance.BRWindow(jnp.full_like(window.ratios, WINDOW_BR),
                            jnp.asarray(window.size, jnp.int32))
    return state.replace(br_window=full)


def build_method(method: str, sizes: dict[str, int], real: jax.Array, labels: jax.Array,
                 with_events: bool) -> MethodBench:
    """Compile ``method``'s iteration (as the runner does) and plan its variants.

    ``with_events``: also the variants that run the scheduled work (else the ordinary one only).
    """
    config = make_config(method, **sizes)
    setup = train.build_setup(config, train.validate_config(config))
    init_fn, iterate, replicated = train.compile_fns(setup, config, train.make_mesh(1))
    state = init_fn(jax.random.key(0))
    if setup.sparsity.method.d_control != "static":
        state = jax.device_put(full_window(state), replicated)
    t0 = time.perf_counter()
    compiled = iterate.lower(state, real, labels).compile()
    compile_s = time.perf_counter() - t0
    total = setup.train.total_iterations
    events = scheduled_events(setup) if with_events else {}
    pairs = event_pairs(events, total)
    works = {frozenset()} | {w for pair in pairs.values() for w in pair}
    variants = {}
    for work in sorted(works, key=len):
        t = first_step_with(work, scheduled_events(setup), total)
        if t is not None:
            variants[work] = t - 1  # the iteration computes t = state.step + 1
    return MethodBench(method, setup, compiled, compile_s, state, variants, pairs)


def _fresh(state: steps.TrainState, step: int) -> steps.TrainState:
    """A copy of ``state`` at ``step``: the compiled iteration donates (invalidates) its input."""
    state = jax.tree_util.tree_map(jnp.copy, state).replace(step=jnp.asarray(step, jnp.int32))
    return jax.block_until_ready(state)


def isolated_pieces(bench: MethodBench, real: jax.Array, labels: jax.Array
                    ) -> dict[str, tuple[Callable, tuple]]:
    """Piece name -> (jitted function, arguments): each piece of the iteration on its own.

    Uses ``bench``'s setup and state (full-size trees). The G update and D decision run at
    the first t of their schedule (their ``lax.cond`` / ``lax.switch`` take the update branch).
    """
    setup, state = bench.setup, bench.state
    events = scheduled_events(setup)
    g_grads = stand_in_grads(state.g_params, jax.random.key(3))
    d_grads = stand_in_grads(state.d_params, jax.random.key(4))

    def br(state, real, labels, key):
        z = jax.random.normal(key, (setup.train.batch_g, setup.model.z_dim))
        y = steps.sample_labels(key, setup.train.batch_g, setup)
        br = steps.br_forwards(setup, state.g_params, state.g_state, state.g_masks,
                               state.d_params, state.d_state, state.d_masks, z, y, real[-1],
                               labels[-1])
        a, c = br.a_scores, br.c_scores
        # b = D(G_pre(z)) comes free with the G step's loss; a stand-in keeps the shapes.
        ratio = balance.balance_ratio(c, jnp.zeros_like(a), a, setup.balance.eps)
        return ratio, balance.push(state.br_window, ratio)

    def ema(g_ema, g_masks, g_params):  # as in steps.train_iteration
        return steps.sparse_ema(g_ema, g_masks, g_params, setup.train.ema_decay)

    pieces = {
        "apply_masks G": (jax.jit(sp.apply_masks), (state.g_params, state.g_masks)),
        "apply_masks D": (jax.jit(sp.apply_masks), (state.d_params, state.d_masks)),
        "BR": (jax.jit(br), (state, real, labels, jax.random.key(5))),
        "EMA": (jax.jit(ema), (state.g_ema, state.g_masks, state.g_params)),
    }
    if "G mask update" in events:
        def g_update(state, grads, t):
            return steps.g_mask_update(setup, t, state.g_params, state.g_masks, state.g_opt,
                                        grads, state.key)

        t = jnp.int32(events["G mask update"])
        pieces["G mask update"] = (jax.jit(g_update), (state, g_grads, t))
    if "D decision" in events:
        def d_decision(state, grads, t):
            return steps.d_density_update(setup, t, state.controller, state.br_window,
                                           state.d_params, state.d_masks, state.d_opt, grads,
                                           state.key)

        t = jnp.int32(events["D decision"])
        pieces["D decision"] = (jax.jit(d_decision), (state, d_grads, t))
    return pieces


def _timed(fn: Callable, *args) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def time_rounds(benches: list[MethodBench], pieces: dict[str, tuple[Callable, tuple]],
                real: jax.Array, labels: jax.Array, reps: int, iso_reps: int
                ) -> tuple[dict[tuple[str, frozenset[str]], list[float]], dict[str, list[float]]]:
    """Seconds per call: every iteration variant once and every piece ``iso_reps`` times a round.

    The variants' order rotates by one each round; the isolated pieces close every round.

    One warm-up call of each compiled function first (the first call of a full-size iteration
    on CPU is much slower than the next ones).
    """
    for b in benches:
        _timed(b.compiled, _fresh(b.state, b.variants[frozenset()]), real, labels)
    for fn, args in pieces.values():
        _timed(fn, *args)
    e2e = {(b.name, w): [] for b in benches for w in b.variants}
    iso: dict[str, list[float]] = {name: [] for name in pieces}
    start = time.perf_counter()
    calls = [(b, work, step) for b in benches for work, step in b.variants.items()]
    for r in range(reps):
        # Each round starts one variant later, so no variant always runs first: the first
        # iteration after the isolated pieces measured ~2.5 s (8%) slower at full size, which
        # made dense (always first) look 9% slower than static. Rotated, the median drops it.
        for b, work, step in rotated(calls, r):
            e2e[b.name, work].append(_timed(b.compiled, _fresh(b.state, step), real, labels))
        for name, (fn, args) in pieces.items():
            iso[name] += [_timed(fn, *args) for _ in range(iso_reps)]
        print(f"# round {r + 1}/{reps} done, {time.perf_counter() - start:.0f} s", file=sys.stderr,
              flush=True)
    return e2e, iso


def overhead_rows(benches: list[MethodBench], e2e_s: dict, iso_s: dict[str, float]
                  ) -> list[dict[str, Any]]:
    """Table rows: masking per method, then BR / G / D of the last method, then EMA.

    ``e2e_s``: (method, work) -> median s; ``iso_s``: piece -> median s. Ratios are fractions of
    the dense ordinary iteration; per-event seconds are before amortisation.
    """
    dense = e2e_s["dense", frozenset()]
    last = benches[-1]
    n_g, n_d = apply_masks_per_iteration(last.setup)
    mask_iso = n_g * iso_s["apply_masks G"] + n_d * iso_s["apply_masks D"]
    rows = []
    for b in benches[1:]:
        extra = e2e_s[b.name, frozenset()] - dense
        rows.append(_row("masking", b.name, 1, extra, mask_iso, dense))
    events = scheduled_events(last.setup)
    for name, (with_it, without) in last.pairs.items():
        have = (last.name, with_it) in e2e_s and (last.name, without) in e2e_s
        extra = e2e_s[last.name, with_it] - e2e_s[last.name, without] if have else None
        rows.append(_row(name, last.name, events[name], extra, iso_s.get(name), dense))
    rows.append(_row("EMA", last.name, 1, None, iso_s["EMA"], dense))
    return rows


def _row(name: str, method: str, every: int, e2e: float | None, iso: float | None,
         dense: float) -> dict[str, Any]:
    """One overhead: per-event seconds, amortised ratios to ``dense`` and the verdict."""
    ratio = {k: None if v is None else v / every / dense for k, v in (("e2e", e2e), ("iso", iso))}
    target = TARGETS[name]
    judged = ratio["iso"] if ratio["iso"] is not None else ratio["e2e"]
    status = "-" if target is None or judged is None else ("ok" if judged <= target else "over")
    return {"overhead": name, "method": method, "every": every, "event_e2e_s": e2e,
            "event_iso_s": iso, "e2e": ratio["e2e"], "iso": ratio["iso"], "target": target,
            "status": status}


def _cell(value: float | None, fmt: str, width: int) -> str:
    """``value`` formatted right-aligned in ``width``, or '-' when it is not measured."""
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{fmt}}"


def _pct(value: float | None, decimals: int, width: int) -> str:
    """A fraction as a right-aligned percentage, or '-'."""
    return f"{'-':>{width}}" if value is None else f"{100 * value:.{decimals}f}%".rjust(width)


def format_overheads(rows: list[dict[str, Any]]) -> str:
    """The overheads table: per-event seconds, then amortised ratios to dense in %."""
    lines = [f"{COLUMNS[0]:<14} {COLUMNS[1]:<7} {COLUMNS[2]:>5} {COLUMNS[3]:>11} "
             f"{COLUMNS[4]:>11} {COLUMNS[5]:>9} {COLUMNS[6]:>9} {COLUMNS[7]:>7} {COLUMNS[8]:>7}"]
    for r in rows:
        lines.append(
            f"{r['overhead']:<14} {r['method']:<7} {r['every']:>5} "
            f"{_cell(r['event_e2e_s'], '.3f', 11)} {_cell(r['event_iso_s'], '.4f', 11)} "
            f"{_pct(r['e2e'], 3, 9)} {_pct(r['iso'], 3, 9)} {_pct(r['target'], 0, 7)} "
            f"{r['status']:>7}")
    return "\n".join(lines)


def format_variants(benches: list[MethodBench], e2e: dict, iso: dict[str, list[float]]) -> str:
    """Every timed call: variant, its t, median s, ratio to dense, all s (the raw numbers)."""
    dense = statistics.median(e2e["dense", frozenset()])
    lines = [f"{'method':<7} {'variant':<32} {'t':>6} {'median s':>9} {'vs dense':>9}  all s"]
    for b in benches:
        for work, step in b.variants.items():
            ts = e2e[b.name, work]
            med = statistics.median(ts)
            lines.append(f"{b.name:<7} {variant_name(work):<32} {step + 1:>6} {med:>9.3f} "
                         f"{med / dense:>9.4f}  {[round(t, 3) for t in ts]}")
    for name, ts in iso.items():
        med = statistics.median(ts)
        lines.append(f"{'iso':<7} {name:<32} {'':>6} {med:>9.4f} {med / dense:>9.4f}  "
                     f"{[round(t, 4) for t in ts]}")
    return "\n".join(lines)


def format_memory(benches: list[MethodBench]) -> str:
    """Compile time and XLA's buffer sizes of each compiled iteration, in MiB.

    ``bound``: arguments + outputs + temps - aliased (donated) bytes, an upper bound of what one
    iteration holds; XLA:CPU's ``peak_memory`` estimate leaves the temps out.
    """
    keys = ("argument", "output", "alias", "temp", "peak_memory")
    lines = [f"{'method':<7} {'compile s':>9} " + " ".join(f"{k + ' MB':>14}" for k in keys)
             + f" {'bound MB':>9}"]
    for b in benches:
        mb = memory.compiled_memory_mb(b.compiled)
        lines.append(f"{b.name:<7} {b.compile_s:>9.1f} "
                     + " ".join(memory.format_mb(mb[f"compiled_{k}_mb"], 14) for k in keys)
                     + " " + memory.format_mb(memory.live_bound_mb(mb), 9))
    return "\n".join(lines)


def run(methods: list[str], *, g_ch: int, d_ch: int, batch_g: int, batch_d: int, n_dis: int,
        reps: int, iso_reps: int) -> str:
    """Compile, time interleaved rounds and return the printed report (three tables)."""
    methods = [m for m in methods if m != "dense"]
    if not methods:
        raise ValueError("--methods needs at least one masked method (dense is always timed).")
    sizes = {"g_ch": g_ch, "d_ch": d_ch, "batch_g": batch_g, "batch_d": batch_d, "n_dis": n_dis}
    real = jax.random.uniform(jax.random.key(1), (n_dis, batch_d, 32, 32, 3), minval=-1.0,
                              maxval=1.0)
    labels = jnp.zeros(real.shape[:2], jnp.int32)
    names = ["dense", *methods]
    benches = [build_method(m, sizes, real, labels, with_events=m == names[-1]) for m in names]
    pieces = isolated_pieces(benches[-1], real, labels)
    e2e, iso = time_rounds(benches, pieces, real, labels, reps, iso_reps)
    e2e_s = {k: statistics.median(v) for k, v in e2e.items()}
    iso_s = {k: statistics.median(v) for k, v in iso.items()}
    dense = e2e["dense", frozenset()]
    spread = (max(dense) - min(dense)) / statistics.median(dense)
    mem = memory.memory_report()
    s = benches[-1].setup
    header = (
        f"backend={jax.default_backend()} G ch {g_ch} / D ch {d_ch}, batch G {batch_g} / D "
        f"{batch_d}, n_dis {n_dis}; schedule: BR every {s.balance.every}, dT_G "
        f"{s.sparsity.g_update_every}, dT_D {s.control.every}, EMA {s.train.ema_decay}; "
        f"medians of {reps} interleaved "
        f"rounds (isolated pieces: {reps * iso_reps} calls); dense ordinary iteration "
        f"{statistics.median(dense):.3f} s, spread (max-min)/median {100 * spread:.1f}%")
    return "\n\n".join([
        header,
        format_overheads(overhead_rows(benches, e2e_s, iso_s)),
        format_variants(benches, e2e, iso),
        format_memory(benches) + f"\nhost peak RSS {mem['host_peak_rss_mb']:.0f} MB, device "
        f"peak {memory.format_mb(mem['device_peak_mb'], 1)} MB",
    ])


def main(argv):
    del argv
    print(run(FLAGS.methods, g_ch=FLAGS.g_ch, d_ch=FLAGS.d_ch, batch_g=FLAGS.batch_g,
              batch_d=FLAGS.batch_d, n_dis=FLAGS.n_dis, reps=FLAGS.reps,
              iso_reps=FLAGS.iso_reps), flush=True)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
