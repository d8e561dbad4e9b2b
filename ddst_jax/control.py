"""D-density controllers: a small protocol, a registry, the paper's controllers, and the step
that turns a decision into new masks (docs/method.md section 6).

A **controller** is a hashable object with two pure, jittable functions:

- ``init(d_count) -> state``: its state pytree (checkpointed with the run), from D's active count;
- ``step(state, window, iteration) -> (state, Decision)``: after iteration ``iteration``
  (1-based), from the BR window (``balance.BRWindow``).

``CONTROLLERS`` maps config names to factories ``(ControlOptions, ControllerContext) ->
controller``; ``register(name)`` adds one, ``make_controller`` builds one. A ``Decision`` is an
action and D's target active count, and ``apply_decision`` (no GAN code) turns it into a
``sparsity.MaskUpdate``:

- ``GROW``: ``resize`` up to ``target_count`` by the grow score (|dL_D/d(w*m)|); new weights 0;
- ``PRUNE``: ``resize`` down to ``target_count`` by the drop score (|w|);
- ``DST``: one drop-and-grow update at constant density (the strict setting at its cap);
- ``NONE``: nothing.

The paper's controllers (``"static"``, ``"relaxed"``, ``"strict"``, ``"dda"``: ``DensityControl``)
track densities as integer active counts of D's maskable weights, never as floats compared for
equality: a move changes the count by exactly ``round(delta * N_D)`` weights, clipped to
``[round(d_min * N_D), round(cap * N_D)]``; a move that would stop less than half a step short
of the cap or floor goes all the way to it (no near-empty moves caused by rounding). They decide
only on decision steps (every ``every`` iterations, never at the final one) and only once the BR
window is full.

``make_density_control(..., reference_exact=True)`` instead reproduces the paper's code
exactly: it tracks d_D as the float the code keeps (``d +- delta`` in float64, clipped, so 0.1 +
8 * 0.05 is 0.49999999999999994), grows to ``floor(d * N_D)`` and prunes to ``ceil(d * N_D)``
active weights, treats "at the cap" as float equality (so a strict run can take a one-weight
step before its first D-DST update), decides once the window holds ``min_measurements``
ratios, and compares the plain mean of the window, non-finite ratios included (an inf ratio
reads as "D too weak"). The float64 arithmetic runs on the host when the control is built: the
reachable densities form a small table, and the jitted step only indexes it.

``ProportionalControl`` (``"proportional"``) is the worked example of a new controller: see
docs/design.md, "Adding a controller". ``RelativeBandControl`` (``"relative"``) goes beyond the
paper: the method's controller with a band measured from the run (docs/method.md section 9).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from ddst_jax import balance
from ddst_jax import sparsity as sp
from ddst_jax.sparsity.masks import count_for_density, validate_density
from ddst_jax.sparsity.schedules import is_update_step

PyTree = Any

NONE, GROW, PRUNE, DST = 0, 1, 2, 3
ACTION_NAMES = ("none", "grow", "prune", "dst")
KINDS = ("static", "relaxed", "strict", "dda")

#: Per-kind defaults of (band_low, band_high, every, cap); ``None`` cap means ``d_max``.
_KIND_DEFAULTS = {
    "static": (0.45, 0.55, 1000, 1.0),
    "relaxed": (0.45, 0.55, 1000, 1.0),
    "strict": (0.45, 0.55, 2000, None),
    "dda": (0.50, 0.65, 2000, 1.0),
}


class _CountBandController:
    """What controllers share whose state is D's active count and who decide by a band."""

    @property
    def band(self) -> tuple[float, float]:
        """(B-, B+)."""
        return self.band_low, self.band_high

    def init(self, d_count: int | jax.Array) -> ControllerState:
        """The state at D's current active count (level 0: the starting density)."""
        return ControllerState(jnp.asarray(d_count, jnp.int32), jnp.zeros((), jnp.int32))


@dataclasses.dataclass(frozen=True)
class DensityControl(_CountBandController):
    """Static (hashable) controller configuration, in integer counts of D's maskable weights.

    >>> c = make_density_control('relaxed', 1000, 10_000)
    >>> c.delta_count, c.min_count, c.cap_count, hash(c) == hash(dataclasses.replace(c))
    (50, 50, 1000, True)
    """

    kind: str
    n_weights: int
    total_iterations: int
    every: int
    band_low: float
    band_high: float
    delta_count: int
    min_count: int
    cap_count: int
    # Measurements the window must hold before a decision; 0: the window's capacity.
    min_measurements: int = 0
    # reference_exact: the float densities the paper's code can reach and their moves.
    reference_levels: ReferenceLevels | None = None

    def step(self, state: ControllerState, window: balance.BRWindow,
             iteration: int | jax.Array) -> tuple[ControllerState, Decision]:
        """``controller_step`` with this configuration."""
        return controller_step(state, window, iteration, self)

    @property
    def dst_at_cap(self) -> bool:
        """Strict setting: at the cap a high BR triggers a D drop-and-grow update.

        >>> make_density_control('strict', 1000, 10_000).dst_at_cap
        True
        """
        return self.kind == "strict"


@dataclasses.dataclass(frozen=True)
class ReferenceLevels:
    """The densities the paper's code reaches from d_start, with its float64 arithmetic.

    Level i has density ``density[i]`` (a Python float); a grow decision moves it to level
    ``grow_to[i]`` (-1: no move, e.g. at the cap) with ``floor(d * N)`` active weights, a prune
    decision to ``prune_to[i]`` with ``ceil(d * N)``; ``at_cap[i]`` is the code's float equality
    ``d == cap`` (the strict setting's D-DST condition). Level 0 is d_start.
    """

    density: tuple[float, ...]
    grow_to: tuple[int, ...]
    prune_to: tuple[int, ...]
    floor_count: tuple[int, ...]
    ceil_count: tuple[int, ...]
    at_cap: tuple[bool, ...]


def reference_levels(d_start: float, n_weights: int, *, delta: float, d_min: float,
                     cap: float, max_levels: int = 10_000) -> ReferenceLevels:
    """Every density the paper's controller reaches from ``d_start`` (host float64).

    Its moves: grow ``max(min(1, d + delta), d_min)``, then ``min(., cap)`` below a cap of 1;
    prune ``min(max(d_min, d - delta), 1)``; a move to the same float is no move; growing is
    allowed only while ``d < cap``.

    >>> lv = reference_levels(0.1, 16880, delta=0.05, d_min=0.05, cap=0.5)
    >>> i = 0
    >>> for _ in range(8):
    ...     i = lv.grow_to[i]
    >>> lv.density[i], lv.floor_count[i], lv.at_cap[i], lv.density[lv.grow_to[i]]
    (0.49999999999999994, 8439, False, 0.5)
    """
    def grow(d: float) -> float:
        t = max(min(1.0, d + delta), d_min)
        return min(t, cap) if cap < 1.0 else t

    def prune(d: float) -> float:
        return min(max(d_min, d - delta), 1.0)

    index: dict[float, int] = {float(d_start): 0}
    order, moves = [float(d_start)], []
    for d in order:  # breadth-first; `order` grows while it is walked
        targets = []
        for target, allowed in ((grow(d), d < cap), (prune(d), True)):
            if not allowed or target == d:
                targets.append(-1)
                continue
            if target not in index:
                if len(order) >= max_levels:
                    raise ValueError("The reference controller's densities do not close; "
                                     "check delta, d_min and the cap.")
                index[target] = len(order)
                order.append(target)
            targets.append(index[target])
        moves.append(targets)
    counts = [d * n_weights for d in order]  # float64, as the paper's code computes them
    return ReferenceLevels(
        density=tuple(order),
        grow_to=tuple(m[0] for m in moves),
        prune_to=tuple(m[1] for m in moves),
        floor_count=tuple(math.floor(c) for c in counts),
        ceil_count=tuple(math.ceil(c) for c in counts),
        at_cap=tuple(d == cap for d in order),
    )


def make_density_control(
    kind: str,
    n_weights: int,
    total_iterations: int,
    *,
    band: tuple[float, float] | None = None,
    every: int | None = None,
    delta: float = 0.05,
    d_min: float = 0.05,
    d_max: float = 0.5,
    cap: float | None = None,
    reference_exact: bool = False,
    d_start: float | None = None,
    min_measurements: int = 0,
) -> DensityControl:
    """Build a controller config; unset fields take the kind's defaults (the paper's).

    Args:
      kind: ``"static"``, ``"relaxed"`` (ADAPT, cap 1.0, dT_D 1000), ``"strict"`` (ADAPT, cap
        ``d_max``, dT_D 2000, D-DST at the cap) or ``"dda"`` (band [0.50, 0.65], dT_D 2000).
      n_weights: N_D, the number of maskable D weights.
      total_iterations: the run's length (no decision at the final iteration).
      band: (B-, B+); BR <= B- lowers d_D, BR >= B+ raises it.
      every: dT_D in iterations.
      delta: density step.
      d_min: density floor.
      d_max: the strict setting's cap.
      cap: explicit cap overriding the kind's.
      reference_exact: reproduce the paper's code exactly (module docstring); needs
        ``d_start``.
      d_start: D's starting density (only read with ``reference_exact``).
      min_measurements: BR measurements needed before a decision; 0: a full window.

    >>> c = make_density_control('strict', 1000, 10_000)
    >>> c.every, (c.band_low, c.band_high), c.cap_count  # cap = d_max = 0.5
    (2000, (0.45, 0.55), 500)
    """
    if kind not in KINDS:
        raise ValueError(f"Unknown controller `kind` {kind!r}; use one of {KINDS}.")
    low, high, default_every, default_cap = _KIND_DEFAULTS[kind]
    band = (low, high) if band is None else tuple(band)
    if not band[0] < band[1]:
        raise ValueError(f"`band` must satisfy B- < B+, got {band}.")
    every = default_every if every is None else int(every)
    if every <= 0:
        raise ValueError(f"`every` (dT_D) must be positive, got {every}.")
    validate_density(delta, "delta")
    validate_density(d_min, "d_min")
    if cap is None:
        cap = validate_density(d_max, "d_max") if default_cap is None else default_cap
    else:
        cap = validate_density(cap, "cap")
    if d_min > cap:
        raise ValueError(f"`d_min` ({d_min}) must not exceed the cap ({cap}).")
    if n_weights <= 0:
        raise ValueError(f"`n_weights` must be positive, got {n_weights}.")
    if min_measurements < 0:
        raise ValueError(f"`min_measurements` must be >= 0, got {min_measurements}.")
    levels = None
    if reference_exact and kind != "static":
        if d_start is None:
            raise ValueError("`reference_exact` needs `d_start`, D's starting density.")
        levels = reference_levels(validate_density(d_start, "d_start"), int(n_weights),
                                  delta=delta, d_min=d_min, cap=cap)
    return DensityControl(
        kind=kind,
        n_weights=int(n_weights),
        total_iterations=int(total_iterations),
        every=every,
        band_low=float(band[0]),
        band_high=float(band[1]),
        delta_count=count_for_density(delta, n_weights),
        min_count=count_for_density(d_min, n_weights),
        cap_count=count_for_density(cap, n_weights),
        min_measurements=int(min_measurements),
        reference_levels=levels,
    )


def _step_towards(count: jax.Array, step: int, bound: int) -> jax.Array:
    """``count + step`` clipped at ``bound``; a move that would stop less than half a step short
    of the bound goes all the way to it.

    The density grid d_start + k * delta and the cap/floor are rounded to counts separately, so
    without the snap a run could stop one weight short of the cap and spend a whole decision
    interval on a one-weight move (the "spurious near-empty step" of the public code).
    """
    target = count + step
    half = abs(step) // 2
    if step > 0:
        return jnp.where(target >= bound - half, bound, target)
    return jnp.where(target <= bound + half, bound, target)


class ControllerState(NamedTuple):
    """Dynamic controller state (a pytree): D's target active count (int32 scalar) and, for a
    ``reference_exact`` control, the index of its current density level (else 0).

    >>> int(ControllerState(jnp.asarray(300, jnp.int32)).count)
    300
    """

    count: jax.Array
    level: jax.Array = np.zeros((), np.int32)


class Decision(NamedTuple):
    """What to do to D's masks now: ``action`` in {NONE, GROW, PRUNE, DST}, new ``target_count``.

    >>> d = Decision(jnp.asarray(GROW, jnp.int32), jnp.asarray(350, jnp.int32))
    >>> ACTION_NAMES[int(d.action)], int(d.target_count)
    ('grow', 350)
    """

    action: jax.Array
    target_count: jax.Array


def init_controller_state(d_start: float, control: DensityControl) -> ControllerState:
    """State at d_D = ``d_start`` (e.g. d_G for Balance / ADAPT / DDA).

    >>> int(init_controller_state(0.3, make_density_control('relaxed', 1000, 10_000)).count)
    300
    >>> init_controller_state(0.6, make_density_control('strict', 1000, 10_000))
    Traceback (most recent call last):
      ...
    ValueError: Starting D density 0.6 is above the cap (0.5); lower it or raise `d_max`.
    """
    count = count_for_density(validate_density(d_start, "d_start"), control.n_weights)
    if control.kind != "static" and count > control.cap_count:
        raise ValueError(
            f"Starting D density {d_start} is above the cap "
            f"({control.cap_count / control.n_weights:.3g}); lower it or raise `d_max`."
        )
    return ControllerState(jnp.asarray(count, jnp.int32))


def controller_step(
    state: ControllerState,
    window: balance.BRWindow,
    iteration: int | jax.Array,
    control: DensityControl,
    band: tuple[float | jax.Array, float | jax.Array] | None = None,
) -> tuple[ControllerState, Decision]:
    """One controller update after iteration ``iteration`` (1-based); jittable.

    Returns the new state and the decision; off decision steps, with a window not yet full, or
    with no finite ratio in the window, the decision is NONE and the state is unchanged.
    ``band`` replaces ``control``'s (B-, B+) (it may be traced, e.g. measured by the run; a
    NaN band decides nothing).

    >>> c = make_density_control('relaxed', 100, 100, every=10)
    >>> w = balance.push(balance.push(balance.init_window(2), 0.9), 0.7)  # BR 0.8 >= B+
    >>> state, d = controller_step(init_controller_state(0.3, c), w, 10, c)
    >>> ACTION_NAMES[int(d.action)], int(d.target_count), int(state.count)
    ('grow', 35, 35)
    """
    count = jnp.asarray(state.count, jnp.int32)
    if control.kind == "static":
        return state, Decision(jnp.asarray(NONE, jnp.int32), count)
    enough = (window.count >= control.min_measurements if control.min_measurements
              else balance.is_full(window))
    decide = jnp.asarray(is_update_step(iteration, control.every, control.total_iterations))
    if control.reference_levels is not None:
        if band is not None:
            raise ValueError("a reference_exact control keeps the paper's fixed band.")
        return _reference_step(state, window, decide & enough, control)
    band_low, band_high = (control.band_low, control.band_high) if band is None else band
    br = balance.windowed_mean(window)
    decide = decide & enough & jnp.isfinite(br)
    at_cap = count >= control.cap_count
    too_weak = decide & (br >= band_high)
    too_strong = decide & (br <= band_low)
    grown = _step_towards(count, control.delta_count, control.cap_count)
    pruned = _step_towards(count, -control.delta_count, control.min_count)
    grow = too_weak & ~at_cap
    dst = too_weak & at_cap & control.dst_at_cap
    prune = too_strong & (pruned < count)
    new_count = jnp.where(grow, grown, jnp.where(prune, pruned, count)).astype(jnp.int32)
    action = jnp.where(grow, GROW, jnp.where(prune, PRUNE, jnp.where(dst, DST, NONE)))
    return ControllerState(new_count), Decision(action.astype(jnp.int32), new_count)


def _reference_step(state: ControllerState, window: balance.BRWindow, decide: jax.Array,
                    control: DensityControl) -> tuple[ControllerState, Decision]:
    """``controller_step`` with the paper code's arithmetic (``reference_levels``)."""
    lv = control.reference_levels
    table = {name: jnp.asarray(np.asarray(getattr(lv, name)))
             for name in ("grow_to", "prune_to", "floor_count", "ceil_count", "at_cap")}
    count = jnp.asarray(state.count, jnp.int32)
    level = jnp.asarray(state.level, jnp.int32)
    br = balance.windowed_mean(window, ignore_nonfinite=False)  # NaN: no branch; inf: "weak"
    too_weak = decide & (br >= control.band_high)
    too_strong = decide & ~too_weak & (br <= control.band_low)
    up, down = table["grow_to"][level], table["prune_to"][level]
    grow = too_weak & (up >= 0)
    dst = too_weak & (up < 0) & table["at_cap"][level] & control.dst_at_cap
    prune = too_strong & (down >= 0)
    # Growing to floor(d N) from the current count (never below it), pruning to ceil(d N).
    grown = jnp.maximum(table["floor_count"][jnp.maximum(up, 0)], count)
    pruned = jnp.minimum(table["ceil_count"][jnp.maximum(down, 0)], count)
    new_count = jnp.where(grow, grown, jnp.where(prune, pruned, count)).astype(jnp.int32)
    new_level = jnp.where(grow, up, jnp.where(prune, down, level)).astype(jnp.int32)
    action = jnp.where(grow, GROW, jnp.where(prune, PRUNE, jnp.where(dst, DST, NONE)))
    return (ControllerState(new_count, new_level),
            Decision(action.astype(jnp.int32), new_count))


# ----------------------------------------------------------------------------- the protocol


class Controller(Protocol):
    """What the training step needs of a D-density controller (hashable: it is static config).

    ``every`` is its decision interval in iterations (for FLOPs accounting and logs); ``band``
    its (B-, B+) when it has one (drawn on BR plots), else None.
    """

    every: int

    @property
    def band(self) -> tuple[float, float] | None: ...

    def init(self, d_count: int | jax.Array) -> PyTree: ...

    def step(self, state: PyTree, window: balance.BRWindow,
             iteration: int | jax.Array) -> tuple[PyTree, Decision]: ...


@dataclasses.dataclass(frozen=True)
class ControlOptions:
    """The config's ``control`` block: what a controller factory may read.

    ``None`` means "the controller's own default" (e.g. dT_D 1000 relaxed, 2000 strict).
    """

    controller: str | None = None  # registry name; None: the method's (relaxed/strict/dda)
    every: int | None = None  # dT_D in iterations
    band_low: float | None = None  # B-
    band_high: float | None = None  # B+
    delta: float = 0.05  # density step of the paper's controllers
    d_min: float = 0.05  # density floor
    d_max: float = 0.5  # the strict setting's cap
    gain: float = 0.5  # "proportional": density change per unit of BR outside the band
    max_step: float = 0.1  # "proportional": largest density change per decision
    reference_exact: bool = False  # the paper code's float arithmetic (paper controllers)
    min_measurements: int = 0  # BR measurements before a decision; 0: a full window
    ratio_low: float = 0.9  # "relative": B- = ratio_low * BR_ref
    ratio_high: float = 1.1  # "relative": B+ = ratio_high * BR_ref
    reference_br: float = 0.0  # "relative": a fixed BR_ref; 0: measured from the run
    calibration_decisions: int = 1  # "relative": decisions averaged into BR_ref


@dataclasses.dataclass(frozen=True)
class ControllerContext:
    """What a controller factory knows about the run.

    Attributes:
      n_weights: N_D, D's maskable weights.
      total_iterations: the run's length (no decision at its final iteration).
      d_start: D's starting density.
      cap: the method's density cap (1.0 relaxed, d_max strict); None: the controller's own.
      kind: the method's own controller (``"relaxed"``, ``"strict"``, ``"dda"``, ``"static"``);
        None: unknown.
    """

    n_weights: int
    total_iterations: int
    d_start: float
    cap: float | None = None
    kind: str | None = None


ControllerFactory = Callable[[ControlOptions, ControllerContext], Controller]
#: Config name -> factory. ``register`` adds to it.
CONTROLLERS: dict[str, ControllerFactory] = {}


def register(name: str) -> Callable[[ControllerFactory], ControllerFactory]:
    """Decorator adding a controller factory under a config name (``control.controller``).

    >>> @register("never")
    ... def _never(options, context):
    ...     return make_density_control("static", context.n_weights, context.total_iterations)
    >>> "never" in CONTROLLERS
    True
    >>> del CONTROLLERS["never"]
    """
    def add(factory: ControllerFactory) -> ControllerFactory:
        if name in CONTROLLERS and CONTROLLERS[name] is not factory:
            raise ValueError(f"A controller named {name!r} is already registered.")
        CONTROLLERS[name] = factory
        return factory

    return add


def make_controller(name: str, options: ControlOptions, context: ControllerContext
                    ) -> Controller:
    """The controller registered as ``name``, built for this run.

    >>> c = make_controller("relaxed", ControlOptions(), ControllerContext(1000, 10_000, 0.1))
    >>> c.every, c.band, int(c.init(100).count)
    (1000, (0.45, 0.55), 100)
    """
    try:
        factory = CONTROLLERS[name]
    except KeyError:
        raise ValueError(f"Unknown controller {name!r}; registered: "
                         f"{', '.join(sorted(CONTROLLERS))}.") from None
    return factory(options, context)


def _paper_controller(kind: str) -> ControllerFactory:
    def build(options: ControlOptions, context: ControllerContext) -> DensityControl:
        band = None
        if options.band_low is not None or options.band_high is not None:
            low, high, _, _ = _KIND_DEFAULTS[kind]
            band = (low if options.band_low is None else options.band_low,
                    high if options.band_high is None else options.band_high)
        return make_density_control(
            kind, context.n_weights, context.total_iterations, band=band, every=options.every,
            delta=options.delta, d_min=options.d_min, d_max=options.d_max, cap=context.cap,
            reference_exact=options.reference_exact, d_start=context.d_start,
            min_measurements=options.min_measurements)

    build.__doc__ = f"The paper's {kind!r} controller (``make_density_control``)."
    return build


for _kind in KINDS:
    register(_kind)(_paper_controller(_kind))


# ----------------------------------------------------------------------------- decisions -> masks


def apply_decision(masks: PyTree, decision: Decision, drop_scores: PyTree, grow_scores: PyTree,
                   *, drop_fraction: float | jax.Array, scope: str = "global",
                   is_maskable: sp.masks.MaskablePredicate | None = None) -> sp.MaskUpdate:
    """The masks after a controller's decision, as a ``sparsity.MaskUpdate`` (jittable).

    GROW and PRUNE ``resize`` the maskable leaves together to ``decision.target_count``
    (growing by ``grow_scores``, e.g. |dL/d(w*m)|; pruning by ``drop_scores``, e.g. |w|); DST
    runs one ``drop_and_grow`` at ``drop_fraction`` within ``scope``; NONE changes nothing
    (``grown`` all False). Follow with ``sparsity.params_after_update`` (grown weights start
    at 0) and, for optimizer state, ``sparsity.optimizer_state_after_regrowth``.

    >>> m = {'kernel': jnp.array([[True, False], [False, True]])}
    >>> w = {'kernel': jnp.array([[0.5, 0.0], [0.0, 0.1]])}
    >>> g = {'kernel': jnp.array([[0.0, 0.9], [0.2, 0.0]])}
    >>> grow = Decision(jnp.asarray(GROW, jnp.int32), jnp.asarray(3, jnp.int32))
    >>> apply_decision(m, grow, w, g, drop_fraction=0.5).masks['kernel'].tolist()
    [[True, True], [False, True]]
    >>> prune = Decision(jnp.asarray(PRUNE, jnp.int32), jnp.asarray(1, jnp.int32))
    >>> apply_decision(m, prune, w, g, drop_fraction=0.5).masks['kernel'].tolist()
    [[True, False], [False, False]]
    """
    def none(_: None) -> sp.MaskUpdate:
        return sp.MaskUpdate(masks, masks, jax.tree_util.tree_map(jnp.zeros_like, masks))

    def resize(_: None) -> sp.MaskUpdate:
        return sp.resize_update(masks, decision.target_count, drop_scores, grow_scores,
                                is_maskable=is_maskable)

    def dst(_: None) -> sp.MaskUpdate:
        return sp.drop_and_grow_update(masks, drop_scores, grow_scores, drop_fraction,
                                       scope=scope, is_maskable=is_maskable)

    branches: list[Callable[[None], sp.MaskUpdate]] = [none] * 4
    branches[GROW], branches[PRUNE], branches[DST] = resize, resize, dst
    return jax.lax.switch(decision.action, branches, None)


# ----------------------------------------------------------------------------- worked example


@dataclasses.dataclass(frozen=True)
class ProportionalControl(_CountBandController):
    """A controller that moves d_D in proportion to how far BR lies outside the band.

    At a decision (every ``every`` iterations, not the last, with a full window and a finite
    windowed BR), with BR above B+ by e (or below B- by e), d_D changes by
    ``min(gain * e, max_step)`` (up, or down), in whole weights, clipped to [d_min, cap].
    Inside the band it does nothing. Unlike the paper's fixed +-0.05 steps, a BR far outside
    the band moves D further, and a BR just outside barely moves it.

    >>> c = make_controller("proportional", ControlOptions(gain=0.5),
    ...                     ControllerContext(1000, 10_000, 0.3))
    >>> w = balance.push(balance.push(balance.init_window(2), 0.75), 0.75)  # BR 0.2 above B+
    >>> state, d = c.step(c.init(300), w, 1000)
    >>> ACTION_NAMES[int(d.action)], int(d.target_count)  # +0.5 * 0.2 of 1000 weights
    ('grow', 400)
    """

    n_weights: int
    total_iterations: int
    every: int
    band_low: float
    band_high: float
    gain: float
    max_step_count: int
    min_count: int
    cap_count: int

    def step(self, state: ControllerState, window: balance.BRWindow,
             iteration: int | jax.Array) -> tuple[ControllerState, Decision]:
        count = jnp.asarray(state.count, jnp.int32)
        br = balance.windowed_mean(window)
        decide = jnp.asarray(is_update_step(iteration, self.every, self.total_iterations))
        decide = decide & balance.is_full(window) & jnp.isfinite(br)
        excess = jnp.where(br > self.band_high, br - self.band_high,
                           jnp.where(br < self.band_low, br - self.band_low, 0.0))
        move = jnp.round(self.gain * excess * self.n_weights)
        move = jnp.clip(move, -self.max_step_count, self.max_step_count).astype(jnp.int32)
        target = jnp.clip(count + jnp.where(decide, move, 0), self.min_count, self.cap_count)
        target = target.astype(jnp.int32)
        action = jnp.where(target > count, GROW, jnp.where(target < count, PRUNE, NONE))
        return (ControllerState(target, state.level),
                Decision(action.astype(jnp.int32), target))


@register("proportional")
def _proportional(options: ControlOptions, context: ControllerContext) -> ProportionalControl:
    low, high, every, cap = _KIND_DEFAULTS["relaxed"]
    low = low if options.band_low is None else options.band_low
    high = high if options.band_high is None else options.band_high
    cap = cap if context.cap is None else context.cap
    if not low < high:
        raise ValueError(f"`band` must satisfy B- < B+, got {(low, high)}.")
    if options.gain <= 0 or not 0 < options.max_step <= 1:
        raise ValueError("proportional control needs gain > 0 and max_step in (0, 1], got "
                         f"gain={options.gain}, max_step={options.max_step}.")
    n = context.n_weights
    return ProportionalControl(
        n_weights=n, total_iterations=context.total_iterations,
        every=every if options.every is None else int(options.every), band_low=float(low),
        band_high=float(high), gain=float(options.gain),
        max_step_count=count_for_density(options.max_step, n),
        min_count=count_for_density(options.d_min, n), cap_count=count_for_density(cap, n))


# ----------------------------------------------------------------------------- beyond the paper


class RelativeBandState(NamedTuple):
    """State of ``RelativeBandControl`` (a pytree, checkpointed with the run).

    Attributes:
      count: D's target active count (int32 scalar), as ``ControllerState.count``.
      reference: BR_ref (float32); NaN while it is still being measured.
      calibration_sum: sum of the windowed BRs of the calibration decisions so far (float32).
      calibrated: how many calibration decisions have been taken (int32).
    """

    count: jax.Array
    reference: jax.Array
    calibration_sum: jax.Array
    calibrated: jax.Array


@dataclasses.dataclass(frozen=True)
class RelativeBandControl:
    """The paper's controller with a band measured from the run: ``(r-, r+) * BR_ref``.

    BR's scale is not universal: it moves with width, learning rate, batch size, n_dis and
    the stage of training (README, "What sets BR's scale"), so the paper's band [0.45, 0.55],
    tuned at full-scale CIFAR-10, can lie far above every BR another setting produces, and
    ADAPT then prunes D to its floor whatever happens. Here the band is relative: at the
    first ``calibration_decisions`` decisions (each with a full window and a finite windowed
    BR) D is not moved and their windowed BRs are averaged into BR_ref, the balance the run
    has at its starting density (d_D = d_G for ADAPT, Static-Balance's point); from then on
    ``base`` (the method's own controller: its steps, floor, cap and, in the strict setting,
    D-DST at the cap) decides with the band ``(ratio_low * BR_ref, ratio_high * BR_ref)``. The
    paper's band is its centre +-10%, hence the default ratios (0.9, 1.1): hold the balance
    the run started with, to within 10%.

    ``reference_br > 0`` skips the calibration and fixes BR_ref; ``reference_br=1`` with
    ratios ``(0.45, 0.55)`` is exactly the paper's controller (tested decision for decision).

    >>> ctx = ControllerContext(1000, 10_000, 0.3, kind="relaxed")
    >>> c = make_controller("relative", ControlOptions(), ctx)
    >>> w = balance.push(balance.push(balance.init_window(2), 0.1), 0.1)  # windowed BR 0.1
    >>> s, d = c.step(c.init(300), w, 1000)       # calibration: BR_ref = 0.1, no move
    >>> round(float(s.reference), 6), ACTION_NAMES[int(d.action)]
    (0.1, 'none')
    >>> w = balance.push(balance.push(w, 0.13), 0.13)  # 0.13 >= 1.1 * BR_ref: D too weak
    >>> s, d = c.step(s, w, 2000)
    >>> ACTION_NAMES[int(d.action)], int(d.target_count)
    ('grow', 350)
    """

    base: DensityControl
    ratio_low: float = 0.9
    ratio_high: float = 1.1
    reference_br: float = 0.0  # > 0: fixed BR_ref; 0: measured
    calibration_decisions: int = 1

    @property
    def every(self) -> int:
        return self.base.every

    @property
    def band(self) -> tuple[float, float] | None:
        """The band when BR_ref is fixed; None when it is measured (it is in the state)."""
        if self.reference_br > 0:
            return self.ratio_low * self.reference_br, self.ratio_high * self.reference_br
        return None

    def init(self, d_count: int | jax.Array) -> RelativeBandState:
        reference = self.reference_br if self.reference_br > 0 else np.nan
        return RelativeBandState(
            count=jnp.asarray(d_count, jnp.int32),
            reference=jnp.asarray(reference, jnp.float32),
            calibration_sum=jnp.zeros((), jnp.float32), calibrated=jnp.zeros((), jnp.int32))

    def step(self, state: RelativeBandState, window: balance.BRWindow,
             iteration: int | jax.Array) -> tuple[RelativeBandState, Decision]:
        br = balance.windowed_mean(window)
        decide = jnp.asarray(is_update_step(iteration, self.every, self.base.total_iterations))
        decide = decide & balance.is_full(window) & jnp.isfinite(br)
        calibrating = decide & jnp.isnan(state.reference)
        total = state.calibration_sum + jnp.where(calibrating, br, 0.0)
        calibrated = state.calibrated + calibrating.astype(jnp.int32)
        done = calibrating & (calibrated >= self.calibration_decisions)
        reference = jnp.where(done, total / calibrated.astype(jnp.float32), state.reference)
        # A calibration decision never moves D (the band is NaN until BR_ref exists, so the
        # comparisons inside controller_step are False; the where below also covers the last
        # calibration decision, where BR_ref was just set).
        band = (self.ratio_low * state.reference, self.ratio_high * state.reference)
        inner, decision = controller_step(ControllerState(state.count), window, iteration,
                                          self.base, band=band)
        count = jnp.where(calibrating, state.count, inner.count).astype(jnp.int32)
        action = jnp.where(calibrating, NONE, decision.action).astype(jnp.int32)
        new_state = RelativeBandState(count, reference.astype(jnp.float32),
                                      total.astype(jnp.float32), calibrated.astype(jnp.int32))
        return new_state, Decision(action, count)


@register("relative")
def _relative(options: ControlOptions, context: ControllerContext) -> RelativeBandControl:
    """The method's controller (relaxed, strict or dda) with a relative band."""
    if not 0 < options.ratio_low < options.ratio_high:
        raise ValueError("relative control needs 0 < ratio_low < ratio_high, got "
                         f"({options.ratio_low}, {options.ratio_high}).")
    if options.reference_br < 0 or not math.isfinite(options.reference_br):
        raise ValueError(f"reference_br must be >= 0 (0: measure it), got "
                         f"{options.reference_br}.")
    if options.calibration_decisions < 1:
        raise ValueError("calibration_decisions must be >= 1, got "
                         f"{options.calibration_decisions}.")
    if options.reference_exact:
        raise ValueError("the relative band has no reference_exact form; use "
                         "reference_mode='fixed'.")
    kind = context.kind if context.kind in ("relaxed", "strict", "dda") else "relaxed"
    base = _paper_controller(kind)(dataclasses.replace(options, band_low=None, band_high=None),
                                   context)
    return RelativeBandControl(base, float(options.ratio_low), float(options.ratio_high),
                               float(options.reference_br), int(options.calibration_decisions))
