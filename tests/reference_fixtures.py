"""Loading the golden fixtures of the paper's PyTorch code (tests/data/reference) into ddst_jax.

The fixtures were made by running the authors' code (YiteWang/ADAPT at 002e2e9, PyTorch 2.13 on
CPU, float32); see tests/data/reference/README.md. Arrays are in PyTorch layout and naming;
``ddst_jax.gan.torch_port`` moves them to the Flax trees. Used by tests/test_reference_parity.py.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ddst_jax import sparsity as sp
from ddst_jax import train
from ddst_jax.gan import setup as setup_lib
from ddst_jax.gan import steps
from ddst_jax.gan import torch_port as tp
from experiments.configs import cifar10

DATA = os.path.join(os.path.dirname(__file__), "data", "reference")
WIDTH = 16  # G and D width of the forward and iteration fixtures
LR, BETA1, BETA2 = 2e-4, 0.0, 0.9  # the iteration fixtures' Adam, as main.py builds it


@functools.cache
def load(name: str) -> dict[str, np.ndarray]:
    """All arrays of ``<name>.npz`` (cached; NumPy only, no pickles)."""
    with np.load(os.path.join(DATA, f"{name}.npz"), allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


@functools.cache
def load_json(name: str) -> dict:
    with open(os.path.join(DATA, f"{name}.json"), encoding="utf-8") as f:
        return json.load(f)


def group(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """The ``<prefix>/<key>`` arrays of a fixture, keyed by ``<key>``."""
    p = prefix + "/"
    return {k[len(p):]: v for k, v in arrays.items() if k.startswith(p)}


def nhwc(x: np.ndarray) -> np.ndarray:
    """NCHW (PyTorch) -> NHWC (Flax), on the last four axes."""
    return np.moveaxis(x, -3, -1)


def iteration_config(*, masked: bool, reference_exact: bool, d_forward: str = "separate"):
    """The default CIFAR-10 config (experiments/configs/cifar10.py) at the iteration fixtures'
    sizes: width 16, n_dis 5, B_D 8, B_G 16, BR every iteration (``br_freq = 1``), ADAPT at ERK
    0.3 (masks replaced by the fixture's) or dense; no mask update or decision at iteration 1.
    Everything else (init, D forward structure, optimizer, schedules) is the default's."""
    config = cifar10.get_config()
    config.reference_mode = "exact" if reference_exact else "fixed"
    config.model.g_ch = config.model.d_ch = WIDTH
    config.train.n_dis, config.train.batch_size_d, config.train.batch_size_g = 5, 8, 16
    config.train.d_forward = d_forward
    config.balance.br_every = 1
    config.sparsity.method = "adapt" if masked else "dense"
    config.sparsity.g_density = 0.3
    config.eval.every = 0
    return config


def iteration_setup(*, masked: bool, reference_exact: bool,
                    d_forward: str = "separate") -> setup_lib.GanSetup:
    """``train.build_setup`` of ``iteration_config``."""
    config = iteration_config(masked=masked, reference_exact=reference_exact, d_forward=d_forward)
    setup = train.build_setup(config, train.validate_config(config))
    # The fixtures' Adam, as the authors' main.py builds it, is the default config's.
    assert (config.train.lr_d, config.train.beta1, config.train.beta2) == (LR, BETA1, BETA2)
    return setup


def iteration_state(setup: steps.GanSetup, arrays: dict[str, np.ndarray]) -> steps.TrainState:
    """The fixture's starting state as a ``TrainState`` (fresh Adam, empty BR window)."""
    state = steps.init_state(setup, jax.random.key(0))
    g_vars = tp.generator_variables(group(arrays, "G_init"))
    d_vars = tp.discriminator_variables(group(arrays, "D_init"))
    g_params = jax.tree_util.tree_map(jnp.asarray, g_vars["params"])
    d_params = jax.tree_util.tree_map(jnp.asarray, d_vars["params"])
    if setup.sparsity.method.masked:
        g_masks = _masks_like(g_params, tp.generator_tree(group(arrays, "mask_G")))
        d_masks = _masks_like(d_params, tp.discriminator_tree(group(arrays, "mask_D")))
    else:
        g_masks, d_masks = sp.dense_masks(g_params), sp.dense_masks(d_params)
    d_count = sp.count_active(d_masks)
    return state.replace(
        g_params=g_params, d_params=d_params,
        g_state=jax.tree_util.tree_map(jnp.asarray, g_vars["batch_stats"]),
        d_state=jax.tree_util.tree_map(jnp.asarray, d_vars["batch_stats"]),
        g_opt=setup.train.g_tx.init(g_params), d_opt=setup.train.d_tx.init(d_params),
        g_masks=g_masks, d_masks=d_masks,
        g_ema=jax.tree_util.tree_map(jnp.copy, g_params),
        controller=setup.control.init(jnp.asarray(d_count, jnp.int32)))


def _masks_like(params, masks: dict):
    """Bool masks for every leaf of ``params``: the fixture's where it has one, else all-True."""
    flat = {sp.path_str(p): m for p, m in jax.tree_util.tree_flatten_with_path(masks)[0]}
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.asarray(flat.get(sp.path_str(p), np.ones(x.shape, bool)), bool), params)


def iteration_noise(arrays: dict[str, np.ndarray]) -> steps.IterationNoise:
    """The fixture's noise: ``z_d`` (5, 8, 128) for the D steps, ``z_g`` (16, 128) for G."""
    return steps.IterationNoise(jnp.asarray(arrays["z_d"]), None, jnp.asarray(arrays["z_g"]),
                                None)


def adam_moments(arrays: dict[str, np.ndarray], net: str) -> tuple[dict, dict]:
    """(mu, nu) trees of the fixture's G or D Adam state after the iteration."""
    tree = tp.generator_tree if net == "G" else tp.discriminator_tree
    return (tree(group(arrays, f"adam{net}_exp_avg")),
            tree(group(arrays, f"adam{net}_exp_avg_sq")))


def adam_state(opt_state) -> optax.ScaleByAdamState:
    """The ``ScaleByAdamState`` inside an ``optax.adam`` state."""
    for s in jax.tree_util.tree_leaves(
            opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState)):
        if isinstance(s, optax.ScaleByAdamState):
            return s
    raise ValueError("No ScaleByAdamState in the optimizer state.")
