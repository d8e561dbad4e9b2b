"""Balance-ratio (BR) monitoring dropped into an existing, fully DENSE Flax GAN loop.

BR (Wang et al., NeurIPS 2023) asks, once per measurement: of the real/fake gap that D sees,
how much does one G step close? With z the G step's noise and x_r the last D step's real batch,

    b = mean D(G_pre(z))   the forward the G loss already computes (return it as aux),
    a = mean D(G_post(z))  one extra forward after the G update (same z, same D),
    c = mean D(x_r)        one extra forward of the last real batch,
    r = (a - b) / (c - b),  BR = mean of the last `window // br_every` finite r.

BR far below 0.45 means D is too strong for G; far above 0.55 (or wild swings) means D is too
weak. The changes to a plain GAN loop are marked "BR (1)" .. "BR (3)"; no sparsity is involved.
The toy problem is the usual ring of 8 Gaussians in 2-D with MLPs and the hinge loss.

Run: python examples/br_monitor_dense_gan.py [--small] [--n_dis 5] [--d_lr 1e-3]
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ddst_jax import balance

PyTree = Any


class MLP(nn.Module):
    """ReLU MLP; the last layer is linear (D's raw score: no sigmoid, as BR requires)."""

    features: Sequence[int]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for f in self.features[:-1]:
            x = nn.relu(nn.Dense(f)(x))
        return nn.Dense(self.features[-1])(x)


def ring_batch(key: jax.Array, n: int) -> jax.Array:
    """n points from 8 Gaussians (std 0.05) on the circle of radius 2."""
    k_mode, k_noise = jax.random.split(key)
    angle = 2 * math.pi * jax.random.randint(k_mode, (n,), 0, 8) / 8
    centres = 2.0 * jnp.stack([jnp.cos(angle), jnp.sin(angle)], axis=-1)
    return centres + 0.05 * jax.random.normal(k_noise, (n, 2))


def make_fns(G: nn.Module, D: nn.Module, g_tx: optax.GradientTransformation,
             d_tx: optax.GradientTransformation, batch: int, z_dim: int):
    """The user's jitted D and G steps, plus the BR measurement."""

    def gen(g_params, z):
        return G.apply({"params": g_params}, z)

    def disc(d_params, x):
        return D.apply({"params": d_params}, x)[:, 0]  # raw scores, (B,)

    @jax.jit
    def d_step(d_params, d_opt, g_params, x_real, key):
        fake = gen(g_params, jax.random.normal(key, (batch, z_dim)))

        def loss_fn(p):  # hinge loss
            return (jnp.mean(nn.relu(1.0 - disc(p, x_real)))
                    + jnp.mean(nn.relu(1.0 + disc(p, fake))))

        loss, grads = jax.value_and_grad(loss_fn)(d_params)
        updates, d_opt = d_tx.update(grads, d_opt, d_params)
        return optax.apply_updates(d_params, updates), d_opt, loss

    @jax.jit
    def g_step(g_params, g_opt, d_params, key):
        z = jax.random.normal(key, (batch, z_dim))

        def loss_fn(p):
            scores = disc(d_params, gen(p, z))
            return -jnp.mean(scores), scores  # BR (1): return D(G_pre(z)) as aux -> b for free

        (loss, b_scores), grads = jax.value_and_grad(loss_fn, has_aux=True)(g_params)
        updates, g_opt = g_tx.update(grads, g_opt, g_params)
        # BR (1'): also return z, the same noise must go through G_post.
        return optax.apply_updates(g_params, updates), g_opt, loss, z, b_scores

    @jax.jit
    def measure_br(window, g_params_post, d_params, z, x_real_last, b_scores):
        # BR (2): two extra forwards with the D of this iteration; nothing is trained here.
        a_scores = disc(d_params, gen(g_params_post, z))
        c_scores = disc(d_params, x_real_last)
        ratio = balance.balance_ratio(c_scores, b_scores, a_scores)
        means = jnp.stack([a_scores.mean(), b_scores.mean(), c_scores.mean()])
        return balance.push(window, ratio), ratio, means

    @jax.jit
    def summary(window):
        return balance.windowed_mean(window), balance.num_ignored(window), balance.is_full(window)

    return d_step, g_step, measure_br, summary


def run(iterations: int = 2000, br_every: int = 10, window_iterations: int = 1000,
        n_dis: int = 2, batch: int = 64, d_lr: float = 2e-4, g_lr: float = 1e-3,
        seed: int = 0, log_every: int = 250, verbose: bool = True) -> dict[str, Any]:
    """Train the dense toy GAN and monitor BR; returns the measurements and the window summary.

    Args:
      iterations: GAN iterations (n_dis D steps + one G step each).
      br_every: measure BR after every ``br_every``-th iteration (the paper's: 10).
      window_iterations: BR averages over this many iterations (the paper's: 1000).
      n_dis: D steps per iteration.
      batch: batch size of both nets.
      d_lr, g_lr: Adam learning rates (betas 0.5, 0.9); raise ``d_lr`` to strengthen D.
      seed: PRNG seed.
      log_every: print a line every ``log_every`` iterations.
      verbose: print progress and the verdict.
    """
    z_dim = 8
    G, D = MLP((64, 64, 2)), MLP((64, 64, 1))
    key, k_g, k_d = jax.random.split(jax.random.key(seed), 3)
    g_params = G.init(k_g, jnp.zeros((1, z_dim)))["params"]
    d_params = D.init(k_d, jnp.zeros((1, 2)))["params"]
    g_tx, d_tx = optax.adam(g_lr, b1=0.5, b2=0.9), optax.adam(d_lr, b1=0.5, b2=0.9)
    g_opt, d_opt = g_tx.init(g_params), d_tx.init(d_params)
    d_step, g_step, measure_br, summary = make_fns(G, D, g_tx, d_tx, batch, z_dim)
    real_batch = jax.jit(ring_batch, static_argnums=1)

    # BR (3): a fixed-size window (a pytree), e.g. 1000 // 10 = 100 entries.
    window = balance.init_window(balance.window_size(window_iterations, br_every))
    ratios, triples, log = [], [], []
    for t in range(1, iterations + 1):
        for _ in range(n_dis):
            key, k_x, k_z = jax.random.split(key, 3)
            x_real = real_batch(k_x, batch)  # after the loop: the last D step's real batch
            d_params, d_opt, d_loss = d_step(d_params, d_opt, g_params, x_real, k_z)
        key, k_z = jax.random.split(key)
        g_params, g_opt, g_loss, z, b_scores = g_step(g_params, g_opt, d_params, k_z)
        if balance.is_measure_step(t, br_every):
            window, ratio, means = measure_br(window, g_params, d_params, z, x_real, b_scores)
            ratios.append(float(ratio))
            triples.append(tuple(float(v) for v in means))
        if t % log_every == 0 or t == iterations:
            br, ignored, full = (x.item() for x in summary(window))
            log.append((t, br, ignored, full))
            if verbose:
                a, b, c = triples[-1] if triples else (math.nan,) * 3
                print(f"it {t:5d}  loss D {float(d_loss):.3f} G {float(g_loss):+.3f}  "
                      f"gap c-b {c - b:+.3f}  G closed a-b {a - b:+.4f}  "
                      f"BR {br:+.3f} ({'full' if full else 'filling'}, {ignored} ignored)")

    br, ignored, full = (x.item() for x in summary(window))
    result = {
        "ratios": ratios,
        "triples": triples,  # (a, b, c) batch means of every measurement
        "window_size": window.size,
        "window_count": int(window.count),
        "window_full": bool(full),
        "br": br,
        "ignored": ignored,
        "log": log,
    }
    check(result)
    if verbose:
        # ADAPT's band [0.45, 0.55] is calibrated on the paper's image GANs (Adam 2e-4); in a
        # new setting, read BR's level and trend relative to runs you know to be healthy.
        verdict = ("D strong relative to G: ADAPT would lower D's density" if br <= 0.45
                   else "D weak relative to G: ADAPT would raise D's density" if br >= 0.55
                   else "inside ADAPT's band: no change")
        print(f"BR over the last {window.size} measurements: {br:.3f} -> {verdict}")
        print("OK: window mean = mean of the last window's finite ratios; each ratio = "
              "(a - b) / (c - b).")
    return result


def check(result: dict[str, Any]) -> None:
    """The window is exactly the host-side mean of the last ``size`` finite ratios."""
    for r, (a, b, c) in zip(result["ratios"], result["triples"], strict=True):
        if math.isfinite(r):
            assert abs(r * (c - b) - (a - b)) <= 1e-4 * (1 + abs(a - b)), (r, a, b, c)
    last = np.asarray(result["ratios"][-result["window_size"]:], np.float64)
    finite = last[np.isfinite(last)]
    assert result["window_count"] == len(result["ratios"])
    assert result["ignored"] == last.size - finite.size
    if finite.size:
        assert abs(result["br"] - finite.mean()) <= 1e-4 * (1 + abs(finite.mean())), result["br"]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--br_every", type=int, default=10)
    parser.add_argument("--window", type=int, default=1000, help="window in iterations")
    parser.add_argument("--n_dis", type=int, default=2)
    parser.add_argument("--d_lr", type=float, default=2e-4)
    parser.add_argument("--g_lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="200 iterations, window 100")
    args = parser.parse_args(argv)
    log_every = 250
    if args.small:
        args.iterations, args.br_every, args.window, log_every = 200, 5, 100, 50
    return run(iterations=args.iterations, br_every=args.br_every,
               window_iterations=args.window, n_dis=args.n_dis, d_lr=args.d_lr,
               g_lr=args.g_lr, seed=args.seed, log_every=log_every)


if __name__ == "__main__":
    main()
