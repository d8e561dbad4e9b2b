"""Helpers shared by the model tests (test_models.py, test_biggan.py)."""

import math

import jax


def key(seed: int) -> jax.Array:
    # The "rbg" PRNG compiles several times faster than threefry on XLA:CPU, and model inits are
    # dominated by the compilation of their random draws. The models do not depend on the impl.
    return jax.random.key(seed, impl="rbg")


def size(tree) -> int:
    """Number of scalars in a pytree of arrays or ShapeDtypeStructs."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def leaves_by_path(tree) -> dict[str, jax.Array]:
    """``{'a/b/kernel': leaf}`` for every leaf of a nested dict."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(k.key for k in path): leaf for path, leaf in flat}
