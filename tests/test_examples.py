"""The examples run in-process at their smallest sizes and show what they claim.

Each example also asserts its own invariants (its ``check``); the tests re-derive the key ones
from the returned values so that a weakened ``check`` cannot hide a regression.
"""

import math

import numpy as np
import pytest

from examples import (
    adapt_custom_discriminator,
    br_monitor_dense_gan,
    dst_classifier,
    sharded_sparse_step,
)

EXAMPLES = (dst_classifier, br_monitor_dense_gan, adapt_custom_discriminator,
            sharded_sparse_step)


@pytest.mark.parametrize("module", EXAMPLES, ids=lambda m: m.__name__.split(".")[-1])
def test_command_line_flags(module, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    assert "--small" in capsys.readouterr().out


def test_dst_classifier_counts_exact_and_loss_decreases():
    r = dst_classifier.run(steps=40, hidden=16, update_every=10, batch=64, verbose=False)
    assert r["final_loss"] < r["initial_loss"]
    assert [h["step"] for h in r["history"]] == [10, 20, 30]
    for h in r["history"]:
        assert h["counts"] == r["init_counts"]  # layer scope: every layer's count is kept
        assert h["max_grown_weight"] == 0.0 and h["max_grown_moment"] == 0.0
    assert r["history"][0]["swapped"] > 0
    fractions = [h["fraction"] for h in r["history"]]
    assert fractions == sorted(fractions, reverse=True)  # cosine decay
    assert r["inactive_nonzero"] == 0
    assert r["traces"] == {"train_step": 1, "mask_update": 1}


def test_br_monitor_fills_window_with_the_mean_of_finite_ratios():
    r = br_monitor_dense_gan.run(iterations=40, br_every=2, window_iterations=20, n_dis=1,
                                 batch=16, log_every=20, verbose=False)
    assert r["window_size"] == 10
    assert r["window_count"] == len(r["ratios"]) == 20
    assert r["window_full"]
    last = np.asarray(r["ratios"][-10:])
    assert r["ignored"] == int(np.sum(~np.isfinite(last)))
    assert math.isclose(r["br"], float(np.mean(last[np.isfinite(last)])), rel_tol=1e-5,
                        abs_tol=1e-6)
    a, b, c = r["triples"][-1]
    assert math.isclose(r["ratios"][-1], (a - b) / (c - b), rel_tol=1e-4, abs_tol=1e-6)
    assert [full for *_, full in r["log"]] == [True, True]  # 20 iterations fill 10 entries


def _adapt(**kw):
    return adapt_custom_discriminator.run(iterations=60, every=10, br_every=2,
                                          window_iterations=10, n_dis=1, batch=16, width=4,
                                          verbose=False, **kw)


def test_adapt_forced_grow_moves_density_up_to_the_strict_cap_then_dst():
    r = _adapt(kind="strict", force="grow", d_start=0.3, d_max=0.4)
    d = r["decisions"]
    assert [x["t"] for x in d] == [10, 20, 30, 40, 50]
    assert d[0]["action"] == "grow"
    assert d[0]["after"] == d[0]["before"] + r["delta_count"]  # GROW adds exactly one step
    for x in d:
        assert x["stem_dense"] and x["max_new_weight"] == 0.0
        assert x["after"] == x["target"] <= r["cap_count"]
    assert r["final_count"] == r["cap_count"]
    dst = [x for x in d if x["action"] == "dst"]
    assert dst and all(x["before"] == x["after"] == r["cap_count"] and x["grown"] > 0
                       for x in dst)


def test_adapt_forced_prune_moves_density_down_by_exact_steps():
    r = _adapt(kind="relaxed", force="prune", d_start=0.3)
    counts = [x["before"] for x in r["decisions"]] + [r["final_count"]]
    assert all(x["action"] == "prune" for x in r["decisions"])
    steps = np.diff(counts)
    assert np.all(steps < 0)
    assert np.all((steps == -r["delta_count"]) | (np.asarray(counts[1:]) == r["min_count"]))


def test_sharded_step_matches_single_device():
    r = sharded_sparse_step.run(steps=12, update_every=5, batch=32, hidden=16, verbose=False)
    assert r["num_devices"] == 8  # conftest.py's fake CPU devices
    assert r["masks_changed"]
    assert r["masks_equal_single"]
    assert r["replicas_identical"] and r["state_replicated"]
    assert r["all_reduce_in_step"]
    assert sum(r["counts"].values()) == sum(r["init_counts"].values())
    assert r["max_param_diff"] < 1e-5
