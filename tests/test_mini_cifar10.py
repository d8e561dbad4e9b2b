"""The real-image CPU benchmark (experiments/mini_cifar10.py): its configs, its real-image
sets, its table, and one tiny end-to-end run of the CLI with the JSON line it promises."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from ddst_jax import train
from experiments import mini_cifar10 as mini

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _npz(path, n_train=40, n_test=12):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n_train + n_test, 32, 32, 3), dtype=np.uint8)
    np.savez(path, train_images=images[:n_train], test_images=images[n_train:])
    return images[:n_train], images[n_train:]


@pytest.mark.parametrize("quick", [True, False])
def test_every_method_is_a_valid_runner_config_with_the_schedules_inside_the_run(quick):
    settings = mini.scale_settings(quick)
    for method in mini.METHODS:
        config = mini.make_config(method, 0, settings, g_density=0.1, lr=2e-4,
                                  data_path="x.npz")
        spec = train.validate_config(config)
        assert config.train.iterations == settings["iterations"]
        assert config.eval.every == 0 and config.data.source == "npz"
        # ADAPT decides several times within the run; G's masks change several times.
        assert settings["iterations"] // config.control.d_update_every >= 5
        assert settings["iterations"] // config.sparsity.g_update_every >= 5
        assert spec.g_dynamic == (method in ("sdst_strong_rigl", "adapt", "adapt_relative"))
    assert mini.make_config("adapt_relative", 0, settings, g_density=0.1, lr=2e-4,
                            data_path="x").control.controller == "relative"
    with pytest.raises(ValueError, match="--width must be positive"):
        mini.scale_settings(quick, width=0)


def test_real_sets_are_disjoint_and_fall_back_to_a_split_of_the_train_images(tmp_path):
    train_images, test_images = _npz(tmp_path / "d.npz")
    reference, sample = mini.real_sets(str(tmp_path / "d.npz"), 10)
    assert reference.shape == sample.shape == (10, 32, 32, 3)
    flat = {r.tobytes() for r in test_images}
    assert all(r.tobytes() in flat for r in reference)  # the held-out split
    assert not {r.tobytes() for r in sample} & flat  # training images only
    # More images asked than the test split has: halves of the training images.
    reference, sample = mini.real_sets(str(tmp_path / "d.npz"), 15)
    assert not {r.tobytes() for r in reference} & {r.tobytes() for r in sample}
    with pytest.raises(ValueError, match="needs 60 real images"):
        mini.real_sets(str(tmp_path / "d.npz"), 30)


def test_real_sets_from_tfds_split_the_train_split_in_halves(monkeypatch):
    from ddst_jax import data

    images = np.arange(40, dtype=np.uint8)[:, None, None, None] * np.ones((1, 32, 32, 3),
                                                                          np.uint8)

    class Source:  # the ImageSource protocol over 40 distinct images
        def __len__(self):
            return len(images)

        def read(self, indices):
            return images[indices], np.zeros(len(indices), np.int32)

    calls = []

    def load_source(config, *, seed):  # the real signature: seed is keyword-only
        calls.append((config.source, seed))
        return Source()

    monkeypatch.setattr(data, "load_source", load_source)
    reference, sample = mini.real_sets("tfds", 10)
    assert calls == [("tfds", 0)]
    assert reference.shape == sample.shape == (10, 32, 32, 3)
    assert set(reference[:, 0, 0, 0]) <= set(range(20, 40))  # the second half
    assert set(sample[:, 0, 0, 0]) <= set(range(20))  # sampled from the first half


def test_table_shows_mean_sample_std_and_n_and_dashes_for_missing_values():
    runs = [{"seed": s, "swd": swd, "br": br, "d_density": br}
            for s, swd, br in [(0, 10.0, 0.1), (1, 12.0, 0.2), (2, 14.0, 0.3)]]
    summaries = {"adapt": mini.summarise(runs),
                 "real": mini.summarise([{"seed": 0, "swd": 2.0}])}
    # Sample std (ddof 1), as experiments.report: sqrt(8 / 2) = 2, not sqrt(8 / 3).
    assert summaries["adapt"]["mean"]["swd"] == 12.0
    assert summaries["adapt"]["std"]["swd"] == pytest.approx(2.0)
    lines = mini.markdown_table(summaries).splitlines()
    assert lines[2] == "| adapt | 3 | 12.00 +- 2.00 | - | - | 0.200 +- 0.100 | 0.200 +- 0.100 |"
    assert lines[3] == "| real | 1 | 2.00 | - | - | - | - |"


def test_br_summary_is_the_median_of_the_second_half_so_one_blown_window_does_not_rule(
        tmp_path):
    settings = {"iterations": 100, "br_window": 10}
    br = {i: 0.2 for i in range(0, 101, 5)}
    br[80] = -330.0  # one window whose real-fake gap was ~0
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step, value in br.items():
            f.write(json.dumps({"step": step, "br/windowed": value, "density/d": 0.1}) + "\n")
    out = mini.br_summary(str(tmp_path), settings)
    assert out["br"] == pytest.approx(0.2)  # the mean would be ~-30
    assert out["d_density"] == pytest.approx(0.1)


def test_cli_runs_end_to_end_and_prints_the_json_line(tmp_path):
    _npz(tmp_path / "d.npz", n_train=64, n_test=16)
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_backend_optimization_level=0"}
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.mini_cifar10", "--quick", "--json",
         f"--workdir={tmp_path / 'runs'}", f"--data={tmp_path / 'd.npz'}",
         "--methods=adapt_relative", "--width=4", "--iterations=12", "--num_eval=16"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    means = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(means) == {"adapt_relative", "real"}
    assert set(means["adapt_relative"]) == set(mini.METRIC_KEYS)
    assert means["real"]["swd"] > 0 and means["adapt_relative"]["swd"] > means["real"]["swd"]
    written = set(os.listdir(tmp_path / "runs"))
    assert {"results.json", "curves.png", "samples_adapt_relative.png",
            "adapt_relative_seed0"} <= written
    # The image runner's relative band measured BR_ref and kept it in the controller state.
    with open(tmp_path / "runs" / "adapt_relative_seed0" / "summary.json") as f:
        controller = json.load(f)["controller"]
    assert controller["calibrated"] == 1 and math.isfinite(controller["reference"])


def test_bad_flags_end_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.mini_cifar10", "--quick", "--methods=adapt,nope",
         f"--workdir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=300,
        check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --methods: unknown ['nope']")
    assert "Traceback" not in proc.stderr


def test_br_scaling_variants_change_one_factor_and_quarters_skip_unfilled_windows():
    from experiments import br_scaling

    base = br_scaling.variant_config("base", 1000, 200,
                                     "x.npz", 0)
    for name, change in br_scaling.VARIANTS.items():
        c = br_scaling.variant_config(name, 1000, 200, "x.npz", 0)
        spec = train.validate_config(c)
        # G dynamic at d_G 0.1 and D static at the variant's density: no controller moves BR.
        assert spec.g_dynamic and spec.d_control == "static" and spec.g_density == 0.1
        assert spec.d_density == change.get("d_density", 0.1)
        differs = {k for k, (a, b) in {
            "width": (c.model.d_ch, base.model.d_ch), "lr": (c.train.lr_d, base.train.lr_d),
            "n_dis": (c.train.n_dis, base.train.n_dis),
            "d_density": (c.sparsity.d_density, base.sparsity.d_density)}.items() if a != b}
        assert differs == set(change), name
    steps, values = np.arange(10, 110, 10), np.arange(10.0)
    # Window 30: quarter 1 (iterations 1-25) has no full window; the others average theirs.
    np.testing.assert_equal(br_scaling.quarter_means(steps, values, 30, 100),
                            [np.nan, 3.0, 5.5, 8.0])
