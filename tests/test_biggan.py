"""Tests of the class-conditional BigGAN models (ddst_jax.gan.biggan).

Full-size models are only traced (``jax.eval_shape``); behaviour is tested on small instances of
the same generic modules and on tiny-width versions of the named layouts.
"""

import functools
import itertools
import math

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_helpers import key as _key
from model_helpers import leaves_by_path as _leaves_by_path
from model_helpers import size as _size

from ddst_jax.gan import layers
from ddst_jax.gan.biggan import (
    CBN_MODULE_NAMES,
    MODEL_NAMES,
    DBlock,
    Discriminator,
    Generator,
    SelfAttention,
    SpectralNorm,
    bias_init,
    build_biggan,
    embedding_init,
    image_size,
    maskable_including_cbn,
    weight_init,
)
from ddst_jax.gan.biggan import (
    is_maskable as biggan_is_maskable,
)

BATCH = 4


def _sn_weight_path(state_path: str) -> str:
    """'block1/conv1_sn/conv1/kernel/u' -> 'block1/conv1/kernel' (the weight it normalises)."""
    return "/".join(p for p in state_path.split("/")[:-1] if not p.endswith("_sn"))


def _conv(c_in: int, c_out: int, k: int, bias: bool = True) -> int:
    return c_in * c_out * k * k + bias * c_out


def _g_block(c_in: int, c_out: int, cond: int) -> int:
    """Up-block: two 3x3 convs, a 1x1 shortcut, and two CBNs whose gain and offset maps each
    hold ``cond * C`` weights (a table of ``cond`` classes or a bias-free ``cond -> C`` map)."""
    cbn = 2 * cond * (c_in + c_out)
    return _conv(c_in, c_out, 3) + _conv(c_out, c_out, 3) + _conv(c_in, c_out, 1) + cbn


def _d_block(c_in: int, c_out: int, shortcut: bool) -> int:
    return _conv(c_in, c_out, 3) + _conv(c_out, c_out, 3) + shortcut * _conv(c_in, c_out, 1)


def _attention(c: int) -> int:
    """Query, key (C -> C/8), value (C -> C/2), out (C/2 -> C), no biases; gamma."""
    return 2 * c * (c // 8) + 2 * c * (c // 2) + 1


# ------------------------------------------------------------------------------------------
# Full-size architectures, traced only.
# ------------------------------------------------------------------------------------------

# The reference's counts: the authors' code (YiteWang/ADAPT at 002e2e9) instantiated once with
# torch 2.13.0 (CPU; not a dependency of this project): biggan.32 = biggan.Generator32(args) /
# Discriminator32(args) with main.py's add_sn applied to D, biggan.64 = big_resnet.Generator /
# Discriminator with args.img_size=64, args.num_classes=200; sum(p.numel() for p in
# net.parameters()) (SN u/v and BN running statistics are buffers, not parameters). The same
# numbers follow by hand from the layouts, see test_hand_counts_add_up.
BIGGAN32_G, BIGGAN32_D = 4_304_387, 4_207_361
BIGGAN64_G, BIGGAN64_D = 17_335_204, 30_796_722
# Maskable weights under BigGAN's predicate (conv/dense kernels but CBN maps and the head).
BIGGAN32_G_MASKABLE, BIGGAN32_D_MASKABLE = 4_266_752, 4_201_984
BIGGAN64_G_MASKABLE, BIGGAN64_D_MASKABLE = 16_219_760, 30_532_000
BIGGAN64_CBN_MAPS = 1_065_600  # 2 maps x 148 inputs x (1280+640 + 640+320 + 320+160 + 160+80)


def test_hand_counts_add_up():
    # biggan32 G: SN dense 128 -> 4*4*256 (+bias); 3 blocks 256 -> 256 with 10-class CBN
    # tables; BN 256; conv 256 -> 3.
    assert _g_block(256, 256, 10) == 1_256_192
    assert 128 * 4096 + 4096 + 3 * 1_256_192 + 2 * 256 + _conv(256, 3, 3) == BIGGAN32_G
    # biggan32 D: optimized 3 -> 256, down block with 1x1 shortcut, 2 identity-shortcut blocks,
    # classifier 256 -> 1 (+bias), projection embedding 10 x 256.
    optimized = _conv(3, 256, 3) + _conv(256, 256, 3) + _conv(3, 256, 1)
    assert (optimized, _d_block(256, 256, True), _d_block(256, 256, False)) == (
        598_272,
        1_245_952,
        1_180_160,
    )
    assert 598_272 + 1_245_952 + 2 * 1_180_160 + 257 + 10 * 256 == BIGGAN32_D
    # biggan64 G: z 100 in 5 chunks of 20; SN dense 20 -> 4*4*1280 (+bias); shared embedding
    # 200 x 128; blocks 1280 -> 640 -> 320 -> 160 -> 80 with CBN maps 148 -> C; attention(160)
    # after block 3; BN 80; conv 80 -> 3.
    widths = [1280, 640, 320, 160, 80]
    blocks = [_g_block(c_in, c_out, 128 + 20) for c_in, c_out in itertools.pairwise(widths)]
    assert blocks == [12_448_640, 3_254_720, 884_960, 256_880]
    assert _attention(160) == 32_001
    total = 20 * 20480 + 20480 + 200 * 128 + sum(blocks) + 32_001 + 2 * 80 + _conv(80, 3, 3)
    assert total == BIGGAN64_G
    # biggan64 D: optimized 3 -> 80, attention(80), down blocks 80 -> 160 -> 320 -> 640, no-down
    # block 640 -> 1280 (learned shortcut), classifier 1280 -> 1 (+bias), embedding 200 x 1280.
    optimized = _conv(3, 80, 3) + _conv(80, 80, 3) + _conv(3, 80, 1)
    d_blocks = [_d_block(c_in, c_out, True) for c_in, c_out in itertools.pairwise(widths[::-1])]
    assert (optimized, _attention(80)) == (60_240, 8_001)
    assert d_blocks == [358_880, 1_434_560, 5_736_320, 22_941_440]
    assert 60_240 + 8_001 + sum(d_blocks) + 1_281 + 200 * 1280 == BIGGAN64_D
    # Maskable = total - biases - BN/attention scalars - CBN maps - shared/projection
    # embeddings - classifier.
    assert BIGGAN32_G - 4096 - 3 * 3 * 256 - 3 - 512 - 3 * 2 * 2 * 10 * 256 == BIGGAN32_G_MASKABLE
    assert BIGGAN32_D - 10 * 256 - 257 - 10 * 256 == BIGGAN32_D_MASKABLE
    assert 2 * 148 * sum(a + b for a, b in itertools.pairwise(widths)) == BIGGAN64_CBN_MAPS
    g64_rest = 20480 + 3 * sum(widths[1:]) + 3 + 160 + 1 + 200 * 128
    assert BIGGAN64_G - g64_rest - BIGGAN64_CBN_MAPS == BIGGAN64_G_MASKABLE
    assert BIGGAN64_D - 3 * sum(widths) - 1 - 1_281 - 200 * 1280 == BIGGAN64_D_MASKABLE


def _abstract_init(G: Generator, D: Discriminator, size: int, batch: int = 2):
    z = jax.ShapeDtypeStruct((batch, G.z_dim), jnp.float32)
    y = jax.ShapeDtypeStruct((batch,), jnp.int32)
    x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    g_vars = jax.eval_shape(functools.partial(G.init, train=False), jax.random.key(0), z, y)
    d_vars = jax.eval_shape(D.init, jax.random.key(0), x, y)
    return g_vars, d_vars, z, y, x


@functools.cache
def _full_size(name: str):
    """(G, D, g_vars, d_vars, z, y, x) of a full-size named model, traced only (batch 2)."""
    G, D = build_biggan(name)
    return (G, D, *_abstract_init(G, D, image_size(name)))


def _maskable_size(params, predicate=biggan_is_maskable) -> int:
    flat = jax.tree_util.tree_leaves_with_path(params)
    return sum(math.prod(leaf.shape) for path, leaf in flat if predicate(path, leaf))


def _host_init(shapes, seed: int):
    """Variables shaped like ``shapes``, drawn with NumPy: no XLA compilation of random draws.

    Kernels ~ N(0, 1/fan_in), class tables ~ N(0, 1), spectral-norm u ~ N(0, 1), attention gates
    0.5 (so attention is active), BN scale, running var and sigma 1, the rest 0.
    """
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key.rsplit("/", 1)[-1]  # SN state keys look like "conv1/kernel/u"
        if name in ("kernel", "embedding", "u"):
            std = 1.0 / math.sqrt(math.prod(leaf.shape[:-1])) if name == "kernel" else 1.0
            return rng.normal(0.0, std, leaf.shape).astype(np.float32)
        fill_value = {"scale": 1.0, "var": 1.0, "sigma": 1.0, "gamma": 0.5}.get(name, 0.0)
        return np.full(leaf.shape, fill_value, np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.mark.parametrize(
    ("name", "counts", "maskable", "classes"),
    [
        ("biggan32", (BIGGAN32_G, BIGGAN32_D), (BIGGAN32_G_MASKABLE, BIGGAN32_D_MASKABLE), 10),
        ("biggan64", (BIGGAN64_G, BIGGAN64_D), (BIGGAN64_G_MASKABLE, BIGGAN64_D_MASKABLE), 200),
    ],
)
def test_full_size_counts_shapes_and_leaf_names(name, counts, maskable, classes):
    G, D, g_vars, d_vars, z, y, x = _full_size(name)
    size = image_size(name)
    assert (G.num_classes, D.num_classes, G.image_size) == (classes, classes, size)
    assert (_size(g_vars["params"]), _size(d_vars["params"])) == counts
    assert (_maskable_size(g_vars["params"]), _maskable_size(d_vars["params"])) == maskable

    out = jax.eval_shape(functools.partial(G.apply, train=False), g_vars, z, y)
    assert (out.shape, out.dtype) == ((2, size, size, 3), jnp.float32)
    scores = jax.eval_shape(functools.partial(D.apply, update_stats=False), d_vars, x, y)
    assert scores.shape == (2,)

    for variables in (g_vars, d_vars):
        leaves = _leaves_by_path(variables["params"])
        # Every conv/dense weight is a leaf named "kernel"; class tables are "embedding" leaves
        # inside modules whose names contain "embed"; everything else is a vector or scalar.
        assert {p.rsplit("/", 1)[-1] for p in leaves} <= {
            "kernel",
            "bias",
            "scale",
            "embedding",
            "gamma",
        }
        for path, leaf in leaves.items():
            is_matrix = path.endswith("/kernel") or path.endswith("/embedding")
            assert (leaf.ndim >= 2) == is_matrix, path
            if path.endswith("/embedding"):
                assert "embed" in path.split("/")[-2], path
        # Spectral norm on every kernel of G and D and on D's projection embedding (not on G's
        # class tables): one (u, sigma) pair each, in batch_stats.
        sn_weights = sorted(p for p in leaves if p.endswith("/kernel") or p == "embed_y/embedding")
        state = {
            p: v
            for p, v in _leaves_by_path(variables["batch_stats"]).items()
            if p.endswith(("/u", "/sigma"))
        }
        for suffix in ("/u", "/sigma"):
            assert sorted(_sn_weight_path(p) for p in state if p.endswith(suffix)) == sn_weights
        # Biases: on every conv/dense of the reference (block convs, shortcuts, G's input dense
        # and output conv, D's classifier), not on the attention convs nor the CBN linear maps.
        for path in (p for p in leaves if p.endswith("/kernel")):
            module = path.split("/")[-2]
            no_bias = module in ("query", "key", "value", "out", *CBN_MODULE_NAMES)
            assert (path[: -len("kernel")] + "bias" in leaves) == (not no_bias), path


def test_biggan_predicate_keeps_embeddings_head_and_cbn_maps_dense():
    # The only weight matrices BigGAN's predicate (the registry's) leaves dense: class
    # embeddings, CBN maps and D's classifier head (the maskable counts above show that every
    # other kernel is maskable).
    g_dense = {
        "biggan32": {"gain_embed", "bias_embed"},
        "biggan64": {"embed_shared", "gain_embed", "bias_embed"},
    }
    for name in MODEL_NAMES:
        _, _, g_vars, d_vars, *_ = _full_size(name)
        for params, expected in (
            (g_vars["params"], g_dense[name]),
            (d_vars["params"], {"classifier", "embed_y"}),
        ):
            dense = {
                path[-2].key
                for path, leaf in jax.tree_util.tree_leaves_with_path(params)
                if leaf.ndim >= 2 and not biggan_is_maskable(path, leaf)
            }
            assert dense == expected, name
    # The literal docs/method.md section 1 option masks biggan64's CBN linear maps too; biggan32's
    # tables stay dense.
    g64 = _full_size("biggan64")[2]
    assert _maskable_size(g64["params"], maskable_including_cbn) == (
        BIGGAN64_G_MASKABLE + BIGGAN64_CBN_MAPS
    )
    _, _, g32, d32, *_ = _full_size("biggan32")
    assert _maskable_size(g32["params"], maskable_including_cbn) == BIGGAN32_G_MASKABLE
    assert _maskable_size(d32["params"], maskable_including_cbn) == BIGGAN32_D_MASKABLE


# ------------------------------------------------------------------------------------------
# Agreement with the authors' reference models (YiteWang/ADAPT at 002e2e9): biggan.32 =
# sparselearning/backbones/biggan.py Generator32 / Discriminator32 (+ main.py's add_sn on D),
# biggan.64 = sparselearning/backbones/big_resnet.py (StudioGAN) at img_size 64.
# ------------------------------------------------------------------------------------------

# name -> (G/D init scheme, BN eps, SN eps, D shortcuts read ReLU(x))
REFERENCE = {
    # res32_weights_init; nn.BatchNorm2d defaults; sn = spectral_norm(eps=1e-12) and add_sn
    # (PyTorch's default eps); DisBlock's nn.ReLU() is not in place.
    "biggan32": ("res32", 1e-5, 1e-12, False),
    # init_weights(..., "ortho"); batchnorm_2d(eps=1e-4); snconv2d/snlinear/sn_embedding use
    # eps=1e-6; DiscBlock's ReLU(inplace=True) also rectifies the tensor its shortcut reads.
    "biggan64": ("ortho", 1e-4, 1e-6, True),
}


def _module_settings(name: str):
    """Every SpectralNorm / BatchNorm module that a full-size G and D call, with its settings."""
    G, D, g_vars, d_vars, z, y, x = _full_size(name)
    seen = []

    def record(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__" and isinstance(module, nn.SpectralNorm):
            seen.append(("sn", "/".join(module.scope.path), type(module), module.epsilon))
        if context.method_name == "__call__" and isinstance(module, nn.BatchNorm):
            settings = (module.epsilon, module.momentum, module.use_scale, module.use_bias)
            seen.append(("bn", "/".join(module.scope.path), type(module), settings))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(functools.partial(G.apply, train=True, mutable=["batch_stats"]), g_vars,
                       z, y)
        jax.eval_shape(functools.partial(D.apply, mutable=["batch_stats"]), d_vars, x, y)
    return seen


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_named_models_use_the_reference_settings(name):
    scheme, bn_eps, sn_eps, relu_shortcut = REFERENCE[name]
    G, D = build_biggan(name)
    assert G.init_scheme == D.init_scheme == scheme
    assert (G.bn_epsilon, G.sn_epsilon, D.sn_epsilon) == (bn_eps, sn_eps, sn_eps)
    assert D.relu_shortcut is relu_shortcut
    # Hierarchical z and the shared embedding only in biggan64: z 100 = 5 chunks of 20.
    assert (G.z_dim, G.shared_dim) == ((100, 128) if name == "biggan64" else (128, 0))
    # Another scheme is an option, not the default.
    assert build_biggan(name, init_scheme="n02")[0].init_scheme == "n02"

    settings = _module_settings(name)
    sn = [s for s in settings if s[0] == "sn"]
    bn = [s for s in settings if s[0] == "bn"]
    # One SN wrapper per kernel of G and D plus D's projection embedding (counted above in
    # test_full_size_counts_shapes_and_leaf_names), all with the model's eps.
    _, _, g_vars, d_vars, *_ = _full_size(name)
    n_kernels = sum(p.endswith("/kernel") for v in (g_vars, d_vars)
                    for p in _leaves_by_path(v["params"]))
    assert len(sn) == n_kernels + 1
    assert all(cls is SpectralNorm and eps == sn_eps for _, _, cls, eps in sn), sn
    # G's BatchNorms: layers.BatchNorm (PyTorch's unbiased running variance), PyTorch momentum
    # 0.1 (flax decay 0.9), the model's eps; the CBNs without affine parameters, bn_out with.
    blocks = len(G.channels) - 1
    assert len(bn) == 2 * blocks + 1
    for _, path, cls, settings in bn:
        assert cls is layers.BatchNorm, path
        affine = path == "bn_out"
        assert settings == (bn_eps, 0.9, affine, affine), path


def _real_init(name: str, g_ch: int, d_ch: int):
    """Params of a small named model from its own initializers (jit, rbg keys)."""
    G, D = build_biggan(name, g_ch=g_ch, d_ch=d_ch)
    z, y = jnp.zeros((2, G.z_dim)), jnp.zeros((2,), jnp.int32)
    x = jnp.zeros((2, G.image_size, G.image_size, 3))
    g_vars = jax.jit(functools.partial(G.init, train=False))(_key(20), z, y)
    d_vars = jax.jit(D.init)(_key(21), x, y)
    return _leaves_by_path(g_vars["params"]), _leaves_by_path(d_vars["params"])


def _fan_in(kernel) -> int:
    return math.prod(kernel.shape[:-1])


def _check_other_leaves(leaves):
    """BN scale 1 and offset 0, attention gate 0 (both references)."""
    for path, leaf in leaves.items():
        if path.endswith("/scale"):
            np.testing.assert_array_equal(leaf, 1.0, err_msg=path)
        if path.endswith("/gamma") or (path.endswith("/bias") and "bn_out" in path):
            np.testing.assert_array_equal(leaf, 0.0, err_msg=path)


def test_biggan32_default_init_is_the_reference_res32_init():
    """res32_weights_init: every Conv2d / Linear / Embedding weight N(0, 0.02); the biases keep
    PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)), nonzero (fan_in = in * kh * kw)."""
    for leaves in _real_init("biggan32", 16, 16):
        kernels = {p: np.asarray(v) for p, v in leaves.items() if p.endswith("/kernel")}
        tables = {p: np.asarray(v) for p, v in leaves.items() if p.endswith("/embedding")}
        assert kernels and tables
        for path, w in kernels.items():
            if w.size >= 1000:  # per layer, where the sample is large enough
                assert abs(w.std() - 0.02) < 0.002 and abs(w.mean()) < 0.002, path
        pooled = np.concatenate([np.ravel(w) for w in kernels.values()])
        np.testing.assert_allclose(pooled.std(), 0.02, rtol=0.02)
        tables = np.concatenate([np.ravel(t) for t in tables.values()])
        np.testing.assert_allclose(tables.std(), 0.02, rtol=0.1)
        scaled = []
        for path, w in kernels.items():
            b = np.asarray(leaves[path[: -len("kernel")] + "bias"])
            bound = 1.0 / math.sqrt(_fan_in(w))
            assert np.all(b != 0.0) and np.all(np.abs(b) <= bound), path
            if b.size >= 16:
                assert np.abs(b).max() > 0.5 * bound, path  # the bound is this layer's
            scaled.append(b / bound)
        scaled = np.concatenate(scaled)  # ~U(-1, 1): std 1/sqrt(3)
        np.testing.assert_allclose(scaled.std(), 1 / math.sqrt(3), rtol=0.1)
        assert abs(scaled.mean()) < 0.1
        _check_other_leaves(leaves)


def test_biggan64_default_init_is_the_reference_ortho_init():
    """StudioGAN's init_weights(..., "ortho"): every Conv2d / Linear / Embedding weight
    (semi-)orthogonal with gain 1, every conv / linear bias 0."""
    for leaves in _real_init("biggan64", 4, 8):
        n_matrices = 0
        for path, leaf in leaves.items():
            if path.endswith(("/kernel", "/embedding")):
                m = np.asarray(leaf, np.float64).reshape(-1, leaf.shape[-1])
                gram = m.T @ m if m.shape[0] >= m.shape[1] else m @ m.T
                np.testing.assert_allclose(gram, np.eye(len(gram)), atol=1e-4, err_msg=path)
                n_matrices += 1
            elif path.endswith("/bias"):
                np.testing.assert_array_equal(leaf, 0.0, err_msg=path)
        assert n_matrices > 10
        _check_other_leaves(leaves)


def test_init_scheme_functions():
    key = _key(30)
    # PyTorch's default conv/linear init: U(+-1/sqrt(fan_in)) for weight and bias alike.
    for scheme in ("res32", "torch"):
        b = np.asarray(bias_init(scheme, 3 * 3 * 16)(key, (20_000,)))
        assert np.abs(b).max() <= 1 / 12 and np.abs(b).max() > 0.99 / 12
        np.testing.assert_allclose(b.std(), 1 / 12 / math.sqrt(3), rtol=0.03)
    for scheme in ("ortho", "n02"):
        assert not np.any(np.asarray(bias_init(scheme, 5)(key, (7,))))
    with pytest.raises(ValueError, match="positive fan_in"):
        bias_init("res32", 0)
    with pytest.raises(ValueError, match="Unknown init scheme"):
        bias_init("xavier", 4)
    w = np.asarray(weight_init("torch")(key, (3, 3, 16, 64)))
    assert np.abs(w).max() <= 1 / 12 and np.abs(w).max() > 0.99 / 12
    np.testing.assert_allclose(w.std(), 1 / 12 / math.sqrt(3), rtol=0.03)
    np.testing.assert_allclose(np.asarray(embedding_init("torch")(key, (100, 100))).std(), 1.0,
                               rtol=0.03)
    for scheme in ("n02", "res32"):
        np.testing.assert_allclose(np.asarray(weight_init(scheme)(key, (64, 64))).std(), 0.02,
                                   rtol=0.05)
        np.testing.assert_allclose(np.asarray(embedding_init(scheme)(key, (64, 64))).std(), 0.02,
                                   rtol=0.05)


def test_relu_shortcut_feeds_the_rectified_input_to_the_shortcut():
    """StudioGAN's DiscBlock: ``x0 = x; x = relu_(x)`` rectifies x0 too, so the block maps x as a
    plain block maps ReLU(x) (its residual starts with a ReLU anyway)."""
    x = jax.random.normal(_key(31), (2, 8, 8, 4))
    for down, features in ((True, 8), (False, 8), (False, 4)):  # 1x1 conv / identity shortcut
        plain = DBlock(features, down)
        rectified = DBlock(features, down, relu_shortcut=True)
        variables = jax.jit(plain.init, static_argnums=2)(_key(32), x, False)

        @jax.jit
        def outputs(variables, x, plain=plain, rectified=rectified):
            expected = plain.apply(variables, jax.nn.relu(x), False)
            return rectified.apply(variables, x, False), expected, plain.apply(variables, x, False)

        out, expected, unrectified = outputs(variables, x)
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
        assert float(jnp.max(jnp.abs(out - unrectified))) > 1e-3
    # The first (optimized) block reads the image and never rectifies its shortcut.
    d = Discriminator(channels=(8, 8), downsample=(True, False), num_classes=2, relu_shortcut=True)
    d_plain = d.clone(relu_shortcut=False)
    x = jax.random.normal(_key(33), (2, 8, 8, 3))
    y = jnp.array([0, 1], jnp.int32)
    variables = jax.jit(d.init)(_key(34), x, y)
    modules = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, DBlock) and context.method_name == "__call__":
            modules[context.module.name] = context.module.relu_shortcut
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(functools.partial(d.apply, update_stats=False), variables, x, y)
    assert modules == {"block1": False, "block2": True}
    scores = jax.jit(lambda v: [m.apply(v, x, y, update_stats=False) for m in (d, d_plain)])
    rectified, plain = scores(variables)
    assert float(jnp.max(jnp.abs(rectified - plain))) > 1e-6


def test_widths_scale_the_layers():
    G, D = build_biggan("biggan64", g_ch=4, d_ch=8, z_dim=10, num_classes=7)
    assert (tuple(G.channels), tuple(D.channels)) == ((64, 32, 16, 8, 4), (8, 16, 32, 64, 128))
    assert (G.z_dim, G.shared_dim, G.num_classes, D.num_classes) == (10, 128, 7, 7)
    assert (G.attention_after, D.attention_after) == (3, 1)
    G, D = build_biggan("biggan32", g_ch=8, d_ch=4)
    assert (tuple(G.channels), tuple(D.channels), G.shared_dim) == ((8,) * 4, (4,) * 4, 0)
    assert tuple(D.downsample) == (True, True, False, False)


@pytest.mark.parametrize(("name", "g_ch", "d_ch"), [("biggan32", 8, 8), ("biggan64", 4, 8)])
def test_tiny_named_model_forward(name, g_ch, d_ch):
    G, D = build_biggan(name, g_ch=g_ch, d_ch=d_ch)
    size = image_size(name)
    g_shapes, d_shapes, *_ = _abstract_init(G, D, size, batch=BATCH)
    g_vars, d_vars = _host_init(g_shapes, 1), _host_init(d_shapes, 2)
    z = jax.random.normal(_key(0), (BATCH, G.z_dim))
    y = jnp.array([0, 1, 2, G.num_classes - 1], jnp.int32)

    @jax.jit
    def forward(z, y):
        fake, _ = G.apply(g_vars, z, y, train=True, mutable=["batch_stats"])
        return fake, D.apply(d_vars, fake, y, update_stats=False)

    fake, scores = forward(z, y)
    assert fake.shape == (BATCH, size, size, 3)
    assert bool(jnp.all(jnp.abs(fake) <= 1.0)) and float(jnp.std(fake)) > 0.0
    assert scores.shape == (BATCH,)
    assert bool(jnp.all(jnp.isfinite(scores))) and float(jnp.std(scores)) > 0.0


# ------------------------------------------------------------------------------------------
# Behaviour, on small instances of the generic modules.
# ------------------------------------------------------------------------------------------

CLASSES = 3
# Per-class CBN tables (biggan32 style): 4x4 -> 8x8.
TABLE_G = Generator(channels=(8, 8), num_classes=CLASSES, z_dim=8)
# Shared embedding + hierarchical z (biggan64 style): z 9 = 3 chunks of 3; 4 -> 8 -> 16 with
# attention after block 1 (8 channels at 8x8).
SHARED_G = Generator(
    channels=(16, 8, 8), num_classes=CLASSES, z_dim=9, shared_dim=4, attention_after=1
)
# 8x8 images: optimized block 3 -> 8 (4x4), attention, no-down block 8 -> 16 (learned shortcut).
SMALL_D = Discriminator(
    channels=(8, 16), downsample=(True, False), num_classes=CLASSES, attention_after=1
)


@pytest.fixture(scope="module")
def small():
    """Host-initialised variables of TABLE_G, SHARED_G, SMALL_D, and inputs."""
    kz, kx = jax.random.split(_key(2))
    z8 = jax.random.normal(kz, (BATCH, 8))
    z9 = jax.random.normal(kz, (BATCH, 9))
    x = jax.random.uniform(kx, (BATCH, 8, 8, 3), minval=-1.0, maxval=1.0)
    y = jnp.array([0, 1, 2, 1], jnp.int32)
    table = jax.eval_shape(functools.partial(TABLE_G.init, train=False), _key(0), z8, y)
    shared = jax.eval_shape(functools.partial(SHARED_G.init, train=False), _key(0), z9, y)
    d = jax.eval_shape(SMALL_D.init, _key(0), x, y)
    return dict(
        table=_host_init(table, 3),
        shared=_host_init(shared, 4),
        d=_host_init(d, 5),
        z8=z8,
        z9=z9,
        x=x,
        y=y,
    )


def _g_eval(G):
    return jax.jit(functools.partial(G.apply, train=False))


def test_conditioning_changes_images_and_scores(small):
    y0, y1 = jnp.zeros(BATCH, jnp.int32), jnp.ones(BATCH, jnp.int32)
    for G, g_vars, z in (
        (TABLE_G, small["table"], small["z8"]),
        (SHARED_G, small["shared"], small["z9"]),
    ):
        apply = _g_eval(G)
        images0, images1 = apply(g_vars, z, y0), apply(g_vars, z, y1)
        assert float(jnp.max(jnp.abs(images0 - images1))) > 1e-3
        np.testing.assert_array_equal(apply(g_vars, z, y0), images0)  # deterministic in eval

    d_vars, x = small["d"], small["x"]
    score = jax.jit(functools.partial(SMALL_D.apply, update_stats=False))
    assert float(jnp.min(jnp.abs(score(d_vars, x, y0) - score(d_vars, x, y1)))) > 1e-5


def test_projection_discriminator_structure(small):
    d_vars, x, y = small["d"], small["x"], small["y"]

    @jax.jit
    def parts(d_vars):
        scores, state = SMALL_D.apply(
            d_vars,
            x,
            y,
            update_stats=False,
            capture_intermediates=True,
            mutable=["intermediates"],
        )
        return scores, state["intermediates"]

    scores, inter = parts(d_vars)
    h = jnp.sum(jax.nn.relu(inter["block2"]["__call__"][0]), axis=(1, 2))  # (B, 16) pooled features
    head = inter["classifier_sn"]["__call__"][0][:, 0]
    embed = inter["embed_y_sn"]["__call__"][0]  # SN'd class embeddings, (B, 16)
    np.testing.assert_allclose(scores, head + jnp.sum(embed * h, axis=-1), rtol=1e-5, atol=1e-5)
    # The embedding rows are the table divided by its (power-iteration) spectral norm.
    table = np.asarray(d_vars["params"]["embed_y"]["embedding"])
    u = np.asarray(d_vars["batch_stats"]["embed_y_sn"]["embed_y/embedding/u"])
    np.testing.assert_allclose(embed, _sn_numpy(table, u)[y], rtol=1e-5, atol=1e-6)
    # Without a class embedding the score ignores y.
    zero = {
        **d_vars,
        "params": {
            **d_vars["params"],
            "embed_y": {"embedding": jnp.zeros_like(d_vars["params"]["embed_y"]["embedding"])},
        },
    }
    no_proj = jax.jit(functools.partial(SMALL_D.apply, update_stats=False))
    np.testing.assert_allclose(
        no_proj(zero, x, y), no_proj(zero, x, (y + 1) % CLASSES), rtol=1e-6, atol=1e-6
    )
    np.testing.assert_allclose(no_proj(zero, x, y), head, rtol=1e-5, atol=1e-6)


def _in_cbn_map(path) -> bool:
    return any(k.key in CBN_MODULE_NAMES for k in path)


def _zero_cbn_maps(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: jnp.zeros_like(leaf) if _in_cbn_map(path) else leaf, params
    )


def test_cbn_gain_is_one_plus_map(small):
    """With the CBN maps at zero, CBN is a plain affine-free BN (gain 1, not 0): the image no
    longer depends on y, nor (hierarchical z) on the chunks that only feed the CBNs."""
    y0, y1 = jnp.zeros(BATCH, jnp.int32), jnp.full(BATCH, 2, jnp.int32)
    for G, name, z in ((TABLE_G, "table", small["z8"]), (SHARED_G, "shared", small["z9"])):
        g_vars = small[name]
        zeroed = {**g_vars, "params": _zero_cbn_maps(g_vars["params"])}
        flat = jax.tree_util.tree_leaves_with_path(g_vars["params"])
        # A gain and an offset map in each of the 2 CBNs per block.
        assert sum(_in_cbn_map(path) for path, _ in flat) == 4 * G.num_blocks
        apply = _g_eval(G)
        out = apply(zeroed, z, y0)
        np.testing.assert_allclose(apply(zeroed, z, y1), out, atol=1e-6)
        assert float(jnp.std(out)) > 1e-3
        if G.shared_dim:
            z_other = z.at[:, 3:].set(-z[:, 3:])  # chunks 1 and 2
            np.testing.assert_allclose(apply(zeroed, z_other, y0), out, atol=1e-6)


def test_hierarchical_z_feeds_every_block(small):
    g_vars, z, y = small["shared"], small["z9"], small["y"]
    apply = _g_eval(SHARED_G)
    out = apply(g_vars, z, y)
    for chunk in range(3):  # chunk 0: the input dense; chunks 1, 2: the CBNs of blocks 1, 2
        flipped = z.at[:, 3 * chunk : 3 * chunk + 3].multiply(-1.0)
        assert float(jnp.max(jnp.abs(apply(g_vars, flipped, y) - out))) > 1e-4, chunk


def test_update_stats_false_leaves_spectral_norm_state_unchanged(small):
    d_vars, x, y = small["d"], small["x"], small["y"]

    @jax.jit
    def forwards(d_vars):
        frozen = SMALL_D.apply(d_vars, x, y, update_stats=False, mutable=["batch_stats"])
        plain = SMALL_D.apply(d_vars, x, y, update_stats=False)  # needs no mutable collection
        updated = SMALL_D.apply(d_vars, x, y, update_stats=True, mutable=["batch_stats"])
        return frozen, plain, updated

    (frozen_scores, frozen_vars), plain_scores, (scores, new_vars) = forwards(d_vars)
    chex.assert_trees_all_equal(frozen_vars["batch_stats"], d_vars["batch_stats"])
    np.testing.assert_allclose(frozen_scores, scores, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(plain_scores, scores, rtol=1e-6, atol=1e-6)
    old, new = _leaves_by_path(d_vars["batch_stats"]), _leaves_by_path(new_vars["batch_stats"])
    assert set(old) == set(new) and any(p.startswith("embed_y_sn/") for p in old)
    # The host-drawn u are not unit vectors and sigma starts at 1, so every entry must move
    # (even the one-unit head and 8 // 8-wide query/key, whose u becomes +-1).
    for path in old:
        assert not np.array_equal(old[path], new[path]), f"{path} was not updated"
    with pytest.raises(flax.errors.ModifyScopeVariableError):
        jax.eval_shape(SMALL_D.apply, d_vars, x, y)

    # G: train=False writes nothing (BN running stats and SN state); train=True updates both.
    g_vars, z = small["shared"], small["z9"]
    run = {
        train: jax.jit(functools.partial(SHARED_G.apply, train=train, mutable=["batch_stats"]))
        for train in (False, True)
    }
    _, kept = run[False](g_vars, z, y)
    chex.assert_trees_all_equal(kept["batch_stats"], g_vars["batch_stats"])
    _, upd = run[True](g_vars, z, y)
    old, new = _leaves_by_path(g_vars["batch_stats"]), _leaves_by_path(upd["batch_stats"])
    kinds = {p.rsplit("/", 1)[-1] for p in old}
    assert kinds == {"mean", "var", "u", "sigma"}
    for path in old:
        assert not np.array_equal(old[path], new[path]), f"{path} was not updated"


def test_batch_norm_train_and_eval_modes(small):
    g_vars, z, y = small["table"], small["z8"], small["y"]
    train = jax.jit(
        functools.partial(
            TABLE_G.apply,
            train=True,
            mutable=["batch_stats", "intermediates"],
            capture_intermediates=True,
        )
    )
    evaluate = _g_eval(TABLE_G)
    out_train, upd = train(g_vars, z, y)
    out_eval = evaluate(g_vars, z, y)
    assert not np.allclose(out_train, out_eval, atol=1e-3)
    # Eval mode treats samples independently; train mode normalises with batch statistics.
    np.testing.assert_allclose(evaluate(g_vars, z[:2], y[:2]), out_eval[:2], rtol=1e-5, atol=1e-6)
    assert not np.allclose(train(g_vars, z[:2], y[:2])[0], out_train[:2], atol=1e-3)
    # Running statistics of block1's CBN as PyTorch's BatchNorm2d: momentum 0.1 from mean 0 and
    # var 1, the *unbiased* batch variance (n = B*4*4 = 64, a factor 64/63 that the 1e-5 rtol
    # resolves); its input is the SN dense output.
    h = upd["intermediates"]["dense_sn"]["__call__"][0].reshape(BATCH, 4, 4, 8)
    bn = upd["batch_stats"]["block1"]["bn1"]["bn"]
    np.testing.assert_allclose(bn["mean"], 0.1 * h.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
    unbiased = np.var(np.asarray(h, np.float64), axis=(0, 1, 2), ddof=1)
    np.testing.assert_allclose(bn["var"], 0.9 + 0.1 * unbiased, rtol=1e-5)
    assert not np.allclose(bn["var"], 0.9 + 0.1 * h.var(axis=(0, 1, 2)), rtol=1e-5)


def _sn_numpy(kernel: np.ndarray, u: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """One power-iteration step from the stored u, as flax's SpectralNorm; returns W / sigma."""
    w = kernel.reshape(-1, kernel.shape[-1]).astype(np.float64)
    v = u @ w.T
    v /= np.sqrt(np.sum(v**2) + eps)
    u = v @ w
    u /= np.sqrt(np.sum(u**2) + eps)
    return kernel / (v @ w @ u.T)[0, 0]


def test_self_attention_matches_pytorch_layout():
    """SelfAttention against a NumPy transcription of StudioGAN's Self_Attn (NCHW)."""
    b, h, w, c = 2, 4, 6, 16
    x = np.asarray(jax.random.normal(_key(5), (b, h, w, c)))
    module = SelfAttention()
    variables = jax.jit(module.init, static_argnums=2)(_key(6), x, False)
    variables = {**variables, "params": {**variables["params"], "gamma": jnp.float32(0.7)}}
    out = jax.jit(module.apply, static_argnums=2)(variables, x, False)

    params, stats = variables["params"], variables["batch_stats"]
    weight = {  # 1x1 kernels as (C_in, C_out) matrices, divided by their spectral norms
        n: _sn_numpy(
            np.asarray(params[n]["kernel"][0, 0]), np.asarray(stats[f"{n}_sn"][f"{n}/kernel/u"])
        )
        for n in ("query", "key", "value", "out")
    }

    def conv1x1(t, wt):  # t (B, C_in, H, W), wt (C_in, C_out)
        return np.einsum("bihw,io->bohw", t, wt)

    def maxpool(t):
        bb, cc, hh, ww = t.shape
        return t.reshape(bb, cc, hh // 2, 2, ww // 2, 2).max(axis=(3, 5))

    xt = x.transpose(0, 3, 1, 2).astype(np.float64)
    theta = conv1x1(xt, weight["query"]).reshape(b, c // 8, h * w)
    phi = maxpool(conv1x1(xt, weight["key"])).reshape(b, c // 8, h * w // 4)
    logits = np.einsum("bcq,bck->bqk", theta, phi)
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    g = maxpool(conv1x1(xt, weight["value"])).reshape(b, c // 2, h * w // 4)
    attn_g = np.einsum("bck,bqk->bcq", g, attn).reshape(b, c // 2, h, w)
    expected = xt + 0.7 * conv1x1(attn_g, weight["out"])
    np.testing.assert_allclose(out, expected.transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-5)


def test_init_schemes(small):
    # Orthogonal (default): a kernel or class table read as (-1, out) is semi-orthogonal.
    shapes = [(3, 3, 8, 16), (1, 1, 64, 8), (3, 16), (16, 3)]
    draws = jax.jit(lambda key: [weight_init("ortho")(key, shape) for shape in shapes])(_key(7))
    for shape, draw in zip(shapes, draws, strict=True):
        m = np.asarray(draw).reshape(-1, shape[-1])
        gram = m.T @ m if m.shape[0] >= m.shape[1] else m @ m.T
        np.testing.assert_allclose(gram, np.eye(len(gram)), atol=1e-5, err_msg=str(shape))
    # N(0, 0.02), the authors' biggan.32 init, through a whole model: spectral norm must keep
    # the raw draw in params (flax's own wrapper would store W / sigma, std ~0.1-0.3 here).
    d = SMALL_D.clone(init_scheme="n02")
    params = jax.jit(d.init)(_key(9), small["x"], small["y"])["params"]
    weights = []
    for path, leaf in _leaves_by_path(params).items():
        if path.endswith(("/kernel", "/embedding")):
            weights.append(np.ravel(leaf))
        else:  # biases and the attention gate start at zero
            assert not np.any(np.asarray(leaf)), path
    weights = np.concatenate(weights)
    np.testing.assert_allclose(weights.std(), 0.02, rtol=0.05)
    assert abs(weights.mean()) < 0.002


class _SNDense(nn.Module):
    """One N(0, 0.02) dense layer under the given spectral-norm wrapper."""

    wrapper: type

    @nn.compact
    def __call__(self, x: jax.Array, update_stats: bool) -> jax.Array:
        dense = nn.Dense(7, kernel_init=nn.initializers.normal(0.02), name="dense")
        return self.wrapper(dense, name="dense_sn")(x, update_stats=update_stats)


def test_spectral_norm_keeps_raw_weights_and_matches_flax():
    x = jax.random.normal(_key(10), (2, 5))

    @jax.jit
    def init_and_apply(x):
        results = []
        for wrapper in (SpectralNorm, nn.SpectralNorm):
            module = _SNDense(wrapper)
            variables = module.init(_key(11), x, update_stats=True)
            out, state = module.apply(variables, x, update_stats=True, mutable=["batch_stats"])
            results.append((variables, out, state["batch_stats"]["dense_sn"]))
        return results

    (ours, out, state), (theirs, out_flax, state_flax) = init_and_apply(x)
    kernel, kernel_flax = ours["params"]["dense"]["kernel"], theirs["params"]["dense"]["kernel"]
    # flax's wrapper stores W / sigma_0 (the first estimate, kept in batch_stats); ours keeps the
    # raw N(0, 0.02) draw, as PyTorch's weight_orig.
    sigma0 = ours["batch_stats"]["dense_sn"]["dense/kernel/sigma"]
    np.testing.assert_allclose(kernel / sigma0, kernel_flax, rtol=1e-5, atol=1e-6)
    assert 0.01 < float(jnp.std(kernel)) < 0.03 < 0.1 < float(jnp.std(kernel_flax))
    # The normalised weight does not depend on the stored scale: same outputs, same u.
    np.testing.assert_allclose(out, out_flax, rtol=1e-5, atol=1e-6)
    u, u_flax = state["dense/kernel/u"], state_flax["dense/kernel/u"]
    np.testing.assert_allclose(u, u_flax, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------
# Errors.
# ------------------------------------------------------------------------------------------


def test_factory_errors():
    with pytest.raises(ValueError, match=r"Unknown BigGAN model 'biggan128'.*biggan32, biggan64"):
        build_biggan("biggan128")
    with pytest.raises(ValueError, match="Unknown BigGAN model 'sngan32'"):
        image_size("sngan32")
    assert (image_size("biggan32"), image_size("biggan64")) == (32, 64)
    with pytest.raises(ValueError, match=r"d_ch=4 .*'biggan64'.*>= 8"):
        build_biggan("biggan64", d_ch=4)
    with pytest.raises(ValueError, match=r"g_ch=0 .*'biggan32'"):
        build_biggan("biggan32", g_ch=0)
    with pytest.raises(ValueError, match=r"num_classes=0"):
        build_biggan("biggan32", num_classes=0)
    with pytest.raises(ValueError, match=r"multiple of 5.*z_dim=128"):
        build_biggan("biggan64", z_dim=128)
    with pytest.raises(ValueError, match="Unknown init scheme 'xavier'"):
        build_biggan("biggan32", init_scheme="xavier")


def test_module_input_errors(small):
    with pytest.raises(ValueError, match=r"downsample\[0\] True"):
        Discriminator(channels=(8, 8), downsample=(False, True), num_classes=2)
    with pytest.raises(ValueError, match="at least 8 channels"):
        Generator(channels=(8, 4), num_classes=2, attention_after=1)
    with pytest.raises(ValueError, match=r"attention_after=3 must be in \[1, 2\]"):
        Discriminator(channels=(8, 8), downsample=(True, False), num_classes=2, attention_after=3)
    z, x = small["z8"], small["x"]
    y = small["y"]
    with pytest.raises(ValueError, match=r"labels of shape \(4,\).*got shape \(4, 1\)"):
        jax.eval_shape(functools.partial(TABLE_G.apply, train=False), small["table"], z, y[:, None])
    with pytest.raises(ValueError, match="integer dtype.*float32"):
        jax.eval_shape(
            functools.partial(SMALL_D.apply, update_stats=False), small["d"], x, y.astype(float)
        )
    with pytest.raises(ValueError, match=r"noise of shape \(batch, 8\), got \(4, 9\)"):
        jax.eval_shape(
            functools.partial(TABLE_G.apply, train=False), small["table"], small["z9"], y
        )
    with pytest.raises(ValueError, match="NHWC"):
        jax.eval_shape(functools.partial(SMALL_D.apply, update_stats=False), small["d"], x[0], y)
