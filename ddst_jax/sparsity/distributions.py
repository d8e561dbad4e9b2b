"""Layer-wise density distributions: uniform and Erdos-Renyi-Kernel (ERK); docs/method.md 3."""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from ddst_jax.sparsity.masks import MaskablePredicate, _predicate, validate_density

PyTree = Any
_DENSE_TOL = 1e-12


def uniform_densities(
    params: PyTree, density: float, *, is_maskable: MaskablePredicate | None = None
) -> PyTree:
    """Every maskable leaf at ``density``; 1.0 elsewhere. Returns a pytree of Python floats.

    >>> import numpy as np
    >>> uniform_densities({'kernel': np.zeros((2, 2)), 'bias': np.zeros(2)}, 0.3)
    {'bias': 1.0, 'kernel': 0.3}
    """
    d = validate_density(density)
    pred = _predicate(is_maskable)
    return jax.tree_util.tree_map_with_path(lambda p, x: d if pred(p, x) else 1.0, params)


def erk_raw_score(shape: tuple[int, ...], power: float = 1.0) -> float:
    """ERK's unnormalised density ``(sum(shape) / prod(shape)) ** power`` (kernel dims included).

    >>> erk_raw_score((3, 3, 4, 8))  # (3 + 3 + 4 + 8) / 288
    0.0625
    """
    return (sum(shape) / math.prod(shape)) ** power


def erk_densities(
    params: PyTree,
    density: float,
    *,
    is_maskable: MaskablePredicate | None = None,
    power: float = 1.0,
) -> PyTree:
    """ERK densities with the overall maskable budget ``density * N`` kept exactly (in reals).

    Solves ``eps * sum_free raw_l N_l + sum_dense N_l = density * sum_l N_l``; while the largest
    free ``eps * raw_l`` exceeds 1, every free layer attaining that maximum is forced dense and
    ``eps`` is solved again (docs/method.md section 3).

    Args:
      params: parameter pytree (arrays or ``ShapeDtypeStruct``s).
      density: target overall density of the maskable leaves, in (0, 1].
      is_maskable: predicate ``(path, leaf) -> bool``; defaults to ``default_is_maskable``.
      power: exponent on the raw scores (1.0 is ERK).

    Returns:
      A pytree like ``params`` of Python floats: ``eps * raw_l`` for free leaves, exactly 1.0 for
      forced-dense and non-maskable leaves.

    >>> import numpy as np
    >>> params = {'a': {'kernel': np.zeros((2, 2))}, 'b': {'kernel': np.zeros((8, 8))}}
    >>> erk_densities(params, 0.5)  # 'a' (raw 1.0) is forced dense: (4 + 0.46875 * 64) / 68
    {'a': {'kernel': 1.0}, 'b': {'kernel': 0.46875}}
    """
    d = validate_density(density)
    pred = _predicate(is_maskable)
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    shapes = {i: tuple(np.shape(x)) for i, (p, x) in enumerate(leaves_with_path) if pred(p, x)}
    if not shapes:
        return jax.tree_util.tree_unflatten(treedef, [1.0] * len(leaves_with_path))
    sizes = {i: math.prod(s) for i, s in shapes.items()}
    raw = {i: erk_raw_score(s, power) for i, s in shapes.items()}
    budget = d * sum(sizes.values())
    dense: set[int] = set()
    while True:
        free = [i for i in shapes if i not in dense]
        if not free:
            eps = 0.0
            break
        eps = (budget - sum(sizes[i] for i in dense)) / sum(raw[i] * sizes[i] for i in free)
        max_raw = max(raw[i] for i in free)
        # The tolerance makes a layer that would land at 1.0 up to rounding exactly dense.
        if eps * max_raw < 1.0 - _DENSE_TOL:
            break
        # Identical shapes give bit-identical raw scores, so equality picks every tied layer.
        dense.update(i for i in free if raw[i] == max_raw)
    out = []
    for i in range(len(leaves_with_path)):
        if i not in shapes or i in dense:
            out.append(1.0)
        else:
            out.append(eps * raw[i])
    return jax.tree_util.tree_unflatten(treedef, out)


def layer_densities(
    params: PyTree,
    density: float,
    distribution: str = "erk",
    *,
    is_maskable: MaskablePredicate | None = None,
    power: float = 1.0,
) -> PyTree:
    """Dispatch on a distribution name: ``'erk'`` or ``'uniform'``.

    >>> import numpy as np
    >>> layer_densities({'kernel': np.zeros((4, 4)), 'bias': np.zeros(4)}, 0.5, 'uniform')
    {'bias': 1.0, 'kernel': 0.5}
    """
    if distribution == "erk":
        return erk_densities(params, density, is_maskable=is_maskable, power=power)
    if distribution == "uniform":
        return uniform_densities(params, density, is_maskable=is_maskable)
    raise ValueError(f"Unknown `distribution` {distribution!r}; use 'erk' or 'uniform'.")
