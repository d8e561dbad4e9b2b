"""ADAPT's BR-driven density controller on a discriminator of your own architecture.

What it shows:
- a user-written conv discriminator with its own layer names, and a maskable predicate of your
  own (here: every kernel except the stem's, which stays dense; `maskable_except(["stem"])`
  gives the same rule). Pass the predicate to *every* sparsity call that takes `is_maskable`;
- D trained sparse with masks multiplied in (`apply_masks`, `sparse_update`, "paper" policy);
- the BR window fed from the G step (see br_monitor_dense_gan.py for the triple);
- `make_density_control` / `init_controller_state` / `controller_step` deciding every `every`
  iterations once the window is full, and `control.apply_decision` turning the decision into
  masks: GROW/PRUNE are one `resize_update` to the decision's exact target count (GROW activates
  the inactive weights with the largest |dL_D/d(w*m)|, PRUNE keeps the active weights with the
  largest |w|); the strict setting at its cap runs one drop-and-grow instead (DST).
  `params_after_update` starts new weights at 0.

`--force grow` / `--force prune` sets a band that BR always clears, so every decision moves D's
density: the quickest way to see the machinery act. The schedule is scaled down from the paper
(dT_D 1000 -> 100 iterations, window 1000 -> 100 iterations measured every 5).

Run: python examples/adapt_custom_discriminator.py [--small] [--force grow --kind strict]
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

from ddst_jax import balance, control
from ddst_jax import sparsity as sp

PyTree = Any
POLICY = "paper"  # dense gradients reach Adam; regrown weights start at 0 with their moments
FORCED_BANDS = {"grow": (-1e6, -1e6 + 1.0), "prune": (1e6, 1e6 + 1.0)}


class MyCritic(nn.Module):
    """A user's discriminator: stem conv, two strided convs, linear score (raw, no sigmoid)."""

    width: int = 16

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.leaky_relu(nn.Conv(self.width, (3, 3), name="stem")(x), 0.2)
        x = nn.leaky_relu(nn.Conv(2 * self.width, (3, 3), strides=2, name="down1")(x), 0.2)
        x = nn.leaky_relu(nn.Conv(4 * self.width, (3, 3), strides=2, name="down2")(x), 0.2)
        return nn.Dense(1, name="score")(x.reshape(x.shape[0], -1))[:, 0]


class Generator(nn.Module):
    """A dense MLP generator of 8x8x1 images in [-1, 1]."""

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        x = nn.relu(nn.Dense(128)(z))
        return jnp.tanh(nn.Dense(64)(x)).reshape(z.shape[0], 8, 8, 1)


def is_maskable(path: tuple, leaf: Any) -> bool:
    """Our own rule, a plain function of (key path, array): every kernel but the stem's."""
    name = sp.path_str(path)
    return name.endswith("kernel") and not name.startswith("stem/")


def bars_batch(key: jax.Array, n: int) -> jax.Array:
    """n 8x8x1 images in [-1, 1]: one bright horizontal or vertical bar on a dark background."""
    k_dir, k_pos = jax.random.split(key)
    vertical = jax.random.bernoulli(k_dir, 0.5, (n, 1, 1))
    pos = jax.random.randint(k_pos, (n, 1, 1), 0, 8)
    idx = jnp.arange(8)
    bar = jnp.where(vertical, idx[None, None, :] == pos, idx[None, :, None] == pos)
    return jnp.where(bar, 1.0, -1.0)[..., None]


def make_fns(G: nn.Module, D: nn.Module, g_tx, d_tx, d_densities: PyTree,
             ctl: control.DensityControl, batch: int, z_dim: int) -> dict[str, Any]:
    """Jitted init, D step, G step, BR measurement, decision and the two ways D's masks change."""

    @jax.jit
    def init(key):
        k_g, k_d, k_m = jax.random.split(key, 3)
        g_params = G.init(k_g, jnp.zeros((1, z_dim)))["params"]
        d_params = D.init(k_d, jnp.zeros((1, 8, 8, 1)))["params"]
        d_masks = sp.init_masks(k_m, d_params, d_densities, is_maskable=is_maskable)
        d_params = sp.apply_masks(d_params, d_masks)
        return g_params, d_params, d_masks, g_tx.init(g_params), d_tx.init(d_params)

    def d_scores(d_params, d_masks, x):
        return D.apply({"params": sp.apply_masks(d_params, d_masks)}, x)

    @jax.jit
    def d_step(d_params, d_opt, d_masks, g_params, x_real, key):
        fake = G.apply({"params": g_params}, jax.random.normal(key, (batch, z_dim)))

        def loss_fn(eff):  # hinge loss, differentiated w.r.t. the effective weights w*m
            return (jnp.mean(nn.relu(1.0 - D.apply({"params": eff}, x_real)))
                    + jnp.mean(nn.relu(1.0 + D.apply({"params": eff}, fake))))

        loss, grads = jax.value_and_grad(loss_fn)(sp.apply_masks(d_params, d_masks))
        d_params, d_opt = sp.sparse_update(d_tx, grads, d_opt, d_params, d_masks, POLICY)
        return d_params, d_opt, loss, grads  # grads: the GROW score of a density increase

    @jax.jit
    def g_step(g_params, g_opt, d_params, d_masks, key):
        z = jax.random.normal(key, (batch, z_dim))

        def loss_fn(p):
            scores = d_scores(d_params, d_masks, G.apply({"params": p}, z))
            return -jnp.mean(scores), scores  # b = mean D(G_pre(z))

        (loss, b_scores), grads = jax.value_and_grad(loss_fn, has_aux=True)(g_params)
        updates, g_opt = g_tx.update(grads, g_opt, g_params)
        return optax.apply_updates(g_params, updates), g_opt, loss, z, b_scores

    @jax.jit
    def measure_br(window, g_params, d_params, d_masks, z, x_real, b_scores):
        a_scores = d_scores(d_params, d_masks, G.apply({"params": g_params}, z))
        c_scores = d_scores(d_params, d_masks, x_real)
        return balance.push(window, balance.balance_ratio(c_scores, b_scores, a_scores))

    @jax.jit
    def decide(ctrl, window, t):
        ctrl, decision = control.controller_step(ctrl, window, t, ctl)
        return ctrl, decision, balance.windowed_mean(window), balance.is_full(window)

    @jax.jit
    def apply_d(d_params, d_masks, d_opt, d_grads, decision, t):
        # The decision as masks (GAN-free): GROW/PRUNE resize to its exact target count (grow
        # by |grad|, keep the top |w|); DST is a drop-and-grow at D's own cosine drop fraction.
        fraction = sp.cosine_drop_fraction(t, ctl.total_iterations, initial=0.5, final=0.005)
        upd = control.apply_decision(d_masks, decision, sp.magnitude_scores(d_params),
                                     sp.gradient_scores(d_grads), drop_fraction=fraction,
                                     is_maskable=is_maskable)
        d_opt = sp.optimizer_state_after_regrowth(d_tx, d_opt, upd.grown, POLICY)
        return sp.params_after_update(d_params, upd), d_opt, upd

    return {"init": init, "d_step": d_step, "g_step": g_step, "measure_br": measure_br,
            "decide": decide, "apply_d": apply_d}


def host_count(masks: PyTree) -> int:
    """Active maskable entries under our predicate, counted on the host."""
    return sum(int(np.asarray(m).sum()) for _, m in sp.maskable_leaves(masks, is_maskable))


def run(iterations: int = 1000, kind: str = "relaxed", force: str | None = None,
        band: tuple[float, float] | None = None, every: int = 100, br_every: int = 5,
        window_iterations: int = 100, d_start: float = 0.3, delta: float = 0.05,
        d_max: float = 0.5, n_dis: int = 2, batch: int = 32, width: int = 8, seed: int = 0,
        verbose: bool = True) -> dict[str, Any]:
    """Train a dense G against the sparse custom D under an ADAPT controller.

    Args:
      iterations: GAN iterations (T).
      kind: controller kind: "relaxed" (cap 1.0), "strict" (cap ``d_max``, DST at the cap), "dda".
      force: "grow" or "prune" sets a band BR always clears; overrides ``band``.
      band: (B-, B+); None: the kind's default ((0.45, 0.55) for ADAPT).
      every: dT_D, iterations between decisions.
      br_every, window_iterations: BR measured every ``br_every`` iterations, averaged over
        ``window_iterations``.
      d_start: D's initial density (ERK over the maskable kernels).
      delta: density step of a move.
      d_max: the strict setting's cap.
      n_dis: D steps per iteration.
      batch: batch size.
      width: D's base width.
      seed: PRNG seed.
      verbose: print one line per decision.
    """
    z_dim = 16
    G, D = Generator(), MyCritic(width)
    key, k_init = jax.random.split(jax.random.key(seed))
    # Shapes suffice for the predicate, ERK and the controller's N_D.
    d_shapes = jax.eval_shape(D.init, k_init, jnp.zeros((1, 8, 8, 1)))["params"]
    # Same rule as maskable_except(["stem"]) (the default predicate plus a name exclusion).
    assert sp.maskable_tree(d_shapes, is_maskable) == sp.maskable_tree(
        d_shapes, sp.maskable_except(["stem"]))
    n_d = sp.num_maskable(d_shapes, is_maskable=is_maskable)
    ctl = control.make_density_control(
        kind, n_d, iterations, band=FORCED_BANDS[force] if force else band, every=every,
        delta=delta, d_max=d_max)
    # The controller tracks D's target active count round(d_start * N_D). init_masks rounds
    # per layer, so with many layers the drawn mask can be a few weights off; the first move
    # lands exactly on a target anyway (resize_update hits its count).
    ctrl = control.init_controller_state(d_start, ctl)

    g_tx = optax.adam(1e-3, b1=0.5, b2=0.9)
    d_tx = optax.adam(2e-4, b1=0.5, b2=0.9)
    densities = sp.erk_densities(d_shapes, d_start, is_maskable=is_maskable)
    fns = make_fns(G, D, g_tx, d_tx, densities, ctl, batch, z_dim)
    g_params, d_params, d_masks, g_opt, d_opt = fns["init"](k_init)
    real_batch = jax.jit(bars_batch, static_argnums=1)
    window = balance.init_window(balance.window_size(window_iterations, br_every))
    if verbose:
        print(f"{kind} controller: N_D = {n_d} maskable weights, step {ctl.delta_count}, "
              f"floor {ctl.min_count}, cap {ctl.cap_count}; band ({ctl.band_low:g}, "
              f"{ctl.band_high:g}); start {host_count(d_masks)} active "
              f"(controller target {int(ctrl.count)})")

    decisions = []
    for t in range(1, iterations + 1):
        for _ in range(n_dis):
            key, k_x, k_z = jax.random.split(key, 3)
            x_real = real_batch(k_x, batch)
            d_params, d_opt, d_loss, d_grads = fns["d_step"](d_params, d_opt, d_masks,
                                                              g_params, x_real, k_z)
        key, k_z = jax.random.split(key)
        g_params, g_opt, g_loss, z, b_scores = fns["g_step"](g_params, g_opt, d_params,
                                                             d_masks, k_z)
        if balance.is_measure_step(t, br_every):
            window = fns["measure_br"](window, g_params, d_params, d_masks, z, x_real,
                                       b_scores)
        if not sp.is_update_step(t, ctl.every, iterations):
            continue  # controller_step would return NONE anyway; skip the host round trip
        ctrl, decision, br, full = fns["decide"](ctrl, window, t)
        action, before = int(decision.action), host_count(d_masks)
        upd = None
        if action != control.NONE:
            d_params, d_opt, upd = fns["apply_d"](d_params, d_masks, d_opt, d_grads, decision, t)
            d_masks = upd.masks
        record = {
            "t": t,
            "br": float(br),
            "window_full": bool(full),
            "action": control.ACTION_NAMES[action],
            "target": int(decision.target_count),
            "before": before,
            "after": host_count(d_masks),
            "stem_dense": bool(np.all(np.asarray(d_masks["stem"]["kernel"]))),
            "grown": 0 if upd is None else host_count(upd.grown),
            "max_new_weight": 0.0 if upd is None else max(
                float(np.max(np.abs(np.asarray(p)) * np.asarray(g)))
                for p, g in zip(jax.tree_util.tree_leaves(d_params),
                                jax.tree_util.tree_leaves(upd.grown), strict=True)),
        }
        decisions.append(record)
        if verbose:
            print(f"it {t:5d}  BR {record['br']:+.3f}  {record['action']:5s}  "
                  f"active {before} -> {record['after']} (target {record['target']}, "
                  f"density {record['after'] / n_d:.3f})  loss D {float(d_loss):.3f} "
                  f"G {float(g_loss):+.3f}")

    result = {"decisions": decisions, "n_weights": n_d, "delta_count": ctl.delta_count,
              "cap_count": ctl.cap_count, "min_count": ctl.min_count,
              "final_count": host_count(d_masks), "kind": kind}
    check(result)
    if verbose:
        print(f"OK: every move landed exactly on its target, the stem stayed dense, new weights "
              f"started at 0; D density {result['final_count'] / n_d:.3f}.")
    return result


def check(result: dict[str, Any]) -> None:
    """The controller's count and D's masks agree exactly after every decision."""
    for d in result["decisions"]:
        assert d["stem_dense"], d  # the predicate kept the stem out of every update
        assert d["max_new_weight"] == 0.0, d  # GROW / DST: new weights start at 0
        if d["action"] in ("grow", "prune"):
            assert d["after"] == d["target"], d
            assert result["min_count"] <= d["after"] <= result["cap_count"], d
        else:  # "none" and "dst" leave the count unchanged
            assert d["after"] == d["before"], d
        if d["action"] == "dst":
            assert d["before"] >= result["cap_count"] and d["grown"] > 0, d
        if d["action"] != "none":
            assert d["window_full"], d  # no decision before the BR window is full


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--kind", choices=("relaxed", "strict", "dda"), default="relaxed")
    parser.add_argument("--force", choices=tuple(FORCED_BANDS), default=None)
    parser.add_argument("--band", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"))
    parser.add_argument("--every", type=int, default=100, help="dT_D in iterations")
    parser.add_argument("--d_start", type=float, default=0.3)
    parser.add_argument("--d_max", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="300 iterations, dT_D 50")
    args = parser.parse_args(argv)
    every, window, br_every = args.every, 100, 5
    if args.small:
        args.iterations, every, window = 300, 50, 50
    return run(iterations=args.iterations, kind=args.kind, force=args.force,
               band=args.band, every=every, br_every=br_every, window_iterations=window,
               d_start=args.d_start, d_max=args.d_max, seed=args.seed)


if __name__ == "__main__":
    main()
