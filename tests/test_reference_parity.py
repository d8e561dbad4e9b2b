"""ddst_jax against golden fixtures of the paper's PyTorch code (tests/data/reference).

Every fixture was made by running the authors' code unmodified (YiteWang/ADAPT at 002e2e9,
PyTorch 2.13, CPU, float32). These tests need only NumPy and the fixture files.

Tolerances, and why:
- float32 forwards: a conv/linear output is a sum of up to 2304 products, accumulated in a
  different order by oneDNN and XLA, so outputs agree to a few float32 ulps of the largest
  partial sums: |diff| <= 1e-5 * (1 + |x|) (measured: 1.4e-6 on G(z), 1.1e-5 on D(x) ~ 25).
- Adam, first steps with beta1 = 0: an update is lr * g / (|g| + eps)-like, i.e. about +-lr
  whatever |g| is. A weight whose gradient is zero in exact arithmetic (a conv bias right before
  a BatchNorm, whose per-channel constant BN removes) gets rounding noise as gradient in both
  implementations, so it moves by up to +-lr in either direction: such entries may differ by
  up to 2 * lr per step. BatchNorm running means downstream of those biases move with them.
- Everything else that is a deterministic function of the same float32 inputs is compared to
  1e-5 relative to the leaf's scale.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference_fixtures as rf
from model_helpers import key as model_key

from ddst_jax import balance, control
from ddst_jax import sparsity as sp
from ddst_jax.gan import models, steps
from ddst_jax.gan import torch_port as tp
from ddst_jax.metrics import flops


def _leaves(tree) -> dict[str, np.ndarray]:
    return {sp.path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _assert_trees_close(ours, ref, *, rtol=1e-5, atol=0.0, what="", noise_leaves=()):
    """Same leaves; every leaf within ``atol + rtol * max|ref leaf|``.

    ``noise_leaves`` hold values that are rounding noise in both implementations (e.g. the
    gradient of a bias before a BatchNorm): they are held to ``rtol`` of the largest leaf.
    """
    ours, ref = _leaves(ours), _leaves(ref)
    assert sorted(ours) == sorted(ref), what
    largest = max(float(np.abs(r).max()) for r in ref.values())
    for name, r in ref.items():
        scale = largest if name in noise_leaves else float(np.abs(r).max())
        bound = atol + rtol * max(scale, 1e-30)
        err = float(np.abs(ours[name] - r).max())
        assert err <= bound, f"{what} {name}: max |diff| {err:.3g} > {bound:.3g}"


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def test_forward_matches_reference():
    arr = rf.load("sngan32_forward")
    G, D = models.build_models("sngan32", g_ch=rf.WIDTH, d_ch=rf.WIDTH)
    g_vars = tp.generator_variables(rf.group(arr, "G_init"))
    d_vars = tp.discriminator_variables(rf.group(arr, "D_init"))

    images, g_upd = G.apply(g_vars, arr["z"], train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(images, rf.nhwc(arr["G_out"]), rtol=1e-5, atol=1e-5)
    g_after = tp.generator_variables(rf.group(arr, "G_after"))
    # PyTorch's running variance is the unbiased one (layers.BatchNorm does the same).
    _assert_trees_close(g_upd["batch_stats"], g_after["batch_stats"], rtol=1e-6, what="G BN")
    # Eval mode reads those running statistics.
    eval_images = G.apply({**g_vars, "batch_stats": g_upd["batch_stats"]}, arr["z"], train=False)
    np.testing.assert_allclose(eval_images, rf.nhwc(arr["G_out_eval"]), rtol=1e-5, atol=1e-5)

    scores, d_upd = D.apply(d_vars, rf.nhwc(arr["x"]), mutable=["batch_stats"])
    np.testing.assert_allclose(scores, arr["D_out"][:, 0], rtol=1e-5, atol=1e-5)
    # u after one power iteration, and the sigma the forward divided by (D_after's sigma is
    # u.(W v) from the stored u, v, which is that sigma).
    d_after = tp.discriminator_variables(rf.group(arr, "D_after"))
    _assert_trees_close(d_upd["batch_stats"], d_after["batch_stats"], rtol=1e-6, atol=3e-7,
                        what="D SN")
    sigma = {k: float(v) for k, v in rf.group(arr, "D_sigma").items()}
    ours = _leaves(d_upd["batch_stats"])
    for layer, value in sigma.items():
        _, path = tp.discriminator_path(layer + ".weight_u")
        key = "/".join((*path[:-1], path[-1].replace("/u", "/sigma")))
        assert ours[key] == pytest.approx(value, rel=1e-6), layer


def test_default_sngan32_initialises_as_pytorch_does():
    # The lottery SNGAN keeps PyTorch's reset_parameters: U(+-1/sqrt(fan_in)) weights AND biases.
    G, D = models.build_models("sngan32")
    g = G.init(model_key(0), jnp.zeros((1, 128)), train=False)["params"]
    d = D.init(model_key(1), jnp.zeros((1, 32, 32, 3)))["params"]
    cases = [  # (leaf, fan_in, bound from the fixtures' README, PyTorch layout)
        (g["block1"]["conv1"], 2304, 0.020833), (g["dense"], 128, 0.088388),
        (g["block2"]["shortcut"], 256, 0.0625), (g["conv_out"], 2304, 0.020833),
        (d["block1"]["conv1"], 27, 0.19245), (d["block1"]["shortcut"], 3, 0.57735),
        (d["block2"]["conv1"], 1152, 0.029463), (d["block2"]["shortcut"], 128, 0.088388),
    ]
    for leaf, fan_in, rounded in cases:
        bound = 1 / np.sqrt(fan_in)
        assert bound == pytest.approx(rounded, abs=1e-6)
        for name in ("kernel", "bias"):
            x = np.asarray(leaf[name]).ravel()
            assert np.abs(x).max() <= bound
            if x.size >= 200:  # a uniform on [-b, b]: std b/sqrt(3), reaches near +-b
                assert np.std(x) == pytest.approx(bound / np.sqrt(3), rel=0.1)
                assert np.abs(x).max() > 0.95 * bound
            assert np.any(x != 0)
    head = np.asarray(d["head"]["kernel"])
    assert "bias" not in d["head"] and np.abs(head).max() <= 1 / np.sqrt(128)


def test_sngan48_defaults_are_the_authors_resnet48():
    # resnet.48: kaiming_normal_ (fan_in, gain sqrt 2) on every conv/linear, zero biases, mean pool,
    # a head bias.
    G, D = models.build_models("sngan48", g_ch=64, d_ch=256)  # smaller, same layers and init
    assert (D.pool, D.head_bias, G.init_scheme, D.init_scheme) == ("mean", True, "kaiming",
                                                                   "kaiming")
    d = D.init(model_key(0), jnp.zeros((1, 48, 48, 3)))["params"]
    conv = np.asarray(d["block3"]["conv1"]["kernel"])  # 3x3, 32 -> 64
    assert conv.shape == (3, 3, 32, 64)
    assert np.std(conv) == pytest.approx(np.sqrt(2 / (9 * 32)), rel=0.05)
    assert not np.any(np.asarray(d["block3"]["conv1"]["bias"]))
    assert not np.any(np.asarray(d["head"]["bias"]))


# --------------------------------------------------------------------------------------------
# One training iteration
# --------------------------------------------------------------------------------------------

_ITERATIONS = {}


def _run_iteration(name: str, exact: bool, d_forward: str = "separate"):
    key = (name, exact, d_forward)
    if key not in _ITERATIONS:
        arr = rf.load(name)
        setup = rf.iteration_setup(masked=name.endswith("erk03"), reference_exact=exact,
                                   d_forward=d_forward)
        state = rf.iteration_state(setup, arr)
        step = jax.jit(lambda s, r, n: steps.train_iteration(setup, s, r, noise=n))
        new, metrics = step(state, jnp.asarray(rf.nhwc(arr["real"])), rf.iteration_noise(arr))
        _ITERATIONS[key] = (arr, state, jax.device_get(new), jax.device_get(metrics))
    return _ITERATIONS[key]


# Biases right before a BatchNorm (their gradient is zero in exact arithmetic): G's conv1 feeds
# bn2, conv2 + shortcut of block i feed block i+1's bn1 (block3's feed bn_out); D has no BN.
_ZERO_GRAD_BIASES = {f"block{i}/{c}/bias" for i in (1, 2, 3) for c in ("conv1", "conv2",
                                                                      "shortcut")}


def _assert_g_params(ours, ref):
    ours, ref = _leaves(ours), _leaves(ref)
    assert sorted(ours) == sorted(ref)
    for name, r in ref.items():
        diff = np.abs(ours[name] - r)
        if name in _ZERO_GRAD_BIASES:
            assert diff.max() <= 2 * rf.LR + 1e-6, name  # one noise-signed Adam step each way
            continue
        # Elsewhere every entry agrees to float32 precision, except entries whose gradient is
        # within rounding of 0, where the first Adam step's sign can flip (-> 2 * lr apart).
        flipped = diff > 1e-5
        assert np.all(np.abs(diff[flipped] - 2 * rf.LR) < 1e-5), name
        assert flipped.sum() <= max(4, flipped.size // 1000), name


def _common_iteration_asserts(arr, masked: bool, new, metrics):
    """What both modes share: the D steps, the G step and every weight and Adam moment."""
    np.testing.assert_allclose(metrics["loss/d_steps"], arr["d_loss"], rtol=1e-5)
    assert float(metrics["loss/g"]) == pytest.approx(float(arr["g_loss"]), rel=1e-5)
    assert float(metrics["br/b"]) == pytest.approx(arr["br_abc"][1], rel=1e-5)

    d_ref = tp.discriminator_variables(rf.group(arr, "D_after"))
    _assert_trees_close(new.d_params, d_ref["params"], rtol=1e-6, what="D params")
    g_ref = tp.generator_variables(rf.group(arr, "G_after"))
    _assert_g_params(new.g_params, g_ref["params"])

    mu, nu = rf.adam_moments(arr, "D")
    d_adam = rf.adam_state(new.d_opt)
    assert int(d_adam.count) == int(arr["adamD_step"]) == 5
    _assert_trees_close(d_adam.mu, mu, rtol=1e-5, what="D Adam mu")
    _assert_trees_close(d_adam.nu, nu, rtol=1e-5, what="D Adam nu")

    mu, nu = rf.adam_moments(arr, "G")
    g_adam = rf.adam_state(new.g_opt)
    assert int(g_adam.count) == int(arr["adamG_step"]) == 1
    if not masked:
        _assert_trees_close(g_adam.mu, mu, rtol=1e-5, what="G Adam mu",
                            noise_leaves=_ZERO_GRAD_BIASES)
        _assert_trees_close(g_adam.nu, nu, rtol=1e-5, what="G Adam nu",
                            noise_leaves=_ZERO_GRAD_BIASES)
        return
    # ERK fixture: G's gradient differs from the fixture's by one sample's share. Sample 14 of
    # z_g has a D ReLU input of 5.9e-7 (measured in float64), within float32 rounding of 0;
    # the fixture's run took the other side of that kink. The reference code rerun here in
    # float64 and float32 agrees with ours to 3e-7 and with the fixture to only 3.6e-3.
    # So: G's moments within 1% of each leaf's scale, and the dense layer's difference (its
    # gradient is sum_b delta_b z_b^T) a rank-one term along z_g[14].
    _assert_trees_close(g_adam.mu, mu, rtol=1e-2, what="G Adam mu",
                        noise_leaves=_ZERO_GRAD_BIASES)
    _assert_trees_close(g_adam.nu, nu, rtol=2e-2, what="G Adam nu",
                        noise_leaves=_ZERO_GRAD_BIASES)
    diff = np.asarray(g_adam.mu["dense"]["kernel"]) - mu["dense"]["kernel"]
    u, s, vt = np.linalg.svd(diff)
    assert s[0] > 10 * s[1]
    z14 = np.asarray(arr["z_g"][14])
    assert abs(u[:, 0] @ z14) / np.linalg.norm(z14) > 0.99


@pytest.mark.parametrize("name", ["sngan32_iteration_dense", "sngan32_iteration_erk03"])
def test_iteration_reference_exact_mode(name):
    arr, _, new, metrics = _run_iteration(name, exact=True)
    _common_iteration_asserts(arr, name.endswith("erk03"), new, metrics)
    a, b, c = arr["br_abc"]
    assert float(metrics["br/a"]) == pytest.approx(a, rel=1e-5)
    assert float(metrics["br/c"]) == pytest.approx(c, rel=1e-5)
    assert float(metrics["br/ratio"]) == pytest.approx(float(arr["br"]), rel=1e-5)
    # Train-mode BR forwards: 13 power iterations in D (10 D steps, G step, a, c), 7 BN updates.
    d_ref = tp.discriminator_variables(rf.group(arr, "D_after"))
    _assert_trees_close(new.d_state, d_ref["batch_stats"], rtol=1e-6, atol=5e-7, what="D SN")
    g_ref = tp.generator_variables(rf.group(arr, "G_after"))
    # BN means downstream of the zero-gradient biases (they moved by up to 2 lr differently in
    # the BR's a forward, the one BN update after the G step): measured up to 1.6e-4.
    _assert_trees_close(new.g_state, g_ref["batch_stats"], rtol=1e-4, atol=3e-4, what="G BN")


# Measured once with this test (fixed vs exact mode, same fixture): the default mode's BR
# forwards run no power iteration and no BN update of their own, so a and c (and BR) differ
# slightly and D's u and G's running statistics are one step behind the reference's.
_FIXED_MODE_BR = {"sngan32_iteration_dense": 0.196501, "sngan32_iteration_erk03": 0.312238}


@pytest.mark.parametrize("name", ["sngan32_iteration_dense", "sngan32_iteration_erk03"])
def test_iteration_default_mode(name):
    arr, _, new, metrics = _run_iteration(name, exact=False)
    # Done-when of issue 15: D losses within 1e-4 relative by default (measured: 1e-6).
    np.testing.assert_allclose(metrics["loss/d_steps"], arr["d_loss"], rtol=1e-4)
    _common_iteration_asserts(arr, name.endswith("erk03"), new, metrics)
    # The known difference, at its measured size.
    assert float(metrics["br/ratio"]) == pytest.approx(_FIXED_MODE_BR[name], abs=2e-6)
    assert float(metrics["br/ratio"]) != pytest.approx(float(arr["br"]), rel=1e-5)
    d_ref = tp.discriminator_variables(rf.group(arr, "D_after"))
    u_diff = max(float(np.abs(_leaves(new.d_state)[k] - v).max())
                 for k, v in _leaves(d_ref["batch_stats"]).items() if k.endswith("/u"))
    assert u_diff > 1e-3  # two power iterations fewer than the reference's
    g_ref = tp.generator_variables(rf.group(arr, "G_after"))
    var_diff = max(float(np.abs(_leaves(new.g_state)[k] - v).max())
                   for k, v in _leaves(g_ref["batch_stats"]).items() if k.endswith("/var"))
    assert 0.02 < var_diff < 0.1  # one BN update (momentum 0.1) fewer: measured 0.050-0.052


def test_concatenated_d_forward_changes_the_d_losses():
    # d_forward="concat" scores real and fake in one forward (one power iteration per D step).
    # From fresh u (the dense fixture) the losses move far from the reference's: measured
    # relative differences per D step, reported in docs/reference.md.
    arr, _, _, metrics = _run_iteration("sngan32_iteration_dense", exact=False, d_forward="concat")
    rel = np.abs(metrics["loss/d_steps"] / arr["d_loss"] - 1)
    assert rel.max() > 1.0  # measured 2.25 (+225%) at the 5th step; separate forwards: 3e-6


# --------------------------------------------------------------------------------------------
# Sparsity: drop-and-grow, schedule, ERK
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("f", ["0.5", "0.1"])
def test_global_drop_and_grow_matches_reference(f):
    arr = rf.load("drop_and_grow")
    masks = tp.generator_tree(rf.group(arr, "mask"))
    weights = tp.generator_tree(rf.group(arr, "weight"))
    grads = tp.generator_tree(rf.group(arr, "grad"))
    masks = jax.tree_util.tree_map(lambda m: jnp.asarray(m, bool), masks)
    a = int(sp.count_active(masks))
    assert a == int(arr["baseline_nonzero"])
    new = sp.drop_and_grow(masks, sp.magnitude_scores(weights), sp.gradient_scores(grads),
                           float(f), scope="global")
    ref = tp.generator_tree(rf.group(arr, f"mask_after_f{f}"))
    n_drop = int(arr[f"n_drop_f{f}"])
    assert n_drop == int(a * float(f)) == int(arr[f"n_grow_f{f}"])
    assert int(sp.count_active(new)) == int(arr[f"n_active_after_f{f}"]) == a
    for name, m in _leaves(ref).items():
        assert np.array_equal(_leaves(new)[name], m), name


def test_cosine_drop_fraction_matches_reference():
    arr = rf.load("drop_and_grow")
    ours = np.array([float(sp.cosine_drop_fraction(int(t), 100_000)) for t in arr["cosine_t"]])
    # float32 cos near pi loses a few bits in 1 + cos: measured 1.5e-6 relative.
    np.testing.assert_allclose(ours, arr["cosine_f"], rtol=3e-6)
    assert all(sp.is_update_step(int(t), 500, 100_000) for t in arr["cosine_t"])
    assert not sp.is_update_step(100_000, 500, 100_000)


@pytest.mark.parametrize("net", ["G", "D"])
def test_erk_densities_match_reference(net):
    G, D = models.build_models("sngan32")
    if net == "G":
        params = jax.eval_shape(lambda: G.init(jax.random.key(0), jnp.zeros((1, 128)),
                                               train=False))["params"]
        to_path = tp.generator_path
    else:
        params = jax.eval_shape(lambda: D.init(jax.random.key(0),
                                               jnp.zeros((1, 32, 32, 3))))["params"]
        to_path = tp.discriminator_path
    ref = rf.load_json("erk")["densities"][net]
    for d, table in ref.items():
        ours = _leaves(jax.tree_util.tree_map(np.asarray, sp.erk_densities(params, float(d))))
        assert sum(1 for k in ours if k.endswith("kernel")) == len(table["layers"])
        for torch_name, layer in table["layers"].items():
            name = "/".join(to_path(torch_name)[1])
            # Both solve the same equation in float64; only the summation order differs.
            assert float(ours[name]) == pytest.approx(layer["density"], rel=1e-12, abs=1e-15), (
                net, d, torch_name)
            assert (float(ours[name]) == 1.0) == layer["dense"]


# --------------------------------------------------------------------------------------------
# The D-density controller on the fixture's synthetic BR sequences
# --------------------------------------------------------------------------------------------


def _replay_controller(case: str, exact: bool, count_init: int | None = None):
    arr = rf.load("controller")
    g = lambda k: arr[f"{case}/{k}"]  # noqa: E731
    n_d, total, every = int(g("N_D")), int(g("T")), int(g("dT_D"))
    entries = int(g("da_iters")) // int(g("br_freq"))
    ctl = control.make_density_control(
        "strict" if bool(g("strict")) else "relaxed", n_d, total, every=every,
        reference_exact=exact, d_start=float(g("d0")), min_measurements=entries if exact else 0)
    window = balance.init_window(entries + 1 if exact else entries)
    count = int(g("count_init")) if count_init is None else count_init
    state = control.ControllerState(jnp.asarray(count, jnp.int32))
    step = jax.jit(lambda s, w, t: control.controller_step(s, w, t, ctl))
    push = jax.jit(balance.push)
    measured = {int(t): i for i, t in enumerate(g("measure_t"))}
    out = []
    for t in range(1, total + 1):
        if t in measured:
            i = measured[t]
            ratio = balance.balance_ratio(g("c")[i], g("b")[i], g("a")[i],
                                          eps=0.0 if exact else balance.DEFAULT_EPS)
            window = push(window, ratio)
        if sp.is_update_step(t, every, total):
            state, decision = step(state, window, t)
            out.append((t, control.ACTION_NAMES[int(decision.action)], int(state.count)))
    return g, out


@pytest.mark.parametrize("case", ["relaxed", "strict", "relaxed_nonfinite"])
def test_controller_reference_exact_mode(case):
    g, out = _replay_controller(case, exact=True)
    assert [t for t, _, _ in out] == list(g("decision_t"))
    assert [a for _, a, _ in out] == list(g("action"))
    assert [c for _, _, c in out] == list(g("count_after"))  # every count, to the weight


# Where the default controller deliberately differs (docs/reference.md), from exact-count
# starts round(d0 * N_D): iteration -> (ours, the reference's).
_FIXED_MODE_ACTIONS = {
    # 0.1 + 8 * 0.05 is 0.49999999999999994 in float64: the reference grows one weight short
    # of the cap at 800 and takes a one-weight "grow" at 1000; we reach the cap at 800 and run
    # D-DST at 1000.
    "strict": {1000: ("dst", "grow"), 4000: ("none", "prune")},
    # The reference's last prune goes 845 -> 844 weights (its floor is ceil(0.05 N) after
    # float steps); ours is already at round(0.05 N) = 844.
    # relaxed_nonfinite: one c == b measurement gives BR = inf for the reference (np.mean over
    # the queue), which reads as "D too weak" and grows D; ours ignores the non-finite ratio.
    "relaxed_nonfinite": {500: ("none", "grow")},
    "relaxed": {},
}


@pytest.mark.parametrize("case", ["relaxed", "strict", "relaxed_nonfinite"])
def test_controller_default_mode_differs_only_where_documented(case):
    arr = rf.load("controller")
    n_d, d0 = int(arr[f"{case}/N_D"]), float(arr[f"{case}/d0"])
    g, out = _replay_controller(case, exact=False, count_init=sp.count_for_density(d0, n_d))
    expected = _FIXED_MODE_ACTIONS[case]
    for (t, action, count), ref_action, ref_count in zip(out, g("action"), g("count_after"),
                                                         strict=True):
        if t in expected:
            assert (action, ref_action) == expected[t], t
        else:
            assert action == ref_action, t
        # A move lands within one weight of the reference's: integer steps of round(0.05 N)
        # from round(d0 N) vs floor (grow) / ceil (prune) of float densities times N.
        if action == ref_action and action in ("grow", "prune"):
            assert abs(count - ref_count) <= 1, t


# --------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------


def test_flops_match_reference():
    ref = rf.load_json("flops")
    G, D = models.build_models("sngan32")
    g_layers = flops.layer_flops(G, jax.ShapeDtypeStruct((1, 128), jnp.float32), train=True)
    d_layers = flops.layer_flops(D, jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32),
                                 update_stats=True)
    assert flops.forward_flops(g_layers) == ref["per_sample_dense"]["G"]
    assert flops.forward_flops(d_layers) == ref["per_sample_dense"]["D"]
    g_params = jax.eval_shape(lambda: G.init(jax.random.key(0), jnp.zeros((1, 128)),
                                             train=False))["params"]
    d_params = jax.eval_shape(lambda: D.init(jax.random.key(0),
                                             jnp.zeros((1, 32, 32, 3))))["params"]
    s = ref["settings"]
    kw = dict(iterations=s["T"], n_dis=s["n_dis"], batch_g=s["batch_g"], batch_d=s["batch_d"])
    for case in ref["cases"]:
        g_dens = sp.erk_densities(g_params, case["d_G"])
        d_dens = None if case["d_D"] == 1.0 else sp.erk_densities(d_params, case["d_D"])
        if case["label"] == "sdst_balance_dynamic_G":  # 200 intervals of 500, same densities
            g_log = [(i * s["g_update_every"], g_dens) for i in range(200)]
            out = flops.training_flops(g_layers, d_layers, g_density_log=g_log,
                                       d_density_log=d_dens, g_update_every=s["g_update_every"],
                                       **kw)
        else:
            out = flops.training_flops(g_layers, d_layers, g_density_log=g_dens,
                                       d_density_log=d_dens, **kw)
        assert out["dense_total"] == ref["dense_training_total"]
        assert out["g"] == pytest.approx(case["G_training_flops"], rel=1e-12), case["label"]
        assert out["d"] == pytest.approx(case["D_training_flops"], rel=1e-12), case["label"]
        assert out["normalised_percent"] == pytest.approx(case["normalised_percent"], rel=1e-12)
