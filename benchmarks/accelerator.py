"""One command for a lent accelerator: what the project does on it, as one table.

On whatever devices JAX finds (the first device for everything but the CPU comparison):

- ``agreement``: the same initial state and real batches run for four ADAPT iterations on the
  device and on ``jax.devices("cpu")``: max |difference| of loss/d, loss/g and BR over them,
  and the number of (iteration, layer) active counts of G's and D's masks that differ. The
  iterations are t = 2, 10, 500 and 1000 of the config's schedule (nothing scheduled, then BR,
  then also G's drop-and-grow, then also D's density decision, whose BR window is filled above
  the band so that it resizes D), so four iterations run every piece. At a reduced width in
  the full run (the CPU side would take minutes at full size). With no accelerator both runs
  are on the CPU and must agree exactly.
- ``it/s``: full-size CIFAR-10 SNGAN (G 256 / D 128 channels, batch G 128 / D 64, n_dis 5), the
  config's own schedule, dense / static / SDST / ADAPT in float32 and bfloat16
  (``benchmarks.train_throughput.bench``): ordinary iterations per second, compile seconds apart.
- ``conv path``: the convolution implementation ``ddst_jax.gan.conv`` chose here ("auto") and
  the alternative's time for one G step and one D step (``benchmarks.gan_steps``).
- ``FID Inception``: images/s of the FID Inception-v3 on 32x32 uint8 batches resized to 299
  (``benchmarks.eval_speed``), with random-initialised weights of the real shapes: the speed
  does not depend on the values, and the weights file is not needed.
- ``masking overhead`` (per masked method, float32): its ordinary iteration / dense's - 1.
  ``mask update overhead`` (SDST, ADAPT): (iteration that also updates G's masks - one that
  only measures BR) / dT_G / dense's ordinary iteration, i.e. the amortised cost.
- ``peak device memory``: the device allocator's high-water mark after all rows
  (``memory_stats()``; "n/a" where the backend keeps none, e.g. CPU), host peak RSS beside it.

Rows run in order of value (agreement, dense and ADAPT float32 and bfloat16, conv, Inception,
static and SDST), and a hard time budget (``--budget_s``) skips the rows not yet started once
it is spent (a row that started runs to its end); each skipped or failed row says so in the
table and the others still run. The table is printed in the order above.

    python -m benchmarks.accelerator                 # full size: <= ~8 min on one GPU
    python -m benchmarks.accelerator --tiny          # the CPU test size (tests/test_benchmarks.py)
    python -m benchmarks.accelerator --json --out=accelerator.txt
    python -m benchmarks.accelerator --only=agreement,adapt-float32,conv   # some rows

``--json`` prints the rows as a JSON object on the last line; ``--out`` writes what is printed
to a file too (local path or any ``etils.epath`` one, e.g. gs://).
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import app, flags
from etils import epath

from benchmarks import eval_speed, gan_steps, overheads, train_throughput
from ddst_jax import data, memory, train
from ddst_jax.gan import conv

FLAGS = flags.FLAGS
METHODS = ("dense", "static", "sdst", "adapt")
DTYPES = ("float32", "bfloat16")
#: Row groups (``--only`` takes these keys), in the order the table shows them.
TABLE_ORDER = ("agreement", *(f"{m}-{d}" for d in DTYPES for m in METHODS), "conv", "inception")
#: The order they run in: the most telling first, so a spent budget skips the least telling.
RUN_ORDER = ("agreement", "dense-float32", "adapt-float32", "dense-bfloat16", "adapt-bfloat16",
             "conv", "inception", "static-float32", "sdst-float32", "static-bfloat16",
             "sdst-bfloat16")
#: Seconds after which rows not yet started are skipped: leaves room for a started row within
#: the 8 minutes a lent GPU is given to this command.
DEFAULT_BUDGET_S = 450.0
Row = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes of one run of the table.

    Attributes:
      sizes: G/D widths, batches and n_dis of the it/s rows.
      agreement_sizes: the same for the agreement rows.
      reps: timed calls per kind of iteration (median).
      conv_batch: batch of the G / D step of the conv rows.
      inception: (images per call, calls per round, rounds) of the Inception row.
    """

    sizes: dict[str, int]
    agreement_sizes: dict[str, int]
    reps: int
    conv_batch: int
    inception: tuple[int, int, int]


PLANS = {
    "full": Plan(sizes={"g_ch": 256, "d_ch": 128, "batch_g": 128, "batch_d": 64, "n_dis": 5},
                 agreement_sizes={"g_ch": 64, "d_ch": 64, "batch_g": 32, "batch_d": 16,
                                  "n_dis": 2},
                 reps=5, conv_batch=64, inception=(100, 4, 3)),
    "tiny": Plan(sizes={"g_ch": 8, "d_ch": 8, "batch_g": 4, "batch_d": 2, "n_dis": 1},
                 agreement_sizes={"g_ch": 8, "d_ch": 8, "batch_g": 4, "batch_d": 2, "n_dis": 1},
                 reps=1, conv_batch=2, inception=(2, 1, 1)),
}


def row(check: str, setting: str, value: Any = None, unit: str = "", *,
        compile_s: float | None = None, note: str = "") -> Row:
    """One line of the table (a JSON-friendly dict)."""
    return {"check": check, "setting": setting, "value": value, "unit": unit,
            "compile_s": compile_s, "note": note}


# ----------------------------------------------------------------------------- agreement


def max_abs_diff(a: Any, b: Any) -> float:
    """max |a - b| over all entries; entries NaN on both sides agree, NaN on one side gives inf.

    >>> max_abs_diff([1.0, float("nan")], [1.5, float("nan")])
    0.5
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    both_nan = np.isnan(a) & np.isnan(b)
    diff = np.where(both_nan, 0.0, np.abs(a - b))
    return float(np.nan_to_num(diff, nan=np.inf).max(initial=0.0))


def agreement_steps(setup) -> list[int]:
    """Iterations t (1-based) that run, in order: nothing scheduled, then the first BR
    measurement, G mask update and D density decision of the config's own schedule (each
    later one also runs the earlier kinds: t = 1000 measures BR and updates G too).

    >>> from benchmarks import train_throughput
    >>> config = train_throughput.make_config("adapt", g_ch=8, d_ch=8, batch_g=4, batch_d=2)
    >>> agreement_steps(train.build_setup(config, train.validate_config(config)))
    [2, 10, 500, 1000]
    """
    return [2, *sorted(set(overheads.scheduled_events(setup).values()))]


def _mesh(device: jax.Device) -> jax.sharding.Mesh:
    return jax.sharding.Mesh(np.array([device]), ("data",))


def _run(fns, state, batches: list[dict[str, np.ndarray]], ts: list[int]
         ) -> list[dict[str, np.ndarray]]:
    """The metrics compared, per iteration, of ``batches`` run from ``state`` at iterations
    ``ts`` (the state's counter is set to t - 1 before each: the iteration computes t)."""
    _, iterate, _ = fns
    out = []
    for batch, t in zip(batches, ts, strict=True):
        state, m = iterate(state.replace(step=np.int32(t - 1)), batch["image"], batch["label"])
        out.append(jax.device_get({k: m[k] for k in ("loss/d", "loss/g", "br/ratio",
                                                       "g_counts", "d_counts")}))
    return out


def agreement_rows(sizes: dict[str, int], device: jax.Device, cpu: jax.Device) -> list[Row]:
    """Losses, BR and mask counts of a few ADAPT iterations on ``device`` vs on ``cpu``.

    The same initial state (made on the CPU, BR window filled with a BR above the band so the
    D decision resizes D) and the same real batches on both sides, at the iterations of
    ``agreement_steps``. The program is the it/s row's ADAPT float32 iteration.
    """
    config = train_throughput.make_config("adapt", **sizes)
    setup = train.build_setup(config, train.validate_config(config, device_count=1))
    ts = agreement_steps(setup)
    t0 = time.perf_counter()
    on_cpu = train.compile_fns(setup, config, _mesh(cpu))
    on_device = on_cpu if device == cpu else train.compile_fns(setup, config, _mesh(device))
    source = data.load_source(config.data, seed=0)
    t = config.train
    batches = [data.get_stacked_batch(source, i * t.n_dis, t.batch_size_d, t.n_dis, seed=0)
               for i in range(len(ts))]
    # The initial state is made on the CPU for each side (the iteration donates it), then put
    # on that side's device: both start from the same bits.
    start = lambda fns: jax.device_put(  # noqa: E731
        overheads.full_window(on_cpu[0](jax.random.key(0))), fns[2])
    runs = [_run(fns, start(fns), batches, ts) for fns in (on_device, on_cpu)]
    seconds = time.perf_counter() - t0
    series = {k: [np.stack([m[k] for m in run]) for run in runs]
              for k in ("loss/d", "loss/g", "br/ratio", "g_counts", "d_counts")}
    setting = (f"ADAPT f32 t={','.join(map(str, ts))}, {device.platform} vs cpu, G "
               f"{sizes['g_ch']} / D {sizes['d_ch']}")
    precision = jax.config.jax_default_matmul_precision or "default"
    same = "both on the CPU: must be 0" if device == cpu else (
        f"{device.platform} at matmul precision {precision}")
    mismatched = sum(int((a != b).sum()) for k in ("g_counts", "d_counts")
                     for a, b in [series[k]])
    layers = series["g_counts"][0].shape[1] + series["d_counts"][0].shape[1]
    d_total = series["d_counts"][1].sum(axis=1)  # the CPU run's D active count per iteration
    resized = "resized D" if d_total[-1] != d_total[-2] else "left D as it was"
    return [
        row("agreement loss/d", setting, max_abs_diff(*series["loss/d"]), "max |diff|",
            note=f"{same}; compile + both runs {seconds:.0f} s"),
        row("agreement loss/g", setting, max_abs_diff(*series["loss/g"]), "max |diff|",
            note=same),
        row("agreement BR", setting, max_abs_diff(*series["br/ratio"]), "max |diff|", note=same),
        row("agreement masks", setting, mismatched, "differing",
            note=f"of {len(ts) * layers} (iteration, layer) active counts; the decision at "
                 f"t={ts[-1]} {resized}"),
    ]


# ----------------------------------------------------------------------------- it/s


def throughput_row(method: str, dtype: str, sizes: dict[str, int], reps: int,
                   results: dict[tuple[str, str], dict[str, float]]) -> list[Row]:
    """One method's ordinary iterations/s at ``sizes``; the timings go into ``results``."""
    config = train_throughput.make_config(method, **sizes, compute_dtype=dtype)
    r = train_throughput.bench(config, reps)
    results[method, dtype] = r
    return [row("it/s", f"{method} {dtype}", 1.0 / r["plain_s"], "it/s", compile_s=r["compile_s"],
                note=f"{r['plain_s'] * 1e3:.1f} ms/it, median of {reps}")]


def overhead_rows(results: dict[tuple[str, str], dict[str, float]],
                  g_update_every: int) -> list[Row]:
    """Masking and G mask-update overheads (float32) as ratios to dense's ordinary iteration.

    ``results``: (method, dtype) -> ``train_throughput.bench`` seconds; rows whose timings are
    missing (skipped or failed) say so.
    """
    dense = results.get(("dense", "float32"))
    rows = []
    for method in METHODS[1:]:
        r = results.get((method, "float32"))
        value = None if dense is None or r is None else r["plain_s"] / dense["plain_s"] - 1.0
        rows.append(row("masking overhead", f"{method} float32", value, "ratio",
                        note="ordinary iteration / dense's - 1" if value is not None
                        else "needs the dense and this it/s row"))
    for method in ("sdst", "adapt"):
        r = results.get((method, "float32"))
        value = None if dense is None or r is None else (
            (r["update_s"] - r["br_s"]) / g_update_every / dense["plain_s"])
        rows.append(row("mask update overhead", f"{method} float32, every {g_update_every}",
                        value, "ratio", note="(+update - +BR iteration) / dT_G / dense"
                        if value is not None else "needs the dense and this it/s row"))
    return rows


# ----------------------------------------------------------------------------- conv, Inception


def conv_rows(batch: int, g_ch: int, d_ch: int, reps: int) -> list[Row]:
    """The convolution path "auto" takes here, and the alternative's G and D step times."""
    chosen = conv.resolve_impl("auto")
    other = "gemm" if chosen == "xla" else "xla"
    all_steps = gan_steps.make_steps(batch, g_ch, d_ch)
    timed = {name: all_steps[name] for name in ("G step", "D step 2fwd")}
    compiled, compile_s = gan_steps.compile_steps(timed, [chosen, other])
    wall, _ = gan_steps.time_steps(timed, compiled, reps)
    rows = []
    for name in timed:
        mine, alt = (statistics.median(wall[name, impl]) for impl in (chosen, other))
        rows.append(row("conv path", f"{name}, batch {batch}: auto = {chosen}", mine * 1e3, "ms",
                        compile_s=compile_s[name, chosen],
                        note=f"{other}: {alt * 1e3:.3g} ms ({alt / mine:.2f}x)"))
    return rows


def inception_rows(batch: int, batches: int, reps: int) -> list[Row]:
    """FID Inception images/s (pytorch-fid resize of 32x32 uint8 to 299), random weights."""
    variables = eval_speed.random_variables(jax.random.key(0))
    (r,) = eval_speed.inception_rows(variables, batch, batches, reps, 32, modes=("pytorch",))
    return [row("FID Inception", f"32->299 px, batch {batch}", r["images_per_s"], "images/s",
                compile_s=r["compile_s"],
                note=f"random-initialised weights of the real shapes; 50k eval "
                     f"{r['eval_50k_hours'] * 60:.3g} min")]


def memory_row() -> Row:
    """The first device's allocator peak so far (process-wide), or 'n/a'; host RSS in the note."""
    report = memory.memory_report()
    peak = report["device_peak_mb"]
    return row("peak device memory", f"{jax.devices()[0].platform}: all rows so far",
               "n/a" if peak is None else peak, "MiB",
               note=("no allocator statistics on this backend; " if peak is None else "")
               + f"host peak RSS {report['host_peak_rss_mb']:.0f} MiB")


# ----------------------------------------------------------------------------- the table


@dataclasses.dataclass(frozen=True)
class Task:
    """Rows measured together: ``key`` orders them in the table, ``fn`` measures them."""

    key: str
    check: str
    setting: str
    fn: Callable[[], list[Row]]


def run_tasks(tasks: list[Task], budget_s: float,
              clock: Callable[[], float] = time.perf_counter) -> dict[str, list[Row]]:
    """Run ``tasks`` in order until ``budget_s`` seconds are spent; then skip the rest.

    A task that raises gives one row naming the error and the next task runs. Returns
    ``{task.key: rows}`` for every task (skipped and failed ones included).
    """
    start = clock()
    out = {}
    for task in tasks:
        spent = clock() - start
        if spent > budget_s:
            out[task.key] = [row(task.check, task.setting, note=(
                f"skipped: {spent:.0f} s of the {budget_s:.0f} s budget spent"))]
            continue
        try:
            out[task.key] = task.fn()
        except Exception as e:  # noqa: BLE001 - one row fails, the others still run
            first = (str(e).strip().splitlines() or [""])[0][:200]
            out[task.key] = [row(task.check, task.setting,
                                 note=f"failed: {type(e).__name__}: {first}")]
        print(f"# {task.key} done at {clock() - start:.0f} s", file=sys.stderr, flush=True)
    return out


def plan_tasks(plan: Plan, results: dict, only: list[str] | None = None
               ) -> tuple[list[Task], list[str]]:
    """(tasks in the order they run, their keys in table order); ``only``: keys to keep."""
    s = plan.sizes
    cpu = _cpu_device()

    def agreement():
        if cpu is None:
            raise RuntimeError("no CPU device: JAX_PLATFORMS leaves the CPU backend out")
        return agreement_rows(plan.agreement_sizes, jax.devices()[0], cpu)

    tasks = {"agreement": Task("agreement", "agreement", "ADAPT f32 vs cpu", agreement)}
    for dtype in DTYPES:
        for method in METHODS:
            tasks[f"{method}-{dtype}"] = Task(
                f"{method}-{dtype}", "it/s", f"{method} {dtype}",
                lambda m=method, d=dtype: throughput_row(m, d, s, plan.reps, results))
    tasks["conv"] = Task("conv", "conv path", "G and D step",
                         lambda: conv_rows(plan.conv_batch, s["g_ch"], s["d_ch"], plan.reps))
    tasks["inception"] = Task("inception", "FID Inception", "32->299 px",
                              lambda: inception_rows(*plan.inception))
    keys = [k for k in RUN_ORDER if only is None or k in only]
    return [tasks[k] for k in keys], [k for k in TABLE_ORDER if k in keys]


def _cpu_device() -> jax.Device | None:
    try:
        return jax.devices("cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS leaves the CPU backend out
        return None


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.4g}"
    return str(value)


def format_table(rows: list[Row]) -> str:
    """The table: check, setting, value, unit, compile s, note."""
    lines = [f"{'check':<20} {'setting':<44} {'value':>10} {'unit':<10} {'compile s':>9}  note"]
    for r in rows:
        lines.append(f"{r['check']:<20} {r['setting']:<44} {_cell(r['value']):>10} "
                     f"{r['unit']:<10} {_cell(r['compile_s']):>9}  {r['note']}")
    return "\n".join(lines)


def describe_devices() -> str:
    """One line: platform, kind and count of the devices, jax version."""
    d = jax.devices()[0]
    return (f"{d.platform} {getattr(d, 'device_kind', '?')} x{jax.device_count()}, "
            f"jax {jax.__version__}")


def run(plan: Plan, budget_s: float, only: list[str] | None = None
        ) -> tuple[str, dict[str, Any]]:
    """Measure every row (or those of ``only``) within ``budget_s``; returns the printed text
    and a JSON-friendly result."""
    t0 = time.perf_counter()
    results: dict[tuple[str, str], dict[str, float]] = {}
    tasks, table_order = plan_tasks(plan, results, only)
    by_key = run_tasks(tasks, budget_s)
    g_every = train_throughput.make_config("sdst", **plan.sizes).sparsity.g_update_every
    rows = [r for key in table_order for r in by_key[key]]
    rows += overhead_rows(results, g_every) + [memory_row()]
    elapsed = time.perf_counter() - t0
    s = plan.sizes
    header = (f"{describe_devices()}; it/s at G {s['g_ch']} / D {s['d_ch']}, batch G "
              f"{s['batch_g']} / D {s['batch_d']}, n_dis {s['n_dis']}, one device; "
              f"{elapsed:.0f} s of a {budget_s:.0f} s budget")
    result = {"devices": describe_devices(), "sizes": s, "budget_s": budget_s,
              "elapsed_s": elapsed, "rows": rows}
    return header + "\n" + format_table(rows), result


def _define_flags() -> None:
    flags.DEFINE_bool("tiny", False, "The CPU test size (widths 8, batches 4 / 2, n_dis 1).")
    flags.DEFINE_bool("json", False, "Print the rows as a JSON object on the last line.")
    flags.DEFINE_string("out", None, "Also write what is printed to this file.")
    flags.DEFINE_float("budget_s", DEFAULT_BUDGET_S, "Seconds after which rows not yet started "
                       "are skipped (a started row runs to its end).")
    flags.DEFINE_list("only", None, f"Measure only these rows: some of {', '.join(TABLE_ORDER)} "
                      "(the overhead and memory rows always follow).")


def flag_error(argv: list[str], budget_s: float, only: list[str] | None = None) -> str | None:
    """One line naming a bad command line and its fix, or None.

    >>> flag_error(["accelerator"], 0.0)
    'error: --budget_s=0.0: use a positive number of seconds (default 450).'
    """
    if len(argv) > 1:
        return (f"error: unexpected arguments {argv[1:]}; the flags are --tiny, --json, "
                "--out=FILE, --budget_s=SECONDS and --only=ROWS.")
    unknown = [k for k in only or [] if k not in TABLE_ORDER]
    if unknown:
        return (f"error: --only: no rows named {', '.join(unknown)}; use some of "
                f"{', '.join(TABLE_ORDER)}.")
    if not budget_s > 0:  # also NaN
        return (f"error: --budget_s={budget_s}: use a positive number of seconds (default "
                f"{DEFAULT_BUDGET_S:.0f}).")
    return None


def main(argv: list[str]) -> None:
    error = flag_error(argv, FLAGS.budget_s, FLAGS.only)
    if error:
        print(error, file=sys.stderr)
        sys.exit(2)
    text, result = run(PLANS["tiny" if FLAGS.tiny else "full"], FLAGS.budget_s, FLAGS.only)
    if FLAGS.json:
        text += "\n" + json.dumps(result)
    print(text, flush=True)
    if FLAGS.out:
        try:
            epath.Path(FLAGS.out).write_text(text + "\n")
        except OSError as e:
            print(f"error: cannot write --out={FLAGS.out} ({e.strerror or e}); the table is "
                  "printed above.", file=sys.stderr)
            sys.exit(1)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
