r"""The runs of a paper table, as one shell command per run (or run them here).

Usage::

    python -m experiments.grid --benchmark=cifar10 --table=1 [--densities=0.1,0.2,0.3,0.5] \
        [--methods=adapt_relaxed,dense] [--root=runs] [--seeds=0,1] [--python=python] \
        [--extra=--config.train.iterations=1000 ...] [--launch]

Prints one command per line, e.g.::

    python -m experiments.cifar10 --workdir=runs/cifar10/adapt_relaxed_g0.1 \
        --config.sparsity.method=adapt --config.sparsity.setting=relaxed ... \
        --config.sparsity.g_density=0.1

ready for a cluster scheduler (each run has its own workdir ``ROOT/BENCHMARK/PRESET_gD``; the
dense run is ``ROOT/BENCHMARK/dense``; with ``--seeds`` a ``_sSEED`` suffix). A re-run of a
command resumes its run; a finished run is reported and left alone. ``--launch`` runs the
commands one after the other in this process's Python, skips runs whose workdir holds a finished
run and stops at the first failure; Ctrl-C or SIGTERM reaches the running child, which saves a
checkpoint, and the grid waits for it, so re-launching the grid goes on where it stopped.

Tables: ``1`` is paper Table 1 as docs/method.md section 7 restates it (relaxed setting): Dense,
Static-Balance, SDST-Strong-RigL, ADAPT relaxed, and ADAPT strict (d_max 0.5) at every density.
The project restates no other paper table, so the other choice is ``all``: every
preset of ``experiments.presets`` (both settings where they differ). ``--methods`` replaces the
table's method list by the given presets.

``--extra`` passes flags on to every run (repeatable; one value may hold several flags,
shell-quoted), e.g. ``--extra=--config=experiments/configs/cifar10.py:smoke`` or
``--extra="--config.train.iterations=1000 --config.eval.every=0"``. Extras may not set the
workdir or the fields a preset controls (method, setting, d_mode, regrow, d_density,
g_density).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence

from ddst_jax import storage
from experiments import presets
from experiments.paper_results import BENCHMARKS

TABLES: dict[str, tuple[str, ...]] = {
    "1": presets.TABLE1,
    "all": tuple(presets.PRESETS),
}

_CONTROLLED = (*presets.PRESET_FIELDS, "sparsity.g_density")


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of a grid: its preset, G density (None: dense), seed, workdir and argv."""

    preset: str
    g_density: float | None
    seed: int | None
    workdir: str
    argv: tuple[str, ...]

    @property
    def command(self) -> str:
        """The shell command line."""
        return shlex.join(self.argv)


def _flag_value(value: object) -> str:
    if isinstance(value, bool):
        return str(value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def run_name(preset: str, g_density: float | None, seed: int | None = None) -> str:
    """``adapt_relaxed_g0.1`` (``dense`` for the dense run), ``_s1`` appended for a seed."""
    name = preset if preset == "dense" or g_density is None else f"{preset}_g{g_density:g}"
    return name if seed is None else f"{name}_s{seed}"


def _check_extras(extra: Sequence[str]) -> list[str]:
    flags: list[str] = []
    for item in extra:
        flags.extend(shlex.split(item))
    for flag in flags:
        if not flag.startswith("--"):
            raise ValueError(f"--extra takes flags of the runner (--config.FIELD=VALUE), got "
                             f"{flag!r}.")
        key = flag[2:].split("=", 1)[0]
        if key == "workdir":
            raise ValueError("--extra may not set --workdir: every run gets its own under --root.")
        if key.startswith("config.") and key.removeprefix("config.") in _CONTROLLED:
            raise ValueError(f"--extra may not set {flag.split('=')[0]}: the grid sets it per run "
                             "(choose the runs with --methods / --densities).")
    return flags


def build_grid(
    benchmark: str,
    table: str = "1",
    *,
    densities: Sequence[float] = presets.G_DENSITIES,
    methods: Sequence[str] | None = None,
    root: str = "runs",
    extra: Sequence[str] = (),
    seeds: Sequence[int] | None = None,
    python: str = "python",
) -> list[Run]:
    """The runs of a table for one benchmark (see the module docstring).

    Raises:
      ValueError: unknown benchmark, table or preset; bad densities; extras that clash with
        the grid.
    """
    if benchmark not in BENCHMARKS:
        raise ValueError(f"Unknown benchmark {benchmark!r}; use one of {', '.join(BENCHMARKS)}.")
    if methods is None:
        if table not in TABLES:
            raise ValueError(
                f"Unknown table {table!r}; use one of {', '.join(TABLES)} (the project restates "
                "only the paper's Table 1; 'all' lists every preset), or pick presets with "
                "--methods.")
        methods = TABLES[table]
    methods = [presets.check_name(m) for m in methods]
    if not densities:
        raise ValueError("Give at least one G density.")
    for d in densities:
        if not 0.0 < d <= 1.0:
            raise ValueError(f"G densities lie in (0, 1]; got {d}.")
    extra_flags = _check_extras(extra)
    if any(f.split("=", 1)[0] == "--config.seed" for f in extra_flags) and seeds:
        raise ValueError("Set the seed with --seeds or with --extra=--config.seed=..., not both.")
    # A --config=FILE[:preset] extra must come before the --config.FIELD overrides.
    config_file = [f for f in extra_flags if f.split("=", 1)[0] == "--config"]
    other = [f for f in extra_flags if f not in config_file]
    runs = []
    for preset in methods:
        for d in ([None] if preset == "dense" else list(densities)):
            for seed in (seeds or [None]):
                workdir = os.path.join(root, benchmark, run_name(preset, d, seed))
                fields = {**presets.PRESETS[preset],
                          "sparsity.g_density": 1.0 if d is None else float(d)}
                overrides = [f"--config.{k}={_flag_value(v)}" for k, v in fields.items()
                             if v is not None]  # None: the config file's default (a placeholder)
                if seed is not None:
                    overrides.append(f"--config.seed={seed}")
                argv = (python, "-m", f"experiments.{benchmark}", f"--workdir={workdir}",
                        *config_file, *overrides, *other)
                runs.append(Run(preset, d, seed, workdir, argv))
    workdirs = [r.workdir for r in runs]
    if len(set(workdirs)) != len(workdirs):
        raise ValueError("Two runs of the grid share a workdir; remove duplicate densities.")
    return runs


class LaunchError(RuntimeError):
    """A launched run failed; the runs after it were not started."""


class GridInterrupted(RuntimeError):
    """A stop signal reached the grid; the running child got it and has finished saving."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def _finished(workdir: str | None) -> bool:
    """Whether ``workdir`` holds a finished run (its summary.json says so)."""
    if not workdir:
        return False
    try:
        path = storage.join(workdir, "summary.json")
        return bool(json.loads(storage.read_text(path)).get("finished"))
    except (OSError, ValueError):
        return False


def _run_child(argv: Sequence[str]) -> tuple[int | None, str, list[int]]:
    """Runs one command; SIGINT/SIGTERM to this process go to the child, which is then waited
    for (it saves a checkpoint first). Returns (exit code, reason, signals forwarded)."""
    try:
        # Its own session: a Ctrl-C in the terminal reaches only this process, which passes
        # exactly one signal on (a second Ctrl-C passes a second one: the child stops at once).
        child = subprocess.Popen(argv, start_new_session=True)
    except OSError as e:
        return None, str(e), []
    forwarded: list[int] = []

    def forward(signum, frame):
        forwarded.append(signum)
        try:
            child.send_signal(signum)
        except ProcessLookupError:
            pass

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            try:
                code = child.wait()
                break
            except KeyboardInterrupt:  # a handler could not be installed: still wait
                forward(signal.SIGINT, None)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return code, f"exit status {code}", forwarded


def launch(argvs: Sequence[Sequence[str]], *, python: str | None = None, stdout=None,
           workdirs: Sequence[str | None] | None = None) -> None:
    """Run the commands one after the other; ``LaunchError`` at the first that fails.

    ``python`` replaces the first word of every command (default: this interpreter).
    ``workdirs`` (one per command) lets finished runs be skipped, so a re-launched grid goes on
    where it stopped. A SIGINT/SIGTERM to this process is passed to the running command, which
    saves a checkpoint; the grid waits for it and raises ``GridInterrupted``.
    """
    python = python or sys.executable
    out = stdout or sys.stdout
    total = len(argvs)
    workdirs = list(workdirs) if workdirs is not None else [None] * total
    for i, (argv, workdir) in enumerate(zip(argvs, workdirs, strict=True), 1):
        argv = [python, *argv[1:]]
        if _finished(workdir):
            print(f"[{i}/{total}] finished, skipped: {workdir}", file=out, flush=True)
            continue
        print(f"[{i}/{total}] {shlex.join(argv)}", file=out, flush=True)
        code, reason, forwarded = _run_child(argv)
        if forwarded:
            name = signal.Signals(forwarded[0]).name
            raise GridInterrupted(
                f"{name}: passed to run {i}/{total}, which stopped ({reason}; it saves a "
                f"checkpoint before stopping). {total - i} later run(s) not started. Re-run the "
                "grid to go on: finished runs are skipped, this one resumes.", forwarded[0])
        if code != 0:
            raise LaunchError(
                f"run {i}/{total} failed ({reason}): {shlex.join(argv)}\n"
                f"{total - i} later run(s) not started. Fix the cause and re-run the grid: runs "
                "that finished are skipped, an interrupted run resumes.")


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, e.g. 0.1,0.2; got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, e.g. 0,1,2; got {text!r}") from None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.grid", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmark", default="cifar10", choices=BENCHMARKS)
    parser.add_argument("--table", default="1", help="'1' (paper Table 1) or 'all' (every preset).")
    parser.add_argument("--densities", type=_floats, default=list(presets.G_DENSITIES),
                        help="Comma-separated G densities (default 0.1,0.2,0.3,0.5).")
    parser.add_argument("--methods", default=None,
                        help=f"Comma-separated presets instead of the table's: "
                             f"{', '.join(presets.PRESETS)}.")
    parser.add_argument("--root", default="runs", help="Workdirs go to ROOT/BENCHMARK/NAME.")
    parser.add_argument("--seeds", type=_ints, default=None,
                        help="Comma-separated seeds: one run per seed (workdir suffix _sSEED).")
    parser.add_argument("--extra", action="append", default=[],
                        help="Flags passed on to every run (repeatable).")
    parser.add_argument("--python", default="python",
                        help="Interpreter word of the printed commands (--launch uses this "
                             "process's interpreter).")
    parser.add_argument("--launch", action="store_true",
                        help="Run the commands here, sequentially; stop at the first failure.")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    methods = None if args.methods is None else [m.strip() for m in args.methods.split(",")
                                                 if m.strip()]
    try:
        runs = build_grid(args.benchmark, args.table, densities=args.densities, methods=methods,
                          root=args.root, extra=args.extra, seeds=args.seeds, python=args.python)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.launch:
        for run in runs:
            print(run.command)
        return 0
    try:
        launch([r.argv for r in runs], workdirs=[r.workdir for r in runs])
    except GridInterrupted as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 128 + e.signum
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"All {len(runs)} runs finished.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
