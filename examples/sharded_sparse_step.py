"""A sparse (RigL) train step under a device mesh: masks are just replicated state.

What it shows:
- one fused, jitted step: masked forward/backward, optimizer update, and on update steps
  (`is_update_step` under `lax.cond`) a drop-and-grow of the masks, all in one program;
- data parallelism with `jax.make_mesh` on a 'data' axis: the state (params, optimizer state,
  masks) is replicated with NamedSharding(mesh, P()), the batch sharded with P('data');
- masks need nothing beyond replication: they are drawn from one key shared by all devices,
  and the mask update ranks all-reduced gradients and replicated weights, so every device
  computes the same top-k and holds the same mask;
- the sharded run matches the single-device run (masks exactly, params to float tolerance),
  and the compiled step really all-reduces across the mesh.

Run: python examples/sharded_sparse_step.py [--small] [--devices 4]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ddst_jax import sparsity as sp

if __name__ == "__main__":
    # Fake 4 CPU devices so that a laptop or CI box has a real mesh to shard over. This must
    # run before JAX creates its CPU backend (on the first computation or `jax.devices()`):
    # the device count is fixed then. It only affects the CPU platform; on a GPU/TPU host the
    # mesh uses the accelerators. (Under pytest, conftest.py sets 8 devices the same way.)
    jax.config.update("jax_num_cpu_devices", 4)

PyTree = Any
POLICY = "rigl"


class SparseState(NamedTuple):
    """Everything the step updates; one pytree, so one sharding spec covers it."""

    step: jax.Array
    params: PyTree
    opt_state: PyTree
    masks: PyTree


class MLP(nn.Module):
    hidden: int
    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Dense(self.hidden)(x))
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.num_classes)(x)


def make_fns(model: nn.Module, tx: optax.GradientTransformation, densities: PyTree,
             total_steps: int, update_every: int):
    """Pure init and step functions; jit (and shardings) are applied by the caller."""

    def init(key: jax.Array, x: jax.Array) -> SparseState:
        k_init, k_mask = jax.random.split(key)
        params = model.init(k_init, x)["params"]
        masks = sp.init_masks(k_mask, params, densities)  # same key -> same mask everywhere
        params = sp.apply_masks(params, masks)
        return SparseState(jnp.zeros((), jnp.int32), params, tx.init(params), masks)

    def step(state: SparseState, x: jax.Array, y: jax.Array) -> tuple[SparseState, jax.Array]:
        def loss_fn(eff):
            logits = model.apply({"params": eff}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        # The batch is sharded, so this mean (and its gradient) needs an all-reduce; XLA inserts
        # it because the outputs are declared replicated.
        loss, grads = jax.value_and_grad(loss_fn)(sp.apply_masks(state.params, state.masks))
        params, opt_state = sp.sparse_update(tx, grads, state.opt_state, state.params,
                                             state.masks, POLICY)
        t = state.step + 1

        def update(operands):
            params, opt_state, masks = operands
            fraction = sp.cosine_drop_fraction(t, total_steps, initial=0.3)
            upd = sp.drop_and_grow_update(masks, sp.magnitude_scores(params),
                                          sp.gradient_scores(grads), fraction)
            opt_state = sp.optimizer_state_after_regrowth(tx, opt_state, upd.grown, POLICY)
            return sp.params_after_update(params, upd), opt_state, upd.masks

        # A traced predicate: the same compiled program serves update and plain steps.
        params, opt_state, masks = jax.lax.cond(
            sp.is_update_step(t, update_every, total_steps), update, lambda o: o,
            (params, opt_state, state.masks))
        return SparseState(t, params, opt_state, masks), loss

    return init, step


def make_data(key: jax.Array, n: int, dim: int = 16, num_classes: int = 8):
    k_c, k_y, k_x = jax.random.split(key, 3)
    centres = 0.6 * jax.random.normal(k_c, (num_classes, dim))
    y = jax.random.randint(k_y, (n,), 0, num_classes)
    return np.asarray(centres[y] + jax.random.normal(k_x, (n, dim))), np.asarray(y)


def train(init, step, x_all, y_all, steps: int, batch: int, key: jax.Array,
          batch_sharding=None):
    """Run ``steps`` steps; with ``batch_sharding`` each host batch is placed sharded."""
    state = init(key, x_all[:1])
    losses = []
    for i in range(steps):
        lo = i * batch % x_all.shape[0]
        x, y = x_all[lo:lo + batch], y_all[lo:lo + batch]
        if batch_sharding is not None:
            x, y = jax.device_put((x, y), batch_sharding)
        state, loss = step(state, x, y)
        # Wait for each step. On the CPU backend the fake devices share one small thread pool,
        # and with hundreds of collective steps dispatched ahead we saw XLA's in-process
        # all-reduce rendezvous time out and abort (2-core machine). One step in flight is safe.
        losses.append(loss.block_until_ready())
    return state, [float(v) for v in losses]


def replicas_identical(tree: PyTree) -> bool:
    """Every device's copy of every leaf holds the same values."""
    for leaf in jax.tree_util.tree_leaves(tree):
        shards = [np.asarray(s.data) for s in leaf.addressable_shards]
        if not all(np.array_equal(shards[0], s) for s in shards[1:]):
            return False
    return True


def run(steps: int = 300, update_every: int = 25, batch: int = 128, hidden: int = 128,
        density: float = 0.1, num_devices: int = 0, seed: int = 0,
        verbose: bool = True) -> dict[str, Any]:
    """Train the same sparse MLP on one device and on a 'data' mesh; compare.

    Args:
      steps, update_every: run length and RigL interval (no update at the last step).
      batch: global batch size (divisible by the device count).
      hidden: MLP width.
      density: overall ERK density of the kernels.
      num_devices: devices on the mesh (0: all visible).
      seed: PRNG seed.
      verbose: print the comparison.
    """
    n = num_devices or jax.device_count()
    if batch % n:
        raise ValueError(f"`batch` ({batch}) must be divisible by the device count ({n}).")
    key, k_data = jax.random.split(jax.random.key(seed))
    x_all, y_all = make_data(k_data, 4096)
    model, tx = MLP(hidden, 8), optax.adam(3e-3)
    shapes = jax.eval_shape(model.init, key, x_all[:1])["params"]
    init, step = make_fns(model, tx, sp.erk_densities(shapes, density), steps, update_every)

    # Reference: one device, no shardings at all.
    single_state, single_losses = train(jax.jit(init), jax.jit(step), x_all, y_all, steps,
                                        batch, key)

    # The mesh: Auto axes let XLA propagate the batch sharding through the step.
    mesh = jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:n])
    replicated, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    sharded_init = jax.jit(init, out_shardings=replicated)
    sharded_step = jax.jit(step, in_shardings=(replicated, batch_sharding, batch_sharding),
                           out_shardings=(replicated, replicated), donate_argnums=0)
    state, losses = train(sharded_init, sharded_step, x_all, y_all, steps, batch, key,
                          batch_sharding)

    hlo = sharded_step.lower(state, *jax.device_put((x_all[:batch], y_all[:batch]),
                                                     batch_sharding)).compile().as_text()
    counts = {sp.path_str(p): int(np.asarray(m).sum()) for p, m in sp.maskable_leaves(state.masks)}
    init_masks = jax.device_get(sharded_init(key, x_all[:1]).masks)
    result = {
        "num_devices": n,
        "masks_equal_single": all(np.array_equal(a, b) for a, b in zip(
            jax.tree_util.tree_leaves(jax.device_get(state.masks)),
            jax.tree_util.tree_leaves(jax.device_get(single_state.masks)), strict=True)),
        "masks_changed": any(not np.array_equal(a, b) for a, b in zip(
            jax.tree_util.tree_leaves(init_masks),
            jax.tree_util.tree_leaves(jax.device_get(state.masks)), strict=True)),
        "max_param_diff": max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(
            jax.tree_util.tree_leaves(state.params),
            jax.tree_util.tree_leaves(single_state.params), strict=True)),
        "max_loss_diff": max(abs(a - b) for a, b in zip(losses, single_losses, strict=True)),
        "replicas_identical": replicas_identical((state.params, state.masks)),
        "state_replicated": all(leaf.sharding.is_fully_replicated
                                for leaf in jax.tree_util.tree_leaves(state)),
        "all_reduce_in_step": "all-reduce" in hlo,
        "counts": counts,
        "init_counts": {sp.path_str(p): int(np.asarray(m).sum())
                        for p, m in sp.maskable_leaves(init_masks)},
        "losses": losses,
    }
    check(result)
    if verbose:
        print(f"mesh {dict(mesh.shape)} over {[d.id for d in mesh.devices.flat]}; "
              f"{steps} steps, masks updated every {update_every}")
        print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; max |loss diff| vs 1 device "
              f"{result['max_loss_diff']:.2e}; max |param diff| {result['max_param_diff']:.2e}")
        print(f"masks equal to the single-device run: {result['masks_equal_single']}; "
              f"identical on all {n} devices: {result['replicas_identical']}; "
              f"active per layer {counts}")
        print("OK: replicated masks, sharded batch, same result as one device.")
    return result


def check(result: dict[str, Any]) -> None:
    assert result["masks_changed"], "no mask update happened"
    # Global scope (the default): layer counts drift, the total stays exact.
    assert sum(result["counts"].values()) == sum(result["init_counts"].values())
    assert result["masks_equal_single"] and result["replicas_identical"]
    assert result["state_replicated"]
    # The all-reduce sums the gradient in another order than one device does, so params agree
    # to float rounding only; Adam's normalised step can turn rounding noise on a weight whose
    # gradient is ~0 into a move of up to lr (3e-3) per step, hence the tolerance.
    assert result["max_param_diff"] < 1e-3, result["max_param_diff"]
    assert result["max_loss_diff"] < 1e-4, result["max_loss_diff"]
    if result["num_devices"] > 1:
        assert result["all_reduce_in_step"]  # the batch really is split across devices


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--update_every", type=int, default=25)
    parser.add_argument("--devices", type=int, default=0, help="mesh size (0: all devices)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="60 steps, width 32")
    args = parser.parse_args(argv)
    hidden = 128
    if args.small:
        args.steps, args.update_every, hidden = 60, 10, 32
    return run(steps=args.steps, update_every=args.update_every, hidden=hidden,
               num_devices=args.devices, seed=args.seed)


if __name__ == "__main__":
    main()
