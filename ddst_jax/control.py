"""D-density controllers as pure functions (SPEC section 6): static, ADAPT relaxed/strict, DDA.

Densities are tracked as integer active counts of D's maskable weights, never as floats compared
for equality: a move changes the count by exactly ``round(delta * N_D)`` weights, clipped to
``[round(d_min * N_D), round(cap * N_D)]``; a move that would stop less than half a step short of
the cap or floor goes all the way to it (no near-empty moves caused by rounding). A controller
decides only on decision steps (every ``every`` iterations, never at the final one) and only once
the BR window is full.

``make_density_control(..., reference_exact=True)`` instead reproduces the paper's code
exactly: it tracks d_D as the float the code keeps (``d +- delta`` in float64, clipped, so 0.1 +
8 * 0.05 is 0.49999999999999994), grows to ``floor(d * N_D)`` and prunes to ``ceil(d * N_D)``
active weights, treats "at the cap" as float equality (so a strict run can take a one-weight
step before its first D-DST update), decides once the window holds ``min_measurements``
ratios, and compares the plain mean of the window, non-finite ratios included (an inf ratio
reads as "D too weak"). The float64 arithmetic runs on the host when the control is built: the
reachable densities form a small table, and the jitted step only indexes it.

A ``Decision`` says what the runner must do to D's masks:

- ``GROW``: ``resize`` up to ``target_count`` by |dL_D/d(w*m)| (new weights start at 0);
- ``PRUNE``: ``resize`` down to ``target_count`` by |w|;
- ``DST``: strict setting at the cap with BR still high: one drop-and-grow update of D;
- ``NONE``: nothing.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddst_jax import balance
from ddst_jax.sparsity.masks import count_for_density, validate_density
from ddst_jax.sparsity.schedules import is_update_step

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


@dataclasses.dataclass(frozen=True)
class DensityControl:
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
    """Build a controller config; unset fields take the kind's SPEC defaults.

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
) -> tuple[ControllerState, Decision]:
    """One controller update after iteration ``iteration`` (1-based); jittable.

    Returns the new state and the decision; off decision steps, with a window not yet full, or
    with no finite ratio in the window, the decision is NONE and the state is unchanged.

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
        return _reference_step(state, window, decide & enough, control)
    br = balance.windowed_mean(window)
    decide = decide & enough & jnp.isfinite(br)
    at_cap = count >= control.cap_count
    too_weak = decide & (br >= control.band_high)
    too_strong = decide & (br <= control.band_low)
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
