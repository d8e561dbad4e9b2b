"""Training-FLOPs accounting (docs/method.md 8): per-layer counts, densities, totals, CLI."""

import json
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddst_jax.metrics.flops import (
    LayerFlops,
    density_log_row,
    flatten_densities,
    forward_flops,
    layer_flops,
    read_density_log,
    samples_per_iteration,
    scheduled_log,
    training_flops,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Tiny(nn.Module):
    """Conv -> BN -> spectral-normalised strided 1x1 conv -> flatten -> Dense -> BN (1-D)."""

    @nn.compact
    def __call__(self, x, update_stats: bool = True):
        x = nn.Conv(3, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=False)(x)
        x = nn.SpectralNorm(nn.Conv(4, (1, 1), strides=2, use_bias=False))(
            x, update_stats=update_stats
        )
        x = x.reshape(x.shape[0], -1)
        x = nn.Dense(5)(x)
        return nn.BatchNorm(use_running_average=False)(x)


# Hand count for one (4, 4, 2) input:
#   Conv_0 3x3, 2 -> 3, SAME, 4x4 out: 2*3*9*16 = 864 weight, 3*16 = 48 bias
#   BatchNorm_0 over (4, 4, 3):        2*3*16 = 96
#   Conv_1 1x1, 3 -> 4, stride 2:      3*4*1*(2*2) = 48 weight, no bias
#   Dense_0 16 -> 5:                   16*5 = 80 weight, 5 bias
#   BatchNorm_1 over (5,):             2*5 = 10
TINY_HAND = {
    ("Conv_0", "kernel"): (864, 48),
    ("BatchNorm_0",): (0, 96),
    ("Conv_1", "kernel"): (48, 0),
    ("Dense_0", "kernel"): (80, 5),
    ("BatchNorm_1",): (0, 10),
}
TINY_DENSE_TOTAL = 864 + 48 + 96 + 48 + 80 + 5 + 10  # 1151


@pytest.fixture(scope="module")
def tiny_layers():
    return layer_flops(Tiny(), jax.ShapeDtypeStruct((1, 4, 4, 2), jnp.float32), update_stats=True)


def test_tiny_model_matches_hand_count(tiny_layers):
    got = {layer.path: (layer.weight_flops, layer.other_flops) for layer in tiny_layers}
    assert got == TINY_HAND
    assert [layer.kind for layer in tiny_layers] == [
        "conv", "batch_norm", "conv", "dense", "batch_norm"
    ]
    assert forward_flops(tiny_layers) == TINY_DENSE_TOTAL
    # The spectral-normalised conv is counted once (init would trace it twice).
    assert sum(layer.path == ("Conv_1", "kernel") for layer in tiny_layers) == 1
    assert tiny_layers[2].in_shape == (1, 4, 4, 3) and tiny_layers[2].out_shape == (1, 2, 2, 4)


def test_counts_are_per_sample_for_any_batch(tiny_layers):
    batched = layer_flops(Tiny(), jnp.zeros((7, 4, 4, 2)), update_stats=False)
    assert [(lf.path, lf.weight_flops, lf.other_flops) for lf in batched] == [
        (lf.path, lf.weight_flops, lf.other_flops) for lf in tiny_layers
    ]


def test_kernel_paths_are_params_tree_paths(tiny_layers):
    x = jax.ShapeDtypeStruct((1, 4, 4, 2), jnp.float32)
    params = jax.eval_shape(lambda x: Tiny().init(jax.random.key(0), x), x)["params"]
    kernel_paths = {
        tuple(k.key for k in path)
        for path, _ in jax.tree_util.tree_leaves_with_path(params)
        if path[-1].key == "kernel"
    }
    assert {lf.path for lf in tiny_layers if lf.weight_flops} == kernel_paths


def test_grouped_and_transposed_convs():
    class Convs(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(6, (3, 3), feature_group_count=2, use_bias=False)(x)  # 4 -> 6, 2 groups
            return nn.ConvTranspose(2, (2, 2), strides=(2, 2))(x)  # 6 -> 2, 3x3 -> 6x6

    layers = layer_flops(Convs(), jnp.zeros((2, 3, 3, 4)))
    # grouped: 4*6*3*3*(3*3) / 2 = 972; transposed: 6*2*2*2 per *input* position * 9 = 432,
    # bias per output position 2*36 = 72.
    assert [(lf.kind, lf.weight_flops, lf.other_flops) for lf in layers] == [
        ("conv", 972, 0),
        ("conv_transpose", 432, 72),
    ]


def test_weight_term_scales_with_density_bias_and_bn_do_not(tiny_layers):
    half_conv = forward_flops(tiny_layers, {("Conv_0", "kernel"): 0.25})
    assert half_conv == TINY_DENSE_TOTAL - 864 + 864 * 0.25
    # Every kernel at density 0: only bias and BN terms are left, unscaled.
    zero = {"Conv_0/kernel": 0.0, "Conv_1/kernel": 0.0, "Dense_0/kernel": 0.0}
    assert forward_flops(tiny_layers, zero) == 48 + 96 + 5 + 10


def test_density_forms_agree(tiny_layers):
    mask = np.zeros((3, 3, 2, 3), bool)
    mask.reshape(-1)[:27] = True  # 27 / 54 active
    nested = {"Conv_0": {"kernel": 0.5, "bias": 1.0}, "BatchNorm_0": {"scale": 1.0}}
    as_masks = {"Conv_0": {"kernel": mask, "bias": np.ones(3, bool)}}
    expected = TINY_DENSE_TOTAL - 864 / 2
    assert forward_flops(tiny_layers, nested) == expected
    assert forward_flops(tiny_layers, as_masks) == expected
    assert forward_flops(tiny_layers, {"Conv_0/kernel": 0.5}) == expected
    assert flatten_densities(nested) == {
        ("Conv_0", "kernel"): 0.5, ("Conv_0", "bias"): 1.0, ("BatchNorm_0", "scale"): 1.0
    }


def test_density_for_unknown_layer_is_an_error(tiny_layers):
    with pytest.raises(ValueError, match="match no counted layer"):
        forward_flops(tiny_layers, {"params": {"Conv_0": {"kernel": 0.5}}})
    with pytest.raises(ValueError, match=r"densities lie in \[0, 1\]"):
        forward_flops(tiny_layers, {"Conv_0/kernel": 1.5})


def test_layer_inside_vmap_is_an_error():
    class Vmapped(nn.Module):
        @nn.compact
        def __call__(self, x):
            dense = nn.vmap(
                nn.Dense, variable_axes={"params": 0}, split_rngs={"params": True},
                in_axes=1, out_axes=1,
            )
            return dense(3)(x)

    # Each vmapped slice sees a (5, 3) kernel while the params leaf is stacked (4, 5, 3).
    with pytest.raises(ValueError, match="lifted transforms"):
        layer_flops(Vmapped(), jnp.zeros((2, 4, 5)))


def test_scalar_example_input_is_an_error():
    with pytest.raises(ValueError, match="batched example input"):
        layer_flops(Tiny(), jnp.float32(0.0))


# ---------------------------------------------------------------------------------------------
# Training totals on hand-made layers: G has weight 10 + other 2, D weight 20 + other 4.
# ---------------------------------------------------------------------------------------------

G = [LayerFlops(("g", "kernel"), 10, 2)]
D = [LayerFlops(("d", "kernel"), 20, 4)]
GK, DK = "g/kernel", "d/kernel"


def test_samples_per_iteration():
    # S_G = n_dis * B_D + 3 * B_G; S_D = 3 * n_dis * B_D + B_G.
    assert samples_per_iteration(n_dis=2, batch_g=3, batch_d=2) == (13, 15)


def test_static_totals_by_hand():
    kw = dict(iterations=10, n_dis=2, batch_g=3, batch_d=2)
    logs = dict(g_density_log={GK: 0.5}, d_density_log={DK: 0.25})  # F_G = 7, F_D = 9
    paper = training_flops(G, D, **kw, **logs)
    physical = training_flops(G, D, **kw, **logs, convention="physical")
    assert paper["g"] == physical["g"] == 13 * 7 * 10
    assert physical["d"] == 15 * 9 * 10
    assert paper["d"] == 15 * 9 * 10 * 2  # static D: iterations * n_dis D steps
    assert paper["dense_total"] == 13 * 12 * 10 + 15 * 24 * 10 * 2
    assert paper["normalised_percent"] == pytest.approx(100 * (910 + 2700) / (1560 + 7200))
    dense = training_flops(G, D, **kw)
    assert dense["total"] == dense["dense_total"] == paper["dense_total"]
    assert dense["normalised_percent"] == 100.0


def test_dynamic_log_integrates_by_hand():
    # 12 iterations, n_dis 3, B_G = B_D = 1: S_G = 3 + 3 = 6, S_D = 9 + 1 = 10.
    kw = dict(iterations=12, n_dis=3, batch_g=1, batch_d=1, g_update_every=4, d_update_every=6)
    g_log = [(0, {GK: 1.0}), (4, {GK: 0.5}), (8, {GK: 0.0})]  # F_G = 12, 7, 2
    d_log = [(0, {DK: 0.5}), (6, {DK: 1.0})]  # F_D = 14, 24
    paper = training_flops(G, D, g_density_log=g_log, d_density_log=d_log, **kw)
    physical = training_flops(
        G, D, g_density_log=g_log, d_density_log=d_log, convention="physical", **kw
    )
    assert physical["g"] == paper["g"] == 6 * (12 * 4 + 7 * 4 + 2 * 4)
    assert physical["d"] == 10 * (14 * 6 + 24 * 6)
    assert paper["d"] == 10 * (14 * 6 * 3 + 24 * 6 * 3)  # D intervals in D steps
    assert physical["dense_total"] == 6 * 12 * 12 + 10 * 24 * 12


def test_irregular_log_paper_counts_update_intervals_physical_counts_spans():
    # A change at iteration 3 with dT_G = 4: the paper gives every entry dT_G iterations (as the
    # public code does); the physical count uses the real spans 3 and 9.
    kw = dict(iterations=12, n_dis=1, batch_g=1, batch_d=1, g_update_every=4)
    g_log = [(0, {GK: 1.0}), (3, {GK: 0.5})]  # F_G = 12, 7; S_G = 1 + 3 = 4
    paper = training_flops(G, D, g_density_log=g_log, **kw)
    physical = training_flops(G, D, g_density_log=g_log, convention="physical", **kw)
    assert paper["g"] == 4 * (12 + 7) * 4
    assert physical["g"] == 4 * (12 * 3 + 7 * 9)


@pytest.mark.parametrize("n_dis", [1, 2, 5])
@pytest.mark.parametrize("dynamic", [False, True])
def test_paper_minus_physical_is_the_extra_n_dis_d_term(n_dis, dynamic):
    kw = dict(iterations=8, n_dis=n_dis, batch_g=4, batch_d=3)
    if dynamic:
        logs = dict(
            g_density_log=[(0, {GK: 0.5}), (2, {GK: 0.25}), (4, {GK: 0.75}), (6, {GK: 0.5})],
            d_density_log=[(0, {DK: 0.5}), (4, {DK: 0.125})],
            g_update_every=2,
            d_update_every=4,
        )
    else:
        logs = dict(g_density_log={GK: 0.5}, d_density_log={DK: 0.125})
    paper = training_flops(G, D, **kw, **logs)
    physical = training_flops(G, D, **kw, **logs, convention="physical")
    assert paper["g"] == physical["g"]
    assert paper["total"] - physical["total"] == (n_dis - 1) * physical["d"]
    assert paper["dense_total"] - physical["dense_total"] == (n_dis - 1) * physical["dense_d"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(g_density_log=[(1, {GK: 0.5})], g_update_every=4), "start with the initial"),
        (dict(g_density_log=[(0, {}), (0, {})], g_update_every=4), "increase strictly"),
        (dict(g_density_log=[(0, {}), (12, {})], g_update_every=4), "stay below"),
        (dict(g_density_log=[(0, {}), (4, {})]), "update interval is None"),
        (dict(g_density_log=[(0, {})], g_update_every=0), "must be >= 1"),
        (dict(convention="exact"), "Unknown convention"),
        (dict(n_dis=0), "n_dis must be a positive integer"),
        (dict(iterations=12.5), "iterations must be a positive integer"),
    ],
)
def test_bad_training_inputs_raise(kwargs, match):
    base = dict(iterations=12, n_dis=1, batch_g=1, batch_d=1)
    with pytest.raises(ValueError, match=match):
        training_flops(G, D, **{**base, **kwargs})


def test_scheduled_log_samples_every_update():
    log = [(0, {GK: 1.0}), (3, {GK: 0.5}), (9, {GK: 0.25})]
    assert scheduled_log(log, every=4, iterations=12) == [
        (0, {GK: 1.0}), (4, {GK: 0.5}), (8, {GK: 0.5})
    ]
    # An update that moved no density still opens a dT_G interval in the paper's count.
    kw = dict(iterations=12, n_dis=1, batch_g=1, batch_d=1, g_update_every=4)
    sparse_log = [(0, {GK: 0.5})]
    paper = training_flops(G, D, g_density_log=scheduled_log(sparse_log, 4, 12), **kw)
    assert paper["g"] == 4 * 7 * 12


def test_density_log_file_round_trip(tmp_path):
    rows = [
        density_log_row(0, {"g": {"kernel": 0.5}}, {"d/kernel": 0.25}),
        density_log_row(5, {"g/kernel": 0.5}, {"d/kernel": 0.25}, changed=["g"]),  # layer DST
        # No "changed": inferred from which densities differ from the previous row.
        json.dumps({"iteration": 10, "g": {"g/kernel": 0.5}, "d": {"d/kernel": 0.5}}),
    ]
    (tmp_path / "density_log.jsonl").write_text("\n".join(rows) + "\n")
    g_log, d_log = read_density_log(tmp_path)
    assert g_log == [(0, {("g", "kernel"): 0.5}), (5, {("g", "kernel"): 0.5})]
    assert d_log == [(0, {("d", "kernel"): 0.25}), (10, {("d", "kernel"): 0.5})]
    with pytest.raises(FileNotFoundError, match="density log"):
        read_density_log(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

TINY_CONFIG = """
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.model = dict(name="sngan32", z_dim=16, g_ch=8, d_ch=8)
    c.train = dict(iterations=20, n_dis=2, batch_size_g=4, batch_size_d=2)
    c.sparsity = dict(g_density=0.1, distribution="erk", erk_power=1.0, g_update_every=5)
    c.control = dict(d_update_every=10, d_max=0.5)
    return c
"""


def test_cli_json_has_sixteen_rows_and_the_run(tmp_path):
    config_file = tmp_path / "tiny.py"
    config_file.write_text(textwrap.dedent(TINY_CONFIG))
    run = tmp_path / "run"
    run.mkdir()
    run_config = {  # as ddst_jax.train writes config.json (fields used here)
        "model": {"name": "sngan32", "z_dim": 16, "g_ch": 8, "d_ch": 8},
        "train": {"iterations": 20, "n_dis": 2, "batch_size_g": 4, "batch_size_d": 2},
        "sparsity": {"method": "adapt", "setting": "relaxed", "d_mode": "balance",
                     "d_density": None, "g_density": 0.5, "g_update_every": 5},
        "control": {"d_update_every": 10, "d_max": 0.5},
    }
    (run / "config.json").write_text(json.dumps(run_config))
    # ADAPT: G updates every dT_G = 5, D grows at dT_D = 10. Like the runner, rows are written
    # only when some per-layer density moved, so the G update at 15 (say layer-scope) is absent.
    # Paths are those of the real sngan32 models.
    def row(iteration, g, d):
        return json.dumps({"step": iteration, "iteration": iteration, "g": {"dense/kernel": g},
                           "d": {"head/kernel": d}, "g_counts": [], "d_counts": []})

    rows = [row(0, 0.5, 0.5), row(5, 0.25, 0.5), row(10, 0.5, 1.0)]
    (run / "density_log.jsonl").write_text("\n".join(rows) + "\n")

    proc = subprocess.run(
        [sys.executable, "-m", "experiments.flops", f"--config={config_file}", "--json",
         f"--workdir={run}"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)  # exactly one JSON object on stdout

    assert out["dense_total"] > 0
    assert len(out["rows"]) == 16
    table = {(r["method"], r["setting"], r["g_density"]): r for r in out["rows"]}
    assert set(table) == {
        (m, s, d)
        for m in ("static_balance", "static_strong")
        for s in ("relaxed", "strict")
        for d in (0.1, 0.2, 0.3, 0.5)
    }
    pct = {k: r["normalised_percent"] for k, r in table.items()}
    for d in (0.1, 0.2, 0.3, 0.5):
        # Balance is the same in both settings; Strong-strict (d_D = 0.5) sits between Balance
        # and Strong-relaxed (dense D), and meets Balance at d_G = 0.5.
        assert pct["static_balance", "relaxed", d] == pct["static_balance", "strict", d]
        assert pct["static_balance", "strict", d] <= pct["static_strong", "strict", d]
        assert pct["static_strong", "strict", d] < pct["static_strong", "relaxed", d] < 100
        assert table["static_strong", "strict", d]["d_density"] == 0.5
    strict_half = pct["static_strong", "strict", 0.5]
    assert strict_half == pytest.approx(pct["static_balance", "relaxed", 0.5])

    run = out["run"]
    assert (run["g_update_every"], run["d_update_every"]) == (5, 10)
    paper, physical = run["paper"], run["physical"]
    # G: the paper counts one dT_G interval per scheduled update (missing row included), which
    # covers the run exactly; D: each of its two entries gets dT_D * n_dis D steps.
    assert paper["g"] == pytest.approx(physical["g"])
    assert paper["d"] == pytest.approx(2 * physical["d"])
    assert 0 < physical["normalised_percent"] < 100
