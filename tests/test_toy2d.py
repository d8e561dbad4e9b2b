"""The 2-D balance benchmark: data, mode metrics, exact mask counts in the loop, the CLI."""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from ddst_jax import control, toy2d
from ddst_jax import sparsity as sp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Decisions every 2 iterations, a window of 2 measurements (full after iteration 2), G updates
# every 2 iterations: 12 iterations hold 5 of each.
TINY = toy2d.ToyConfig(
    iterations=12, batch_size=8, g_hidden=(8, 8), d_hidden=(8, 8), g_density=0.3,
    g_update_every=2, br_every=1, br_window=2, d_update_every=2)
# BR is finite, so it is always >= B+ of the first band (GROW) and <= B- of the second (PRUNE).
ALWAYS_GROW = (-1e30, -1e29)
ALWAYS_PRUNE = (1e29, 1e30)


# ----------------------------------------------------------------------------- data and metrics


def test_mode_centres_and_real_samples():
    ring, grid = toy2d.mode_centres("ring"), toy2d.mode_centres("grid")
    np.testing.assert_allclose(np.linalg.norm(ring, axis=1), 2.0, rtol=1e-6)
    assert grid.shape == (25, 2) and set(np.unique(grid)) == {-4.0, -2.0, 0.0, 2.0, 4.0}
    for dataset in toy2d.DATASETS:
        real = np.asarray(toy2d.sample_real(jax.random.key(0), dataset, (20_000,)))
        m = toy2d.mode_metrics(real, dataset)
        assert m["modes_covered"] == m["num_modes"]
        # A 2-D Gaussian lies within 3 std of its mean with probability 1 - exp(-4.5) = 0.989.
        assert m["high_quality"] == pytest.approx(1 - math.exp(-4.5), abs=0.005)


def test_mode_metrics_on_hand_made_samples():
    centres = toy2d.mode_centres("ring")
    exact = toy2d.mode_metrics(np.repeat(centres, 10, axis=0), "ring")
    assert (exact["modes_covered"], exact["high_quality"]) == (8, 1.0)
    assert exact["counts"].tolist() == [10] * 8

    one = toy2d.mode_metrics(np.repeat(centres[3:4], 80, axis=0), "ring")
    assert (one["modes_covered"], one["high_quality"]) == (1, 1.0)

    far = toy2d.mode_metrics(np.zeros((50, 2)), "ring")  # the ring's centre: no mode
    assert (far["modes_covered"], far["high_quality"]) == (0, 0.0)

    # Inside / outside the 3-std radius (0.06 for the ring); NaN is never high quality.
    edge = np.array([centres[0] + [0.059, 0.0], centres[1] + [0.0, 0.061], [np.nan, np.nan]])
    m = toy2d.mode_metrics(edge, "ring", min_fraction=0.0)
    assert m["counts"].tolist() == [1] + [0] * 7
    assert m["high_quality"] == pytest.approx(1 / 3)

    grid = toy2d.mode_metrics(toy2d.mode_centres("grid"), "grid")
    assert (grid["modes_covered"], grid["high_quality"]) == (25, 1.0)


def test_mode_coverage_threshold():
    # 800 samples, 8 modes: a mode needs >= 0.1 * 800 / 8 = 10 samples.
    centres = toy2d.mode_centres("ring")
    counts = [10, 9, 100, 100, 100, 100, 100, 281]
    samples = np.repeat(centres, counts, axis=0)
    assert toy2d.mode_metrics(samples, "ring", min_fraction=0.1)["modes_covered"] == 7
    assert toy2d.mode_metrics(samples, "ring", min_fraction=0.09)["modes_covered"] == 8


def test_bad_names_are_refused():
    with pytest.raises(ValueError, match="dataset"):
        toy2d.mode_centres("spiral")
    with pytest.raises(ValueError, match="toy method"):
        toy2d.method_spec("ddst", 0.1)


# ----------------------------------------------------------------------------- training loop


def _expected_d_counts(ctl: control.DensityControl, start: int, grow: bool) -> list[int]:
    """D's active count after each iteration when every decision step moves one delta.

    A move ending within half a step of the cap (floor) goes to it; at the bound nothing moves.
    """
    sign = 1 if grow else -1
    bound = ctl.cap_count if grow else ctl.min_count
    counts, count = [], start
    for t in range(1, ctl.total_iterations + 1):
        if t % ctl.every == 0 and t < ctl.total_iterations:
            target = count + sign * ctl.delta_count
            count = bound if sign * (target - bound) >= -(ctl.delta_count // 2) else target
        counts.append(count)
    return counts


# 88 maskable D weights, d_D starts near 0.3 (27 weights): GROW by 18 reaches the cap (88) on
# the 4th decision with a snap (27 -> 45 -> 63 -> 81 -> 88); PRUNE by 9 reaches the floor (4)
# on the 3rd (27 -> 18 -> 9 -> 4).
@pytest.mark.parametrize("band, grow, delta", [(ALWAYS_GROW, True, 0.2),
                                               (ALWAYS_PRUNE, False, 0.1)])
def test_adapt_moves_d_by_exact_steps_and_keeps_g_count(band, grow, delta):
    config = toy2d.ToyConfig(**{**vars(TINY), "band": band, "delta": delta})
    setup = toy2d.build_setup(config, "adapt")
    ctl = setup.control
    state0 = toy2d.init_state(setup, jax.random.key(0))
    g_masks0 = jax.device_get(state0.g_masks)
    d_start = int(sp.count_active(state0.d_masks))  # state0 is donated to the first chunk

    # ERK masks with exactly round(d_l * N_l) entries per layer.
    erk = sp.erk_densities(state0.g_params, config.g_density)
    g_expected = sum(
        sp.count_for_density(d, m.size)
        for (path, m), d in zip(jax.tree.leaves_with_path(g_masks0), jax.tree.leaves(erk),
                                strict=True)
        if sp.default_is_maskable(path, m))
    assert int(sp.count_active(g_masks0)) == g_expected

    state, curves = toy2d.train(setup, config.dataset, jax.random.key(0), state=state0)
    assert int(state.step) == config.iterations

    # G: drop-and-grow swapped weights five times, the global active count never changed.
    g_totals = curves["g_counts"].sum(axis=1)
    np.testing.assert_array_equal(g_totals, g_expected)
    assert int(sp.count_active(state.g_masks)) == g_expected
    changed = sum(int(np.sum(a != b)) for a, b in zip(
        jax.tree.leaves(g_masks0), jax.tree.leaves(state.g_masks), strict=True))
    assert changed > 0

    # D: exactly one delta per decision, clipped to [d_min, cap] (the counts, not floats).
    # The controller starts from the ERK masks' count (per-layer rounding, so within a few
    # weights of round(d_G * N_D)).
    start = d_start
    assert abs(start - sp.count_for_density(config.g_density, ctl.n_weights)) <= 4
    d_totals = curves["d_counts"].sum(axis=1)
    np.testing.assert_array_equal(d_totals, _expected_d_counts(ctl, start, grow))
    moves = np.diff(np.concatenate([[start], d_totals]))
    moves, bound = moves[moves != 0], ctl.cap_count if grow else ctl.min_count
    assert np.all(np.abs(moves[:-1]) == ctl.delta_count) and d_totals[-1] == bound
    actions = curves["control/action"]
    assert set(actions[actions != control.NONE]) == {control.GROW if grow else control.PRUNE}
    # Within [d_min, 1] up to the rounding of d_min * N_D to a count (4 of 88 = 0.045 here).
    assert np.all((d_totals >= ctl.min_count) & (d_totals <= ctl.n_weights))
    d = toy2d.final_d_density(state, setup)
    assert config.d_min - 0.5 / ctl.n_weights <= d <= 1.0
    assert int(sp.count_active(state.d_masks)) == d_totals[-1]
    # Inactive weights are exactly zero, in both networks.
    for params, masks in ((state.g_params, state.g_masks), (state.d_params, state.d_masks)):
        for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(masks), strict=True):
            assert not np.any(np.asarray(p)[~np.asarray(m)])


def test_run_reports_the_four_numbers():
    result = toy2d.run(TINY, "static_balance", seed=1, num_samples=400)
    assert 0 <= result["modes_covered"] <= 8
    assert 0.0 <= result["high_quality"] <= 1.0
    # Static: d_D stays at d_G up to ERK's per-layer rounding (88 maskable D weights here).
    assert result["d_density"] == pytest.approx(TINY.g_density, abs=0.01)
    assert result["samples"].shape == (400, 2)
    assert np.isfinite(result["br"]) and np.isfinite(result["br_median_late"])
    assert set(result["curves"]) == set(toy2d.CURVE_KEYS)
    assert all(len(v) == TINY.iterations for v in result["curves"].values())


# ----------------------------------------------------------------------------- CLI


def test_cli_json_runs_every_method(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0",
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.toy2d", f"--workdir={tmp_path}", "--json",
         "--seeds=1", "--iterations=6", "--hidden=8,8", "--batch_size=8", "--num_samples=200",
         "--g_density=0.3", "--g_update_every=2", "--d_update_every=2", "--br_every=1",
         "--br_window=2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert list(out) == list(toy2d.METHODS)
    for method, row in out.items():
        assert set(row) == {"modes_covered", "high_quality", "br", "d_density"}
        assert 0 <= row["modes_covered"] <= 8
        assert 0.0 <= row["high_quality"] <= 1.0
        assert row["br"] is None or isinstance(row["br"], float)
        assert 4 / 88 <= row["d_density"] <= 1.0, method  # floor: round(0.05 * 88) weights
    assert out["dense"]["d_density"] == out["sdst_strong"]["d_density"] == 1.0
    assert out["static_balance"]["d_density"] == pytest.approx(0.3, abs=0.01)  # ERK rounding
    assert "| method |" in proc.stdout  # the markdown table comes first
    written = set(os.listdir(tmp_path))
    assert {"curves.png", "results.json", *(f"samples_{m}.png" for m in toy2d.METHODS)} <= written
    results = json.loads((tmp_path / "results.json").read_text())
    assert {k: results["summary"]["adapt"]["mean"][k] for k in out["adapt"]} == out["adapt"]


def test_cli_refuses_an_unknown_method(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.toy2d", f"--workdir={tmp_path}", "--methods=ddst"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1
    assert "--methods" in proc.stderr and "ddst" in proc.stderr
