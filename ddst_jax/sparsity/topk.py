"""Exact-k selection with deterministic ties, jittable with static shapes and traced k."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rank_descending(scores: jax.Array, eligible: jax.Array | None = None) -> jax.Array:
    """Rank of every entry when sorted by (eligible first, score descending, index ascending).

    Args:
      scores: float array of shape (n,). NaN ranks below every number (and -inf).
      eligible: optional bool array (n,); ineligible entries rank after all eligible ones.

    Returns:
      int32 array (n,) with a permutation of 0..n-1: rank 0 is the best entry. Equal scores go
      to the lower flat index first.

    >>> import jax.numpy as jnp
    >>> rank_descending(jnp.array([1., 3., 3., 2.])).tolist()
    [3, 0, 1, 2]
    """
    scores = jnp.ravel(scores).astype(jnp.float32)
    n = scores.shape[0]
    # Lexicographic keys: eligibility, NaN-ness (NaN after every number, -inf included),
    # -score, then the index itself, so ties resolve to the lower flat index.
    is_nan = jnp.isnan(scores)
    neg = jnp.where(is_nan, jnp.inf, -scores)
    ineligible = (
        jnp.zeros((n,), jnp.int32) if eligible is None else (~jnp.ravel(eligible)).astype(jnp.int32)
    )
    iota = jnp.arange(n, dtype=jnp.int32)
    *_, order = jax.lax.sort(
        (ineligible, is_nan.astype(jnp.int32), neg, iota), num_keys=4, is_stable=True
    )
    return jnp.zeros((n,), jnp.int32).at[order].set(iota)


def select_top(
    scores: jax.Array, k: jax.Array | int, eligible: jax.Array | None = None
) -> jax.Array:
    """Bool mask (n,) of the ``min(k, #eligible)`` eligible entries with the highest scores.

    ``k`` may be a traced int; ties go to the lower flat index.

    >>> import jax.numpy as jnp
    >>> select_top(jnp.array([1., 3., 3., 2.]), 2).tolist()
    [False, True, True, False]
    """
    ranks = rank_descending(scores, eligible)
    chosen = ranks < jnp.asarray(k, jnp.int32)
    if eligible is not None:
        chosen = chosen & jnp.ravel(eligible)
    return chosen
