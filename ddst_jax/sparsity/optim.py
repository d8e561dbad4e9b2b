"""What the optimizer sees for masked weights, and its state at regrown positions.

The rules are docs/method.md section 4.

Two policies, for any optax optimizer (via ``optax.tree_utils.tree_map_params``):

- ``"paper"`` (default, the public release): dense gradients reach the optimizer at every
  position, so inactive weights keep accumulating Adam moments; inactive weights are re-zeroed
  after each update; a regrown weight starts at 0 but inherits the moments it accumulated.
- ``"rigl"``: gradients are masked before the optimizer, and the optimizer's per-parameter state
  (e.g. Adam's mu/nu) is zeroed at regrown positions.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import optax
from optax import tree_utils as otu

from ddst_jax.sparsity.masks import apply_masks

PyTree = Any
POLICIES = ("paper", "rigl")


def check_policy(policy: str) -> str:
    """Return ``policy`` if known, else raise a ``ValueError`` listing the options.

    >>> check_policy('rigl')
    'rigl'
    """
    if policy not in POLICIES:
        raise ValueError(f"Unknown optimizer-state `policy` {policy!r}; use one of {POLICIES}.")
    return policy


def gradients_for_optimizer(grads: PyTree, masks: PyTree, policy: str = "paper") -> PyTree:
    """Gradients to feed the optimizer: dense under ``"paper"``, masked under ``"rigl"``.

    >>> import jax.numpy as jnp
    >>> g, m = {'kernel': jnp.ones((1, 2))}, {'kernel': jnp.array([[True, False]])}
    >>> gradients_for_optimizer(g, m)['kernel'].tolist()
    [[1.0, 1.0]]
    >>> gradients_for_optimizer(g, m, 'rigl')['kernel'].tolist()
    [[1.0, 0.0]]
    """
    check_policy(policy)
    return grads if policy == "paper" else apply_masks(grads, masks)


def zero_state_at(optimizer: optax.GradientTransformation, opt_state: PyTree,
                  positions: PyTree) -> PyTree:
    """Zero the params-shaped leaves of ``opt_state`` where ``positions`` (bool, like params) holds.

    Counters and other non-parameter fields (e.g. Adam's ``count``) are left unchanged.

    >>> import jax.numpy as jnp, optax
    >>> opt, p = optax.sgd(1.0, momentum=0.9), {'kernel': jnp.zeros((1, 2))}
    >>> _, state = opt.update({'kernel': jnp.ones((1, 2))}, opt.init(p), p)  # trace = 1
    >>> state = zero_state_at(opt, state, {'kernel': jnp.array([[False, True]])})
    >>> state[0].trace['kernel'].tolist()
    [[1.0, 0.0]]
    """
    return otu.tree_map_params(
        optimizer,
        lambda s, pos: jnp.where(pos, jnp.zeros((), s.dtype), s),
        opt_state,
        positions,
        transform_non_params=lambda s: s,
    )


def optimizer_state_after_regrowth(optimizer: optax.GradientTransformation, opt_state: PyTree,
                                   grown: PyTree, policy: str = "paper") -> PyTree:
    """Optimizer state after a mask update: kept (``paper``) or zeroed at ``grown`` (``rigl``).

    >>> import jax.numpy as jnp, optax
    >>> opt, p = optax.sgd(1.0, momentum=0.9), {'kernel': jnp.zeros((1, 2))}
    >>> _, state = opt.update({'kernel': jnp.ones((1, 2))}, opt.init(p), p)  # trace = 1
    >>> grown = {'kernel': jnp.array([[False, True]])}
    >>> optimizer_state_after_regrowth(opt, state, grown) is state
    True
    >>> optimizer_state_after_regrowth(opt, state, grown, 'rigl')[0].trace['kernel'].tolist()
    [[1.0, 0.0]]
    """
    check_policy(policy)
    if policy == "paper":
        return opt_state
    return zero_state_at(optimizer, opt_state, grown)


def masked_apply_updates(params: PyTree, updates: PyTree, masks: PyTree) -> PyTree:
    """``optax.apply_updates`` followed by re-zeroing the inactive weights (both policies).

    >>> import jax.numpy as jnp
    >>> p, u = {'kernel': jnp.ones((1, 2))}, {'kernel': jnp.ones((1, 2))}
    >>> masked_apply_updates(p, u, {'kernel': jnp.array([[True, False]])})['kernel'].tolist()
    [[2.0, 0.0]]
    """
    return apply_masks(optax.apply_updates(params, updates), masks)


def sparse_update(
    optimizer: optax.GradientTransformation,
    grads: PyTree,
    opt_state: PyTree,
    params: PyTree,
    masks: PyTree,
    policy: str = "paper",
) -> tuple[PyTree, PyTree]:
    """One optimizer step of masked params under a policy -> (new params, new opt state).

    >>> import jax.numpy as jnp, optax
    >>> opt = optax.sgd(1.0)
    >>> p, m = {'kernel': jnp.ones((1, 2))}, {'kernel': jnp.array([[True, False]])}
    >>> g = {'kernel': jnp.ones((1, 2))}
    >>> sparse_update(opt, g, opt.init(p), p, m)[0]['kernel'].tolist()
    [[0.0, 0.0]]
    """
    g = gradients_for_optimizer(grads, masks, policy)
    updates, opt_state = optimizer.update(g, opt_state, params)
    return masked_apply_updates(params, updates, masks), opt_state


__all__ = [
    "POLICIES",
    "check_policy",
    "gradients_for_optimizer",
    "masked_apply_updates",
    "optimizer_state_after_regrowth",
    "sparse_update",
    "zero_state_at",
]


