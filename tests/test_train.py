"""End-to-end training: every method, resume, devices, controller in the loop, failures."""

import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from ddst_jax import checkpoint, data, train
from ddst_jax import sparsity as sp
from ddst_jax.gan import losses
from experiments.configs import cifar10 as cifar10_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
    """8 iterations, masks updated every 2, decisions every 2, BR every iteration."""
    c = cifar10_config.get_config("smoke")
    c.model.g_ch = 8
    c.model.d_ch = 8
    c.data.source = "synthetic"
    c.data.synthetic_size = 64
    c.data.prefetch = 0
    c.train.iterations = 8
    c.train.n_dis = 2
    c.train.batch_size_g = 8
    c.train.batch_size_d = 8
    c.train.log_every = 2
    c.train.checkpoint_every = 4
    c.train.sample_every = 8
    c.train.num_samples = 4
    c.train.progress_bar = False
    c.sparsity.g_density = 0.3
    c.sparsity.g_update_every = 2
    c.balance.br_every = 1
    c.balance.window = 2
    c.control.d_update_every = 2
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def restore_final(workdir, config, step=None):
    """The final (or ``step``'s) checkpointed state of a run, restored into a fresh abstract
    target on the mesh of ``config.parallel.num_devices``."""
    spec = train.validate_config(config)
    setup = train.build_setup(config, spec)
    init_fn, _, replicated = train.compile_fns(setup, config,
                                               train.make_mesh(config.parallel.num_devices))
    abstract = checkpoint.abstract_state(jax.eval_shape(init_fn, jax.random.key(config.seed)),
                                         sharding=replicated)
    with checkpoint.Checkpointer(workdir) as ckpt:
        return ckpt.restore(abstract, step=step), setup


METHODS = {
    "dense": {"sparsity.method": "dense"},
    "static_balance": {"sparsity.method": "static"},
    "static_strong_strict": {"sparsity.method": "static", "sparsity.d_mode": "strong",
                             "sparsity.setting": "strict"},
    "sdst_set_layer": {"sparsity.method": "sdst", "sparsity.regrow": "set",
                       "sparsity.scope": "layer", "sparsity.d_mode": "strong"},
    "sdst_rigl_policy": {"sparsity.method": "sdst", "sparsity.optimizer_policy": "rigl"},
    "adapt_relaxed": {"sparsity.method": "adapt"},
    "adapt_strict": {"sparsity.method": "adapt", "sparsity.setting": "strict"},
    "dda": {"sparsity.method": "dda"},
}


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_trains_with_exact_densities_and_logs_br(name, tmp_path):
    config = tiny_config(**METHODS[name])
    with tfds.testing.mock_data(num_examples=32):
        config.data.source = "tfds"
        summary = train.train_and_evaluate(config, str(tmp_path))
    assert summary["finished"] and summary["iteration"] == 8
    assert summary["memory"]["host_peak_rss_mb"] > 0  # peak memory of the run is recorded
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    br_rows = [r for r in rows if "br/ratio" in r]
    assert len(br_rows) >= 6  # measured every iteration (minus guarded ones)
    assert any("br/windowed" in r for r in rows)
    density_rows = read_jsonl(tmp_path / train.DENSITY_LOG)
    (restored, setup) = restore_final(str(tmp_path), config)
    state = restored.state
    spec = setup.sparsity.method
    g_counts = [sum(r["g_counts"]) for r in density_rows]
    d_counts = [sum(r["d_counts"]) for r in density_rows]
    if spec.masked:
        dens = jax.tree_util.tree_leaves(sp.erk_densities(state.g_params, spec.g_density))
        expected_g = sum(
            sp.count_for_density(d, int(np.size(p)))
            for (path, p), d in zip(jax.tree_util.tree_leaves_with_path(state.g_params), dens,
                                    strict=True)
            if sp.default_is_maskable(path, p))
        assert set(g_counts) == {expected_g}  # G's count never drifts
        assert int(sp.count_active(state.g_masks)) == expected_g
    else:
        assert summary["g_density"] == 1.0 and summary["d_density"] == 1.0
    # D's final count equals the controller's integer target.
    assert int(sp.count_active(state.d_masks)) == int(state.controller.count) == d_counts[-1]
    if spec.g_dynamic:
        # At least one G update happened: the per-layer layout changed under the same total.
        assert len({tuple(r["g_counts"]) for r in density_rows}) > 1 or spec.scope == "layer"
        assert summary["iteration"] > config.sparsity.g_update_every
    # The masked params are exactly zero at inactive entries, EMA too.
    for p, e, m in zip(jax.tree_util.tree_leaves(state.g_params),
                       jax.tree_util.tree_leaves(state.g_ema),
                       jax.tree_util.tree_leaves(state.g_masks), strict=True):
        assert not bool(jnp.any(jnp.where(m, 0.0, p) != 0))
        assert not bool(jnp.any(jnp.where(m, 0.0, e) != 0))
    for artefact in ("summary.json", "plots/br.png", "plots/density.png",
                     "samples/iter_0000008.png"):
        assert (tmp_path / artefact).exists(), artefact
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))


@pytest.mark.parametrize("band,direction", [((-1e9, -1e9 + 1), 1), ((1e9 - 1, 1e9), -1)])
def test_controller_in_the_loop_moves_d_density(band, direction, tmp_path):
    # A BR always above B+ means "D too weak": ADAPT must raise d_D; always below B-: lower it.
    config = tiny_config(**{"sparsity.method": "adapt", "control.band_low": band[0],
                            "control.band_high": band[1]})
    summary = train.train_and_evaluate(config, str(tmp_path))
    rows = read_jsonl(tmp_path / train.DENSITY_LOG)
    d = [sum(r["d_counts"]) for r in rows]
    n_d = summary["d_maskable"]
    step = sp.count_for_density(0.05, n_d)
    # Decisions after iterations 2, 4, 6 (the window of 2 entries is full from iteration 2).
    assert d == [d[0] + direction * k * step for k in range(4)]
    assert np.sign(summary["d_density"] - 0.3) == direction


class _StopAfter:
    """A stop flag that reports a stop request once ``n`` iterations have been checked.

    The runner also checks once before the first iteration (a signal during start-up), so
    the flag answers "no" ``n`` times after that first check.
    """

    def __init__(self, n):
        self.n, self.calls, self.signum = n + 1, 0, 15

    @property
    def requested(self):
        self.calls += 1
        return self.calls >= self.n

    def requested_anywhere(self):
        return self.requested

    def close(self):
        pass


def test_resume_continues_the_same_trajectory(tmp_path, monkeypatch):
    config = tiny_config(**{"sparsity.method": "adapt", "control.band_low": -1e9,
                            "control.band_high": -1e9 + 1})
    straight, split = tmp_path / "straight", tmp_path / "split"
    train.train_and_evaluate(config, str(straight))
    with monkeypatch.context() as m:
        m.setattr(checkpoint, "install_stop_handler", lambda *a, **k: _StopAfter(3))
        first = train.train_and_evaluate(config, str(split))
    assert not first["finished"] and first["iteration"] == 3
    second = train.train_and_evaluate(config, str(split))
    assert second["finished"] and second["iterations_this_session"] == 5
    a, _ = restore_final(str(straight), config)
    b, _ = restore_final(str(split), config)
    chex.assert_trees_all_equal(a.state, b.state)
    assert a.metadata["data_position"] == b.metadata["data_position"] == 16
    # The logs of the resumed run match the straight one (rows after the stop were dropped).
    rows_a = [r for r in read_jsonl(straight / "metrics.jsonl") if "br/ratio" in r]
    rows_b = [r for r in read_jsonl(split / "metrics.jsonl") if "br/ratio" in r]
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]
    np.testing.assert_allclose([r["br/ratio"] for r in rows_a], [r["br/ratio"] for r in rows_b])
    # Re-running a finished run reports it and trains nothing.
    again = train.train_and_evaluate(config, str(split))
    assert again["finished"] and again["iteration"] == 8


def _run_iterations(config, num_devices, n):
    config = tiny_config(**{**config, "parallel.num_devices": num_devices})
    spec = train.validate_config(config)
    setup = train.build_setup(config, spec)
    mesh = train.make_mesh(num_devices)
    init_fn, iterate, _ = train.compile_fns(setup, config, mesh)
    state = init_fn(jax.random.key(0))
    source = data.load_source(config.data, seed=0)
    metrics = []
    for p in range(n):
        batch = data.get_stacked_batch(source, p * 2, 8, 2, seed=0)
        batch = data.shard_batch(batch, mesh, batch_axis=1)
        state, m = iterate(state, batch["image"], batch["label"])
        metrics.append(jax.device_get(m))
    return state, metrics


def assert_masks_match(a, b, max_swapped_fraction=1e-3):
    """Masks of runs on different device counts: same per-leaf counts, near-identical sets.

    Initial masks come from the run key alone and are identical. After gradient-ranked updates
    a few near-tie entries may swap: the all-reduce order of the gradients differs between
    device counts, which changes their last bits and so the order of nearly equal scores.
    """
    swapped = total = 0
    for x, y in zip(jax.tree_util.tree_leaves(jax.device_get(a)),
                    jax.tree_util.tree_leaves(jax.device_get(b)), strict=True):
        assert int(x.sum()) == int(y.sum())  # exact counts per leaf
        swapped += int((x != y).sum())
        total += x.size
    assert swapped <= max(4, max_swapped_fraction * total), (swapped, total)


def test_eight_devices_match_one_device():
    assert jax.device_count() == 8
    overrides = {"sparsity.method": "adapt"}
    s1, m1 = _run_iterations(overrides, 1, 4)
    s8, m8 = _run_iterations(overrides, 8, 4)
    for a, b in zip(m1, m8, strict=True):
        np.testing.assert_allclose(a["loss/d"], b["loss/d"], rtol=2e-4, atol=2e-5)
        np.testing.assert_allclose(a["loss/g"], b["loss/g"], rtol=2e-4, atol=2e-5)
        np.testing.assert_array_equal(a["d_counts"], b["d_counts"])  # same decisions
        np.testing.assert_array_equal(a["g_counts"], b["g_counts"])
    assert_masks_match(s1.g_masks, s8.g_masks)
    assert_masks_match(s1.d_masks, s8.d_masks)
    assert len(s8.g_params["dense"]["kernel"].sharding.device_set) == 8


def test_initial_masks_are_identical_on_any_device_count():
    s1, _ = _run_iterations({"sparsity.method": "adapt"}, 1, 0)
    s8, _ = _run_iterations({"sparsity.method": "adapt"}, 8, 0)
    chex.assert_trees_all_equal(jax.device_get(s1.g_masks), jax.device_get(s8.g_masks))
    chex.assert_trees_all_equal(jax.device_get(s1.d_masks), jax.device_get(s8.d_masks))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    # The config of a method test above, so its compiled step can come from the cache.
    config = tiny_config(**METHODS["sdst_rigl_policy"])
    with monkeypatch.context() as m:
        m.setattr(checkpoint, "install_stop_handler", lambda *a, **k: _StopAfter(4))
        train.train_and_evaluate(config, str(tmp_path))
    ckpt_dir = tmp_path / "checkpoints"
    assert sorted(os.listdir(ckpt_dir)) == ["4"]
    before = sorted((p, os.path.getsize(os.path.join(r, p))) for r, _, fs in os.walk(ckpt_dir)
                    for p in fs)
    monkeypatch.setattr(losses, "g_hinge_loss", lambda scores: jnp.nan * jnp.mean(scores))
    with pytest.raises(train.TrainingDiverged, match="loss/g.*last good checkpoint"):
        train.train_and_evaluate(config, str(tmp_path))
    after = sorted((p, os.path.getsize(os.path.join(r, p))) for r, _, fs in os.walk(ckpt_dir)
                   for p in fs)
    assert sorted(os.listdir(ckpt_dir)) == ["4"] and before == after


@pytest.mark.parametrize("field,value,match", [
    ("sparsity.g_density", 1.5, "config.sparsity.*g_density"),
    ("sparsity.method", "adaptive", "config.sparsity.*Unknown method"),
    ("train.batch_size_d", 12, "config.train.batch_size_d.*divisible"),
    ("data.image_size", 48, "config.data.image_size"),
    ("model.name", "dcgan", "config.model.name"),
    ("model.g_ch", 0, "config.model: g_ch=0 is invalid"),
    ("control.band_low", 0.9, r"config.control: `band` must satisfy B- < B\+"),
    ("control.d_update_every", 0, "config.control.d_update_every"),
    ("control.controller", "pid", "config.control.controller: unknown controller 'pid'"),
    ("parallel.num_devices", 64, "config.parallel.num_devices: 64 devices asked for"),
    ("health.pinned_iterations", -1, "config.health.pinned_iterations"),
])
def test_bad_config_is_refused_before_compiling(field, value, match):
    with pytest.raises(ValueError, match=match):
        train.validate_config(tiny_config(**{field: value}))


def test_every_section_is_validated_before_the_data_loads(tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the data source was opened before the config was checked")

    monkeypatch.setattr(data, "load_source", no_loading)
    with pytest.raises(ValueError, match="config.control"):
        train.train_and_evaluate(tiny_config(**{"control.band_low": 0.9}), str(tmp_path))


def test_cli_missing_dataset_prints_one_clear_message(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.cifar10", f"--workdir={tmp_path / 'run'}",
         f"--config.data.data_dir={tmp_path / 'empty'}", "--config.data.download=False"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "error:" in proc.stderr and "source=npz" in proc.stderr
    assert "synthetic" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_help_documents_every_field():
    proc = subprocess.run([sys.executable, "-m", "experiments.cifar10", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    out = proc.stdout
    config = cifar10_config.get_config()

    def fields(prefix, node):
        for key, value in node.items():
            name = f"{prefix}.{key}" if prefix else key
            if hasattr(value, "items"):
                yield from fields(name, value)
            else:
                yield name

    missing = [f for f in fields("", config) if f"--config.{f}=" not in out]
    assert not missing, missing


def _stand_in_features(images):
    """A cheap deterministic 'Inception': pooled colour statistics as features."""
    x = images.astype(jnp.float32) / 255.0
    pool = jnp.concatenate([x.mean(axis=(1, 2)), x.std(axis=(1, 2)), x[:, ::8, ::8, :].reshape(
        x.shape[0], -1)], axis=1)
    return pool, pool[:, :10] * 10.0


def test_fid_and_is_inside_training_keep_the_best_checkpoint(tmp_path):
    config = tiny_config(**{"sparsity.method": "adapt", "eval.every": 4, "eval.num_samples": 24,
                            "eval.batch_size": 8})
    summary = train.train_and_evaluate(config, str(tmp_path),
                                       features_fn=jax.jit(_stand_in_features))
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "eval/fid" in r]
    assert [r["step"] for r in rows] == [4, 8]
    assert all(r["eval/fid"] > 0 and r["eval/is"] >= 1.0 for r in rows)
    best = min(rows, key=lambda r: r["eval/fid"])
    assert summary["best_fid"] == pytest.approx(best["eval/fid"])
    assert summary["best_fid_iteration"] == best["step"]
    assert os.listdir(tmp_path / "best") == [str(best["step"])]
    assert (tmp_path / "reference_stats.npz").exists()  # computed once from the data source


@pytest.mark.parametrize("module", ["stl10", "cifar10_biggan", "tiny_imagenet"])
def test_benchmark_configs_validate_at_full_size(module):
    import importlib

    config = importlib.import_module(f"experiments.configs.{module}").get_config()
    spec = train.validate_config(config, device_count=1, process_count=1)
    assert spec.name == "adapt" and config.data.image_size in (32, 48, 64)


def test_class_conditional_biggan_trains_with_labels(tmp_path):
    config = tiny_config(**{"model.name": "biggan32", "sparsity.method": "adapt",
                            "train.iterations": 4, "train.sample_every": 4,
                            "data.source": "tfds"})
    with tfds.testing.mock_data(num_examples=32):  # mocked CIFAR-10 with labels
        summary = train.train_and_evaluate(config, str(tmp_path))
    assert summary["finished"]
    restored, setup = restore_final(str(tmp_path), config)
    assert setup.model.num_classes == 10
    # The projection head and class embeddings stay dense (the model registry's predicate);
    # conv/dense kernels are masked.
    flags = {sp.path_str(p): m for p, m in jax.tree_util.tree_leaves_with_path(
        sp.maskable_tree(restored.state.d_params, setup.model.is_maskable))}
    assert not any(v for k, v in flags.items() if "embed" in k or "classifier" in k)
    assert any(v for k, v in flags.items() if k.endswith("kernel"))
    assert int(sp.count_active(restored.state.d_masks, is_maskable=setup.model.is_maskable)) == int(
        restored.state.controller.count)
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "br/ratio" in r]
    assert rows  # BR measured through the conditional forwards


@pytest.mark.parametrize("module", ["stl10", "tiny_imagenet"])
def test_each_other_benchmark_config_traces_an_iteration_on_its_own_data(module):
    # Traced, not compiled: compiling SNGAN-48 / BigGAN-64 costs minutes of CPU, so the
    # two-iteration runs of every config are `python -m benchmarks.config_runs`.
    from benchmarks import config_runs
    from ddst_jax.gan import steps

    widths, source = config_runs.CONFIGS[module]
    config = config_runs.small_config(module, widths, source)
    spec = train.validate_config(config)
    t = config.train
    with tfds.testing.mock_data(num_examples=16):
        with data.BatchIterator(data.load_source(config.data, seed=0), 0, t.batch_size_d,
                                seed=0, flip=config.data.flip, stack=t.n_dis,
                                prefetch=0) as batches:
            _, batch = next(batches)
    size = config.data.image_size
    assert batch["image"].shape == (t.n_dis, t.batch_size_d, size, size, 3)
    setup = train.build_setup(config, spec)
    state = jax.eval_shape(lambda k: steps.init_state(setup, k), jax.random.key(0))
    new_state, metrics = jax.eval_shape(lambda s, x, y: steps.train_iteration(setup, s, x, y),
                                        state, batch["image"], batch["label"])
    chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
    assert metrics["loss/d_steps"].shape == (t.n_dis,)
    classes = setup.model.num_classes
    labels = jnp.zeros((2,), jnp.int32) if classes else None
    samples = jax.eval_shape(lambda s: steps.generate(
        setup, s.g_ema, s.g_state, s.g_masks, jnp.zeros((2, setup.model.z_dim)), labels,
        train=False), state)
    assert samples.shape == (2, size, size, 3)
