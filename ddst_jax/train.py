"""The experiment runner: ``train_and_evaluate(config, workdir)``.

Composes the pure pieces: data -> one jitted iteration (n_dis D steps, G step with BR, mask
updates, EMA) -> logging / samples / checkpoints. A run is resumable: re-running with the same
workdir restores every piece of state and the data position and continues the same trajectory;
a finished run is reported and left alone.

Workdir layout::

    config.json            the run's config
    checkpoints/<step>/    orbax checkpoints (state + JSON metadata)
    metrics.jsonl          every logged scalar (also in tensorboard/)
    density_log.jsonl      per-layer densities at the start and after every mask change
    samples/iter_XXXXXXX.png   EMA-G sample grids
    plots/br.png, plots/density.png, summary.json   written at the end
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import time
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ddst_jax import (
    balance,
    checkpoint,
    control,
    data,
    evaluation,
    memory,
    reporting,
    rundir,
    storage,
)
from ddst_jax import sparsity as sp
from ddst_jax.gan import registry, steps
from ddst_jax.gan import setup as setup_lib
from ddst_jax.gan.methods import MethodSpec, resolve_method
from ddst_jax.metrics import flops


class TrainingDiverged(RuntimeError):
    """A loss became non-finite; the last good checkpoint is kept."""


class TrainingCollapsed(TrainingDiverged):
    """A health check failed (losses pinned, no finite BR); the last good checkpoint is kept."""


say = reporting.say


DENSITY_LOG = "density_log.jsonl"
#: ``config.reference_mode``: the paper's code with its defects fixed, or exactly.
REFERENCE_MODES = ("fixed", "exact")


# ----------------------------------------------------------------------------- config


def method_spec(config: ml_collections.ConfigDict) -> MethodSpec:
    """The run's ``MethodSpec`` from ``config.sparsity`` / ``config.control``."""
    s = config.sparsity
    return resolve_method(
        s.method, g_density=s.g_density, setting=s.setting, d_mode=s.d_mode,
        d_density=s.d_density, d_max=config.control.d_max, regrow=s.regrow, scope=s.scope,
        policy=s.optimizer_policy)


def _require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ValueError(f"config.{field}: {message}")


def _check_finite(config: ml_collections.ConfigDict) -> None:
    for name, value in rundir.flatten(config.to_dict()).items():
        values = value if isinstance(value, list | tuple) else [value]
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"config.{name}: must be a finite number, got {value}.")


def _validate_control(config: ml_collections.ConfigDict, spec: MethodSpec) -> None:
    """``config.control``: the controller builds (with a stand-in D size) from its options."""
    c = config.control
    name = c.get("controller") or spec.d_control
    _require(name in control.CONTROLLERS, "control.controller",
             f"unknown controller {name!r}; registered: {', '.join(sorted(control.CONTROLLERS))}.")
    _require(spec.d_control != "static" or name == "static", "control.controller",
             f"{name!r} needs a method whose D density moves (adapt or dda), not "
             f"{spec.name!r}.")
    _require(c.d_update_every is None or int(c.d_update_every) > 0, "control.d_update_every",
             f"must be a positive number of iterations, got {c.d_update_every}.")
    try:
        control.make_controller(name, control_options(config), control.ControllerContext(
            n_weights=10_000, total_iterations=int(config.train.iterations),
            d_start=spec.d_density, cap=spec.d_cap, kind=spec.d_control))
    except ValueError as e:
        raise ValueError(f"config.control: {e}") from None


def validate_config(config: ml_collections.ConfigDict, device_count: int | None = None,
                    process_count: int | None = None) -> MethodSpec:
    """Check every field before anything is compiled; one ``ValueError`` naming the field."""
    _check_finite(config)
    t = config.train
    for name in ("iterations", "n_dis", "batch_size_g", "batch_size_d", "log_every",
                 "checkpoint_every", "sample_every", "num_samples", "max_to_keep"):
        _require(int(t[name]) > 0, f"train.{name}", f"must be a positive integer, got {t[name]}.")
    _require(0.0 <= t.ema_decay < 1.0, "train.ema_decay", f"must lie in [0, 1), got {t.ema_decay}.")
    _require(t.sample_bn_mode in ("train", "eval"), "train.sample_bn_mode",
             f"use 'train' or 'eval', got {t.sample_bn_mode!r}.")
    for name in ("lr_g", "lr_d"):
        _require(t[name] > 0, f"train.{name}", f"must be positive, got {t[name]}.")
    mode = config.get("reference_mode", "fixed")
    _require(mode in REFERENCE_MODES, "reference_mode",
             f"use one of {', '.join(map(repr, REFERENCE_MODES))}, got {mode!r}.")
    _require(t.get("d_forward", "separate") in steps.D_FORWARDS, "train.d_forward",
             f"use one of {', '.join(map(repr, steps.D_FORWARDS))}, got {t.get('d_forward')!r}.")
    try:
        size = registry.image_size(config.model.name)
    except ValueError as e:
        raise ValueError(f"config.model.name: {e}") from None
    try:  # widths, classes, z_dim: the model builds (nothing is initialised)
        registry.build(config.model.name, z_dim=config.model.z_dim, g_ch=config.model.g_ch,
                       d_ch=config.model.d_ch, num_classes=config.model.get("num_classes"))
    except ValueError as e:
        raise ValueError(f"config.model: {e}") from None
    scheme = config.model.get("init_scheme", "reference")
    schemes = registry.init_schemes(config.model.name)
    _require(scheme == "reference" or scheme in schemes, "model.init_scheme",
             f"use 'reference' (the authors' init for this model) or one of "
             f"{', '.join(map(repr, schemes))}, got {scheme!r}.")
    dtype = config.model.get("compute_dtype", "float32")
    _require(dtype in registry.COMPUTE_DTYPES, "model.compute_dtype",
             f"use one of {', '.join(map(repr, registry.COMPUTE_DTYPES))}, got {dtype!r}.")
    _require(config.data.image_size == size, "data.image_size",
             f"is {config.data.image_size} but model {config.model.name!r} works on {size}x{size} "
             f"images; set --config.data.image_size={size}.")
    try:
        spec = method_spec(config)
    except ValueError as e:
        raise ValueError(f"config.sparsity: {e}") from None
    s = config.sparsity
    _require(s.g_update_every > 0, "sparsity.g_update_every", "must be positive.")
    for name in ("drop_fraction", "drop_fraction_final"):
        _require(0.0 <= s[name] <= 1.0, f"sparsity.{name}", f"must lie in [0, 1], got {s[name]}.")
    _require(s.distribution in ("erk", "uniform"), "sparsity.distribution",
             f"use 'erk' or 'uniform', got {s.distribution!r}.")
    b = config.balance
    try:
        balance.window_size(b.window, b.br_every)
    except ValueError as e:
        raise ValueError(f"config.balance: {e}") from None
    _validate_control(config, spec)
    every = config.control.d_update_every
    if mode == "exact" and spec.d_control != "static" and every is not None:
        # The paper's queue holds 101 ratios at a decision only when the decision iteration
        # also measures BR; the exact mode's 101-entry window assumes it does.
        _require(every % b.br_every == 0, "control.d_update_every",
                 f"reference_mode='exact' needs a multiple of balance.br_every ({b.br_every}), "
                 f"got {every}.")
    h = config.get("health")
    if h is not None:
        _require(int(h.pinned_iterations) >= 0, "health.pinned_iterations",
                 f"must be >= 0 (0: off), got {h.pinned_iterations}.")
        _require(h.pinned_tolerance >= 0, "health.pinned_tolerance",
                 f"must be >= 0, got {h.pinned_tolerance}.")
    e = config.eval
    _require(e.every >= 0, "eval.every", f"must be >= 0 (0: no evaluation), got {e.every}.")
    if e.every:
        _require(e.num_samples > 1, "eval.num_samples", f"must be > 1, got {e.num_samples}.")
        _require(e.bn_mode in ("train", "eval"), "eval.bn_mode",
                 f"use 'train' or 'eval', got {e.bn_mode!r}.")
        _require(e.splits >= 1, "eval.splits", f"must be >= 1, got {e.splits}.")
    data.validate_config(config.data)
    wanted, visible = config.parallel.num_devices, jax.device_count()
    _require(0 <= wanted <= visible, "parallel.num_devices",
             f"{wanted} devices asked for, {visible} visible; use 0 for all of them.")
    devices = device_count or wanted or visible
    processes = jax.process_count() if process_count is None else process_count
    sizes = {"train.batch_size_g": t.batch_size_g, "train.batch_size_d": t.batch_size_d}
    if e.every:
        sizes["eval.batch_size"] = e.batch_size
    usable = usable_device_count(list(sizes.values()), min(devices, visible), processes)
    for name, size in sizes.items():
        # A run resumed on other hardware keeps its batch sizes (they are part of the run), so
        # the fix to name first is the device count, not the batch.
        on_fewer = (f"run on {usable} of them with --config.parallel.num_devices={usable}, or "
                    if usable else "")
        _require(size > 0 and size % devices == 0 and size % processes == 0, name,
                 f"{size} is not divisible by the {devices} devices / {processes} processes; "
                 f"{on_fewer}use a multiple of the device count (in a resumed run, with "
                 f"--change={name}).")
    return spec


def usable_device_count(batch_sizes: list[int], visible: int, processes: int = 1) -> int | None:
    """The most devices (<= ``visible``, a multiple of ``processes``) that split every batch.

    Data parallelism gives each device ``batch / devices`` examples, so every global batch size
    must be a multiple of the device count. None if only a batch change would do.

    >>> usable_device_count([12, 64], visible=8)
    4
    """
    return next((n for n in range(visible, 0, -1)
                 if n % processes == 0 and all(b > 0 and b % n == 0 for b in batch_sizes)), None)


# ----------------------------------------------------------------------------- setup


def _adam(lr: float, config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    return optax.adam(lr, b1=config.train.beta1, b2=config.train.beta2)


def control_options(config: ml_collections.ConfigDict) -> control.ControlOptions:
    """``config.control`` (and the reference mode) as ``control.ControlOptions``."""
    c, b = config.control, config.balance
    exact = config.get("reference_mode", "fixed") == "exact"
    # Fields of the optional controllers: configs written before they existed (a resumed
    # run's config.json) lack them, so they fall back to ControlOptions' defaults.
    optional = {name: c.get(name, getattr(control.ControlOptions, name))
                for name in ("gain", "max_step", "ratio_low", "ratio_high", "reference_br",
                             "calibration_decisions")}
    return control.ControlOptions(
        controller=c.get("controller") or None, every=c.d_update_every, band_low=c.band_low,
        band_high=c.band_high, delta=c.delta, d_min=c.d_min, d_max=c.d_max, **optional,
        reference_exact=exact,
        min_measurements=balance.window_size(b.window, b.br_every) if exact else 0)


def build_setup(config: ml_collections.ConfigDict, spec: MethodSpec) -> setup_lib.GanSetup:
    """The run description of a config (``gan.setup.build_setup``).

    ``config.reference_mode="exact"`` turns on everything that reproduces the paper's code
    where ddst_jax deliberately differs (docs/reference.md): train-mode BR forwards and
    Bernoulli masks, a window of ``window // br_every + 1`` ratios with decisions from
    ``window // br_every`` on, no denominator guard, and the controller's float arithmetic.
    """
    pair = registry.build(config.model.name, z_dim=config.model.z_dim, g_ch=config.model.g_ch,
                          d_ch=config.model.d_ch, num_classes=config.model.get("num_classes"),
                          compute_dtype=config.model.get("compute_dtype", "float32"),
                          init_scheme=config.model.get("init_scheme", "reference"))
    t, s, b = config.train, config.sparsity, config.balance
    exact = config.get("reference_mode", "fixed") == "exact"
    entries = balance.window_size(b.window, b.br_every)
    return setup_lib.build_setup(
        pair,
        setup_lib.TrainSpec(
            g_tx=_adam(t.lr_g, config), d_tx=_adam(t.lr_d, config), batch_g=t.batch_size_g,
            batch_d=t.batch_size_d, n_dis=t.n_dis, total_iterations=t.iterations,
            ema_decay=t.ema_decay, unroll_d_steps=t.get("unroll_d_steps", True),
            d_forward=t.get("d_forward", "separate")),
        setup_lib.SparsitySpec(
            spec, g_update_every=s.g_update_every, drop_fraction=s.drop_fraction,
            drop_fraction_final=s.drop_fraction_final, distribution=s.distribution,
            erk_power=s.erk_power, mask_sampling="bernoulli" if exact else "exact"),
        setup_lib.BalanceSpec(
            every=b.br_every, window=entries + 1 if exact else entries,
            eps=0.0 if exact else b.eps, train_mode_forwards=exact, ignore_nonfinite=not exact),
        control_options(config))


def initialize_distributed(parallel: ml_collections.ConfigDict) -> None:
    """``jax.distributed.initialize`` with the config's explicit cluster spec, if any.

    Must run before any JAX computation. CPU processes talk through gloo collectives.
    """
    if jax.distributed.is_initialized():
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=parallel.coordinator_address,
                               num_processes=parallel.num_processes,
                               process_id=parallel.process_id)


def make_mesh(num_devices: int = 0) -> jax.sharding.Mesh:
    """A 1-D data-parallel mesh ('data') over the first ``num_devices`` devices (0: all)."""
    devices = jax.devices()
    n = len(devices) if num_devices in (0, None) else num_devices
    if not 1 <= n <= len(devices):
        raise ValueError(f"config.parallel.num_devices={num_devices}: only {len(devices)} "
                         "devices are visible; use 0 for all of them.")
    # Auto axes: XLA propagates the batch sharding through the step (sharding in types is not
    # needed for pure data parallelism).
    return jax.sharding.Mesh(np.array(devices[:n]), ("data",),
                             axis_types=(jax.sharding.AxisType.Auto,))


def compile_fns(setup: setup_lib.GanSetup, config: ml_collections.ConfigDict, mesh):
    """Jitted init and iteration with the state replicated and the batch sharded on 'data'."""
    replicated = NamedSharding(mesh, P())
    init = jax.jit(functools.partial(steps.init_state, setup), out_shardings=replicated)
    iterate = jax.jit(
        functools.partial(steps.train_iteration, setup, z_sharding=NamedSharding(mesh, P("data"))),
        in_shardings=(replicated, NamedSharding(mesh, P(None, "data")),
                      NamedSharding(mesh, P(None, "data"))),
        out_shardings=(replicated, replicated),
        donate_argnums=0)
    return init, iterate, replicated


# ----------------------------------------------------------------------------- logging


class HealthCheck:
    """Stops a run that has collapsed (``config.health``), on the host at log points.

    * Pinned losses: loss/d and loss/g both stay within ``pinned_tolerance`` (relative to
      1 + |value|) of their values at some iteration for ``pinned_iterations`` iterations
      (e.g. an exploding D learning rate pins the hinge losses at 2 and 0).
    * No finite BR: the BR window is full and every ratio in it is non-finite (c == b: D scores
      real and fake images alike), so BR and the controller are blind.
    Raises ``TrainingCollapsed``; the iteration's state is not saved.
    """

    def __init__(self, config: ml_collections.ConfigDict | None, window_size: int):
        self.pinned = int(config.pinned_iterations) if config is not None else 0
        self.tolerance = float(config.pinned_tolerance) if config is not None else 0.0
        self.nonfinite_br = bool(config.nonfinite_br) if config is not None else False
        self.window_size = window_size
        self._since: tuple[int, float, float] | None = None

    def _close(self, a: float, b: float) -> bool:
        return abs(a - b) <= self.tolerance * (1.0 + abs(b))

    def check(self, iteration: int, m: Mapping[str, Any]) -> None:
        d, g = float(m["loss/d"]), float(m["loss/g"])
        if self.pinned:
            if self._since is None or not (self._close(d, self._since[1])
                                           and self._close(g, self._since[2])):
                self._since = (iteration, d, g)
            elif iteration - self._since[0] >= self.pinned:
                raise TrainingCollapsed(
                    f"The run has collapsed: loss/d stayed at {d + 0.0:.6g} and loss/g at "
                    f"{g + 0.0:.6g} from "
                    f"iteration {self._since[0]} to {iteration}. Stopped without saving this "
                    "state; checkpoints from before the collapse are kept (a recent one may "
                    "already be collapsed). Lower the learning rates or change the seed; "
                    "health.pinned_iterations=0 turns this check off.")
        if (self.nonfinite_br and bool(m["br/window_full"])
                and int(m["br/ignored"]) >= self.window_size):
            raise TrainingCollapsed(
                f"The run has collapsed: at iteration {iteration} every ratio in the full BR "
                f"window ({self.window_size} measurements) is non-finite (D scores real and fake "
                "images alike, |c - b| below balance.eps), so BR and the density controller are "
                "blind. Stopped without saving this state; earlier checkpoints are kept. Lower "
                "the learning rates or change the seed; health.nonfinite_br=False turns this "
                "check off.")


class _Logger:
    """Batches per-iteration device metrics and writes them at log points (one host sync)."""

    def __init__(self, writer: reporting.MetricWriter, workdir: str, setup: setup_lib.GanSetup,
                 g_names: list[str], d_names: list[str], g_sizes: list[int], d_sizes: list[int],
                 resume_step: int | None, health: ml_collections.ConfigDict | None = None):
        self.writer, self.setup = writer, setup
        self.health = HealthCheck(health, setup.balance.window)
        self.g_names, self.d_names = g_names, d_names
        self.g_sizes, self.d_sizes = np.array(g_sizes), np.array(d_sizes)
        self.pending: list[tuple[int, dict]] = []
        self.last_counts: tuple | None = None
        self.last: dict[str, float] = {}
        self.density_path = storage.join(workdir, DENSITY_LOG)
        self._density: storage.Appender | None = None
        if writer.enabled:
            reporting.truncate_jsonl(self.density_path, -1 if resume_step is None else resume_step)
            rows = reporting.read_jsonl(self.density_path) if storage.exists(
                self.density_path) else []
            if rows:
                last = rows[-1]
                self.last_counts = (tuple(last["g_counts"]), tuple(last["d_counts"]))
            self._density = storage.Appender(self.density_path)
        self.tick = time.perf_counter()
        self.tick_step: int | None = None

    def add(self, iteration: int, metrics: dict) -> None:
        self.pending.append((iteration, metrics))

    def _density_row(self, iteration: int, g_counts, d_counts,
                     changed: tuple[str, ...] = ()) -> None:
        """Append a row when a mask update ran (``changed``) or per-layer counts moved.

        The format is ``ddst_jax.metrics.flops``'s (``changed`` lists the networks whose masks
        were updated, so a layer-scope drop-and-grow that keeps every count still opens a new
        FLOPs interval), plus the raw counts used to resume.
        """
        key = (tuple(int(c) for c in g_counts), tuple(int(c) for c in d_counts))
        if self.last_counts is not None:
            moved = tuple(net for net, a, b in zip("gd", key, self.last_counts, strict=True)
                          if a != b)
            changed = tuple(sorted(set(changed) | set(moved)))
        else:
            changed = ("g", "d")
        if not changed:
            return
        self.last_counts = key
        if not self.writer.enabled:
            return
        line = flops.density_log_row(
            iteration,
            {n: c / s for n, c, s in zip(self.g_names, key[0], self.g_sizes, strict=True)},
            {n: c / s for n, c, s in zip(self.d_names, key[1], self.d_sizes, strict=True)},
            changed,
            extra={"step": iteration, "g_counts": list(key[0]), "d_counts": list(key[1])})
        self._density.write(line + "\n")

    def sync(self) -> None:
        """Stores the logs written so far (a bucket's are uploaded); call before a checkpoint,
        so a resume from it finds every row up to its step."""
        if self._density is not None:
            self._density.flush()
        self.writer.flush()

    def close(self) -> None:
        if self._density is not None:
            self._density.close()
            self._density = None

    def log_initial(self, iteration: int, state: steps.TrainState) -> None:
        g = jax.device_get(sp.layer_counts(state.g_masks, self.setup.model.is_maskable))
        d = jax.device_get(sp.layer_counts(state.d_masks, self.setup.model.is_maskable))
        self._density_row(iteration, g, d)
        self.tick_step = iteration

    def flush(self) -> dict[str, float]:
        """Write pending metrics; raise ``TrainingDiverged`` on a non-finite loss."""
        if not self.pending:
            return self.last
        host = jax.device_get([m for _, m in self.pending])
        its = [it for it, _ in self.pending]
        self.pending = []
        for it, m in zip(its, host, strict=True):
            for name in ("loss/d", "loss/g"):
                if not math.isfinite(float(m[name])):
                    raise TrainingDiverged(
                        f"{name} became {float(m[name])} at iteration {it}. The run stopped "
                        "without saving this state; the last good checkpoint is kept. Lower the "
                        "learning rates or change the seed, then re-run to resume from it.")
            self.health.check(it, m)
            if not math.isnan(float(m["br/ratio"])):
                self.writer.write_scalars(it, {"br/ratio": float(m["br/ratio"])})
            updated = tuple(net for net, ran in (
                ("g", self.setup.sparsity.method.g_dynamic and sp.is_update_step(
                    it, self.setup.sparsity.g_update_every, self.setup.train.total_iterations)),
                ("d", int(m["control/action"]) != control.NONE)) if ran)
            self._density_row(it, m["g_counts"], m["d_counts"], updated)
        last_it, last = its[-1], host[-1]
        now = time.perf_counter()
        elapsed_its = last_it - (self.tick_step if self.tick_step is not None else its[0] - 1)
        rate = elapsed_its / max(now - self.tick, 1e-9)
        self.tick, self.tick_step = now, last_it
        scalars = {
            "loss/d": float(np.mean([m["loss/d"] for m in host])),
            "loss/g": float(np.mean([m["loss/g"] for m in host])),
            "br/windowed": float(last["br/windowed"]),
            "br/ignored": int(last["br/ignored"]),
            "density/g": float(last["density/g"]),
            "density/d": float(last["density/d"]),
            "perf/it_per_s": rate,
        }
        for prefix, names, counts, sizes in (
                ("density/g/", self.g_names, last["g_counts"], self.g_sizes),
                ("density/d/", self.d_names, last["d_counts"], self.d_sizes)):
            for n, c, s in zip(names, counts, sizes, strict=True):
                scalars[prefix + n] = float(c) / float(s)
        self.writer.write_scalars(last_it, {k: v for k, v in scalars.items()
                                            if not (isinstance(v, float) and math.isnan(v))})
        self.last = scalars
        return scalars


# ----------------------------------------------------------------------------- samples


def _sample_grid(setup: setup_lib.GanSetup, state: steps.TrainState, z: jax.Array,
                 bn_mode: str) -> np.ndarray:
    # Conditional models: classes in order, so each grid row/column walks through the labels.
    classes = setup.model.num_classes
    y = jnp.arange(z.shape[0], dtype=jnp.int32) % classes if classes else None
    images = steps.generate(setup, state.g_ema, state.g_state, state.g_masks, z, y,
                            train=bn_mode == "train")
    return np.asarray(jax.device_get(images))


def _save_samples(workdir: str, writer: reporting.MetricWriter, iteration: int,
                  images: np.ndarray) -> str | None:
    if not writer.enabled:
        return None
    path = storage.join(workdir, "samples", f"iter_{iteration:07d}.png")
    reporting.save_image_grid(images, path, nrow=int(math.ceil(math.sqrt(len(images)))))
    writer.write_images(iteration, {"samples/ema": reporting.to_uint8(images)})
    return path


# ----------------------------------------------------------------------------- main loop


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       features_fn: evaluation.FeaturesFn | None = None,
                       allow_changes: Iterable[str] = (),
                       stop: checkpoint.StopFlag | None = None) -> dict[str, Any]:
    """Train (or resume, or report a finished run) in ``workdir``; returns the summary dict.

    The run owns ``workdir`` while it runs (``rundir.RunLock``; a second run refuses). A resume
    must use the configuration the run was started with, except fields named in
    ``allow_changes`` (e.g. ``("train.iterations",)`` to extend a run, finished or not); every
    change is recorded in ``config_history.jsonl``. SIGINT/SIGTERM at any point (even during
    the first compile) stop the run cleanly: after the current iteration, with a checkpoint.

    Args:
      config: see ``experiments/configs/cifar10.py``.
      workdir: the run directory.
      features_fn: replaces the FID Inception network (tests use a cheap stand-in); by default
        the weights of ``config.eval.inception_weights`` (or the cache / download) are used.
      allow_changes: config fields (or sections) allowed to differ from the run's on resume.
      stop: a stop flag the caller installed earlier (an entry point does, before its heavy
        imports); by default one is installed here and removed on return.
    """
    if config.parallel.distributed:
        initialize_distributed(config.parallel)
    # Before anything slow: a Ctrl-C during start-up or the first compile only sets this flag
    # (an interrupt inside XLA's compiler threads would otherwise crash the interpreter).
    own_flag = stop is None
    stop = checkpoint.install_stop_handler() if own_flag else stop
    try:
        spec = validate_config(config)
        workdir = rundir.prepare_workdir(workdir)
        lock = rundir.acquire_for_all_processes(workdir)
        try:
            if lock is not None and lock.stale_message():
                say(lock.stale_message())
            return _run(config, spec, workdir, stop, features_fn, tuple(allow_changes))
        finally:
            if lock is not None:
                lock.release()
    finally:
        if own_flag:
            stop.close()


def _stopped_early(iteration: int, stop: checkpoint.StopFlag) -> dict[str, Any]:
    say(f"Stopped (signal {stop.signum}) before training iteration {iteration + 1}; nothing new "
        "was written. Re-run the same command to start.")
    return {"finished": False, "iteration": iteration, "stopped_before_training": True}


def _resume_changes(config, meta: Mapping[str, Any], workdir: str,
                    allow_changes: tuple[str, ...]) -> dict[str, list[Any]]:
    """The run's config changes on this resume (``ConfigMismatch`` if not allowed)."""
    old = meta.get("config")
    if old is None:  # checkpoints from before the config was stored with them
        path = storage.join(workdir, "config.json")
        if not storage.exists(path):
            say("Cannot check this resume's configuration: the checkpoint has no copy of it "
                "and config.json is missing.")
            return {}
        old = json.loads(storage.read_text(path))
    new = json.loads(config.to_json_best_effort())
    return rundir.check_resume(old, new, allowed=allow_changes, iteration=meta.get("iteration"))


def _run(config, spec, workdir: str, stop: checkpoint.StopFlag,
         features_fn: evaluation.FeaturesFn | None,
         allow_changes: tuple[str, ...]) -> dict[str, Any]:
    primary = reporting.is_primary()
    source = data.load_source(config.data, seed=config.seed)
    setup = build_setup(config, spec)
    mesh = make_mesh(config.parallel.num_devices)
    init_fn, iterate, replicated = compile_fns(setup, config, mesh)
    abstract = checkpoint.abstract_state(jax.eval_shape(init_fn, jax.random.key(config.seed)),
                                         sharding=replicated)
    evaluator = None
    if config.eval.every:  # weights and reference statistics before anything is trained
        features_fn = features_fn or evaluation.inception_features_fn(
            config.eval.inception_weights)
        evaluator = evaluation.Evaluator(
            setup, mesh, features_fn,
            evaluation.reference_statistics(config, workdir, features_fn, mesh, source),
            num_samples=config.eval.num_samples, batch_size=config.eval.batch_size,
            bn_mode=config.eval.bn_mode, splits=config.eval.splits, seed=config.seed + 2)
    ckpt = checkpoint.Checkpointer(workdir, max_to_keep=config.train.max_to_keep)
    restored = ckpt.restore(abstract)
    total = config.train.iterations
    if restored is not None:
        try:
            changes = _resume_changes(config, restored.metadata, workdir, allow_changes)
        except rundir.ConfigMismatch:
            ckpt.close()
            raise
        done = int(restored.metadata["iteration"])
        if total < done:
            ckpt.close()
            raise rundir.ConfigMismatch(
                f"train.iterations={total} is below the {done} iterations this run has done: "
                "a run cannot be shortened; use the run's value or a fresh --workdir.")
        if restored.metadata.get("finished") and total == done:
            ckpt.close()
            say(f"The run in {workdir} is finished (iteration {done}); nothing to do. To "
                "train it longer, raise train.iterations and add --change=train.iterations.")
            summary_path = storage.join(workdir, "summary.json")
            if storage.exists(summary_path):
                return json.loads(storage.read_text(summary_path))
            return {"finished": True, "iteration": done}
        if primary and changes:
            rundir.record_changes(workdir, done, changes)
            storage.write_text(storage.join(workdir, "config.json"),
                               config.to_json_best_effort(indent=2))
            say("Configuration changes recorded in config_history.jsonl: " + "; ".join(
                f"{k}: {v[0]!r} -> {v[1]!r}" for k, v in changes.items()))
    if _stop_requested(stop, 0, 1):  # a signal during start-up (all processes agree)
        ckpt.close()
        return _stopped_early(0 if restored is None else int(restored.metadata["iteration"]),
                              stop)
    if restored is None:
        state = init_fn(jax.random.key(config.seed))
        start = 0
        if primary:
            storage.write_text(storage.join(workdir, "config.json"),
                               config.to_json_best_effort(indent=2))
    else:
        state, meta = restored
        start = int(meta["iteration"])
        verb = "Extending the finished run" if meta.get("finished") else "Resuming"
        say(f"{verb} from iteration {start} in {workdir}.")

    t, total = config.train, config.train.iterations
    writer = reporting.MetricWriter(workdir, resume_step=start if restored else -1)
    logger = _Logger(writer, workdir, setup, steps.leaf_names(state.g_masks, setup),
                     steps.leaf_names(state.d_masks, setup), steps.leaf_sizes(state.g_masks, setup),
                     steps.leaf_sizes(state.d_masks, setup), start if restored else None,
                     health=config.get("health"))
    logger.log_initial(start, state)
    sample_z = jax.device_put(
        jax.random.normal(jax.random.key(config.seed + 1), (t.num_samples, setup.model.z_dim)),
        replicated)

    config_dict = json.loads(config.to_json_best_effort())

    def metadata(iteration: int, finished: bool) -> dict[str, Any]:
        return {"iteration": iteration, "data_position": iteration * t.n_dis,
                "finished": finished, "config_hash": _config_hash(config),
                "config": config_dict}

    batches = data.BatchIterator(source, start * t.n_dis, t.batch_size_d, seed=config.seed,
                                 flip=config.data.flip, stack=t.n_dis,
                                 prefetch=config.data.prefetch, mesh=mesh)
    bar = reporting.progress_bar(total, initial=start, enabled=primary and t.progress_bar)
    # XLA's in-process CPU collectives can deadlock when many multi-device steps are queued
    # ("Expected N threads to join the rendezvous"); on CPU meshes, wait for each step.
    sync_each_step = jax.default_backend() == "cpu" and mesh.size > 1
    iteration, stopped, t_start = start, False, time.perf_counter()
    evals: list[dict[str, float]] = []
    try:
        with batches:
            while iteration < total:
                _, batch = next(batches)
                state, metrics = iterate(state, batch["image"], batch["label"])
                if sync_each_step:
                    jax.block_until_ready(metrics)
                iteration += 1
                logger.add(iteration, metrics)
                bar.update(1)
                end = iteration == total
                if iteration % t.log_every == 0 or end or iteration % t.checkpoint_every == 0:
                    scalars = logger.flush()
                    bar.set_postfix(d=f"{scalars['density/d']:.3f}",
                                    br=f"{scalars['br/windowed']:.2f}", refresh=False)
                if iteration % t.sample_every == 0 or end:
                    _save_samples(workdir, writer, iteration,
                                  _sample_grid(setup, state, sample_z, t.sample_bn_mode))
                if evaluator and (iteration % config.eval.every == 0 or end):
                    result = evaluator(state)
                    writer.write_scalars(iteration, result)
                    evals.append({"iteration": iteration, **result})
                    ckpt.save_best(iteration, state, result["eval/fid"],
                                   metadata(iteration, end))
                if end or iteration % t.checkpoint_every == 0:
                    logger.sync()
                    ckpt.save(iteration, state, metadata(iteration, end))
                if _stop_requested(stop, iteration, t.log_every):
                    logger.flush()
                    logger.sync()
                    ckpt.save(iteration, state, metadata(iteration, False), force=True)
                    stopped = True
                    say(f"Stopped (signal {stop.signum}): saved iteration {iteration} in "
                        f"{workdir}; re-run the same command to resume.")
                    break
    finally:
        bar.close()
        ckpt.wait_until_finished()
        best_fid = (ckpt.best_value(), ckpt.best_step())
        ckpt.close()
        logger.close()
        writer.flush()
    wall = time.perf_counter() - t_start
    summary = _summary(config, spec, setup, state, logger.last, iteration, total, stopped,
                       wall, iteration - start)
    summary["config_history"] = rundir.read_history(workdir)
    if evals:
        summary["evaluations_this_session"] = evals
    if best_fid[0] is not None:  # over the whole run, from the best-checkpoint slot
        summary["best_fid"], summary["best_fid_iteration"] = best_fid
    if primary and not stopped:
        summary["plots"] = reporting.plot_curves(
            writer.jsonl_path, storage.join(workdir, "plots"),
            br_band=getattr(setup.control, "band", None))
        reporting.write_summary(storage.join(workdir, "summary.json"), summary)
    writer.close()
    return summary


def _stop_requested(stop: checkpoint.StopFlag, iteration: int, every: int) -> bool:
    """Whether to stop now. Multi-host, every process must stop at the same iteration, which
    takes a collective (a host round trip that waits for the queued steps), so processes agree
    only every ``every`` iterations; a single process checks its flag every iteration."""
    if jax.process_count() == 1:
        return stop.requested
    return iteration % every == 0 and stop.requested_anywhere()


def _config_hash(config: ml_collections.ConfigDict) -> str:
    return hashlib.sha256(config.to_json_best_effort(sort_keys=True).encode()).hexdigest()[:16]


def _summary(config, spec, setup, state, last: Mapping[str, float], iteration: int, total: int,
             stopped: bool, wall_s: float, trained: int) -> dict[str, Any]:
    return {
        "method": dataclasses.asdict(spec),
        "iteration": iteration,
        "iterations": total,
        "finished": iteration >= total and not stopped,
        "final": dict(last),
        "d_count": int(state.controller.count),
        # The controller's whole state (e.g. the relative band's measured BR_ref).
        "controller": ({k: np.asarray(v).tolist() for k, v in state.controller._asdict().items()}
                       if hasattr(state.controller, "_asdict") else None),
        "d_maskable": setup_lib.d_maskable_count(setup.model),
        "g_density": float(sp.density(state.g_masks, is_maskable=setup.model.is_maskable)),
        "d_density": float(sp.density(state.d_masks, is_maskable=setup.model.is_maskable)),
        "wall_seconds": wall_s,
        "iterations_this_session": trained,
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "backend": jax.default_backend(),
        # This process's high-water marks in MiB (a resumed run: this session's): host peak RSS;
        # device allocator peak / in use on GPU and TPU (None on CPU, which does not report it).
        "memory": memory.memory_report(),
        "config": json.loads(config.to_json_best_effort()),
    }
