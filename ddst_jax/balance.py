"""The balance ratio (BR) and its fixed-size window, as pure functions (docs/method.md section 2).

For one iteration, after its n_dis D updates, with z the G step's noise batch and x_r the real
batch of the last D step:

    b = mean D(G_pre(z)),  a = mean D(G_post(z)),  c = mean D(x_r),  r = (a - b) / (c - b).

The denominator is the real/fake gap as D sees it; the numerator is how far one G step closes it.
Small BR: D too strong for G. Large BR: D too weak. BR is the mean of the finite ratios among the
last ``size`` measurements (mean of ratios, not ratio of means; a non-finite one keeps its slot).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

#: |c - b| below this makes a measurement non-finite (NaN) instead of a huge ratio.
DEFAULT_EPS = 1e-8


def balance_ratio(
    d_real: jax.Array,
    d_fake_before: jax.Array,
    d_fake_after: jax.Array,
    eps: float = DEFAULT_EPS,
) -> jax.Array:
    """One BR measurement from raw D outputs (no sigmoid); batch means are taken first.

    Args:
      d_real: D(x_r), any shape (e.g. (B_D,)).
      d_fake_before: D(G_pre(z)), any shape (e.g. (B_G,)).
      d_fake_after: D(G_post(z)), same z and D.
      eps: denominator guard; ``|c - b| < eps`` returns NaN.

    Returns:
      float32 scalar ``(a - b) / (c - b)``, or NaN when the denominator is below ``eps``.

    >>> import jax.numpy as jnp
    >>> float(balance_ratio(jnp.array([2.0, 4.0]), jnp.array([0.0, -2.0]), jnp.array([1.0])))
    0.5
    """
    a = jnp.mean(jnp.asarray(d_fake_after, jnp.float32))
    b = jnp.mean(jnp.asarray(d_fake_before, jnp.float32))
    c = jnp.mean(jnp.asarray(d_real, jnp.float32))
    gap = c - b
    safe_gap = jnp.where(jnp.abs(gap) < eps, 1.0, gap)
    return jnp.where(jnp.abs(gap) < eps, jnp.nan, (a - b) / safe_gap)


class BRWindow(NamedTuple):
    """Ring buffer of the last ``size`` BR measurements (a pytree usable inside jit).

    Attributes:
      ratios: float32 (size,); slot ``i % size`` holds the i-th measurement.
      count: int32 scalar, number of measurements pushed so far (never reset).

    >>> w = push(init_window(2), 0.5)
    >>> w.size, int(w.count)
    (2, 1)
    """

    ratios: jax.Array
    count: jax.Array

    @property
    def size(self) -> int:
        """Capacity of the window (a Python int).

        >>> init_window(3).size
        3
        """
        return self.ratios.shape[0]


def window_size(window_iterations: int = 1000, br_every: int = 10) -> int:
    """Entries of the window: ``window_iterations // br_every`` (the paper's 1000 // 10 = 100).

    >>> window_size(), window_size(1000, 50)
    (100, 20)
    """
    if br_every <= 0 or window_iterations < br_every:
        raise ValueError(
            f"Need 0 < br_every <= window; got br_every={br_every}, window={window_iterations}."
        )
    return window_iterations // br_every


def init_window(size: int) -> BRWindow:
    """An empty window of ``size`` entries.

    >>> w = init_window(3)
    >>> w.ratios.shape, int(w.count)
    ((3,), 0)
    """
    if size <= 0:
        raise ValueError(f"BR window `size` must be positive, got {size}.")
    return BRWindow(jnp.full((size,), jnp.nan, jnp.float32), jnp.zeros((), jnp.int32))


def push(window: BRWindow, ratio: jax.Array) -> BRWindow:
    """Append one measurement, overwriting the oldest once the window is full.

    >>> w = push(push(push(init_window(2), 1.0), 2.0), 3.0)
    >>> w.ratios.tolist(), int(w.count)
    ([3.0, 2.0], 3)
    """
    slot = window.count % window.size
    return BRWindow(window.ratios.at[slot].set(jnp.asarray(ratio, jnp.float32)), window.count + 1)


def is_full(window: BRWindow) -> jax.Array:
    """True once ``size`` measurements have been pushed.

    >>> w = push(init_window(2), 0.5)
    >>> bool(is_full(w)), bool(is_full(push(w, 0.5)))
    (False, True)
    """
    return window.count >= window.size


def _stored(window: BRWindow) -> jax.Array:
    return jnp.arange(window.size) < jnp.minimum(window.count, window.size)


def windowed_mean(window: BRWindow, *, ignore_nonfinite: bool = True) -> jax.Array:
    """Mean of the finite stored ratios (NaN if there is none).

    ``ignore_nonfinite=False`` averages every stored ratio as ``np.mean`` does (what the paper's
    code compares with the band): one inf makes the mean inf, a NaN (or +inf with -inf) NaN.

    >>> w = push(push(init_window(3), 0.25), float('nan'))
    >>> float(windowed_mean(w)), float(windowed_mean(push(w, 0.75)))
    (0.25, 0.5)
    >>> float(windowed_mean(push(init_window(2), float('inf')), ignore_nonfinite=False))
    inf
    """
    use = _stored(window)
    if ignore_nonfinite:
        use = use & jnp.isfinite(window.ratios)
    n = jnp.sum(use)
    total = jnp.sum(jnp.where(use, window.ratios, 0.0))
    return jnp.where(n > 0, total / jnp.maximum(n, 1), jnp.nan)


def num_ignored(window: BRWindow) -> jax.Array:
    """How many stored entries are non-finite and so left out of ``windowed_mean`` (int32).

    >>> int(num_ignored(push(push(init_window(3), 0.25), float('nan'))))
    1
    """
    return jnp.sum(_stored(window) & ~jnp.isfinite(window.ratios), dtype=jnp.int32)


def is_measure_step(iteration: int | jax.Array, br_every: int) -> jax.Array | bool:
    """BR is measured after iteration ``t`` (1-based) when ``t % br_every == 0``.

    >>> [t for t in range(1, 31) if is_measure_step(t, 10)]
    [10, 20, 30]
    """
    if isinstance(iteration, int):
        return iteration > 0 and iteration % br_every == 0
    t = jnp.asarray(iteration)
    return (t > 0) & (t % br_every == 0)
