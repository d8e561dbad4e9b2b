"""Pluggable D-density controllers: the protocol, the registry, ``apply_decision``, and the
worked example (``"proportional"``) run end to end through the training runner."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_balance_control import full_window
from test_train import read_jsonl, tiny_config

from ddst_jax import balance, control, train
from ddst_jax import sparsity as sp

N = 1000


def _window(value: float, size: int = 2) -> balance.BRWindow:
    return full_window(value, size)


def _proportional(**options) -> control.ProportionalControl:
    return control.make_controller("proportional", control.ControlOptions(**options),
                                   control.ControllerContext(N, 10_000, d_start=0.3))


@pytest.mark.parametrize(("br", "action", "target"), [
    (0.75, "grow", 400),    # 0.20 above B+ = 0.55: +0.5 * 0.20 * 1000 weights
    (0.60, "grow", 325),    # 0.05 above: +25
    (0.50, "none", 300),    # inside the band
    (0.25, "prune", 200),   # 0.20 below B- = 0.45: -100
    (3.00, "grow", 400),    # far above: capped at max_step = 0.1 of N
])
def test_proportional_moves_in_proportion_to_the_distance_from_the_band(br, action, target):
    c = _proportional(gain=0.5, max_step=0.1)
    state, decision = c.step(c.init(300), _window(br), 1000)
    assert control.ACTION_NAMES[int(decision.action)] == action
    assert int(decision.target_count) == int(state.count) == target


def test_proportional_decides_only_on_schedule_with_a_full_window_and_clips():
    c = _proportional(gain=10.0, max_step=1.0)
    state = c.init(300)
    for t, window in ((999, _window(0.9)), (1000, balance.push(balance.init_window(2), 0.9)),
                      (1000, _window(float("nan"))), (10_000, _window(0.9))):
        _, d = c.step(state, window, t)  # off schedule, window not full, no finite BR, last
        assert int(d.action) == control.NONE and int(d.target_count) == 300
    _, d = c.step(state, _window(5.0), 1000)
    assert int(d.target_count) == N  # clipped at the cap (1.0 relaxed)
    _, d = c.step(state, _window(-5.0), 1000)
    assert int(d.target_count) == sp.count_for_density(0.05, N)  # at the floor


def test_controllers_are_jittable_and_hashable_static_config():
    for name in ("relaxed", "strict", "dda", "proportional", "relative"):
        c = control.make_controller(name, control.ControlOptions(),
                                    control.ControllerContext(N, 10_000, d_start=0.3, cap=None))
        hash(c)  # closed over by jit as static configuration
        step = jax.jit(c.step)
        state, decision = step(c.init(300), _window(0.9, 2), jnp.asarray(c.every))
        assert decision.action.dtype == jnp.int32
        assert jax.tree_util.tree_structure(state) == jax.tree_util.tree_structure(c.init(300))


def test_unknown_controller_and_bad_options_are_refused_by_name():
    with pytest.raises(ValueError, match="Unknown controller 'pid'; registered: .*proportional"):
        control.make_controller("pid", control.ControlOptions(),
                                control.ControllerContext(N, 100, 0.3))
    config = tiny_config(**{"control.controller": "pid"})
    with pytest.raises(ValueError, match=r"config\.control\.controller: unknown controller 'pid'"):
        train.validate_config(config)
    config = tiny_config(**{"control.controller": "proportional", "sparsity.method": "sdst"})
    with pytest.raises(ValueError, match=r"config\.control\.controller: 'proportional' needs a "
                       r"method whose D density moves"):
        train.validate_config(config)
    config = tiny_config(**{"control.controller": "proportional", "control.gain": -1.0})
    with pytest.raises(ValueError, match=r"config\.control: proportional control needs gain"):
        train.validate_config(config)


def _masks_and_scores():
    masks = {"a": {"kernel": jnp.array([[True, False], [False, True]])},
             "b": {"kernel": jnp.array([[False, False, True]]), "bias": jnp.ones((3,), bool)}}
    weights = {"a": {"kernel": jnp.array([[0.9, 0.0], [0.0, 0.2]])},
               "b": {"kernel": jnp.array([[0.0, 0.0, 0.5]]), "bias": jnp.zeros((3,))}}
    grads = {"a": {"kernel": jnp.array([[0.0, 0.7], [0.1, 0.0]])},
             "b": {"kernel": jnp.array([[0.3, 0.8, 0.0]]), "bias": jnp.zeros((3,))}}
    return masks, weights, grads


@pytest.mark.parametrize(("action", "target", "expected"), [
    (control.NONE, 3, ([[True, False], [False, True]], [[False, False, True]])),
    (control.GROW, 5, ([[True, True], [False, True]], [[False, True, True]])),  # top |grad|
    (control.PRUNE, 2, ([[True, False], [False, False]], [[False, False, True]])),  # top |w|
])
def test_apply_decision_resizes_across_leaves_and_leaves_others_alone(action, target, expected):
    masks, weights, grads = _masks_and_scores()
    decision = control.Decision(jnp.asarray(action, jnp.int32), jnp.asarray(target, jnp.int32))
    upd = jax.jit(lambda d: control.apply_decision(masks, d, sp.magnitude_scores(weights),
                                                   sp.gradient_scores(grads),
                                                   drop_fraction=0.5))(decision)
    assert upd.masks["a"]["kernel"].tolist() == expected[0]
    assert upd.masks["b"]["kernel"].tolist() == expected[1]
    assert bool(jnp.all(upd.masks["b"]["bias"]))  # not maskable: untouched
    grown = sum(int(g.sum()) for g in jax.tree_util.tree_leaves(upd.grown))
    assert grown == max(0, target - 3) if action != control.NONE else grown == 0


def test_apply_decision_dst_keeps_the_count():
    masks, weights, grads = _masks_and_scores()
    decision = control.Decision(jnp.asarray(control.DST, jnp.int32), jnp.asarray(3, jnp.int32))
    upd = control.apply_decision(masks, decision, sp.magnitude_scores(weights),
                                 sp.gradient_scores(grads), drop_fraction=0.34)
    assert int(sp.count_active(upd.masks)) == 3  # floor(3 * 0.34) = 1 swapped
    assert sum(int(g.sum()) for g in jax.tree_util.tree_leaves(upd.grown)) == 1


# ----------------------------------------------------------------------------- end to end


@dataclasses.dataclass(frozen=True)
class _AlwaysPrune:
    """A test controller: every decision step, one weight fewer (the protocol, nothing else)."""

    every: int
    total_iterations: int

    @property
    def band(self):
        return None

    def init(self, d_count):
        return control.ControllerState(jnp.asarray(d_count, jnp.int32), jnp.zeros((), jnp.int32))

    def step(self, state, window, iteration):
        decide = sp.is_update_step(iteration, self.every, self.total_iterations)
        target = jnp.where(decide, state.count - 1, state.count).astype(jnp.int32)
        action = jnp.where(decide, control.PRUNE, control.NONE).astype(jnp.int32)
        return control.ControllerState(target, state.level), control.Decision(action, target)


def test_a_new_controller_is_one_function_and_one_config_name(tmp_path):
    @control.register("always_prune_for_test")
    def _factory(options, context):
        return _AlwaysPrune(every=options.every or 2, total_iterations=context.total_iterations)

    try:
        config = tiny_config(**{"sparsity.method": "adapt",
                                "control.controller": "always_prune_for_test"})
        summary = train.train_and_evaluate(config, str(tmp_path))
    finally:
        del control.CONTROLLERS["always_prune_for_test"]
    rows = read_jsonl(tmp_path / "density_log.jsonl")
    counts = [sum(r["d_counts"]) for r in rows]
    # Decisions at iterations 2, 4, 6 (not 8, the last): one weight each.
    assert [r["iteration"] for r in rows] == [0, 2, 4, 6]
    assert counts == [counts[0] - k for k in range(4)]
    assert summary["d_count"] == counts[-1]


def test_proportional_controller_in_the_runner(tmp_path):
    # B+ far below any BR: every decision grows D by max_step (0.1 of N_D), to the cap.
    config = tiny_config(**{"sparsity.method": "adapt", "control.controller": "proportional",
                            "control.band_low": -1e9, "control.band_high": -1e9 + 1,
                            "control.max_step": 0.1})
    summary = train.train_and_evaluate(config, str(tmp_path))
    rows = read_jsonl(tmp_path / "density_log.jsonl")
    n_d = summary["d_maskable"]
    counts = np.array([sum(r["d_counts"]) for r in rows])
    assert [r["iteration"] for r in rows] == [0, 2, 4, 6]
    np.testing.assert_array_equal(np.diff(counts), sp.count_for_density(0.1, n_d))


def test_the_design_docs_controller_example_runs():
    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs", "design.md")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    try:
        exec(compile(code, path, "exec"), {})  # noqa: S102 (our own documentation)
        c = control.make_controller("halve_when_strong", control.ControlOptions(every=10),
                                    control.ControllerContext(N, 100, d_start=0.4))
        state, d = jax.jit(c.step)(c.init(400), _window(0.1), jnp.asarray(10))
        assert control.ACTION_NAMES[int(d.action)] == "prune" and int(state.count) == 200
        _, d = c.step(c.init(400), _window(0.5), 10)  # BR not below `low`: no move
        assert int(d.action) == control.NONE
    finally:
        control.CONTROLLERS.pop("halve_when_strong", None)


# ----------------------------------------------------------------------------- "relative"


def _relative(kind: str = "relaxed", d_start: float = 0.3,
              **options) -> control.RelativeBandControl:
    return control.make_controller("relative", control.ControlOptions(**options),
                                   control.ControllerContext(N, 10_000, d_start, kind=kind))


def test_relative_band_calibrates_then_holds_the_measured_balance():
    c = _relative(calibration_decisions=2)
    s = c.init(300)
    assert np.isnan(float(s.reference)) and c.band is None
    # Two calibration decisions (windowed BR 0.04 and 0.06): no move, BR_ref = 0.05.
    for t, br in ((1000, 0.04), (2000, 0.06)):
        s, d = c.step(s, _window(br), t)
        assert int(d.action) == control.NONE and int(s.count) == 300
    assert float(s.reference) == pytest.approx(0.05)
    assert int(s.calibrated) == 2
    # Band (0.045, 0.055): the paper's rules around it, steps of 0.05 * N = 50 weights.
    for br, action, count in ((0.06, "grow", 350), (0.05, "none", 300), (0.044, "prune", 250),
                              (0.5, "grow", 350)):
        s2, d = c.step(s, _window(br), 3000)
        assert (control.ACTION_NAMES[int(d.action)], int(s2.count)) == (action, count), br
    # Off schedule, a window not yet full or no finite BR: nothing, and no calibration either.
    fresh = c.init(300)
    for t, window in ((999, _window(0.1)), (1000, balance.push(balance.init_window(2), 0.1)),
                      (1000, _window(float("nan")))):
        s3, d = c.step(fresh, window, t)
        assert int(d.action) == control.NONE and int(s3.calibrated) == 0


@pytest.mark.parametrize("kind", ["relaxed", "strict", "dda"])
def test_relative_band_with_a_fixed_reference_is_the_paper_controller(kind):
    # reference_br = 1 makes the ratios the band itself: decision for decision the same as
    # the method's own controller, along a random walk of windowed BRs.
    low, high = {"dda": (0.50, 0.65)}.get(kind, (0.45, 0.55))
    ctx = control.ControllerContext(N, 200_000, 0.3, kind=kind,
                                    cap=0.5 if kind == "strict" else 1.0)
    paper = control.make_controller(kind, control.ControlOptions(), ctx)
    relative = control.make_controller("relative", control.ControlOptions(
        ratio_low=low, ratio_high=high, reference_br=1.0), ctx)
    assert relative.band == (low, high) and relative.every == paper.every
    rng = np.random.default_rng(0)
    s_p, s_r = paper.init(300), relative.init(300)
    step_p, step_r = jax.jit(paper.step), jax.jit(relative.step)
    actions = set()
    # Every value (on, inside and outside both bands) four times, in a random order.
    values = rng.permutation(np.repeat([0.2, 0.44, 0.45, 0.5, 0.55, 0.56, 0.64, 0.65, 0.9], 4))
    for i, br in enumerate(values, start=1):
        window = _window(float(br))
        s_p, d_p = step_p(s_p, window, jnp.asarray(i * paper.every))
        s_r, d_r = step_r(s_r, window, jnp.asarray(i * paper.every))
        assert (int(d_p.action), int(d_p.target_count)) == (int(d_r.action),
                                                            int(d_r.target_count)), i
        actions.add(control.ACTION_NAMES[int(d_p.action)])
    assert {"grow", "prune", "none"} <= actions
    if kind == "strict":
        assert "dst" in actions  # the strict setting's D-DST at the cap goes through too


def test_relative_band_state_is_a_resumable_pytree():
    c = _relative()
    s, _ = c.step(c.init(300), _window(0.08), 1000)
    leaves, treedef = jax.tree_util.tree_flatten(s)
    restored = jax.tree_util.tree_unflatten(treedef, [np.asarray(x) for x in leaves])
    # A run resumed from a checkpoint makes the same next decision as one that never stopped.
    a = c.step(s, _window(0.2), 2000)
    b = c.step(restored, _window(0.2), 2000)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(
        lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True)), a, b))


def test_relative_band_refuses_bad_options_by_name():
    with pytest.raises(ValueError, match="0 < ratio_low < ratio_high"):
        _relative(ratio_low=1.2, ratio_high=1.1)
    with pytest.raises(ValueError, match="reference_br must be >= 0"):
        _relative(reference_br=-1.0)
    with pytest.raises(ValueError, match="calibration_decisions must be >= 1"):
        _relative(calibration_decisions=0)
    with pytest.raises(ValueError, match="config.control: relative control needs"):
        train.validate_config(tiny_config(**{"sparsity.method": "adapt",
                                             "control.controller": "relative",
                                             "control.ratio_low": 2.0}))


def test_relative_band_in_the_runner_calibrates_and_resumes(tmp_path):
    # Decisions every 2 iterations of 8: calibration at 2, then the band (0.9, 1.1) x BR_ref.
    config = tiny_config(**{"sparsity.method": "adapt", "control.controller": "relative"})
    config.train.iterations = 4
    train.train_and_evaluate(config, str(tmp_path))
    config.train.iterations = 8
    summary = train.train_and_evaluate(config, str(tmp_path), allow_changes=("train.iterations",))
    rows = read_jsonl(tmp_path / "density_log.jsonl")
    assert [r["iteration"] for r in rows][:2] == [0, 2]
    assert sum(rows[1]["d_counts"]) == sum(rows[0]["d_counts"])  # calibration: no move
    assert np.isfinite(summary["controller"]["reference"])
