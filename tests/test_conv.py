"""ddst_jax.gan.conv: GEMM-gradient convolutions equal lax.conv, and fall back where they must."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ddst_jax.gan import conv

NHWC = ("NHWC", "HWIO", "NHWC")


def _lax_conv(x, w, padding="SAME"):
    return jax.lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=NHWC)


def _value_and_grads(fn, x, w, dy):
    y, vjp = jax.vjp(fn, x, w)
    return (y, *vjp(dy))


@settings(max_examples=12, deadline=None)
@given(k=st.sampled_from([1, 3, 5]), batch=st.integers(1, 3), height=st.integers(1, 6),
       width=st.integers(1, 6), c_in=st.integers(1, 4), c_out=st.integers(1, 4),
       seed=st.integers(0, 2**16))
def test_conv_same_matches_lax_values_and_both_gradients(k, batch, height, width, c_in, c_out,
                                                          seed):
    kx, kw, kd = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (batch, height, width, c_in))
    w = jax.random.normal(kw, (k, k, c_in, c_out))
    dy = jax.random.normal(kd, (batch, height, width, c_out))
    ours = _value_and_grads(conv.conv_same, x, w, dy)
    ref = _value_and_grads(_lax_conv, x, w, dy)
    for a, b, name in zip(ours, ref, ("y", "dx", "dw"), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4, err_msg=name)


def test_weight_gradient_taps_exact_small_case():
    # 1 image, 3x3 input 1..9, one channel; dy = 1 at the centre only: dW[i, j] = x_pad[1+i, 1+j]
    # around the centre, i.e. the 3x3 input itself.
    x = jnp.arange(1.0, 10.0).reshape(1, 3, 3, 1)
    dy = jnp.zeros((1, 3, 3, 1)).at[0, 1, 1, 0].set(1.0)
    dw = conv._tap_weight_grad(x, dy, 3)
    np.testing.assert_array_equal(dw[:, :, 0, 0], x[0, :, :, 0])
    # dy = 1 at the top-left corner: the taps looking up/left see zero padding.
    dy = jnp.zeros((1, 3, 3, 1)).at[0, 0, 0, 0].set(1.0)
    dw = conv._tap_weight_grad(x, dy, 3)
    np.testing.assert_array_equal(dw[:, :, 0, 0], [[0, 0, 0], [0, 1, 2], [0, 4, 5]])


def _uses_custom_rule(fn, *args) -> bool:
    return "custom_vjp_call" in str(jax.make_jaxpr(fn)(*args))


def test_impl_choice():
    x, w = jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2))

    def traced_with(impl):
        return lambda x, w: conv.conv_fn(impl)(x, w, (1, 1), "SAME", dimension_numbers=NHWC)

    assert _uses_custom_rule(traced_with("gemm"), x, w)
    assert not _uses_custom_rule(traced_with("xla"), x, w)
    # "auto": GEMM gradients on one CPU device only (the suite runs with 8 CPU devices).
    one_cpu = jax.default_backend() == "cpu" and jax.device_count() == 1
    assert conv.resolve_impl("auto") == ("gemm" if one_cpu else "xla")
    assert _uses_custom_rule(traced_with("auto"), x, w) == one_cpu


def test_auto_impl_re_points_auto_while_tracing():
    x, w = jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2))
    for impl, custom in (("xla", False), ("gemm", True)):
        with conv.auto_impl(impl):
            assert conv.resolve_impl("auto") == impl
            assert conv.resolve_impl("gemm") == "gemm"  # explicit choices are untouched
            f = lambda x, w: conv.conv_general_dilated(x, w, (1, 1), "SAME",  # noqa: E731
                                                       dimension_numbers=NHWC)
            assert _uses_custom_rule(f, x, w) == custom
    one_cpu = jax.default_backend() == "cpu" and jax.device_count() == 1
    assert conv.resolve_impl("auto") == ("gemm" if one_cpu else "xla")


def test_unknown_impl_is_rejected():
    for bad in (lambda: conv.conv_fn("cudnn"), lambda: conv.auto_impl("cudnn").__enter__()):
        with pytest.raises(ValueError, match="Unknown convolution implementation 'cudnn'"):
            bad()


def test_even_kernel_is_rejected_by_conv_same():
    with pytest.raises(ValueError, match="odd square kernel"):
        conv.conv_same(jnp.ones((1, 4, 4, 1)), jnp.ones((2, 2, 1, 1)))


@pytest.mark.parametrize(
    "kwargs, kernel",
    [
        ({"window_strides": (2, 2), "padding": "SAME"}, (3, 3)),
        ({"window_strides": (1, 1), "padding": "VALID"}, (3, 3)),
        ({"window_strides": (1, 1), "padding": "SAME", "rhs_dilation": (2, 2)}, (3, 3)),
        ({"window_strides": (1, 1), "padding": "SAME"}, (2, 2)),
        ({"window_strides": (1, 1), "padding": ((0, 2), (1, 1))}, (3, 3)),
    ],
    ids=["stride2", "valid", "dilated", "even_kernel", "asymmetric_pad"],
)
def test_other_convolutions_fall_back_to_lax(kwargs, kernel):
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
    w = jax.random.normal(jax.random.key(1), (*kernel, 3, 4))

    def ours(x, w):
        return conv.conv_general_dilated(x, w, dimension_numbers=NHWC, impl="gemm", **kwargs)

    def ref(x, w):
        return jax.lax.conv_general_dilated(x, w, dimension_numbers=NHWC, **kwargs)

    assert not _uses_custom_rule(ours, x, w)
    np.testing.assert_allclose(ours(x, w), ref(x, w), rtol=1e-6)


def test_explicit_symmetric_padding_counts_as_same():
    x, w = jnp.ones((1, 5, 5, 2)), jnp.ones((3, 3, 2, 2))

    def f(x, w):
        return conv.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC,
                                         impl="gemm")

    assert _uses_custom_rule(f, x, w)
    np.testing.assert_allclose(f(x, w), _lax_conv(x, w), rtol=1e-6)


def test_flax_conv_with_the_hook_has_the_same_params_outputs_and_grads():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    plain = nn.Conv(5, (3, 3))
    hooked = nn.Conv(5, (3, 3), conv_general_dilated=conv.conv_fn("gemm"))
    params = plain.init(jax.random.key(1), x)
    assert jax.tree_util.tree_structure(hooked.init(jax.random.key(1), x)) == \
        jax.tree_util.tree_structure(params)

    def loss(module, p):
        return jnp.sum(module.apply(p, x) ** 2)

    g_hooked = jax.grad(lambda p: loss(hooked, p))(params)
    g_plain = jax.grad(lambda p: loss(plain, p))(params)
    np.testing.assert_allclose(hooked.apply(params, x), plain.apply(params, x), rtol=1e-5)
    leaves = jax.tree_util.tree_leaves
    for a, b in zip(leaves(g_hooked), leaves(g_plain), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_bfloat16_inputs_give_bfloat16_gradients():
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (3, 3, 3, 2), jnp.bfloat16)
    dx, dw = jax.grad(lambda x, w: jnp.sum(conv.conv_same(x, w).astype(jnp.float32)),
                      argnums=(0, 1))(x, w)
    ref_dx, ref_dw = jax.grad(lambda x, w: jnp.sum(_lax_conv(x, w).astype(jnp.float32)),
                              argnums=(0, 1))(x, w)
    assert dx.dtype == dw.dtype == jnp.bfloat16
    np.testing.assert_allclose(dw.astype(np.float32), ref_dw.astype(np.float32), rtol=2e-2,
                               atol=5e-2)
    np.testing.assert_allclose(dx.astype(np.float32), ref_dx.astype(np.float32), rtol=2e-2,
                               atol=5e-2)
