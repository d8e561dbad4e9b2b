"""Tests of the SNGAN generator/discriminator (ddst_jax.gan.models) and the hinge losses.

Full-size models are only ever traced (``jax.eval_shape``), never allocated. Behaviour is tested
on small instances of the same generic modules, so few and small XLA programs are compiled.
"""

import functools
import math

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_helpers import key as _key
from model_helpers import leaves_by_path as _leaves_by_path
from model_helpers import size as _size

from ddst_jax.gan.losses import d_hinge_loss, g_hinge_loss
from ddst_jax.gan.models import (
    MODEL_NAMES,
    Discriminator,
    Generator,
    build_models,
    image_size,
    kernel_init,
)

BATCH = 4


def _sn_kernel_path(state_path: str) -> str:
    """'block1/conv1_sn/conv1/kernel/u' -> 'block1/conv1/kernel' (the kernel it normalises)."""
    parts = state_path.split("/")[:-1]
    return "/".join(part for part in parts if not part.endswith("_sn"))


def _conv(c_in: int, c_out: int, k: int) -> int:
    return c_in * c_out * k * k + c_out


# ------------------------------------------------------------------------------------------
# Full-size architectures, traced only.
# ------------------------------------------------------------------------------------------

# Parameter counts by hand from the authors' lottery SNGAN (sngan32; shared/reference's
# sngan_torch.py has the same layers plus a head bias) and their resnet.48 (sngan48, whose D head
# has a bias); conv = c_in*c_out*k*k + c_out (bias), BN = 2*C (scale, bias).
SNGAN32_G = 4_276_739
SNGAN32_D = 1_053_824  # lottery: l5 = Linear(128, 1, bias=False)
SNGAN48_G = 4_878_083
SNGAN48_D = 19_542_721  # resnet.48: ... + Linear(1024, 1) with bias


def _g_block(c_in: int, c_out: int) -> int:
    return (
        2 * c_in
        + _conv(c_in, c_out, 3)
        + 2 * c_out
        + _conv(c_out, c_out, 3)
        + _conv(c_in, c_out, 1)
    )


def _d_block(c_in: int, c_out: int, shortcut: bool) -> int:
    return _conv(c_in, c_out, 3) + _conv(c_out, c_out, 3) + shortcut * _conv(c_in, c_out, 1)


def test_hand_counts_add_up():
    # sngan32 G: dense 128 -> 4*4*256 (+bias), 3 up-blocks 256 -> 256, BN, conv 256 -> 3.
    assert _g_block(256, 256) == 1_246_976
    assert 528_384 + 3 * 1_246_976 + 512 + 6_915 == SNGAN32_G
    assert (128 * 4096 + 4096, 2 * 256, _conv(256, 3, 3)) == (528_384, 512, 6_915)
    # sngan32 D: optimized 3 -> 128, down block with 1x1 shortcut, 2 identity-shortcut blocks,
    # head 128 -> 1 without bias.
    optimized = _conv(3, 128, 3) + _conv(128, 128, 3) + _conv(3, 128, 1)
    assert (optimized, _d_block(128, 128, True), _d_block(128, 128, False)) == (
        151_680,
        311_680,
        295_168,
    )
    assert 151_680 + 311_680 + 2 * 295_168 + 128 == SNGAN32_D
    # sngan48 G: dense 128 -> 6*6*512 (+bias), up-blocks 512 -> 256 -> 128 -> 64, BN, conv 64 -> 3.
    g48 = [_g_block(512, 256), _g_block(256, 128), _g_block(128, 64)]
    assert g48 == [1_902_848, 476_288, 119_360]
    assert 2_377_728 + sum(g48) + 128 + 1_731 == SNGAN48_G
    # sngan48 D: optimized 3 -> 64, down blocks 64 -> 128 -> 256 -> 512 -> 1024, head 1024 -> 1
    # with a bias.
    widths = [(64, 128), (128, 256), (256, 512), (512, 1024)]
    d48 = [_d_block(c_in, c_out, True) for c_in, c_out in widths]
    assert d48 == [229_760, 918_272, 3_671_552, 14_683_136]
    assert _conv(3, 64, 3) + _conv(64, 64, 3) + _conv(3, 64, 1) == 38_976
    assert 38_976 + sum(d48) + 1024 + 1 == SNGAN48_D


@pytest.mark.parametrize(
    ("name", "g_params", "d_params", "n_kernels"),
    [("sngan32", SNGAN32_G, SNGAN32_D, (11, 11)), ("sngan48", SNGAN48_G, SNGAN48_D, (11, 16))],
)
def test_full_size_counts_shapes_and_leaf_names(name, g_params, d_params, n_kernels):
    G, D = build_models(name)
    size = image_size(name)
    z = jax.ShapeDtypeStruct((64, 128), jnp.float32)
    x = jax.ShapeDtypeStruct((64, size, size, 3), jnp.float32)
    g_vars = jax.eval_shape(functools.partial(G.init, train=False), jax.random.key(0), z)
    d_vars = jax.eval_shape(D.init, jax.random.key(0), x)
    assert _size(g_vars["params"]) == g_params
    assert _size(d_vars["params"]) == d_params
    assert G.image_size == size

    out = jax.eval_shape(functools.partial(G.apply, train=False), g_vars, z)
    assert (out.shape, out.dtype) == ((64, size, size, 3), jnp.float32)
    scores = jax.eval_shape(functools.partial(D.apply, update_stats=False), d_vars, x)
    assert scores.shape == (64,)

    # Every conv/dense weight is a leaf named "kernel" (the maskable predicate relies on it):
    # G: dense + 3 blocks x 3 convs + conv_out; D: 3 per block (sngan32: blocks 3, 4 have identity
    # shortcuts, 2 each) + head.
    for params, n in zip((g_vars["params"], d_vars["params"]), n_kernels, strict=True):
        leaves = _leaves_by_path(params)
        assert {path.rsplit("/", 1)[-1] for path in leaves} <= {"kernel", "bias", "scale"}
        for path, leaf in leaves.items():
            assert (leaf.ndim >= 2) == path.endswith("/kernel"), path
        assert sum(path.endswith("/kernel") for path in leaves) == n

    # Spectral norm on every D kernel: one (u, sigma) pair each, in batch_stats, not in params.
    kernels = sorted(p for p in _leaves_by_path(d_vars["params"]) if p.endswith("/kernel"))
    state = _leaves_by_path(d_vars["batch_stats"])
    for suffix in ("/u", "/sigma"):
        assert sorted(_sn_kernel_path(p) for p in state if p.endswith(suffix)) == kernels
    assert len(state) == 2 * len(kernels)


def test_head_bias_option_matches_reference_count():
    _, D = build_models("sngan32", d_head_bias=True)
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    d_vars = jax.eval_shape(D.init, jax.random.key(0), x)
    assert _size(d_vars["params"]) == SNGAN32_D + 1 == 1_053_825


def test_widths_scale_the_layers():
    G, D = build_models("sngan48", g_ch=16, d_ch=32)
    assert (tuple(G.channels), tuple(D.channels)) == ((16, 8, 4, 2), (2, 4, 8, 16, 32))
    G, D = build_models("sngan32", g_ch=8, d_ch=4, z_dim=16)
    assert (tuple(G.channels), tuple(D.channels), G.z_dim) == ((8,) * 4, (4,) * 4, 16)


def _host_init(shapes, seed: int):
    """Variables shaped like ``shapes``, drawn with NumPy: no XLA compilation of random draws.

    Kernels ~ N(0, 1/fan_in); BN scale and running var 1; spectral-norm u ~ N(0, 1); the rest 0.
    """
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key.rsplit("/", 1)[-1]  # SN state keys look like "conv1/kernel/u"
        if name == "kernel":
            std = 1.0 / math.sqrt(math.prod(leaf.shape[:-1]))
            return rng.normal(0.0, std, leaf.shape).astype(np.float32)
        if name == "u":
            return rng.normal(size=leaf.shape).astype(np.float32)
        fill_value = 1.0 if name in ("scale", "var", "sigma") else 0.0
        return np.full(leaf.shape, fill_value, np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_tiny_named_model_forward(name):
    G, D = build_models(name, g_ch=8, d_ch=16)
    size = image_size(name)
    z = jax.random.normal(_key(0), (BATCH, G.z_dim))
    x = jax.ShapeDtypeStruct((BATCH, size, size, 3), jnp.float32)
    g_vars = _host_init(jax.eval_shape(functools.partial(G.init, train=False), _key(1), z), 1)
    d_vars = _host_init(jax.eval_shape(D.init, _key(2), x), 2)

    @jax.jit
    def forward(g_vars, d_vars, z):
        fake, _ = G.apply(g_vars, z, train=True, mutable=["batch_stats"])
        return fake, D.apply(d_vars, fake, update_stats=False)

    fake, scores = forward(g_vars, d_vars, z)
    assert fake.shape == (BATCH, size, size, 3)
    assert bool(jnp.all(jnp.abs(fake) <= 1.0)) and float(jnp.std(fake)) > 0.0
    assert scores.shape == (BATCH,)
    assert bool(jnp.all(jnp.isfinite(scores))) and float(jnp.std(scores)) > 0.0


# ------------------------------------------------------------------------------------------
# Behaviour, on small instances of the generic modules.
# ------------------------------------------------------------------------------------------

Z_DIM = 8
# 4x4 -> 8x8 images. D: optimized block 3 -> 4 (8x8 -> 4x4), then a non-down-sampling block with
# a learned 1x1 shortcut (4 -> 8 channels) and a head: every block type of the D family.
SMALL_G = Generator(channels=(8, 8), bottom_width=4, z_dim=Z_DIM)
SMALL_D = Discriminator(channels=(4, 8), downsample=(True, False))


@pytest.fixture(scope="module")
def small():
    """(g_vars, d_vars, z, x) of SMALL_G / SMALL_D, initialised with their default schemes."""
    kg, kd, kz, kx = jax.random.split(_key(2), 4)
    z = jax.random.normal(kz, (BATCH, Z_DIM))
    x = jax.random.uniform(kx, (BATCH, 8, 8, 3), minval=-1.0, maxval=1.0)
    g_vars = jax.jit(functools.partial(SMALL_G.init, train=False))(kg, z)
    d_vars = jax.jit(SMALL_D.init)(kd, x)
    return g_vars, d_vars, z, x


def test_update_stats_false_leaves_spectral_norm_state_unchanged(small):
    _, d_vars, _, x = small

    @jax.jit
    def forwards(d_vars, x):
        frozen = SMALL_D.apply(d_vars, x, update_stats=False, mutable=["batch_stats"])
        # Nothing is written, so no mutable collection is needed either.
        plain = SMALL_D.apply(d_vars, x, update_stats=False)
        updated = SMALL_D.apply(d_vars, x, update_stats=True, mutable=["batch_stats"])
        # Spectral norm divides every kernel by its top singular value, so with the zero biases
        # of init, scaling all kernels changes nothing (a kernel without SN would break this).
        scaled_params = jax.tree_util.tree_map_with_path(
            lambda path, p: 7.0 * p if path[-1].key == "kernel" else p, d_vars["params"]
        )
        scaled = SMALL_D.apply({**d_vars, "params": scaled_params}, x, update_stats=False)
        return frozen, plain, updated, scaled

    (frozen_scores, frozen_vars), plain_scores, (scores, new_vars), scaled = forwards(d_vars, x)
    np.testing.assert_allclose(scaled, scores, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_equal(frozen_vars["batch_stats"], d_vars["batch_stats"])
    # Same computation either way: only the write differs.
    np.testing.assert_allclose(frozen_scores, scores, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(plain_scores, scores, rtol=1e-6, atol=1e-6)
    old, new = _leaves_by_path(d_vars["batch_stats"]), _leaves_by_path(new_vars["batch_stats"])
    for path in old:
        if path.startswith("head_sn/"):
            continue  # one output unit: u is a fixed +-1 and sigma is exact from the start
        assert not np.array_equal(old[path], new[path]), f"{path} was not updated"
    # Updating without a mutable batch_stats is an error, not a silent no-op.
    with pytest.raises(flax.errors.ModifyScopeVariableError):
        jax.eval_shape(SMALL_D.apply, d_vars, x)


def test_spectral_norm_converges_to_largest_singular_value(small):
    _, d_vars, _, x = small

    @jax.jit
    def power_iterations(d_vars):
        def step(_, stats):
            _, upd = SMALL_D.apply({**d_vars, "batch_stats": stats}, x, mutable=["batch_stats"])
            return upd["batch_stats"]

        return jax.lax.fori_loop(0, 300, step, d_vars["batch_stats"])

    kernels = _leaves_by_path(d_vars["params"])
    stats = _leaves_by_path(power_iterations(d_vars))
    sigmas = {path: v for path, v in stats.items() if path.endswith("/sigma")}
    assert len(sigmas) == 7  # 3 + 3 convs + head
    for path, sigma in sigmas.items():
        kernel = np.asarray(kernels[_sn_kernel_path(path)])
        top = np.linalg.svd(kernel.reshape(-1, kernel.shape[-1]), compute_uv=False)[0]
        np.testing.assert_allclose(sigma, top, rtol=1e-3, err_msg=path)


def test_batch_norm_train_and_eval_modes(small):
    g_vars, _, z, _ = small
    train = jax.jit(functools.partial(SMALL_G.apply, train=True, mutable=["batch_stats"]))
    evaluate = jax.jit(functools.partial(SMALL_G.apply, train=False, mutable=["batch_stats"]))
    out_train, upd = train(g_vars, z)
    out_eval, upd_eval = evaluate(g_vars, z)

    chex.assert_trees_all_equal(upd_eval["batch_stats"], g_vars["batch_stats"])
    assert not np.allclose(out_train, out_eval, atol=1e-3)
    # Eval mode treats samples independently; train mode normalises with batch statistics.
    np.testing.assert_allclose(evaluate(g_vars, z[:2])[0], out_eval[:2], rtol=1e-5, atol=1e-6)
    assert not np.allclose(train(g_vars, z[:2])[0], out_train[:2], atol=1e-3)

    # Running statistics as PyTorch keeps them: momentum 0.1 and the UNBIASED batch variance
    # (n / (n - 1) times the biased one, n = B*H*W): new = 0.9 * old + 0.1 * batch statistic,
    # from mean 0 and var 1.
    dense = g_vars["params"]["dense"]
    h = (z @ dense["kernel"] + dense["bias"]).reshape(BATCH, 4, 4, 8)  # input of block1/bn1
    bn1 = upd["batch_stats"]["block1"]["bn1"]
    np.testing.assert_allclose(bn1["mean"], 0.1 * h.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn1["var"], 0.9 + 0.1 * h.var(axis=(0, 1, 2), ddof=1), rtol=1e-5)


def test_gradients_reach_every_kernel(small):
    g_vars, d_vars, z, _ = small

    @jax.jit
    @jax.grad
    def g_loss_grad(g_params):
        fake, _ = SMALL_G.apply(
            {**g_vars, "params": g_params}, z, train=True, mutable=["batch_stats"]
        )
        return g_hinge_loss(SMALL_D.apply(d_vars, fake, update_stats=False))

    grads = _leaves_by_path(g_loss_grad(g_vars["params"]))
    assert sum(path.endswith("/kernel") for path in grads) == 5
    for path, grad in grads.items():
        assert bool(jnp.all(jnp.isfinite(grad))), path
        if path.endswith("/kernel"):
            assert float(jnp.max(jnp.abs(grad))) > 0.0, path


def test_mean_pool_is_sum_pool_over_spatial_size(small):
    _, d_vars, _, x = small
    mean_d = SMALL_D.clone(pool="mean")
    scores = jax.jit(
        lambda v, x: jnp.stack(
            [SMALL_D.apply(v, x, update_stats=False), mean_d.apply(v, x, update_stats=False)]
        )
    )(d_vars, x)
    np.testing.assert_allclose(scores[1] * 4 * 4, scores[0], rtol=1e-5, atol=1e-6)  # 4x4 maps


def test_small_modules_use_pytorch_default_init(small):
    # Default scheme "torch": kernels and biases U(+-1/sqrt(fan_in)), fan_in of the kernel.
    g_vars, d_vars, _, _ = small
    for params in (g_vars["params"], d_vars["params"]):
        leaves = _leaves_by_path(params)
        for path, leaf in leaves.items():
            if not path.endswith("/kernel"):
                continue
            limit = 1.0 / math.sqrt(math.prod(leaf.shape[:-1]))
            assert 0.5 * limit < float(jnp.max(jnp.abs(leaf))) <= limit, path
            bias = leaves.get(path[: -len("kernel")] + "bias")
            if bias is not None:
                assert float(jnp.max(jnp.abs(bias))) <= limit and np.any(np.asarray(bias)), path
        for path, leaf in leaves.items():  # BatchNorm: scale 1, offset 0
            if "/bn" in path:
                assert np.all(np.asarray(leaf) == (1.0 if path.endswith("scale") else 0.0))


def test_xavier_and_kaiming_schemes_zero_the_biases():
    for scheme in ("xavier", "kaiming"):
        G, D = build_models("sngan32", g_ch=8, d_ch=8, init_scheme=scheme)
        g = G.init(_key(0), jnp.zeros((1, 128)), train=False)["params"]
        d = D.init(_key(1), jnp.zeros((1, 32, 32, 3)))["params"]
        for params in (g, d):
            for path, leaf in _leaves_by_path(params).items():
                if path.endswith("/bias") and "bn" not in path:
                    assert not np.any(np.asarray(leaf)), (scheme, path)


def test_kernel_init_schemes():
    shape = (3, 3, 32, 64)  # fan_in 288, fan_out 576
    draw = jax.jit(
        lambda key: jnp.stack(
            [
                kernel_init("xavier", residual=True)(key, shape),
                kernel_init("xavier", residual=False)(key, shape),
                kernel_init("kaiming", residual=True)(key, shape),
                kernel_init("torch", residual=True)(key, shape),
            ]
        )
    )(_key(3))
    xavier_res, xavier, kaiming, torch_default = np.asarray(draw)
    # PyTorch's reset_parameters: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)).
    assert np.abs(torch_default).max() <= 1 / math.sqrt(288)
    np.testing.assert_allclose(torch_default.std(), 1 / math.sqrt(3 * 288), rtol=0.03)
    limit = math.sqrt(6.0 / (288 + 576))  # Glorot uniform bound, gain 1
    assert np.abs(xavier).max() <= limit < np.abs(xavier_res).max() <= math.sqrt(2) * limit
    np.testing.assert_allclose(xavier.std(), limit / math.sqrt(3), rtol=0.03)
    np.testing.assert_allclose(kaiming.std(), math.sqrt(2.0 / 288), rtol=0.03)  # He normal
    assert np.abs(kaiming).max() > 2.5 * math.sqrt(2.0 / 288)  # untruncated, like torch's


# ------------------------------------------------------------------------------------------
# Losses and errors.
# ------------------------------------------------------------------------------------------


def test_losses_on_hand_computed_numbers():
    d_real = jnp.array([2.0, 0.5, -1.0])  # relu(1 - d) = 0, 0.5, 2 -> mean 5/6
    d_fake = jnp.array([-2.0, 0.0, 0.5, 1.5])  # relu(1 + d) = 0, 1, 1.5, 2.5 -> mean 5/4
    loss = d_hinge_loss(d_real, d_fake)
    assert loss.shape == ()
    np.testing.assert_allclose(loss, 5 / 6 + 5 / 4, rtol=1e-6)
    np.testing.assert_allclose(g_hinge_loss(d_fake), -0.0, atol=1e-7)  # -(0 / 4)
    np.testing.assert_allclose(g_hinge_loss(jnp.array([1.0, 2.0])), -1.5, rtol=1e-6)
    # Only the samples inside the margin carry gradient, 1/B each.
    grad_real, grad_fake = jax.grad(d_hinge_loss, argnums=(0, 1))(d_real, d_fake)
    np.testing.assert_allclose(grad_real, [0.0, -1 / 3, -1 / 3], rtol=1e-6)
    np.testing.assert_allclose(grad_fake, [0.0, 0.25, 0.25, 0.25], rtol=1e-6)


def test_factory_errors():
    with pytest.raises(ValueError, match=r"Unknown model 'sngan64'.*sngan32, sngan48"):
        build_models("sngan64")
    with pytest.raises(ValueError, match="Unknown model 'biggan'"):
        image_size("biggan")
    assert (image_size("sngan32"), image_size("sngan48")) == (32, 48)
    with pytest.raises(ValueError, match=r"g_ch=12 .*'sngan48'.*multiple of 8"):
        build_models("sngan48", g_ch=12)
    with pytest.raises(ValueError, match=r"d_ch=0 .*positive int"):
        build_models("sngan32", d_ch=0)
    with pytest.raises(ValueError, match="Unknown init scheme 'orthogonal'"):
        build_models("sngan32", init_scheme="orthogonal")
    with pytest.raises(ValueError, match="Unknown pool 'max'"):
        build_models("sngan32", d_pool="max")


def test_module_input_errors():
    with pytest.raises(ValueError, match=r"downsample\[0\] True"):
        Discriminator(channels=(8, 8), downsample=(False, True))
    with pytest.raises(ValueError, match="one bool per block"):
        Discriminator(channels=(8, 8), downsample=(True,))
    with pytest.raises(ValueError, match="positive ints"):
        Generator(channels=())
    z = jax.ShapeDtypeStruct((2, 64), jnp.float32)
    with pytest.raises(ValueError, match=r"noise of shape \(batch, 8\), got \(2, 64\)"):
        jax.eval_shape(functools.partial(SMALL_G.init, train=False), jax.random.key(0), z)
    x = jax.ShapeDtypeStruct((8, 8, 3), jnp.float32)
    with pytest.raises(ValueError, match="NHWC"):
        jax.eval_shape(SMALL_D.init, jax.random.key(0), x)
