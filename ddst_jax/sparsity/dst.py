"""Dynamic sparse training: scores, drop-and-grow and resize, all pure and jittable.

Counting rules (docs/method.md section 4, DESIGN "Public API contract"):
- ``drop_and_grow`` drops ``floor(A * f)`` active entries with the lowest drop score and grows the
  same number of entries that were not kept (just-dropped ones included) with the highest grow
  score, so the active count ``A`` of the scope is unchanged. ``A * f`` is evaluated in float32.
- Ties go to the lower flat index: among equal drop scores the lower index is kept; among equal
  grow scores the lower index is grown. In the global scope the flat index runs over the maskable
  leaves concatenated in tree-flatten order.
- NaN scores rank below every number: a NaN-weight is dropped first and a NaN-gradient grown last.
  Concrete (non-traced) NaN scores are refused with a ``ValueError`` instead.
- Grown entries start at 0: use ``MaskUpdate.kept`` to zero them (``params_after_update``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddst_jax.sparsity.masks import (
    MaskablePredicate,
    _predicate,
    apply_masks,
    check_same_structure,
    num_maskable,
    path_str,
)
from ddst_jax.sparsity.topk import select_top

PyTree = Any
SCOPES = ("global", "layer")


class MaskUpdate(NamedTuple):
    """The outcome of a mask update; each field is a bool pytree like the masks.

    Attributes:
      masks: the new masks (``kept | grown``).
      kept: entries active before and after, whose weights keep their values.
      grown: entries activated by this update; their weights (and, under the RigL optimizer
        policy, their optimizer moments) start at 0. Disjoint from ``kept``.

    >>> import jax.numpy as jnp
    >>> u = resize_update({'kernel': jnp.array([[True, False], [False, False]])}, 2, None,
    ...                   {'kernel': jnp.array([[0.0, 0.1], [0.5, 0.2]])})
    >>> u.masks['kernel'].tolist()  # kept | grown
    [[True, False], [True, False]]
    >>> u.kept['kernel'].tolist(), u.grown['kernel'].tolist()
    ([[True, False], [False, False]], [[False, False], [True, False]])
    """

    masks: PyTree
    kept: PyTree
    grown: PyTree


# ----------------------------------------------------------------------------- scores


def magnitude_scores(params: PyTree) -> PyTree:
    """Drop score |w| (prune the smallest magnitudes).

    >>> import jax.numpy as jnp
    >>> magnitude_scores({'kernel': jnp.array([[-2.0, 0.5]])})['kernel'].tolist()
    [[2.0, 0.5]]
    """
    return jax.tree_util.tree_map(jnp.abs, params)


def gradient_scores(grads: PyTree) -> PyTree:
    """RigL grow score |dL/d(w*m)|: pass the dense gradient w.r.t. the effective weights.

    >>> import jax.numpy as jnp
    >>> gradient_scores({'kernel': jnp.array([[0.25, -1.0]])})['kernel'].tolist()
    [[0.25, 1.0]]
    """
    return jax.tree_util.tree_map(jnp.abs, grads)


def random_scores(key: jax.Array, tree: PyTree) -> PyTree:
    """SET grow score: i.i.d. uniform [0, 1) per entry, one folded key per leaf.

    >>> import jax, jax.numpy as jnp
    >>> s = random_scores(jax.random.key(0), {'kernel': jnp.zeros((2, 3), bool)})['kernel']
    >>> s.shape, bool(((s >= 0) & (s < 1)).all())
    ((2, 3), True)
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return jax.tree_util.tree_unflatten(
        treedef,
        [jax.random.uniform(jax.random.fold_in(key, i), np.shape(x)) for i, x in enumerate(leaves)],
    )


# ----------------------------------------------------------------------------- validation


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_scores(scores: PyTree | None, masks: PyTree, name: str) -> None:
    if scores is None:
        return
    check_same_structure(masks, scores, "masks", name)
    for path, x in jax.tree_util.tree_leaves_with_path(scores):
        if _is_concrete(x) and np.isnan(np.asarray(x, dtype=np.float32)).any():
            raise ValueError(
                f"`{name}` holds NaN at '{path_str(path)}'; scores must be finite or +-inf "
                "(a NaN usually means the loss or the weights diverged)."
            )


def _check_fraction(drop_fraction: Any) -> None:
    if _is_concrete(drop_fraction):
        f = float(np.asarray(drop_fraction))
        if not 0.0 <= f <= 1.0:
            raise ValueError(f"`drop_fraction` must lie in [0, 1], got {f}.")


def _check_scope(scope: str) -> None:
    if scope not in SCOPES:
        raise ValueError(f"Unknown `scope` {scope!r}; use one of {SCOPES}.")


# ----------------------------------------------------------------------------- flat helpers


def _flat_scope(tree: PyTree | None, masks: PyTree, pred: MaskablePredicate, fill: float):
    """The maskable leaves of ``tree`` raveled (or ``fill`` arrays if tree is None)."""
    mask_leaves = jax.tree_util.tree_leaves_with_path(masks)
    if tree is None:
        return [jnp.full((int(np.prod(np.shape(m))),), fill, jnp.float32)
                for p, m in mask_leaves if pred(p, m)]
    leaves = jax.tree_util.tree_leaves(tree)
    return [jnp.ravel(x) for (p, m), x in zip(mask_leaves, leaves, strict=True) if pred(p, m)]


def _unflatten_scope(flat_parts: list[jax.Array], masks: PyTree, pred: MaskablePredicate,
                     fill_nonmaskable: bool) -> PyTree:
    """Inverse of ``_flat_scope`` for bool results; non-maskable leaves get ``fill``."""
    mask_leaves, treedef = jax.tree_util.tree_flatten_with_path(masks)
    parts = iter(flat_parts)
    out = []
    for p, m in mask_leaves:
        if pred(p, m):
            out.append(next(parts).reshape(np.shape(m)))
        else:
            out.append(jnp.full(np.shape(m), fill_nonmaskable, bool))
    return jax.tree_util.tree_unflatten(treedef, out)


def _split(flat: jax.Array, like: list[jax.Array]) -> list[jax.Array]:
    sizes = np.cumsum([x.shape[0] for x in like])[:-1]
    return jnp.split(flat, sizes)


def _drop_grow_flat(m, ds, gs, f):
    """One scope: returns (kept, grown) flat bool arrays."""
    active = jnp.sum(m, dtype=jnp.int32)
    n_swap = jnp.floor(active.astype(jnp.float32) * jnp.asarray(f, jnp.float32)).astype(jnp.int32)
    kept = select_top(ds, active - n_swap, eligible=m)
    grown = select_top(gs, n_swap, eligible=~kept)
    return kept, grown


def _apply_per_scope(fn, masks, score_trees, scope, pred):
    """Run ``fn(m, *scores) -> (kept, grown)`` per leaf or on the concatenation of all leaves."""
    m_parts = _flat_scope(masks, masks, pred, 0.0)
    s_parts = [_flat_scope(t, masks, pred, 0.0) for t in score_trees]
    if not m_parts:
        raise ValueError("`masks` has no maskable leaf; check `is_maskable`.")
    if scope == "layer":
        results = [fn(m, *ss) for m, *ss in zip(m_parts, *s_parts, strict=True)]
        kept = [r[0] for r in results]
        grown = [r[1] for r in results]
    else:
        k, g = fn(jnp.concatenate(m_parts), *[jnp.concatenate(s) for s in s_parts])
        kept, grown = _split(k, m_parts), _split(g, m_parts)
    kept_tree = _unflatten_scope(kept, masks, pred, True)
    grown_tree = _unflatten_scope(grown, masks, pred, False)
    new = jax.tree_util.tree_map(jnp.logical_or, kept_tree, grown_tree)
    return MaskUpdate(new, kept_tree, grown_tree)


# ----------------------------------------------------------------------------- public API


def drop_and_grow_update(
    masks: PyTree,
    drop_scores: PyTree | None,
    grow_scores: PyTree | None,
    drop_fraction: float | jax.Array,
    *,
    scope: str = "global",
    is_maskable: MaskablePredicate | None = None,
) -> MaskUpdate:
    """Prune ``floor(A * f)`` active entries and regrow as many; returns masks, kept and grown.

    Args:
      masks: bool pytree.
      drop_scores: pytree like ``masks``; the lowest-scoring active entries are dropped
        (e.g. ``magnitude_scores(params)``). ``None`` ranks all entries equal (index order).
      grow_scores: pytree like ``masks``; the highest-scoring non-kept entries are grown
        (e.g. ``gradient_scores(grads)`` for RigL, ``random_scores(key, masks)`` for SET).
      drop_fraction: f in [0, 1] (Python float or traced scalar).
      scope: ``"global"`` ranks across all maskable leaves together (the paper's default; layer
        densities drift), ``"layer"`` ranks within each leaf (layer densities fixed).
      is_maskable: predicate ``(path, leaf) -> bool``; defaults to ``default_is_maskable``.

    >>> import jax.numpy as jnp
    >>> m = {'kernel': jnp.array([[True, True], [False, False]])}
    >>> u = drop_and_grow_update(m, {'kernel': jnp.array([[0.2, 0.9], [0.0, 0.0]])},
    ...                          {'kernel': jnp.array([[0.0, 0.0], [1.0, 0.3]])}, 0.5)
    >>> u.kept['kernel'].tolist(), u.grown['kernel'].tolist()  # floor(2 * 0.5) = 1 swap
    ([[False, True], [False, False]], [[False, False], [True, False]])
    """
    _check_scope(scope)
    _check_fraction(drop_fraction)
    _check_scores(drop_scores, masks, "drop_scores")
    _check_scores(grow_scores, masks, "grow_scores")
    pred = _predicate(is_maskable)
    score_trees = [drop_scores, grow_scores]
    f = jnp.clip(jnp.asarray(drop_fraction, jnp.float32), 0.0, 1.0)
    return _apply_per_scope(lambda m, ds, gs: _drop_grow_flat(m, ds, gs, f), masks,
                            score_trees, scope, pred)


def drop_and_grow(
    masks: PyTree,
    drop_scores: PyTree | None,
    grow_scores: PyTree | None,
    drop_fraction: float | jax.Array,
    *,
    scope: str = "global",
    is_maskable: MaskablePredicate | None = None,
) -> PyTree:
    """New masks after one prune-and-regrow step (see ``drop_and_grow_update``).

    >>> import jax.numpy as jnp
    >>> m = {'kernel': jnp.array([[True, True], [False, False]])}
    >>> w = {'kernel': jnp.array([[0.1, 0.9], [0.0, 0.0]])}
    >>> g = {'kernel': jnp.array([[0.0, 0.0], [0.2, 0.7]])}
    >>> drop_and_grow(m, w, g, 0.5)['kernel'].tolist()  # drop 0.1, grow the 0.7 entry
    [[False, True], [False, True]]
    """
    return drop_and_grow_update(
        masks, drop_scores, grow_scores, drop_fraction, scope=scope, is_maskable=is_maskable
    ).masks


def _resize_flat(m, ds, gs, target):
    active = jnp.sum(m, dtype=jnp.int32)

    def grow(_):
        return m, select_top(gs, target - active, eligible=~m)

    def shrink(_):
        return select_top(ds, target, eligible=m), jnp.zeros_like(m)

    return jax.lax.cond(target >= active, grow, shrink, None)


def resize_update(
    masks: PyTree,
    target_count: int | jax.Array,
    drop_scores: PyTree | None,
    grow_scores: PyTree | None,
    *,
    is_maskable: MaskablePredicate | None = None,
) -> MaskUpdate:
    """Masks with exactly ``target_count`` active entries over all maskable leaves together.

    Growing activates the inactive entries with the highest grow score (e.g. |dL_D/d(w*m)|);
    shrinking keeps the active entries with the highest drop score (e.g. |w|). Ties go to the
    lower flat index. A traced ``target_count`` is clipped to [1, N].

    >>> import jax.numpy as jnp
    >>> m = {'kernel': jnp.array([[True, True], [True, False]])}
    >>> u = resize_update(m, 1, {'kernel': jnp.array([[0.3, 0.1], [0.2, 0.0]])}, None)
    >>> u.masks['kernel'].tolist(), int(u.grown['kernel'].sum())  # shrinking grows nothing
    ([[True, False], [False, False]], 0)
    """
    _check_scores(drop_scores, masks, "drop_scores")
    _check_scores(grow_scores, masks, "grow_scores")
    pred = _predicate(is_maskable)
    capacity = num_maskable(masks, is_maskable=pred)
    if _is_concrete(target_count):
        t = int(np.asarray(target_count))
        if not 1 <= t <= capacity:
            raise ValueError(
                f"`target_count` must lie in [1, {capacity}] (the maskable entries), got {t}."
            )
    target = jnp.clip(jnp.asarray(target_count, jnp.int32), 1, capacity)
    return _apply_per_scope(lambda m, ds, gs: _resize_flat(m, ds, gs, target), masks,
                            [drop_scores, grow_scores], "global", pred)


def resize(
    masks: PyTree,
    target_count: int | jax.Array,
    drop_scores: PyTree | None,
    grow_scores: PyTree | None,
    *,
    is_maskable: MaskablePredicate | None = None,
) -> PyTree:
    """New masks with exactly ``target_count`` active maskable entries (see ``resize_update``).

    >>> import jax.numpy as jnp
    >>> m = {'kernel': jnp.array([[True, False], [False, False]])}
    >>> g = {'kernel': jnp.array([[0.0, 0.5], [0.9, 0.1]])}
    >>> resize(m, 3, None, g)['kernel'].tolist()
    [[True, True], [True, False]]
    """
    return resize_update(masks, target_count, drop_scores, grow_scores,
                         is_maskable=is_maskable).masks


def params_after_update(params: PyTree, update: MaskUpdate) -> PyTree:
    """Params for the new masks: kept entries keep their values; grown and inactive ones are 0.

    >>> import jax.numpy as jnp
    >>> u = MaskUpdate(masks={'w': jnp.array([True, True, False])},
    ...                kept={'w': jnp.array([True, False, False])},
    ...                grown={'w': jnp.array([False, True, False])})
    >>> params_after_update({'w': jnp.array([1.0, 2.0, 3.0])}, u)['w'].tolist()
    [1.0, 0.0, 0.0]
    """
    return apply_masks(params, update.kept)
