"""Masks: bool pytrees with the structure of the parameters.

A mask tree has exactly the structure, shapes and key paths of the parameter tree it belongs to.
Maskable leaves hold a bool array with some entries False; every other leaf holds an all-True
array (never ``None``), so ``apply_masks`` is a plain ``tree_map`` and masks travel through
``jit``, ``vmap``, checkpoints and shardings like any other pytree.

Which leaves are maskable is decided by a predicate ``(path, leaf) -> bool`` evaluated on the key
path and the array. Because mask trees share paths and shapes with the parameters, the same
predicate works on either tree.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
KeyPath = tuple[Any, ...]
MaskablePredicate = Callable[[KeyPath, Any], bool]

def key_name(key: Any) -> str:
    """The plain name of one entry of a JAX key path (dict key, attribute or index).

    >>> import jax
    >>> key_name(jax.tree_util.DictKey('kernel')), key_name(jax.tree_util.SequenceKey(2))
    ('kernel', '2')
    """
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(path: KeyPath) -> str:
    """A key path as ``'Block_0/Conv_0/kernel'``.

    >>> import jax
    >>> [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path({'a': {'kernel': 0}})]
    ['a/kernel']
    """
    return "/".join(key_name(k) for k in path)


def default_is_maskable(path: KeyPath, leaf: Any) -> bool:
    """docs/method.md section 1: every conv/dense ``kernel`` (also under spectral norm) with at
    least two dimensions is maskable; nothing else is.

    Biases, normalisation scales/offsets, embeddings (leaves named ``embedding``) and
    spectral-norm ``u``/``sigma`` state (another collection) are not. The library knows no
    model names: a model that keeps some kernels dense (BigGAN's classifier head, say) passes
    its own predicate (``gan.registry.ModelPair.is_maskable``, or ``maskable_except``).

    >>> import numpy as np
    >>> default_is_maskable(('Conv_0', 'kernel'), np.zeros((3, 3, 3, 8)))
    True
    >>> default_is_maskable(('Conv_0', 'bias'), np.zeros((8,)))
    False
    >>> default_is_maskable(('embed', 'kernel'), np.zeros((4, 8)))  # any name
    True
    """
    names = [key_name(k) for k in path]
    return bool(names) and names[-1] == "kernel" and np.ndim(leaf) >= 2


def maskable_except(patterns: Sequence[str]) -> MaskablePredicate:
    """The default predicate, additionally keeping dense every leaf whose path contains a pattern.

    Patterns match substrings of the whole ``'a/b/kernel'`` path: ``'Conv_0'`` also matches
    ``'Block_1/Conv_0/kernel'``; anchor it (e.g. ``'stem/'``) to keep one layer dense.

    >>> import numpy as np
    >>> pred, w = maskable_except(['Conv_0']), np.zeros((3, 3, 3, 8))
    >>> pred(('Conv_0', 'kernel'), w), pred(('Block_0', 'Conv_0', 'kernel'), w)
    (False, False)
    >>> pred(('Conv_1', 'kernel'), w)
    True
    """
    patterns = tuple(patterns)

    def predicate(path: KeyPath, leaf: Any) -> bool:
        return default_is_maskable(path, leaf) and not any(p in path_str(path) for p in patterns)

    return predicate


def _predicate(is_maskable: MaskablePredicate | None) -> MaskablePredicate:
    return default_is_maskable if is_maskable is None else is_maskable


def maskable_tree(tree: PyTree, is_maskable: MaskablePredicate | None = None) -> PyTree:
    """A pytree like ``tree`` of Python bools: which leaves are maskable.

    >>> import numpy as np
    >>> maskable_tree({'Dense_0': {'kernel': np.zeros((2, 3)), 'bias': np.zeros(3)}})
    {'Dense_0': {'bias': False, 'kernel': True}}
    """
    pred = _predicate(is_maskable)
    return jax.tree_util.tree_map_with_path(lambda p, x: bool(pred(p, x)), tree)


def maskable_leaves(
    tree: PyTree, is_maskable: MaskablePredicate | None = None
) -> list[tuple[KeyPath, Any]]:
    """The ``(path, leaf)`` pairs of the maskable leaves, in tree-flatten order.

    >>> import numpy as np
    >>> params = {'Dense_0': {'kernel': np.zeros((2, 3)), 'bias': np.zeros(3)}}
    >>> [path_str(p) for p, _ in maskable_leaves(params)]
    ['Dense_0/kernel']
    """
    pred = _predicate(is_maskable)
    return [(p, x) for p, x in jax.tree_util.tree_leaves_with_path(tree) if pred(p, x)]


def check_same_structure(
    a: PyTree, b: PyTree, name_a: str, name_b: str, *, shapes: bool = True
) -> None:
    """Raise ``ValueError`` naming the first difference if two trees differ in structure/shapes.

    >>> import numpy as np
    >>> check_same_structure({'w': np.zeros(2)}, {'w': np.zeros(3)}, 'params', 'masks')
    Traceback (most recent call last):
      ...
    ValueError: `params` and `masks` differ in shape at 'w': (2,) vs (3,).
    """
    paths_a = jax.tree_util.tree_leaves_with_path(a)
    paths_b = jax.tree_util.tree_leaves_with_path(b)
    keys_a = [path_str(p) for p, _ in paths_a]
    keys_b = [path_str(p) for p, _ in paths_b]
    if keys_a != keys_b:
        missing = sorted(set(keys_a) - set(keys_b))
        extra = sorted(set(keys_b) - set(keys_a))
        detail = (
            f"{name_b} lacks {missing[:3]}" if missing else f"{name_b} has extra {extra[:3]}"
        ) if (missing or extra) else "leaf order differs"
        raise ValueError(
            f"`{name_a}` and `{name_b}` must have the same tree structure: {detail}. "
            f"Build {name_b} from the same parameter tree (e.g. init_masks(key, params, ...))."
        )
    for (path, x), (_, y) in zip(paths_a, paths_b, strict=True):
        if shapes and np.shape(x) != np.shape(y):
            raise ValueError(
                f"`{name_a}` and `{name_b}` differ in shape at '{path_str(path)}': "
                f"{np.shape(x)} vs {np.shape(y)}."
            )


def count_for_density(density: float, size: int) -> int:
    """Exact active count for a density: ``round(density * size)``, half up, at least 1.

    >>> count_for_density(0.1, 27), count_for_density(0.25, 2), count_for_density(1e-9, 100)
    (3, 1, 1)
    """
    return int(min(size, max(1, math.floor(density * size + 0.5))))


def validate_density(density: float, name: str = "density") -> float:
    """Return ``density`` as float if it lies in (0, 1]; otherwise raise a clear ``ValueError``.

    >>> validate_density(1)
    1.0
    >>> validate_density(0.0, 'd_min')
    Traceback (most recent call last):
      ...
    ValueError: `d_min` must lie in (0, 1], got 0.0.
    """
    d = float(density)
    if not (0.0 < d <= 1.0) or math.isnan(d):
        raise ValueError(f"`{name}` must lie in (0, 1], got {density!r}.")
    return d


#: How ``init_masks`` draws active entries: exact counts, or independent Bernoulli(d) draws.
MASK_SAMPLINGS = ("exact", "bernoulli")


def init_masks(
    key: jax.Array,
    params: PyTree,
    densities: PyTree | float,
    *,
    is_maskable: MaskablePredicate | None = None,
    sampling: str = "exact",
) -> PyTree:
    """Random masks with exactly ``round(d * N)`` active entries per maskable leaf (at least 1).

    Active positions are drawn uniformly without replacement from ``key``; each leaf uses the key
    folded with its flatten index, so the draw is the same on every process holding ``key``.
    ``sampling="bernoulli"`` instead draws every entry independently with probability ``d`` (what
    the paper's code does): the count is then random (mean ``d * N``, possibly 0).

    Args:
      key: a PRNG key (typed or raw), shared by all processes.
      params: parameter pytree (arrays or ``ShapeDtypeStruct``s).
      densities: one float for every maskable leaf, or a pytree like ``params`` of Python floats
        (as returned by ``erk_densities``); entries of non-maskable leaves are ignored.
      is_maskable: predicate ``(path, leaf) -> bool``; defaults to ``default_is_maskable``.
      sampling: ``"exact"`` (exact counts, the default) or ``"bernoulli"`` (independent draws).

    Returns:
      A bool pytree like ``params``; all-True at non-maskable leaves.

    >>> import jax, jax.numpy as jnp
    >>> m = init_masks(jax.random.key(0), {'kernel': jnp.zeros((4, 5))}, 0.25)
    >>> int(m['kernel'].sum())
    5
    >>> m = init_masks(jax.random.key(0), {'kernel': jnp.zeros((400, 50))}, 0.25,
    ...                sampling="bernoulli")
    >>> 4700 < int(m['kernel'].sum()) < 5300
    True
    """
    if sampling not in MASK_SAMPLINGS:
        raise ValueError(f"Unknown mask `sampling` {sampling!r}; use one of {MASK_SAMPLINGS}.")
    pred = _predicate(is_maskable)
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    if np.ndim(densities) == 0 and not isinstance(densities, dict | list | tuple):
        dens = [float(densities)] * len(leaves_with_path)  # any scalar, e.g. np.float32
    else:
        check_same_structure(params, densities, "params", "densities", shapes=False)
        dens = jax.tree_util.tree_leaves(densities)
    out = []
    for i, ((path, leaf), d) in enumerate(zip(leaves_with_path, dens, strict=True)):
        shape = np.shape(leaf)
        if not pred(path, leaf):
            out.append(jnp.ones(shape, dtype=bool))
            continue
        d = validate_density(d, f"densities['{path_str(path)}']")
        size = int(np.prod(shape))
        if sampling == "bernoulli":
            # Density 1 stays exactly dense (the paper's code forces such layers to all-ones).
            draw = jax.random.bernoulli(jax.random.fold_in(key, i), d, shape)
            out.append(jnp.ones(shape, dtype=bool) if d >= 1.0 else draw)
            continue
        k = count_for_density(d, size)
        # A random permutation's first k positions: uniform without replacement, exact count.
        chosen = jax.random.permutation(jax.random.fold_in(key, i), size)[:k]
        flat = jnp.zeros((size,), dtype=bool).at[chosen].set(True)
        out.append(flat.reshape(shape))
    return jax.tree_util.tree_unflatten(treedef, out)


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
    """Effective parameters ``w * m`` (inactive entries exactly 0, dtype of ``params`` kept).

    >>> import jax.numpy as jnp
    >>> apply_masks({'w': jnp.array([1., 2.])}, {'w': jnp.array([True, False])})['w'].tolist()
    [1.0, 0.0]
    """
    check_same_structure(params, masks, "params", "masks")
    return jax.tree_util.tree_map(
        lambda p, m: jnp.where(m, p, jnp.zeros((), p.dtype)), params, masks
    )


def count_active(
    masks: PyTree, *, is_maskable: MaskablePredicate | None = None, per_leaf: bool = False
) -> jax.Array | PyTree:
    """Active entries over the maskable leaves (int32 scalar), or per leaf with ``per_leaf=True``.

    Per leaf (a pytree like ``masks`` of int32 scalars), maskable leaves report their active
    count and non-maskable leaves (by ``is_maskable``) their full size, whatever their mask
    holds. For the maskable leaves' counts as one array, see ``layer_counts``.

    >>> import jax, jax.numpy as jnp
    >>> m = {'bias': jnp.ones((2,), bool), 'kernel': jnp.array([[True, False], [True, True]])}
    >>> int(count_active(m)), jax.tree_util.tree_map(int, count_active(m, per_leaf=True))
    (3, {'bias': 2, 'kernel': 3})
    """
    pred = _predicate(is_maskable)
    if per_leaf:
        return jax.tree_util.tree_map_with_path(
            lambda p, m: jnp.sum(m, dtype=jnp.int32) if pred(p, m)
            else jnp.asarray(int(np.prod(np.shape(m))), jnp.int32), masks)
    counts = [jnp.sum(m, dtype=jnp.int32) for p, m in jax.tree_util.tree_leaves_with_path(masks)
              if pred(p, m)]
    return sum(counts, jnp.zeros((), jnp.int32))


def layer_counts(masks: PyTree, is_maskable: MaskablePredicate | None = None) -> jax.Array:
    """Active entries of each maskable leaf: int32 ``(num maskable leaves,)``.

    In tree-flatten order, i.e. the order of ``maskable_leaves`` (name the entries with
    ``path_str``); shape ``(0,)`` when no leaf is maskable. Works under ``jit`` (the shape is
    static), so per-layer counts can be returned as one small array from a jitted step.

    >>> import jax.numpy as jnp
    >>> m = {'b': {'kernel': jnp.ones((2, 2), bool)}, 'bias': jnp.ones((3,), bool),
    ...      'a': {'kernel': jnp.array([[True, False], [False, False]])}}
    >>> layer_counts(m).tolist()
    [1, 4]
    """
    leaves = maskable_leaves(masks, is_maskable)
    if not leaves:
        return jnp.zeros((0,), jnp.int32)
    return jnp.stack([jnp.sum(m, dtype=jnp.int32) for _, m in leaves])


def num_maskable(tree: PyTree, *, is_maskable: MaskablePredicate | None = None) -> int:
    """Number of maskable entries N (a Python int) of a params or mask tree.

    >>> import numpy as np
    >>> num_maskable({'kernel': np.zeros((3, 4)), 'bias': np.zeros(4)})
    12
    """
    return int(sum(int(np.prod(np.shape(x))) for _, x in maskable_leaves(tree, is_maskable)))


def density(
    masks: PyTree, *, is_maskable: MaskablePredicate | None = None, per_leaf: bool = False
) -> jax.Array | PyTree:
    """Fraction of active maskable entries (float32), overall or per leaf (1.0 if not maskable).

    >>> import jax.numpy as jnp
    >>> float(density({'kernel': jnp.array([[True, False], [False, False]])}))
    0.25
    """
    if per_leaf:
        pred = _predicate(is_maskable)
        return jax.tree_util.tree_map_with_path(
            lambda p, m: jnp.mean(m, dtype=jnp.float32) if pred(p, m)
            else jnp.ones((), jnp.float32), masks)
    total = num_maskable(masks, is_maskable=is_maskable)
    if total == 0:
        return jnp.ones((), jnp.float32)
    return count_active(masks, is_maskable=is_maskable).astype(jnp.float32) / total


def dense_masks(params: PyTree) -> PyTree:
    """All-True masks like ``params`` (the dense method).

    >>> import numpy as np
    >>> dense_masks({'kernel': np.zeros((1, 2))})['kernel'].tolist()
    [[True, True]]
    """
    return jax.tree_util.tree_map(lambda p: jnp.ones(np.shape(p), bool), params)
