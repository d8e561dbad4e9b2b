"""Sparsity core: masks, ERK, drop-and-grow, resize, schedules, optimizer policies."""

import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ddst_jax import sparsity as sp

HYP = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def tiny_params():
    """A hand-made Flax-like tree: two kernels, a bias, a BN scale and an embedding."""
    return {
        "Conv_0": {"kernel": jnp.ones((3, 3, 2, 4)), "bias": jnp.zeros((4,))},
        "Dense_0": {"kernel": jnp.ones((8, 5))},
        "BatchNorm_0": {"scale": jnp.ones((4,)), "bias": jnp.zeros((4,))},
        "Embed_0": {"embedding": jnp.ones((10, 4))},
    }


# ----------------------------------------------------------------------------- maskable


def test_default_predicate_on_flax_tree_with_spectral_norm():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.SpectralNorm(nn.Conv(4, (3, 3)))(x, update_stats=False)
            x = nn.BatchNorm(use_running_average=True)(x)
            y = nn.Embed(10, 4)(jnp.zeros((x.shape[0],), jnp.int32))
            x = nn.Dense(3)(x.reshape(x.shape[0], -1)) + jnp.sum(y)
            return nn.SpectralNorm(nn.Dense(1, use_bias=False, name="projection"))(
                x, update_stats=False)

    variables = Net().init(jax.random.key(0), jnp.ones((1, 4, 4, 3)))
    flags = {sp.path_str(p): m for p, m in
             jax.tree_util.tree_leaves_with_path(sp.maskable_tree(variables["params"]))}
    assert flags == {
        "Conv_0/kernel": True, "Conv_0/bias": False,
        "BatchNorm_0/scale": False, "BatchNorm_0/bias": False,
        "Embed_0/embedding": False,
        "Dense_0/kernel": True, "Dense_0/bias": False,
        # The library knows no model names: a head is maskable unless the model says otherwise.
        "projection/kernel": True,
    }
    dense_head = sp.maskable_tree(variables["params"], sp.maskable_except(["projection/"]))
    assert dense_head["projection"]["kernel"] is False and dense_head["Conv_0"]["kernel"] is True


def test_maskable_except_keeps_named_layer_dense():
    pred = sp.maskable_except(["Conv_0"])
    flags = sp.maskable_tree(tiny_params(), pred)
    assert flags["Conv_0"]["kernel"] is False and flags["Dense_0"]["kernel"] is True


# ----------------------------------------------------------------------------- init / apply


def test_init_masks_exact_counts_and_non_maskable_all_true():
    params = tiny_params()
    masks = sp.init_masks(jax.random.key(1), params, 0.3)
    # round-half-up of 0.3 * 72 = 21.6 -> 22 and 0.3 * 40 = 12.
    assert int(masks["Conv_0"]["kernel"].sum()) == 22
    assert int(masks["Dense_0"]["kernel"].sum()) == 12
    for leaf in (masks["Conv_0"]["bias"], masks["BatchNorm_0"]["scale"],
                 masks["Embed_0"]["embedding"]):
        assert leaf.dtype == jnp.bool_ and bool(leaf.all())
    assert int(sp.count_active(masks)) == 34
    assert sp.num_maskable(masks) == 112
    np.testing.assert_allclose(float(sp.density(masks)), 34 / 112, rtol=1e-6)


def test_init_masks_at_least_one_and_deterministic():
    params = {"kernel": jnp.ones((10, 10))}
    m1 = sp.init_masks(jax.random.key(3), params, 1e-6)
    m2 = sp.init_masks(jax.random.key(3), params, 1e-6)
    assert int(m1["kernel"].sum()) == 1
    assert bool((m1["kernel"] == m2["kernel"]).all())


def test_count_for_density_rounds_half_up():
    assert sp.count_for_density(0.5, 5) == 3  # 2.5 -> 3 (Python's round would give 2)
    assert sp.count_for_density(0.1, 27) == 3
    assert sp.count_for_density(1.0, 7) == 7


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan")])
def test_init_masks_rejects_bad_density(bad):
    with pytest.raises(ValueError, match="densit"):
        sp.init_masks(jax.random.key(0), tiny_params(), bad)


def test_apply_masks_zeroes_inactive_and_rejects_mismatch():
    params = {"a": {"kernel": jnp.arange(4.0).reshape(2, 2) + 1}}
    masks = {"a": {"kernel": jnp.array([[True, False], [False, True]])}}
    out = sp.apply_masks(params, masks)
    assert out["a"]["kernel"].tolist() == [[1.0, 0.0], [0.0, 4.0]]
    with pytest.raises(ValueError, match="same tree structure"):
        sp.apply_masks(params, {"b": {"kernel": masks["a"]["kernel"]}})
    with pytest.raises(ValueError, match="shape"):
        sp.apply_masks(params, {"a": {"kernel": jnp.ones((4,), bool)}})


# A few fixed shapes: every new shape costs an XLA compile, which dominates the test's time.
SMALL_SHAPES = [(1, 5), (2, 3), (3, 3), (4, 4)]


@given(d=st.floats(0.001, 1.0), seed=st.integers(0, 2**16),
       shape=st.sampled_from(SMALL_SHAPES))
@HYP
def test_init_masks_count_property(d, seed, shape):
    rows, cols = shape
    params = {"k1": {"kernel": jnp.zeros((rows, cols))}, "k2": {"kernel": jnp.zeros((cols, 3))}}
    masks = sp.init_masks(jax.random.key(seed), params, d)
    for name, n in (("k1", rows * cols), ("k2", cols * 3)):
        assert int(masks[name]["kernel"].sum()) == sp.count_for_density(d, n)


# ----------------------------------------------------------------------------- ERK


def test_erk_hand_case_without_forcing():
    # Two dense kernels (4, 4) and (8, 2): raw = 8/16 = 0.5 and 10/16 = 0.625, N = 16 each.
    params = {"a": {"kernel": jnp.zeros((4, 4))}, "b": {"kernel": jnp.zeros((8, 2))}}
    dens = sp.erk_densities(params, 0.5)
    # eps * (0.5 * 16 + 0.625 * 16) = 0.5 * 32 -> eps = 16 / 18 = 8 / 9.
    assert dens["a"]["kernel"] == pytest.approx(0.5 * 8 / 9)
    assert dens["b"]["kernel"] == pytest.approx(0.625 * 8 / 9)


def test_erk_forces_every_layer_at_the_maximum_dense():
    # Two tiny identical layers (raw = 4/4 = 1) and one big layer (raw = 200/10000 = 0.02).
    params = {
        "s1": {"kernel": jnp.zeros((2, 2))},
        "s2": {"kernel": jnp.zeros((2, 2))},
        "big": {"kernel": jnp.zeros((100, 100))},
    }
    dens = sp.erk_densities(params, 0.1)
    # First solve: eps = 1000.8 / (1*8 + 0.02*10000) = 4.81 -> 4.81 * 1 > 1: both small forced.
    assert dens["s1"]["kernel"] == 1.0 and dens["s2"]["kernel"] == 1.0
    # Then eps * 0.02 * 10000 + 8 = 0.1 * 10008 -> d_big = (1000.8 - 8) / 10000.
    assert dens["big"]["kernel"] == pytest.approx((1000.8 - 8) / 10000)


def test_erk_counts_kernel_spatial_dims_and_power():
    assert sp.erk_raw_score((3, 3, 16, 32)) == pytest.approx((3 + 3 + 16 + 32) / (9 * 16 * 32))
    assert sp.erk_raw_score((4, 4), power=2.0) == pytest.approx(0.25)


def test_erk_non_maskable_leaves_get_one():
    dens = sp.erk_densities(tiny_params(), 0.2)
    assert dens["Conv_0"]["bias"] == 1.0 and dens["Embed_0"]["embedding"] == 1.0
    assert 0 < dens["Conv_0"]["kernel"] < 1


@st.composite
def kernel_trees(draw):
    n = draw(st.integers(1, 5))
    tree = {}
    for i in range(n):
        shape = tuple(draw(st.lists(st.integers(1, 9), min_size=2, max_size=4)))
        tree[f"L{i}"] = {"kernel": jnp.zeros(shape)}
    return tree


@given(tree=kernel_trees(), d=st.floats(0.01, 1.0))
@HYP
def test_erk_budget_property(tree, d):
    dens = sp.erk_densities(tree, d)
    sizes = {k: v["kernel"].size for k, v in tree.items()}
    total = sum(sizes.values())
    budget = sum(dens[k]["kernel"] * sizes[k] for k in tree)
    assert budget == pytest.approx(d * total, rel=1e-9, abs=1e-6)
    for k in tree:
        assert 0 < dens[k]["kernel"] <= 1.0 + 1e-12
    # With exact counts (init_masks draws count_for_density per leaf, tested above), the
    # realised active total is within one weight per leaf of d * N.
    realised = sum(sp.count_for_density(dens[k]["kernel"], sizes[k]) for k in tree)
    assert abs(realised - d * total) <= len(tree)
    # A forced-dense leaf is exactly 1.0 (not 0.9999...).
    for k in tree:
        if dens[k]["kernel"] > 1 - 1e-9:
            assert dens[k]["kernel"] == 1.0


def test_uniform_densities_and_dispatch():
    dens = sp.layer_densities(tiny_params(), 0.4, "uniform")
    assert dens["Conv_0"]["kernel"] == 0.4 and dens["Conv_0"]["bias"] == 1.0
    with pytest.raises(ValueError, match="distribution"):
        sp.layer_densities(tiny_params(), 0.4, "bernoulli")


# ----------------------------------------------------------------------------- top-k


def test_rank_and_select_ties_go_to_lower_index():
    scores = jnp.array([2.0, 5.0, 5.0, 1.0, 5.0])
    assert sp.rank_descending(scores).tolist() == [3, 0, 1, 4, 2]
    assert sp.select_top(scores, 2).tolist() == [False, True, True, False, False]
    eligible = jnp.array([True, False, True, True, True])
    assert sp.select_top(scores, 2, eligible).tolist() == [False, False, True, False, True]


def test_select_top_nan_ranks_last_and_k_beyond_eligible():
    scores = jnp.array([jnp.nan, -jnp.inf, 0.0])
    assert sp.rank_descending(scores).tolist() == [2, 1, 0]
    assert int(sp.select_top(scores, 10, jnp.array([True, False, True])).sum()) == 2


# ----------------------------------------------------------------------------- drop and grow


def test_drop_and_grow_hand_case_global():
    masks = {"a": {"kernel": jnp.array([[True, True], [True, False]])},
             "b": {"kernel": jnp.array([[True, False, False]])}}
    drop = {"a": {"kernel": jnp.array([[0.5, 0.1], [0.3, 0.0]])},
            "b": {"kernel": jnp.array([[0.2, 0.0, 0.0]])}}
    grow = {"a": {"kernel": jnp.array([[0.0, 0.0], [0.0, 0.4]])},
            "b": {"kernel": jnp.array([[0.0, 0.9, 0.4]])}}
    # A = 4 active, f = 0.5 -> drop 2: the two smallest |w| among active are 0.1 (a[0,1]) and
    # 0.2 (b[0,0]); grow 2 among not kept: 0.9 (b[0,1]) and 0.4 tied at a[1,1] (flat 3) and
    # b[0,2] (flat 6) -> the lower flat index a[1,1] wins.
    upd = sp.drop_and_grow_update(masks, drop, grow, 0.5)
    assert upd.masks["a"]["kernel"].tolist() == [[True, False], [True, True]]
    assert upd.masks["b"]["kernel"].tolist() == [[False, True, False]]
    assert upd.kept["a"]["kernel"].tolist() == [[True, False], [True, False]]
    assert upd.grown["b"]["kernel"].tolist() == [[False, True, False]]


def test_drop_and_grow_tie_on_drop_keeps_lower_index():
    masks = {"kernel": jnp.array([[True, True, True, False]])}
    w = {"kernel": jnp.array([[1.0, 1.0, 1.0, 0.0]])}
    g = {"kernel": jnp.array([[0.0, 0.0, 0.0, 1.0]])}
    # floor(3 * 0.34) = 1 dropped: equal scores -> the highest index (2) goes, 0 and 1 are kept.
    out = sp.drop_and_grow(masks, w, g, 0.34)
    assert out["kernel"].tolist() == [[True, True, False, True]]


def test_drop_and_grow_just_dropped_may_regrow_and_starts_at_zero():
    masks = {"kernel": jnp.array([[True, True, False]])}
    params = {"kernel": jnp.array([[0.1, 0.9, 0.0]])}
    grads = {"kernel": jnp.array([[5.0, 0.0, 1.0]])}  # the dropped entry has the largest grad
    upd = sp.drop_and_grow_update(masks, sp.magnitude_scores(params),
                                  sp.gradient_scores(grads), 0.5)
    assert upd.masks["kernel"].tolist() == [[True, True, False]]
    assert upd.grown["kernel"].tolist() == [[True, False, False]]
    new_params = sp.params_after_update(params, upd)
    assert new_params["kernel"].tolist() == [[0.0, pytest.approx(0.9), 0.0]]


def test_drop_and_grow_layer_scope_keeps_layer_counts():
    masks = {"a": {"kernel": jnp.array([[True, True], [False, False]])},
             "b": {"kernel": jnp.array([[True, True], [False, False]])}}
    w = {"a": {"kernel": jnp.array([[0.1, 0.2], [0.0, 0.0]])},
         "b": {"kernel": jnp.array([[5.0, 6.0], [0.0, 0.0]])}}
    g = {"a": {"kernel": jnp.array([[0.0, 0.0], [0.0, 0.0]])},
         "b": {"kernel": jnp.array([[0.0, 0.0], [9.0, 8.0]])}}
    layer = sp.drop_and_grow(masks, w, g, 0.5, scope="layer")
    # a: drop 0.1 (flat 0); all grow scores tie at 0 -> the lowest non-kept index, flat 0 itself.
    assert layer["a"]["kernel"].tolist() == [[True, True], [False, False]]
    assert layer["b"]["kernel"].tolist() == [[False, True], [True, False]]
    glob = sp.drop_and_grow(masks, w, g, 0.5, scope="global")
    # Global: drop a's two weakest, grow b's two strongest gradients.
    assert int(glob["a"]["kernel"].sum()) == 0 and int(glob["b"]["kernel"].sum()) == 4


def _random_case(seed, shapes, density):
    key = jax.random.key(seed)
    k1, k2, k3 = jax.random.split(key, 3)
    params = {f"L{i}": {"kernel": jax.random.normal(jax.random.fold_in(k1, i), s)}
              for i, s in enumerate(shapes)}
    masks = sp.init_masks(k2, params, density)
    grads = {f"L{i}": {"kernel": jax.random.normal(jax.random.fold_in(k3, i), s)}
             for i, s in enumerate(shapes)}
    return params, masks, grads


shape_lists = st.lists(st.sampled_from(SMALL_SHAPES), min_size=1, max_size=3)


@given(seed=st.integers(0, 10_000), shapes=shape_lists, d=st.floats(0.05, 1.0),
       f=st.floats(0.0, 1.0), scope=st.sampled_from(sp.SCOPES))
@HYP
def test_drop_and_grow_properties(seed, shapes, d, f, scope):
    params, masks, grads = _random_case(seed, shapes, d)
    upd = sp.drop_and_grow_update(masks, sp.magnitude_scores(params), sp.gradient_scores(grads),
                                  f, scope=scope)
    before = sp.count_active(masks, per_leaf=True)
    after = sp.count_active(upd.masks, per_leaf=True)
    if scope == "layer":
        assert jax.tree_util.tree_map(int, before) == jax.tree_util.tree_map(int, after)
    assert int(sp.count_active(upd.masks)) == int(sp.count_active(masks))
    for kept, grown, old in zip(jax.tree_util.tree_leaves(upd.kept),
                                jax.tree_util.tree_leaves(upd.grown),
                                jax.tree_util.tree_leaves(masks), strict=True):
        assert not bool((kept & grown).any())  # disjoint
        assert not bool((kept & ~old).any())  # kept were active
    n_dropped = int(sp.count_active(masks)) - int(sp.count_active(upd.kept))
    if scope == "global":
        active = int(sp.count_active(masks))
        assert n_dropped == math.floor(np.float32(active) * np.float32(f))
    new_params = sp.params_after_update(params, upd)
    for p, g in zip(jax.tree_util.tree_leaves(new_params), jax.tree_util.tree_leaves(upd.grown),
                    strict=True):
        assert bool((jnp.where(g, p, 0.0) == 0.0).all())


@given(seed=st.integers(0, 10_000), shapes=shape_lists, d=st.floats(0.05, 1.0),
       scope=st.sampled_from(sp.SCOPES))
@HYP
def test_drop_fraction_zero_is_identity(seed, shapes, d, scope):
    params, masks, grads = _random_case(seed, shapes, d)
    out = sp.drop_and_grow(masks, sp.magnitude_scores(params), sp.gradient_scores(grads), 0.0,
                           scope=scope)
    chex.assert_trees_all_equal(out, masks)


def test_set_regrowth_random_scores_counts():
    params, masks, _ = _random_case(0, [(6, 6), (4, 5)], 0.3)
    grow = sp.random_scores(jax.random.key(9), masks)
    out = sp.drop_and_grow(masks, sp.magnitude_scores(params), grow, 0.5)
    assert int(sp.count_active(out)) == int(sp.count_active(masks))


def test_drop_and_grow_bad_inputs():
    params, masks, grads = _random_case(0, [(3, 3)], 0.5)
    w, g = sp.magnitude_scores(params), sp.gradient_scores(grads)
    with pytest.raises(ValueError, match="drop_fraction"):
        sp.drop_and_grow(masks, w, g, 1.5)
    with pytest.raises(ValueError, match="drop_fraction"):
        sp.drop_and_grow(masks, w, g, -0.1)
    with pytest.raises(ValueError, match="scope"):
        sp.drop_and_grow(masks, w, g, 0.5, scope="tensor")
    with pytest.raises(ValueError, match="grow_scores.*NaN"):
        sp.drop_and_grow(masks, w, {"L0": {"kernel": jnp.full((3, 3), jnp.nan)}}, 0.5)
    with pytest.raises(ValueError, match="same tree structure"):
        sp.drop_and_grow(masks, {"other": w["L0"]}, g, 0.5)


# ----------------------------------------------------------------------------- resize


def test_resize_hand_cases():
    masks = {"a": {"kernel": jnp.array([[True, False], [True, False]])},
             "b": {"kernel": jnp.array([[True, False]])}}
    w = {"a": {"kernel": jnp.array([[0.3, 0.0], [0.1, 0.0]])},
         "b": {"kernel": jnp.array([[0.2, 0.0]])}}
    g = {"a": {"kernel": jnp.array([[0.0, 0.7], [0.0, 0.7]])},
         "b": {"kernel": jnp.array([[0.0, 0.9]])}}
    up = sp.resize_update(masks, 5, w, g)
    # Grow 2: 0.9 (b[0,1]) then the 0.7 tie -> lower flat index a[0,1].
    assert up.masks["a"]["kernel"].tolist() == [[True, True], [True, False]]
    assert up.masks["b"]["kernel"].tolist() == [[True, True]]
    assert up.grown["a"]["kernel"].tolist() == [[False, True], [False, False]]
    down = sp.resize(masks, 1, w, g)
    assert down["a"]["kernel"].tolist() == [[True, False], [False, False]]
    assert int(down["b"]["kernel"].sum()) == 0
    same = sp.resize(masks, 3, w, g)
    chex.assert_trees_all_equal(same, masks)


@given(seed=st.integers(0, 10_000), shapes=shape_lists, d=st.floats(0.05, 1.0),
       frac=st.floats(0.0, 1.0))
@HYP
def test_resize_count_property(seed, shapes, d, frac):
    params, masks, grads = _random_case(seed, shapes, d)
    n = sp.num_maskable(masks)
    target = max(1, round(frac * n))
    upd = sp.resize_update(masks, target, sp.magnitude_scores(params), sp.gradient_scores(grads))
    assert int(sp.count_active(upd.masks)) == target
    for kept, grown in zip(jax.tree_util.tree_leaves(upd.kept),
                           jax.tree_util.tree_leaves(upd.grown), strict=True):
        assert not bool((kept & grown).any())


def test_resize_rejects_target_beyond_capacity():
    _, masks, _ = _random_case(0, [(2, 3)], 0.5)
    with pytest.raises(ValueError, match="target_count"):
        sp.resize(masks, 7, None, None)
    with pytest.raises(ValueError, match="target_count"):
        sp.resize(masks, 0, None, None)


def test_update_functions_work_under_jit_with_traced_fraction_and_target():
    params, masks, grads = _random_case(1, [(5, 5), (3, 4)], 0.4)
    w, g = sp.magnitude_scores(params), sp.gradient_scores(grads)
    jitted = jax.jit(lambda m, f: sp.drop_and_grow(m, w, g, f))
    eager = sp.drop_and_grow(masks, w, g, 0.25)
    chex.assert_trees_all_equal(jitted(masks, 0.25), eager)
    jr = jax.jit(lambda m, t: sp.resize(m, t, w, g))
    assert int(sp.count_active(jr(masks, 20))) == 20


# ----------------------------------------------------------------------------- schedules


def test_cosine_drop_fraction_values():
    assert float(sp.cosine_drop_fraction(0, 100)) == pytest.approx(0.5)
    assert float(sp.cosine_drop_fraction(100, 100)) == pytest.approx(0.005)
    assert float(sp.cosine_drop_fraction(50, 100)) == pytest.approx(0.005 + 0.495 * 0.5)
    assert float(sp.cosine_drop_fraction(25, 100)) == pytest.approx(
        0.005 + 0.495 * (1 + math.cos(math.pi / 4)) / 2)
    with pytest.raises(ValueError, match="total_steps"):
        sp.cosine_drop_fraction(0, 0)


def test_update_step_predicate_never_at_final_iteration():
    assert [t for t in range(0, 1501) if sp.is_update_step(t, 500, 1500)] == [500, 1000]
    traced = jax.jit(lambda t: sp.is_update_step(t, 500, 1500))
    assert [bool(traced(t)) for t in (499, 500, 1000, 1500)] == [False, True, True, False]


# ----------------------------------------------------------------------------- optimizer


def test_paper_policy_keeps_moments_and_rezeroes_inactive_weights():
    opt = optax.adam(0.1)
    params = {"kernel": jnp.array([[1.0, 0.0]])}
    masks = {"kernel": jnp.array([[True, False]])}
    state = opt.init(params)
    grads = {"kernel": jnp.array([[1.0, 2.0]])}
    new_params, state = sp.sparse_update(opt, grads, state, params, masks, "paper")
    assert float(new_params["kernel"][0, 1]) == 0.0  # inactive re-zeroed
    mu = state[0].mu["kernel"]
    assert float(mu[0, 1]) == pytest.approx(0.2)  # dense gradient reached the moments
    # Regrowth under the paper policy leaves the state alone.
    grown = {"kernel": jnp.array([[False, True]])}
    chex.assert_trees_all_equal(sp.optimizer_state_after_regrowth(opt, state, grown, "paper"),
                                state)


def test_rigl_policy_masks_gradients_and_zeroes_moments_at_grown():
    opt = optax.chain(optax.clip_by_global_norm(10.0), optax.adam(0.1))
    params = {"kernel": jnp.array([[1.0, 0.0]]), "bias": jnp.array([0.5])}
    masks = {"kernel": jnp.array([[True, False]]), "bias": jnp.array([True])}
    state = opt.init(params)
    grads = {"kernel": jnp.array([[1.0, 2.0]]), "bias": jnp.array([1.0])}
    _, state = sp.sparse_update(opt, grads, state, params, masks, "rigl")
    adam_state = state[1][0]
    assert float(adam_state.mu["kernel"][0, 1]) == 0.0  # masked gradient
    # Pretend position (0, 0) was regrown: its moments are zeroed, count untouched.
    state = jax.tree_util.tree_map(lambda x: x, state)
    grown = {"kernel": jnp.array([[True, False]]), "bias": jnp.array([False])}
    reset = sp.optimizer_state_after_regrowth(opt, state, grown, "rigl")
    adam_reset = reset[1][0]
    assert float(adam_reset.mu["kernel"][0, 0]) == 0.0
    assert float(adam_reset.nu["kernel"][0, 0]) == 0.0
    assert float(adam_reset.mu["bias"][0]) == pytest.approx(float(adam_state.mu["bias"][0]))
    assert int(adam_reset.count) == int(adam_state.count) == 1
    with pytest.raises(ValueError, match="policy"):
        sp.sparse_update(opt, grads, state, params, masks, "adamw")


# ----------------------------------------------------------------------------- tracing


def test_masked_step_traces_once_across_mask_updates():
    params, masks, grads = _random_case(2, [(6, 6), (6, 3)], 0.3)
    opt = optax.adam(1e-2)
    opt_state = opt.init(params)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, opt_state, masks, x):
        def loss(p):
            eff = sp.apply_masks(p, masks)
            return jnp.sum((x @ eff["L0"]["kernel"] @ eff["L1"]["kernel"]) ** 2)

        g = jax.grad(loss)(params)
        return (*sp.sparse_update(opt, g, opt_state, params, masks), g)

    x = jnp.ones((2, 6))
    for i in range(4):
        params, opt_state, g = step(params, opt_state, masks, x)
        masks = sp.drop_and_grow(masks, sp.magnitude_scores(params), sp.gradient_scores(g),
                                 0.3 + 0.1 * i)
    assert int(sp.count_active(masks)) == sp.count_for_density(0.3, 36) + \
        sp.count_for_density(0.3, 18)


def test_init_masks_accepts_numpy_and_jax_scalar_densities():
    params = {"kernel": jnp.zeros((4, 5))}
    for d in (np.float32(0.25), jnp.asarray(0.25), 0.25):
        assert int(sp.init_masks(jax.random.key(0), params, d)["kernel"].sum()) == 5


# ----------------------------------------------------------------------------- counts


def test_layer_counts_per_maskable_leaf_in_flatten_order():
    masks = sp.init_masks(jax.random.key(1), tiny_params(), 0.3)
    counts = sp.layer_counts(masks)
    assert counts.dtype == jnp.int32 and counts.shape == (2,)
    # Flatten order = maskable_leaves order: Conv_0/kernel (22 of 72), Dense_0/kernel (12 of 40).
    assert [sp.path_str(p) for p, _ in sp.maskable_leaves(masks)] == [
        "Conv_0/kernel", "Dense_0/kernel"]
    assert counts.tolist() == [22, 12]
    assert int(counts.sum()) == int(sp.count_active(masks))
    # The predicate picks the leaves (positional, as the runner passes setup.model.is_maskable).
    assert sp.layer_counts(masks, sp.maskable_except(["Conv_0"])).tolist() == [12]
    none = sp.layer_counts(masks, lambda p, x: False)
    assert none.shape == (0,) and none.dtype == jnp.int32
    # Traceable: the same array from inside jit (one small array, not a pytree of scalars).
    np.testing.assert_array_equal(jax.jit(sp.layer_counts)(masks), counts)


def test_per_leaf_count_and_density_respect_is_maskable():
    masks = sp.init_masks(jax.random.key(1), tiny_params(), 0.3)
    # A leaf the predicate calls non-maskable reports its full size / density 1.0, even if
    # its mask has False entries (here Conv_0/kernel at 22 of 72, and a malformed bias).
    masks["Conv_0"]["bias"] = jnp.array([True, False, False, True])
    pred = sp.maskable_except(["Conv_0"])
    counts = jax.tree_util.tree_map(int, sp.count_active(masks, is_maskable=pred, per_leaf=True))
    assert counts["Conv_0"] == {"kernel": 72, "bias": 4}
    assert counts["Dense_0"] == {"kernel": 12}
    assert counts["Embed_0"] == {"embedding": 40}
    dens = jax.tree_util.tree_map(float, sp.density(masks, is_maskable=pred, per_leaf=True))
    assert dens["Conv_0"] == {"kernel": 1.0, "bias": 1.0}
    assert dens["Dense_0"]["kernel"] == pytest.approx(12 / 40)
    # Default predicate: per-leaf counts agree with layer_counts and the scalar total.
    default = sp.count_active(masks, per_leaf=True)
    assert int(default["Conv_0"]["kernel"]) == 22 and int(default["Conv_0"]["bias"]) == 4
    assert [int(default[k]["kernel"]) for k in ("Conv_0", "Dense_0")] == \
        sp.layer_counts(masks).tolist()
    assert int(sp.count_active(masks, is_maskable=pred)) == 12
