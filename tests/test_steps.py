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
    # SPEC section 2: a = mean D(G_post(z)), c = mean D(x_r). _br_forwards runs D once over both
    # batches (one power iteration); the scores must equal two separate side-effect-free calls.
    config = tiny_config(**{"model.name": model, "sparsity.method": "adapt"})
    setup = train.build_setup(config, train.validate_config(config))
    state = steps.init_state(setup, jax.random.key(0))
    k_z, k_x, k_y = jax.random.split(jax.random.key(1), 3)
    z = jax.random.normal(k_z, (setup.batch_g, setup.z_dim))
    x_real = jax.random.uniform(k_x, (setup.batch_d, *setup.image_shape), minval=-1, maxval=1)
    y = steps.sample_labels(k_y, setup.batch_g, setup)
    y_real = steps.sample_labels(k_y, setup.batch_d, setup)
    a, c = steps._br_forwards(setup, state.g_params, state.g_state, state.g_masks,
                              state.d_params, state.d_state, state.d_masks, z, y, x_real, y_real)

    d_vars = {"params": steps._masked(state.d_params, state.d_masks, setup),
              "batch_stats": state.d_state}
    fake = steps.generate(setup, state.g_params, state.g_state, state.g_masks, z, y)
    a_ref = steps.d_apply(setup, d_vars, fake, y, update_stats=False)
    c_ref = steps.d_apply(setup, d_vars, x_real, y_real, update_stats=False)
    assert a.shape == (setup.batch_g,) and c.shape == (setup.batch_d,)
    np.testing.assert_allclose(a, a_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(c, c_ref, rtol=1e-5, atol=1e-6)
    assert jnp.all(jnp.isfinite(a)) and jnp.all(jnp.isfinite(c))
