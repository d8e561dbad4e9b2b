"""Dynamic sparse training (RigL) of a small Flax classifier with ddst_jax's sparsity pieces.

What it shows, on a synthetic Gaussian-mixture problem:
- ERK layer densities (`erk_densities`) and masks with exact active counts (`init_masks`);
- a plain `jax.jit` + optax train step that multiplies the masks into the params (`apply_masks`)
  and returns the dense gradient w.r.t. the effective weights w*m: RigL's grow score;
- every `update_every` steps one RigL update: drop the smallest |w|, grow the largest |grad|
  (`drop_and_grow_update`), by the cosine drop fraction (`cosine_drop_fraction`,
  `is_update_step`); regrown weights start at 0 (`params_after_update`) and their Adam moments
  are zeroed (`optimizer_state_after_regrowth(..., policy="rigl")`);
- the masks are an *argument* of the jitted step, so mask updates never retrace it.

Run: python examples/dst_classifier.py [--small] [--scope global]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ddst_jax import sparsity as sp

PyTree = Any
# "rigl": masked gradients reach Adam, and moments restart at 0 where a weight regrows.
POLICY = "rigl"


class MLP(nn.Module):
    """Two hidden ReLU layers; all three kernels are maskable under the default predicate."""

    hidden: int
    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Dense(self.hidden)(x))
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.num_classes)(x)


def make_data(key: jax.Array, centres: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """n labelled points of a Gaussian mixture: a unit-variance blob around each class centre."""
    k_y, k_x = jax.random.split(key)
    y = jax.random.randint(k_y, (n,), 0, centres.shape[0])
    return centres[y] + jax.random.normal(k_x, centres[y].shape), y


def cross_entropy(model: nn.Module, params: PyTree, x: jax.Array, y: jax.Array) -> jax.Array:
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def layer_counts(masks: PyTree) -> dict[str, int]:
    """Active entries of every maskable leaf, by path (host-side numpy: no compile)."""
    return {sp.path_str(p): int(np.asarray(m).sum()) for p, m in sp.maskable_leaves(masks)}


def max_at(tree: PyTree, where: PyTree) -> float:
    """max |x| over the positions where ``where`` holds (0.0 if none), on the host."""
    leaves = zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(where), strict=True)
    return float(max(np.max(np.abs(np.asarray(x)) * np.asarray(w)) for x, w in leaves))


def make_fns(model: nn.Module, tx: optax.GradientTransformation, densities: PyTree,
             total_steps: int, scope: str, traces: dict[str, int]):
    """Jitted init, train step, mask update and evaluation; ``traces`` counts their traces."""

    @jax.jit
    def init(key, x):
        k_init, k_mask = jax.random.split(key)
        params = model.init(k_init, x)["params"]
        masks = sp.init_masks(k_mask, params, densities)  # exact counts, jittable
        params = sp.apply_masks(params, masks)  # inactive weights are exactly 0 from the start
        return params, tx.init(params), masks

    @jax.jit
    def train_step(params, opt_state, masks, x, y):
        traces["train_step"] += 1  # a Python side effect: runs at trace time only
        # Differentiate w.r.t. the effective weights w*m: the gradient is dense (nonzero at
        # inactive entries too), which is what RigL ranks to choose entries to grow.
        eff = sp.apply_masks(params, masks)
        loss, grads = jax.value_and_grad(lambda p: cross_entropy(model, p, x, y))(eff)
        params, opt_state = sp.sparse_update(tx, grads, opt_state, params, masks, POLICY)
        return params, opt_state, loss, grads

    @jax.jit
    def mask_update(params, opt_state, masks, grads, step):
        traces["mask_update"] += 1
        fraction = sp.cosine_drop_fraction(step, total_steps, initial=0.3, final=0.005)
        upd = sp.drop_and_grow_update(masks, sp.magnitude_scores(params),
                                      sp.gradient_scores(grads), fraction, scope=scope)
        params = sp.params_after_update(params, upd)  # grown entries start at exactly 0
        opt_state = sp.optimizer_state_after_regrowth(tx, opt_state, upd.grown, policy=POLICY)
        return params, opt_state, upd, fraction

    @jax.jit
    def evaluate(params, masks, x, y):
        eff = sp.apply_masks(params, masks)
        accuracy = jnp.mean(jnp.argmax(model.apply({"params": eff}, x), -1) == y)
        return cross_entropy(model, eff, x, y), accuracy

    return init, train_step, mask_update, evaluate


def run(steps: int = 600, hidden: int = 128, density: float = 0.1, update_every: int = 50,
        scope: str = "layer", batch: int = 128, seed: int = 0,
        verbose: bool = True) -> dict[str, Any]:
    """Train the sparse MLP; returns counts, losses, accuracy and trace counts.

    Args:
      steps: optimizer steps (the cosine schedule's T).
      hidden: hidden width.
      density: overall density of the maskable kernels (ERK across layers).
      update_every: RigL update interval in steps (never at the last step).
      scope: "layer" keeps every layer's count (RigL); "global" only the total (the paper's G).
      batch: batch size.
      seed: PRNG seed for data, init and masks.
      verbose: print a line per mask update.
    """
    dim, num_classes = 16, 8
    k_centres, k_train, k_test, k_init = jax.random.split(jax.random.key(seed), 4)
    centres = 0.6 * jax.random.normal(k_centres, (num_classes, dim))
    data = jax.jit(make_data, static_argnums=2)
    # Host (numpy) copies: slicing them into batches compiles nothing.
    x_train, y_train = jax.device_get(data(k_train, centres, 4096))
    x_test, y_test = jax.device_get(data(k_test, centres, 1024))

    model = MLP(hidden, num_classes)
    tx = optax.adam(3e-3)
    # ERK needs only shapes: eval_shape gives them without running the init.
    shapes = jax.eval_shape(model.init, k_init, x_train[:1])["params"]
    densities = sp.erk_densities(shapes, density)  # small layers get denser, budget exact
    traces = {"train_step": 0, "mask_update": 0}
    init, train_step, mask_update, evaluate = make_fns(model, tx, densities, steps, scope,
                                                       traces)
    params, opt_state, masks = init(k_init, x_train[:1])
    init_counts = layer_counts(masks)
    initial_loss, _ = evaluate(params, masks, x_train, y_train)
    if verbose:
        dens = {sp.path_str(p): d for p, d in jax.tree_util.tree_leaves_with_path(densities)}
        print(f"ERK densities at d={density}: "
              + ", ".join(f"{k}={dens[k]:.3f}" for k in init_counts))
        print(f"active per layer: {init_counts}  (total {sum(init_counts.values())})")

    history = []
    for step in range(1, steps + 1):
        lo = (step - 1) * batch % x_train.shape[0]
        x, y = x_train[lo:lo + batch], y_train[lo:lo + batch]
        params, opt_state, loss, grads = train_step(params, opt_state, masks, x, y)
        if sp.is_update_step(step, update_every, steps):
            params, opt_state, upd, fraction = mask_update(params, opt_state, masks, grads, step)
            masks = upd.masks
            history.append({
                "step": step,
                "fraction": float(fraction),
                "swapped": sum(layer_counts(upd.grown).values()),  # = the number dropped
                "counts": layer_counts(masks),
                # Both must be exactly 0 right after the update (checked in `check`).
                "max_grown_weight": max_at(params, upd.grown),
                "max_grown_moment": max(
                    max_at(optax.tree_utils.tree_get(opt_state, name), upd.grown)
                    for name in ("mu", "nu")),  # Adam's first and second moments
            })
            if verbose:
                print(f"step {step:4d}  loss {float(loss):.3f}  drop fraction {float(fraction):.3f}"
                      f"  swapped {history[-1]['swapped']:4d}"
                      f"  active {sum(history[-1]['counts'].values())}")

    final_loss, accuracy = evaluate(params, masks, x_train, y_train)
    _, test_accuracy = evaluate(params, masks, x_test, y_test)
    leaves = zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(masks), strict=True)
    result = {
        "initial_loss": float(initial_loss),
        "final_loss": float(final_loss),
        "train_accuracy": float(accuracy),
        "test_accuracy": float(test_accuracy),
        "init_counts": init_counts,
        "final_counts": layer_counts(masks),
        "history": history,
        "inactive_nonzero": int(sum(np.sum(~np.asarray(m) & (np.asarray(p) != 0))
                                    for p, m in leaves)),
        "traces": dict(traces),
        "scope": scope,
    }
    check(result)
    if verbose:
        print(f"loss {result['initial_loss']:.3f} -> {result['final_loss']:.3f}, "
              f"test accuracy {result['test_accuracy']:.3f}, traces {result['traces']}")
        print("OK: counts exact after every update, regrown weights and moments started at 0, "
              "one trace per jitted function.")
    return result


def check(result: dict[str, Any]) -> None:
    """The invariants this example demonstrates."""
    total = sum(result["init_counts"].values())
    for h in result["history"]:
        assert sum(h["counts"].values()) == total, h  # drop-and-grow keeps the count exactly
        if result["scope"] == "layer":
            assert h["counts"] == result["init_counts"], h  # ... and per layer in "layer" scope
        assert h["max_grown_weight"] == 0.0 and h["max_grown_moment"] == 0.0, h
    assert result["history"] and result["history"][0]["swapped"] > 0, "masks never changed"
    assert result["inactive_nonzero"] == 0
    # Mask updates do not retrace the train step: masks are data, not static structure.
    assert result["traces"] == {"train_step": 1, "mask_update": 1}, result["traces"]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--update_every", type=int, default=50)
    parser.add_argument("--scope", choices=sp.SCOPES, default="layer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="100 steps, width 64")
    args = parser.parse_args(argv)
    if args.small:
        args.steps, args.hidden, args.update_every = 100, 64, 20
    return run(steps=args.steps, hidden=args.hidden, density=args.density,
               update_every=args.update_every, scope=args.scope, seed=args.seed)


if __name__ == "__main__":
    main()
