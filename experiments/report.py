r"""Tables and curves of finished runs, laid out like the paper's, with the paper's numbers.

Usage::

    python -m experiments.report WORKDIR... [--out=DIR] [--json]

Each WORKDIR is a run directory (it holds ``config.json``) or a folder searched for run
directories (e.g. ``runs/``). For every finished run (``summary.json`` with ``"finished":
true``) the report reads:

- benchmark: from ``config.json``'s ``model.name`` and ``data.name`` (sngan32 + cifar10 ->
  ``cifar10``, sngan48 + stl10 -> ``stl10``, biggan32 + cifar10 -> ``cifar10_biggan``, biggan64 +
  tiny_imagenet -> ``tiny_imagenet``; anything else is its own benchmark ``MODEL/DATA``);
- method: the preset its ``config.sparsity`` fields select (``experiments.presets``; a run that
  departs from every preset gets a label such as ``adapt_relaxed[regrow=set]`` and no paper
  numbers); G density: ``config.sparsity.g_density`` (1.0 for dense);
- FID: ``summary.json``'s ``best_fid`` (best over the run's periodic evaluations, as the paper
  most likely reports), else the lowest ``eval/fid`` of ``metrics.jsonl``;
- IS: ``eval/is`` of ``metrics.jsonl`` at the best-FID evaluation;
- FLOPs: normalised training FLOPs in percent of dense, paper convention
  (``experiments.flops.run_report`` on ``config.json`` and ``density_log.jsonl``).

It prints one table per benchmark and metric: rows = methods, columns = G densities 10/20/30/50%
(plus any other density run), each cell ``ours (paper, ours - paper)``, '-' where a number is
missing (the paper numbers are those of ``experiments.paper_results``: Table 1 FID; docs/method.md
restates no paper IS or FLOPs). The dense run has one number, shown in every column. Runs of
the same method and density (seeds) are averaged and marked ``n=K``. Unfinished runs are listed
and left out of the tables and plots.

It writes to ``--out`` (default ``report``): ``BENCHMARK_curves.png`` per benchmark (windowed
BR and D density over iterations of every finished run, legend by method and G density),
``report.txt`` and ``report.json``. ``--json`` prints ``report.json``'s object instead of the
tables: ``{"benchmarks": [{"benchmark", "title", "densities", "notes", "runs", "plot",
"tables": {"fid" | "is" | "flops": [{"method", "name", "cells": {"0.1": {"ours", "paper",
"diff", "n", "workdirs"}}}]}}], "unfinished": [...], "errors": [...]}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from ddst_jax import reporting, rundir, storage
from experiments import paper_results, presets

METRICS: tuple[tuple[str, str], ...] = (
    ("fid", "FID (best over the run's evaluations; lower is better)"),
    ("is", "Inception Score (at the best-FID evaluation)"),
    ("flops", "Normalised training FLOPs, % of dense (paper convention)"),
    ("kid", "KID x 1e3 (experiments.evaluate; lower is better)"),
    ("precision", "Precision (experiments.evaluate, k-NN, Naeem et al. 2020)"),
    ("recall", "Recall (experiments.evaluate)"),
    ("density", "Density (experiments.evaluate)"),
    ("coverage", "Coverage (experiments.evaluate)"),
)
_FORMATS = {"fid": "{:.2f}", "is": "{:.2f}", "flops": "{:.2f}", "kid": "{:.2f}",
            "precision": "{:.3f}", "recall": "{:.3f}", "density": "{:.3f}",
            "coverage": "{:.3f}"}
#: Metrics read from ``experiments.evaluate``'s JSON (``RUN/eval/*.json``), with their scale.
_EVAL_METRICS = {"kid": 1e3, "precision": 1.0, "recall": 1.0, "density": 1.0,
                 "coverage": 1.0}
#: Protocol fields shown when the runs of a report were scored differently.
_PROTOCOL_FIELDS = ("num_samples", "generator", "bn_mode", "checkpoint", "resize",
                    "inception_sha256", "reference_sha256")

#: (model.name, data.name) -> benchmark (the entry point ``experiments/<benchmark>.py``).
MODEL_BENCHMARKS: dict[tuple[str, str], str] = {
    ("sngan32", "cifar10"): "cifar10",
    ("sngan48", "stl10"): "stl10",
    ("biggan32", "cifar10"): "cifar10_biggan",
    ("biggan64", "tiny_imagenet"): "tiny_imagenet",
}
BR_BAND = (0.45, 0.55)


@dataclasses.dataclass
class RunResult:
    """What the report knows about one run directory."""

    workdir: str
    benchmark: str
    method: str  # preset label (``experiments.presets.label``)
    g_density: float
    finished: bool
    iteration: int | None
    iterations: int | None
    fid: float | None = None
    inception_score: float | None = None
    flops: float | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    config: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)
    evaluation: dict[str, Any] | None = None  # the newest experiments.evaluate JSON of the run
    protocol: dict[str, Any] | None = None  # its protocol, flattened to _PROTOCOL_FIELDS

    def value(self, metric: str) -> float | None:
        if metric in _EVAL_METRICS:
            if not self.evaluation:
                return None
            x = self.evaluation["scores"].get(metric)
            return None if x is None else float(x) * _EVAL_METRICS[metric]
        return {"fid": self.fid, "is": self.inception_score, "flops": self.flops}[metric]


def _evaluation(workdir: str) -> dict[str, Any] | None:
    """The newest ``experiments.evaluate`` JSON of a run's generator, or None."""
    folder = storage.join(workdir, "eval")
    if not storage.isdir(folder):
        return None
    found = []
    for name in storage.listdir(folder):
        if name.endswith(".json"):
            try:
                result = _read_json(storage.join(folder, name))
            except (OSError, ValueError):
                continue
            if result and result.get("protocol", {}).get("source") == "generator":
                found.append((storage.mtime(storage.join(folder, name)), name, result))
    return max(found)[2] if found else None


def _protocol_of(evaluation: dict[str, Any]) -> dict[str, Any]:
    p = evaluation["protocol"]
    flat = {k: p.get(k) for k in _PROTOCOL_FIELDS if k in p}
    flat["inception_sha256"] = (p.get("inception_sha256") or "")[:12]
    flat["reference_sha256"] = ((p.get("reference") or {}).get("sha256") or "")[:12]
    return flat


# ----------------------------------------------------------------------------- collecting


def find_runs(paths: Iterable[str]) -> list[str]:
    """Run directories (holding ``config.json``) at or below each path, in order, no repeats."""
    found: list[str] = []
    for path in paths:
        if not storage.isdir(path):
            raise FileNotFoundError(f"{path} is not a directory.")
        if storage.exists(storage.join(path, "config.json")):
            hits = [path]
        else:
            hits = []
            for root, dirs, files in storage.walk(path):
                dirs[:] = sorted(d for d in dirs if d not in ("checkpoints", "tensorboard",
                                                              "samples", "plots"))
                if "config.json" in files:
                    hits.append(root)
                    dirs[:] = []
            if not hits:
                raise FileNotFoundError(
                    f"No run directory (one holding config.json) at or below {path}.")
        for hit in hits:
            if storage.resolve(hit) not in {storage.resolve(f) for f in found}:
                found.append(hit)
    return found


def _read_json(path: str) -> dict[str, Any] | None:
    if not storage.exists(path):
        return None
    return json.loads(storage.read_text(path))


def _get(config: Any, dotted: str, default: Any = None) -> Any:
    node = config
    for p in dotted.split("."):
        if not isinstance(node, dict) or p not in node:
            return default
        node = node[p]
    return node


def benchmark_of(config: dict[str, Any]) -> str:
    """The benchmark of a run's config (see the module docstring)."""
    model = _get(config, "model.name", "?")
    data = _get(config, "data.name", "?")
    return MODEL_BENCHMARKS.get((model, data), f"{model}/{data}")


def _metric_rows(workdir: str) -> list[dict[str, Any]]:
    path = storage.join(workdir, reporting.JSONL_NAME)
    return reporting.read_jsonl(path) if storage.exists(path) else []


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def _scores(summary: dict[str, Any], rows: list[dict[str, Any]]) -> tuple[float | None,
                                                                          float | None]:
    """(best FID, IS at that evaluation)."""
    evals = [r for r in rows if _finite(r.get("eval/fid"))]
    fid, step = summary.get("best_fid"), summary.get("best_fid_iteration")
    if not _finite(fid):
        fid, step = None, None
        if evals:
            best = min(evals, key=lambda r: r["eval/fid"])
            fid, step = float(best["eval/fid"]), best["step"]
    inception = None
    at_step = [r for r in rows if r.get("step") == step and _finite(r.get("eval/is"))]
    if at_step:
        inception = float(at_step[-1]["eval/is"])
    return (None if fid is None else float(fid)), inception


def _flops(workdir: str) -> float:
    from experiments import flops as flops_cli  # jax + models: only when needed

    return float(flops_cli.run_report(workdir)["paper"]["normalised_percent"])


def load_run(workdir: str, *, with_flops: bool = True) -> RunResult:
    """Read one run directory (``ValueError`` if it is not a readable run)."""
    try:
        config = _read_json(storage.join(workdir, "config.json"))
        summary = _read_json(storage.join(workdir, "summary.json"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{workdir}: unreadable config.json / summary.json ({e}).") from e
    if config is None:
        raise ValueError(f"{workdir}: no config.json.")
    method = presets.label(config)
    g_density = 1.0 if _get(config, "sparsity.method") == "dense" else float(
        _get(config, "sparsity.g_density", float("nan")))
    rows = _metric_rows(workdir)
    iterations = _get(config, "train.iterations")
    finished = bool(summary and summary.get("finished"))
    iteration = (summary or {}).get("iteration")
    if iteration is None and rows:
        iteration = max(int(r.get("step", 0)) for r in rows)
    run = RunResult(workdir, benchmark_of(config), method, g_density, finished, iteration,
                    iterations, config=config)
    # Labels come from config.json, the run's latest configuration: say when it changed.
    for change in rundir.read_history(workdir):
        fields = [k for k in change.get("changes", {}) if not rundir.is_environment_field(k)]
        if fields:
            run.notes.append(f"config changed at iteration {change.get('iteration')}: "
                             + ", ".join(f"{k} {change['changes'][k][0]!r} -> "
                                         f"{change['changes'][k][1]!r}" for k in fields))
    if not finished:
        return run
    run.fid, run.inception_score = _scores(summary, rows)
    run.evaluation = _evaluation(workdir)
    if run.evaluation is not None:
        run.protocol = _protocol_of(run.evaluation)
    if run.fid is None:
        run.notes.append("no FID evaluation")
    if with_flops:
        try:
            run.flops = _flops(workdir)
        except (OSError, ValueError, KeyError, TypeError) as e:
            run.notes.append(f"FLOPs unavailable: {e}")
    return run


# ----------------------------------------------------------------------------- tables


def _dkey(d: float) -> str:
    return f"{d:g}"


def _method_order(labels: Iterable[str]) -> list[str]:
    order = {name: i for i, name in enumerate(presets.PRESETS)}
    return sorted(set(labels), key=lambda m: (order.get(m, len(order)), m))


def benchmark_tables(benchmark: str, runs: Sequence[RunResult]) -> dict[str, Any]:
    """Rows and cells of every metric for the finished runs of one benchmark."""
    densities = sorted({*presets.G_DENSITIES,
                        *(r.g_density for r in runs if r.method != "dense")})
    methods = _method_order(r.method for r in runs)
    tables: dict[str, list[dict[str, Any]]] = {}
    for metric, _ in METRICS:
        rows = []
        for method in methods:
            cells = {}
            for d in densities:
                group = [r for r in runs if r.method == method
                         and (method == "dense" or abs(r.g_density - d) < 1e-9)]
                values = [r.value(metric) for r in group if r.value(metric) is not None]
                ours, std, ci = seed_statistics(values)
                paper = paper_results.paper_value(metric, benchmark, method, d)
                diff = ours - paper if ours is not None and paper is not None else None
                cells[_dkey(d)] = {"ours": ours, "std": std, "ci95": ci, "paper": paper,
                                   "diff": diff, "n": len(values),
                                   "workdirs": [r.workdir for r in group]}
            rows.append({"method": method, "name": presets.display_name(method),
                         "cells": cells})
        tables[metric] = rows
    return {"densities": densities, "tables": tables}


def seed_statistics(values: Sequence[float]) -> tuple[float | None, float | None,
                                                     tuple[float, float] | None]:
    """(mean, sample std, 95% interval of the mean) over seeds; std and interval need n >= 2.

    The interval is Student's t: mean +- t(0.975, n - 1) * std / sqrt(n).

    >>> mean, std, (lo, hi) = seed_statistics([1.0, 2.0, 3.0])
    >>> mean, std, round(lo, 3), round(hi, 3)
    (2.0, 1.0, -0.484, 4.484)
    """
    if not values:
        return None, None, None
    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, None, None
    from scipy import stats  # noqa: PLC0415

    std = float(np.std(values, ddof=1))
    half = float(stats.t.ppf(0.975, len(values) - 1)) * std / math.sqrt(len(values))
    return mean, std, (mean - half, mean + half)


def protocol_table(runs: Sequence[RunResult]) -> list[dict[str, Any]]:
    """The distinct evaluation protocols of the runs (one row each, with their workdirs); a
    report whose runs were scored differently shows this table."""
    rows: dict[str, dict[str, Any]] = {}
    for r in runs:
        if r.protocol is None:
            continue
        key = json.dumps(r.protocol, sort_keys=True)
        rows.setdefault(key, {"protocol": r.protocol, "workdirs": []})["workdirs"].append(
            r.workdir)
    return list(rows.values())


def _benchmark_notes(benchmark: str, runs: Sequence[RunResult]) -> list[str]:
    notes = []
    lengths = sorted({r.iterations for r in runs if r.iterations is not None})
    default = None
    if benchmark in paper_results.BENCHMARKS:
        import importlib

        module = importlib.import_module(f"experiments.configs.{benchmark}")
        default = module.get_config(None).train.iterations
    if lengths and default is not None and lengths != [default]:
        notes.append(f"runs of {', '.join(map(str, lengths))} iterations; the paper's config "
                     f"trains {default}: compare with the paper's numbers with care")
    sources = sorted({str(_get(r.config, "data.source", "?")) for r in runs} - {"tfds", "npz"})
    if sources:
        notes.append(f"data source {', '.join(sources)} (not the real data set)")
    for r in runs:
        notes.extend(f"{r.workdir}: {n}" for n in r.notes)
    return notes


def _fmt(metric: str, x: float | None, signed: bool = False) -> str:
    if x is None:
        return "-"
    return ("{:+.2f}" if signed else _FORMATS[metric]).format(x)


def format_cell(metric: str, cell: dict[str, Any]) -> str:
    """``ours (paper, ours - paper)``, e.g. ``14.00 (14.19, -0.19)``; over K > 1 seeds
    ``mean+-std [95% interval] n=K``."""
    ours = _fmt(metric, cell["ours"])
    if cell["n"] > 1:
        lo, hi = cell["ci95"]
        ours += (f"+-{_fmt(metric, cell['std'])} [{_fmt(metric, lo)}, {_fmt(metric, hi)}]"
                 f" n={cell['n']}")
    return f"{ours} ({_fmt(metric, cell['paper'])}, {_fmt(metric, cell['diff'], True)})"


def format_benchmark(entry: dict[str, Any]) -> str:
    """The text tables of one benchmark."""
    densities = entry["densities"]
    n = len(entry["runs"])
    lines = [f"== {entry['title']} ({entry['benchmark']}): {n} finished run{'s' * (n != 1)} =="]
    lines += [f"   note: {note}" for note in entry["notes"]]
    for metric, title in METRICS:
        rows = entry["tables"][metric]
        if metric in _EVAL_METRICS and not any(c["n"] for r in rows for c in r["cells"].values()):
            continue  # no run of this benchmark was scored with experiments.evaluate
        header = ["method"] + [f"d_G={d:.0%}" for d in densities]
        body = [[row["name"]] + [format_cell(metric, row["cells"][_dkey(d)]) for d in densities]
                for row in rows]
        widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
        lines += ["", f"{title}; cells: ours (paper, ours - paper)"]
        for r in [header, *body]:
            lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                   for i, (c, w) in enumerate(zip(r, widths, strict=True))))
    protocols = entry.get("protocols", [])
    if len(protocols) > 1:
        lines += ["", "The runs were scored under different protocols (experiments.evaluate):"]
        for row in protocols:
            shown = ", ".join(f"{k}={v}" for k, v in sorted(row["protocol"].items()))
            lines.append(f"  {shown}: {len(row['workdirs'])} run(s), e.g. {row['workdirs'][0]}")
    if entry.get("plot"):
        lines += ["", f"BR / D-density curves: {entry['plot']}"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- curves


def plot_benchmark(benchmark: str, runs: Sequence[RunResult], path: str) -> str:
    """Windowed BR and D density over iterations of every run, one PNG."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 7), layout="constrained")
    ax_br, ax_d = figure.subplots(2, 1, sharex=True)
    order = {m: i for i, m in enumerate(_method_order(r.method for r in runs))}
    runs = sorted(runs, key=lambda r: (order[r.method], r.g_density, r.workdir))
    cmap = _colormap(len(runs))
    drawn = 0
    for i, run in enumerate(runs):
        rows = _metric_rows(run.workdir)
        density = "dense" if run.method == "dense" else f"{run.g_density:.0%}"
        label = f"{presets.display_name(run.method)}, d_G={density}"
        style = {"color": cmap(i), "linewidth": 1.4}
        for ax, key in ((ax_br, "br/windowed"), (ax_d, "density/d")):
            steps, values = reporting.scalar_series(rows, key)
            keep = np.isfinite(values)
            if keep.any():
                ax.plot(steps[keep], values[keep], label=label, **style)
                drawn += 1
    band = [ax_br.axhline(level, color="gray", linestyle="--", linewidth=1) for level in BR_BAND]
    ax_br.set_ylabel("BR (windowed)")
    ax_d.set_ylabel("D density")
    ax_d.set_xlabel("iteration")
    title = paper_results.BENCHMARK_TITLES.get(benchmark, benchmark)
    ax_br.set_title(f"{title}: balance ratio and D density")
    for ax in (ax_br, ax_d):
        ax.grid(alpha=0.3)
    if drawn:  # one legend (the runs are the same in both panels)
        source = ax_d if ax_d.get_legend_handles_labels()[0] else ax_br
        figure.legend(*source.get_legend_handles_labels(), loc="outside right upper", fontsize=7)
    ax_br.legend(band[:1], [f"ADAPT band [{BR_BAND[0]}, {BR_BAND[1]}]"], fontsize=7)
    if not drawn:
        ax_br.text(0.5, 0.5, "no br/windowed or density/d scalars in these runs",
                   ha="center", va="center", transform=ax_br.transAxes)
    return reporting._save_figure(figure, path)


def _colormap(n: int):
    from matplotlib import colormaps

    cmap = colormaps["tab20" if n > 10 else "tab10"]
    return lambda i: cmap(i % cmap.N)


# ----------------------------------------------------------------------------- report


def build_report(paths: Sequence[str], out: str | None = "report", *,
                 with_flops: bool = True) -> dict[str, Any]:
    """The report object (see the module docstring); writes the PNGs when ``out`` is given."""
    runs, errors = [], []
    for workdir in find_runs(paths):
        try:
            runs.append(load_run(workdir, with_flops=with_flops))
        except ValueError as e:
            errors.append(str(e))
    unfinished = [{"workdir": r.workdir, "benchmark": r.benchmark, "method": r.method,
                   "g_density": r.g_density, "iteration": r.iteration,
                   "iterations": r.iterations} for r in runs if not r.finished]
    finished = [r for r in runs if r.finished]
    order = {b: i for i, b in enumerate(paper_results.BENCHMARKS)}
    entries = []
    for bench in sorted({r.benchmark for r in finished}, key=lambda b: (order.get(b, 99), b)):
        group = [r for r in finished if r.benchmark == bench]
        entry = {"benchmark": bench,
                 "title": paper_results.BENCHMARK_TITLES.get(bench, bench),
                 **benchmark_tables(bench, group),
                 "notes": _benchmark_notes(bench, group),
                 "protocols": protocol_table(group),
                 "runs": [{"workdir": r.workdir, "method": r.method, "g_density": r.g_density,
                           "iteration": r.iteration, "fid": r.fid, "is": r.inception_score,
                           "flops": r.flops} for r in group],
                 "plot": None}
        if out is not None:
            name = bench.replace("/", "_")
            entry["plot"] = plot_benchmark(bench, group, storage.join(out, f"{name}_curves.png"))
        entries.append(entry)
    return {"benchmarks": entries, "unfinished": unfinished, "errors": errors}


def format_report(report: dict[str, Any]) -> str:
    """The whole text report."""
    parts = [format_benchmark(e) for e in report["benchmarks"]]
    if not report["benchmarks"]:
        parts.append("No finished runs.")
    if report["unfinished"]:
        lines = ["Unfinished runs (left out of the tables and plots):"]
        for u in report["unfinished"]:
            at = "not started" if u["iteration"] is None else f"iteration {u['iteration']}"
            lines.append(f"  {u['workdir']}: {u['benchmark']} {u['method']} "
                         f"d_G={u['g_density']:g}, {at} of {u['iterations']}")
        parts.append("\n".join(lines))
    if report["errors"]:
        parts.append("\n".join(["Skipped (not readable runs):",
                                *(f"  {e}" for e in report["errors"])]))
    return "\n\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.report", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdirs", nargs="+", metavar="WORKDIR",
                        help="Run directories, or folders holding them.")
    parser.add_argument("--out", default="report",
                        help="Where the PNGs, report.txt and report.json go (default: report).")
    parser.add_argument("--json", action="store_true",
                        help="Print one JSON object instead of the tables.")
    args = parser.parse_args(argv)
    try:
        report = build_report(args.workdirs, args.out)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = format_report(report)
    blob = json.dumps(reporting.to_jsonable(report), indent=None)
    storage.write_text(storage.join(args.out, "report.txt"), text + "\n")
    storage.write_text(storage.join(args.out, "report.json"), blob + "\n")
    print(blob if args.json else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
