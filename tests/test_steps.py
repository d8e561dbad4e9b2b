"""Pieces of the jitted iteration (ddst_jax.gan.steps) checked against their plain definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train import tiny_config

from ddst_jax import train
from ddst_jax.gan import steps


@pytest.mark.parametrize("model", ["sngan32", "biggan32"])
def test_br_forwards_in_one_d_call_equal_two_separate_calls(model):
    # docs/method.md section 2: a = mean D(G_post(z)), c = mean D(x_r). br_forwards runs D once
    # over both batches (one power iteration); the scores must equal two separate side-effect-free
    # calls.
    config = tiny_config(**{"model.name": model, "sparsity.method": "adapt"})
    setup = train.build_setup(config, train.validate_config(config))
    state = steps.init_state(setup, jax.random.key(0))
    k_z, k_x, k_y = jax.random.split(jax.random.key(1), 3)
    z = jax.random.normal(k_z, (setup.train.batch_g, setup.model.z_dim))
    x_real = jax.random.uniform(k_x, (setup.train.batch_d, *setup.model.image_shape),
                                minval=-1, maxval=1)
    y = steps.sample_labels(k_y, setup.train.batch_g, setup)
    y_real = steps.sample_labels(k_y, setup.train.batch_d, setup)
    br = steps.br_forwards(setup, state.g_params, state.g_state, state.g_masks,
                           state.d_params, state.d_state, state.d_masks, z, y, x_real, y_real)
    a, c = br.a_scores, br.c_scores
    assert br.g_state is state.g_state and br.d_state is state.d_state  # nothing written

    d_vars = {"params": steps._masked(state.d_params, state.d_masks, setup),
              "batch_stats": state.d_state}
    fake = steps.generate(setup, state.g_params, state.g_state, state.g_masks, z, y)
    a_ref = steps.d_apply(setup, d_vars, fake, y, update_stats=False)
    c_ref = steps.d_apply(setup, d_vars, x_real, y_real, update_stats=False)
    assert a.shape == (setup.train.batch_g,) and c.shape == (setup.train.batch_d,)
    np.testing.assert_allclose(a, a_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(c, c_ref, rtol=1e-5, atol=1e-6)
    assert jnp.all(jnp.isfinite(a)) and jnp.all(jnp.isfinite(c))


def test_br_forwards_reference_exact_advance_g_bn_and_d_sn_state():
    # The paper's code runs the BR forwards in train mode: G's BN statistics take one update
    # (from G_post(z)), D's spectral norm one power iteration for a, then one more for c.
    config = tiny_config(**{"model.name": "sngan32", "sparsity.method": "adapt",
                            "reference_mode": "exact"})
    setup = train.build_setup(config, train.validate_config(config))
    assert setup.balance.train_mode_forwards and setup.balance.eps == 0.0
    assert setup.sparsity.mask_sampling == "bernoulli" and setup.balance.window == 3
    state = steps.init_state(setup, jax.random.key(0))
    z = jax.random.normal(jax.random.key(1), (setup.train.batch_g, setup.model.z_dim))
    x_real = jax.random.uniform(jax.random.key(2), (setup.train.batch_d, *setup.model.image_shape),
                                minval=-1, maxval=1)
    br = steps.br_forwards(setup, state.g_params, state.g_state, state.g_masks, state.d_params,
                           state.d_state, state.d_masks, z, None, x_real, None)

    g_vars = {"params": steps._masked(state.g_params, state.g_masks, setup),
              "batch_stats": state.g_state}
    fake, g_upd = steps.g_apply(setup, g_vars, z, None, train=True, mutable=["batch_stats"])
    d_eff = steps._masked(state.d_params, state.d_masks, setup)
    a, d_upd = steps.d_apply(setup, {"params": d_eff, "batch_stats": state.d_state}, fake, None,
                             mutable=["batch_stats"])
    c, d_upd = steps.d_apply(setup, {"params": d_eff, "batch_stats": d_upd["batch_stats"]},
                             x_real, None, mutable=["batch_stats"])
    np.testing.assert_allclose(br.a_scores, a, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(br.c_scores, c, rtol=1e-6, atol=1e-7)
    for ours, ref, before in ((br.g_state, g_upd["batch_stats"], state.g_state),
                              (br.d_state, d_upd["batch_stats"], state.d_state)):
        close = jax.tree_util.tree_map(lambda x, y: np.allclose(x, y, atol=1e-7), ours, ref)
        assert all(jax.tree_util.tree_leaves(close))
        moved = jax.tree_util.tree_map(lambda x, y: not np.array_equal(x, y), ours, before)
        assert any(jax.tree_util.tree_leaves(moved))
