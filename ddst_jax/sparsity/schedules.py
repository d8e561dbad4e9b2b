"""When masks change and by how much: the cosine drop fraction and the update-step predicate."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def cosine_drop_fraction(
    step: int | jax.Array,
    total_steps: int,
    initial: float = 0.5,
    final: float = 0.005,
) -> jax.Array:
    """f(s) = final + (initial - final) * (1 + cos(pi * s / T)) / 2 (docs/method.md section 4).

    Args:
      step: s, the number of completed G (or D) steps; traced or Python int.
      total_steps: T, the total number of steps of the run.
      initial: f_0, the fraction at s = 0.
      final: f_min, the fraction at s = T.

    Returns:
      float32 scalar in [final, initial] (s is clipped to [0, T]).

    >>> round(float(cosine_drop_fraction(50, 100)), 6)
    0.2525
    """
    if total_steps <= 0:
        raise ValueError(f"`total_steps` must be positive, got {total_steps}.")
    for name, v in (("initial", initial), ("final", final)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"`{name}` drop fraction must lie in [0, 1], got {v}.")
    s = jnp.clip(jnp.asarray(step, jnp.float32), 0.0, float(total_steps))
    return final + (initial - final) * 0.5 * (1.0 + jnp.cos(math.pi * s / total_steps))


def is_update_step(iteration: int | jax.Array, every: int, total: int) -> jax.Array | bool:
    """True after iteration ``t`` (1-based count of completed iterations) when t % every == 0.

    Never at the final iteration ``t == total`` (an update there would never be trained).
    Returns a Python bool for a Python int, a bool array for a traced one.

    >>> [t for t in range(1, 11) if is_update_step(t, 5, 10)]
    [5]
    """
    if every <= 0:
        raise ValueError(f"Update interval `every` must be positive, got {every}.")
    if isinstance(iteration, int):
        return iteration > 0 and iteration % every == 0 and iteration < total
    t = jnp.asarray(iteration)
    return (t > 0) & (t % every == 0) & (t < total)
