r"""Normalised training FLOPs of the paper's static baselines, and of a finished run.

The accounting is docs/method.md section 8.

Usage::

    python -m experiments.flops --config=experiments/configs/cifar10.py [--json] \
        [--workdir RUN_DIR] [--convention=paper|physical]

Prints, for the benchmark of the config, the training FLOPs of Static-Balance (d_D = d_G) and
Static-Strong (d_D = 1.0 relaxed, d_D = config.control.d_max strict) at G densities 10/20/30/50%,
normalised by the dense run (G + D), in the paper's convention (``--convention=physical``: the
correct count; see ``ddst_jax.metrics.flops``).
Layer densities follow ``config.sparsity.distribution`` (ERK by default) over each network's
maskable kernels.

``--json`` prints exactly one JSON object instead::

    {"convention": "paper", "dense_total": <FLOPs>,
     "rows": [{"method": "static_balance" | "static_strong",
      "setting": "relaxed" | "strict", "g_density": 0.1, "d_density": 0.1,
      "normalised_percent": ...}, ...]}

``--workdir RUN_DIR`` also reports that run, from ``RUN_DIR/config.json`` (the run's config as
JSON, as ``ddst_jax.train`` writes it) and ``RUN_DIR/density_log.jsonl`` (format:
``ddst_jax.metrics.flops``), in both conventions, under the key ``"run"``. Which network is
dynamic, and its update interval, follow the run's ``sparsity.method`` (see ``run_report``).

Config fields read: ``model.{name, z_dim, g_ch, d_ch}``, ``train.{iterations, n_dis,
batch_size_g, batch_size_d}``, ``sparsity.{distribution, erk_power}``, ``control.d_max``; for a
run also ``sparsity.{method, setting, d_mode, d_density, g_density, g_update_every}`` and
``control.d_update_every``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from ddst_jax import control, sparsity, storage
from ddst_jax.gan import methods, registry
from ddst_jax.metrics import flops

G_DENSITIES: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5)
METHODS: tuple[str, ...] = ("static_balance", "static_strong")
SETTINGS: tuple[str, ...] = ("relaxed", "strict")
RUN_CONFIG_FILE = "config.json"

_CONFIG = config_flags.DEFINE_config_file("config", None, "Benchmark config file.")
_JSON = flags.DEFINE_bool("json", False, "Print exactly one JSON object instead of a table.")
_WORKDIR = flags.DEFINE_string("workdir", None, "A finished run directory to report as well.")
_CONVENTION = flags.DEFINE_enum(
    "convention", "paper", ["paper", "physical"],
    "FLOPs convention of the static table (ddst_jax.metrics.flops.training_flops).",
)


@dataclasses.dataclass(frozen=True)
class ModelFlops:
    """Per-sample layer FLOPs, abstract params and maskable rule of a benchmark's G and D."""

    g_layers: list[flops.LayerFlops]
    d_layers: list[flops.LayerFlops]
    g_params: Any
    d_params: Any
    is_maskable: Any = None


def _field(config: Any, dotted: str) -> Any:
    """``config.a.b`` for ConfigDicts and plain dicts, or one clear error naming the field."""
    node = config
    for name in dotted.split("."):
        try:
            node = node[name]
        except (KeyError, TypeError, AttributeError):
            raise ValueError(f"The config has no field `{dotted}`; add it (see --help).") from None
    return node


def model_flops(model_config: Any) -> ModelFlops:
    """Layer FLOPs, abstract params and maskable rule of the config's G and D, from the model
    registry (``gan.registry.ModelPair``): G traced as ``G(z[, y], train=True)``, D on
    real-size images."""
    pair = registry.build(
        _field(model_config, "name"), z_dim=_field(model_config, "z_dim"),
        g_ch=_field(model_config, "g_ch"), d_ch=_field(model_config, "d_ch"),
        num_classes=_get(model_config, "num_classes"))
    g_layers, d_layers = pair.layer_flops()
    g_params, d_params = pair.abstract_params()
    return ModelFlops(g_layers, d_layers, g_params, d_params, pair.is_maskable)


def d_density(method: str, setting: str, g_density: float, d_max: float) -> float:
    """D's overall density of a static method (docs/method.md section 6), via ``resolve_method``.

    >>> [d_density(m, "strict", 0.1, 0.5) for m in METHODS]
    [0.1, 0.5]
    """
    if method not in METHODS:
        raise ValueError(f"Unknown static method {method!r}; use one of {METHODS}.")
    d_mode = method.removeprefix("static_")
    spec = methods.resolve_method(
        "static", g_density=g_density, setting=setting, d_mode=d_mode, d_max=d_max
    )
    return spec.d_density


def _train_kwargs(config: Any) -> dict[str, int]:
    return {
        "iterations": int(_field(config, "train.iterations")),
        "n_dis": int(_field(config, "train.n_dis")),
        "batch_g": int(_field(config, "train.batch_size_g")),
        "batch_d": int(_field(config, "train.batch_size_d")),
    }


def static_table(
    config: Any, model: ModelFlops, convention: flops.Convention = "paper"
) -> dict[str, Any]:
    """Dense total and the 16 rows (2 methods x 2 settings x 4 G densities)."""
    train = {**_train_kwargs(config), "convention": convention}
    distribution = _field(config, "sparsity.distribution")
    power = float(_field(config, "sparsity.erk_power"))
    d_max = float(_field(config, "control.d_max"))

    def densities(params: Any, d: float) -> Any:
        return sparsity.layer_densities(params, d, distribution, power=power,
                                        is_maskable=model.is_maskable)

    dense = flops.training_flops(model.g_layers, model.d_layers, **train)
    rows = []
    for method in METHODS:
        for setting in SETTINGS:
            for d_g in G_DENSITIES:
                d_d = d_density(method, setting, d_g, d_max)
                result = flops.training_flops(
                    model.g_layers,
                    model.d_layers,
                    g_density_log=densities(model.g_params, d_g),
                    d_density_log=densities(model.d_params, d_d),
                    **train,
                )
                rows.append({
                    "method": method,
                    "setting": setting,
                    "g_density": d_g,
                    "d_density": d_d,
                    "normalised_percent": result["normalised_percent"],
                })
    return {"convention": convention, "dense_total": dense["dense_total"], "rows": rows}


def _get(config: Any, dotted: str, default: Any = None) -> Any:
    try:
        return _field(config, dotted)
    except ValueError:
        return default


def _run_schedule(run_config: Any, g_log: list, d_log: list) -> tuple[int | None, int | None]:
    """(dT_G, dT_D) of a run, ``None`` for a network whose mask never changes.

    From ``sparsity.method`` when the run config has one (``ddst_jax.gan.methods``; dT_D
    defaults to the controller's, 1000 relaxed / 2000 strict and DDA); otherwise a network is
    dynamic when its log holds more than the initial entry.
    """
    method = _get(run_config, "sparsity.method")
    if method is None:
        g_dynamic, d_kind = len(g_log) > 1, "relaxed" if len(d_log) > 1 else "static"
    else:
        spec = methods.resolve_method(
            method,
            g_density=_get(run_config, "sparsity.g_density", 1.0),
            setting=_get(run_config, "sparsity.setting", "relaxed"),
            d_mode=_get(run_config, "sparsity.d_mode", "balance"),
            d_density=_get(run_config, "sparsity.d_density"),
            d_max=_get(run_config, "control.d_max", 0.5),
        )
        g_dynamic, d_kind = spec.g_dynamic, spec.d_control
    g_every = int(_field(run_config, "sparsity.g_update_every")) if g_dynamic else None
    d_every = None
    name = _get(run_config, "control.controller") or d_kind
    if d_kind != "static":
        options = control.ControlOptions(every=_get(run_config, "control.d_update_every"),
                                         d_max=_get(run_config, "control.d_max", 0.5))
        context = control.ControllerContext(1, int(_field(run_config, "train.iterations")),
                                            d_start=1.0)
        d_every = control.make_controller(name, options, context).every
    return g_every, d_every


def run_report(workdir: str | os.PathLike[str]) -> dict[str, Any]:
    """Training FLOPs of a finished run, both conventions, from its config and density log.

    The paper convention gives a dynamic G one ``dT_G`` interval per scheduled update
    (``flops.scheduled_log``: the run log only records changed densities) and a dynamic D one
    ``dT_D * n_dis`` interval per logged D change.
    """
    config_path = storage.join(workdir, RUN_CONFIG_FILE)
    if not storage.exists(config_path):
        raise FileNotFoundError(
            f"No {RUN_CONFIG_FILE} in {workdir}; pass the directory of a run written by the "
            "training runner."
        )
    run_config = json.loads(storage.read_text(config_path))
    g_log, d_log = flops.read_density_log(workdir)
    model = model_flops(_field(run_config, "model"))
    train = _train_kwargs(run_config)
    g_every, d_every = _run_schedule(run_config, g_log, d_log)
    out: dict[str, Any] = {
        "workdir": os.fspath(workdir), "g_update_every": g_every, "d_update_every": d_every
    }
    for convention in ("paper", "physical"):
        g_run_log = g_log
        if convention == "paper" and g_every is not None:
            g_run_log = flops.scheduled_log(g_log, g_every, train["iterations"])
        out[convention] = flops.training_flops(
            model.g_layers,
            model.d_layers,
            g_density_log=g_run_log,
            d_density_log=d_log,
            g_update_every=g_every,
            d_update_every=d_every,
            convention=convention,
            **train,
        )
    return out


def report(
    config: Any, workdir: str | None = None, convention: flops.Convention = "paper"
) -> dict[str, Any]:
    """The JSON object ``--json`` prints."""
    out = static_table(config, model_flops(_field(config, "model")), convention)
    if workdir is not None:
        out["run"] = run_report(workdir)
    return out


def format_table(config: Any, result: Mapping[str, Any]) -> str:
    """The human-readable table of ``report``."""
    train = _train_kwargs(config)
    lines = [
        f"Normalised training FLOPs ({result['convention']} convention): "
        f"{_field(config, 'model.name')}, "
        f"{train['iterations']} iterations, n_dis {train['n_dis']}, B_G {train['batch_g']}, "
        f"B_D {train['batch_d']}, {_field(config, 'sparsity.distribution')} layer densities",
        f"dense total: {result['dense_total']:.4e} FLOPs (= 100%)",
        "",
        f"{'method':<16}{'setting':<9}{'d_D':<10}"
        + "".join(f"{f'd_G={d:.0%}':>11}" for d in G_DENSITIES),
    ]
    for method in METHODS:
        for setting in SETTINGS:
            rows = [r for r in result["rows"] if (r["method"], r["setting"]) == (method, setting)]
            by_density = {r["g_density"]: r["normalised_percent"] for r in rows}
            d_d = "= d_G" if method == "static_balance" else f"{rows[0]['d_density']:.0%}"
            lines.append(
                f"{method:<16}{setting:<9}{d_d:<10}"
                + "".join(f"{by_density[d]:>10.2f}%" for d in G_DENSITIES)
            )
    if "run" in result:
        run = result["run"]
        lines += [
            "",
            f"run {run['workdir']}: "
            f"{run['paper']['normalised_percent']:.2f}% (paper convention), "
            f"{run['physical']['normalised_percent']:.2f}% (physical), "
            f"total {run['paper']['total']:.4e} FLOPs (paper)",
        ]
    return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    config: ml_collections.ConfigDict | None = _CONFIG.value
    if config is None:
        raise app.UsageError("Give a config file: --config=experiments/configs/cifar10.py")
    result = report(config, _WORKDIR.value, _CONVENTION.value)
    print(json.dumps(result) if _JSON.value else format_table(config, result))


if __name__ == "__main__":
    app.run(main)
