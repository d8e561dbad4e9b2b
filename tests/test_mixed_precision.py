"""bfloat16 compute (``config.model.compute_dtype``): float32 state, bf16 activations, counts."""

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from test_train import tiny_config

from ddst_jax import data, train
from ddst_jax import sparsity as sp
from ddst_jax.gan import biggan, models, registry

# ADAPT with G's drop-and-grow at t = 2 and 4 (layer scope: every leaf keeps its ERK count) and
# a band that every BR lies above ("D too weak"), so D grows at each decision (t = 2, 4) whatever
# the precision: the decisions, hence D's totals, cannot differ between the two runs.
# One D step per iteration and one device: the file's time is mostly the four compilations.
RUN = {"sparsity.method": "adapt", "sparsity.scope": "layer", "control.band_low": -1e9,
       "control.band_high": -1e9 + 1, "parallel.num_devices": 1, "train.n_dis": 1}
ITERATIONS = 4


def _setup(compute_dtype):
    config = tiny_config(**RUN, **{"model.compute_dtype": compute_dtype})
    setup = train.build_setup(config, train.validate_config(config))
    mesh = train.make_mesh(1)
    return config, setup, mesh, train.compile_fns(setup, config, mesh)


def _run(config, mesh, iterate, state):
    """Final state and per-iteration host metrics of ITERATIONS iterations from ``state``."""
    source = data.load_source(config.data, seed=0)
    metrics = []
    for p in range(ITERATIONS):
        batch = data.get_stacked_batch(source, p * config.train.n_dis, config.train.batch_size_d,
                                       config.train.n_dis, seed=0)
        batch = data.shard_batch(batch, mesh, batch_axis=1)
        state, m = iterate(state, batch["image"], batch["label"])
        metrics.append(jax.device_get(m))
    return jax.device_get(state), metrics


@pytest.fixture(scope="module")
def runs():
    """{dtype: (setup, initial state, final state, metrics)} from the same initial state.

    The state does not depend on the compute dtype (test below), so both runs start from one
    compiled float32 init: a second init would only add its compile time.
    """
    results, init_fn = {}, None
    for dtype in ("float32", "bfloat16"):
        config, setup, mesh, (init, iterate, _) = _setup(dtype)
        init_fn = init_fn or init  # float32's, compiled once; fresh buffers on every call
        state = init_fn(jax.random.key(0))
        initial = jax.device_get(state)  # host copies, before iterate donates the buffers
        results[dtype] = (setup, initial, *_run(config, mesh, iterate, state))
    return results


def _erk_counts(params, density):
    """Per maskable leaf, in ``*_counts`` order: round(d * N) of its ERK density d."""
    dens = jax.tree_util.tree_leaves(sp.erk_densities(params, density))
    return [sp.count_for_density(d, int(np.size(p)))
            for (path, p), d in zip(jax.tree_util.tree_leaves_with_path(params), dens, strict=True)
            if sp.default_is_maskable(path, p)]


def _float_dtypes(tree):
    return {str(x.dtype) for x in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)}


def test_bf16_run_keeps_params_optimizer_ema_and_statistics_float32(runs):
    setup, initial, final, _ = runs["bfloat16"]
    model = setup.model
    assert model.generator.dtype == jnp.bfloat16 and model.discriminator.dtype == jnp.bfloat16
    for name in ("g_params", "d_params", "g_opt", "d_opt", "g_ema", "g_state", "d_state"):
        assert _float_dtypes(getattr(final, name)) == {"float32"}, name
    assert {str(m.dtype) for m in jax.tree_util.tree_leaves((final.g_masks, final.d_masks))} == {
        "bool"}
    # G's BN running statistics and D's spectral-norm u/sigma were written (not just kept).
    assert any(not np.array_equal(a, b) for a, b in zip(
        jax.tree_util.tree_leaves(initial.g_state), jax.tree_util.tree_leaves(final.g_state),
        strict=True))
    assert any(not np.array_equal(a, b) for a, b in zip(
        jax.tree_util.tree_leaves(initial.d_state), jax.tree_util.tree_leaves(final.d_state),
        strict=True))


def test_bf16_init_state_has_the_float32_names_shapes_and_dtypes():
    # Only the computation dtype differs: the same variables (names, shapes, float32), hence
    # the same initializer draws; traced only.
    states = {}
    for dtype in ("float32", "bfloat16"):
        _, _, _, (init_fn, _, _) = _setup(dtype)
        states[dtype] = jax.eval_shape(init_fn, jax.random.key(0))
    a, b = states["float32"], states["bfloat16"]
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b),
                            strict=True):
        assert (x.shape, x.dtype) == (y.shape, y.dtype), jax.tree_util.keystr(path)
    assert _float_dtypes(b) == {"float32"}


def test_mask_counts_are_exact_and_identical_under_bf16(runs):
    setup32, init32, final32, m32 = runs["float32"]
    setup16, init16, final16, m16 = runs["bfloat16"]
    g_target = _erk_counts(init16.g_params, setup16.sparsity.method.g_density)
    for a, b in zip(m32, m16, strict=True):
        # Layer-scope drop-and-grow keeps every G leaf at its ERK count, in both precisions.
        assert list(a["g_counts"]) == list(b["g_counts"]) == g_target
        # D's total follows the controller's integer target (same decisions in both runs).
        assert int(np.sum(a["d_counts"])) == int(np.sum(b["d_counts"]))
        assert int(a["control/action"]) == int(b["control/action"])
    assert int(np.sum(m16[-1]["d_counts"])) > int(np.sum(m16[0]["d_counts"]))  # D grew
    assert int(sp.count_active(final16.d_masks)) == int(final16.controller.count)
    assert int(final16.controller.count) == int(final32.controller.count)
    # G's drop-and-grow did run under bf16: its masks moved, their counts did not.
    moved = sum(int(np.sum(x != y)) for x, y in zip(
        jax.tree_util.tree_leaves(init16.g_masks), jax.tree_util.tree_leaves(final16.g_masks),
        strict=True))
    assert moved > 0
    for p, e, m in zip(jax.tree_util.tree_leaves(final16.g_params),
                       jax.tree_util.tree_leaves(final16.g_ema),
                       jax.tree_util.tree_leaves(final16.g_masks), strict=True):
        assert not np.any(np.where(m, 0.0, p)) and not np.any(np.where(m, 0.0, e))


def test_first_iteration_losses_are_finite_and_close_to_float32(runs):
    # Same params, masks, noise and data at iteration 1: only bf16 rounding of the activations
    # (8 significant bits, relative step 2**-8 = 0.4%) separates the losses. Tolerance: 3%
    # relative + 0.02 absolute (the untrained tiny D's scores are large, loss/d ~ 13; measured
    # gaps were ~0.5%).
    a, b = runs["float32"][3][0], runs["bfloat16"][3][0]
    for name in ("loss/d", "loss/g"):
        assert np.isfinite(b[name]), name
        np.testing.assert_allclose(b[name], a[name], rtol=0.03, atol=0.02, err_msg=name)
    for m in runs["bfloat16"][3]:
        assert np.isfinite(m["loss/d"]) and np.isfinite(m["loss/g"])


def _conv_input_dtypes(jaxpr) -> list[str]:
    """Operand dtypes of every conv_general_dilated in a jaxpr, sub-jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            found += [str(v.aval.dtype) for v in eqn.invars]
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    found += _conv_input_dtypes(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    found += _conv_input_dtypes(sub)
    return found


@pytest.mark.parametrize("name,widths", [("sngan32", (8, 8)), ("biggan32", (8, 8)),
                                         ("biggan64", (4, 8))])
def test_bf16_activations_float32_outputs_and_statistics(name, widths):
    # Traced only (eval_shape / make_jaxpr): dtypes without running anything.
    pair = registry.build(name, g_ch=widths[0], d_ch=widths[1], compute_dtype="bfloat16")
    G, D, size = pair.generator, pair.discriminator, pair.image_size
    z, x = jnp.zeros((4, pair.z_dim)), jnp.zeros((4, size, size, 3))
    y = (jnp.zeros((4,), jnp.int32),) if pair.num_classes else ()
    g_vars = jax.eval_shape(lambda: G.init(jax.random.key(0), z, *y, train=False))
    d_vars = jax.eval_shape(lambda: D.init(jax.random.key(1), x, *y))
    outputs = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and isinstance(out, jax.Array):
            outputs.append((type(context.module).__name__, context.module.name, str(out.dtype)))
        return out

    with nn.intercept_methods(record):
        images, g_upd = jax.eval_shape(
            lambda v: G.apply(v, z, *y, train=True, mutable=["batch_stats"]), g_vars)
        scores, d_upd = jax.eval_shape(
            lambda v: D.apply(v, x, *y, mutable=["batch_stats"]), d_vars)
    assert images.dtype == scores.dtype == jnp.float32
    for tree in (g_vars, d_vars, g_upd, d_upd):
        assert _float_dtypes(tree) == {"float32"}  # params, BN mean/var, SN u/sigma
    layers = [o for o in outputs if o[0] in ("Conv", "Dense", "BatchNorm", "Embed")]
    heads = ("head", "classifier", "embed_y")  # after D's float32 pooling, by design
    assert layers and all(d == "bfloat16" for t, n, d in layers if n not in heads), layers
    assert all(d == "float32" for t, n, d in layers if n in heads), layers
    jaxpr = jax.make_jaxpr(lambda v: D.apply(v, x, *y, update_stats=False))(d_vars)
    dtypes = _conv_input_dtypes(jaxpr.jaxpr)
    assert dtypes and set(dtypes) == {"bfloat16"}  # every k x k convolution runs in bf16


def test_float32_default_is_unchanged():
    G, D = models.build_models("sngan32", g_ch=8, d_ch=8)
    assert G.dtype == D.dtype == jnp.float32
    G, D = biggan.build_biggan("biggan32", g_ch=8, d_ch=8)
    assert G.dtype == D.dtype == jnp.float32


@pytest.mark.parametrize("value", ["float16", "bf16", "float64"])
def test_unknown_compute_dtype_is_refused(value):
    with pytest.raises(ValueError, match=r"config\.model\.compute_dtype.*bfloat16"):
        train.validate_config(tiny_config(**{"model.compute_dtype": value}))
    with pytest.raises(ValueError, match="Unknown compute dtype"):
        registry.build("sngan32", g_ch=8, d_ch=8, compute_dtype=value)
