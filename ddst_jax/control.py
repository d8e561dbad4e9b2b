"""D-density controllers as pure functions (SPEC section 6): static, ADAPT relaxed/strict, DDA.

Densities are tracked as integer active counts of D's maskable weights, never as floats compared
for equality: a move changes the count by exactly ``round(delta * N_D)`` weights, clipped to
``[round(d_min * N_D), round(cap * N_D)]``; a move that would stop less than half a step short of
the cap or floor goes all the way to it (no near-empty moves caused by rounding). A controller
decides only on decision steps (every ``every`` iterations, never at the final one) and only once
the BR window is full.

A ``Decision`` says what the runner must do to D's masks:

- ``GROW``: ``resize`` up to ``target_count`` by |dL_D/d(w*m)| (new weights start at 0);
- ``PRUNE``: ``resize`` down to ``target_count`` by |w|;
- ``DST``: strict setting at the cap with BR still high: one drop-and-grow update of D;
- ``NONE``: nothing.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

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

    @property
    def dst_at_cap(self) -> bool:
        """Strict setting: at the cap a high BR triggers a D drop-and-grow update.

        >>> make_density_control('strict', 1000, 10_000).dst_at_cap
        True
        """
        return self.kind == "strict"


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
    """Dynamic controller state (a pytree): D's target active count (int32 scalar).

    >>> int(ControllerState(jnp.asarray(300, jnp.int32)).count)
    300
    """

    count: jax.Array


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
    br = balance.windowed_mean(window)
    decide = is_update_step(iteration, control.every, control.total_iterations)
    decide = jnp.asarray(decide) & balance.is_full(window) & jnp.isfinite(br)
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
