"""A checkpoint written on 8 devices resumes on 4, 2 and 1 with the same state.

What is bitwise and what is within tolerance (README, "Resuming on other hardware"):

* Restoring is exact: every leaf (parameters, optimizer moments, masks, EMA, BatchNorm and
  spectral-norm state, BR window, controller, iteration counter, PRNG key) comes back bit for
  bit on any device count, placed on the new mesh.
* Continuing on the same device count is exact too: the resumed run ends bitwise where the
  uninterrupted one does (tests/test_train.py, test_resume_continues_the_same_trajectory, on
  the session's 8 devices).
* Continuing on another device count (here 2, through the runner) is exact for what is computed
  from integers and keys (counter, PRNG key, BR window count, the controller's decisions, the
  per-layer mask counts) and within tolerance for floats: each device holds batch / M examples,
  so the gradient all-reduce adds in another order and the last bits differ; Adam then turns
  exactly-zero gradients' rounding noise into +-lr steps, so parameters are compared through the
  generator's output, and gradient-ranked mask updates may swap near-tie entries. A BR within
  rounding of a band edge could make a decision differ; none does here.

The writing run is the 8-device run of tests/test_train.py and tests/test_multiprocess.py (same
compiled program); the resuming side is a fresh process with only 4 devices
(tests/resume_devices_worker.py), so the devices the checkpoint was written from do not exist
there. It restores on 4, 2 and 1 of its devices (a mesh over M of them is what a machine with M
devices runs) and continues through the runner on 2 (each runner resume costs ~10 s here).
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from test_multiprocess import MP_OVERRIDES
from test_train import assert_masks_match, read_jsonl, restore_final, tiny_config

from ddst_jax import train
from ddst_jax.gan import steps

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "resume_devices_worker.py")
RESUME_OVERRIDES = MP_OVERRIDES  # checkpoints at 4 and 8, ADAPT: masks and D density move
WRITTEN_STEP = 4
COUNTS = (4, 2, 1)
CONTINUE_ON = 2  # the batch split over 2 devices instead of 8
# Leaves computed from integers and keys only: equal on any device count (names from
# ``state_arrays``).
EXACT_AFTER_CONTINUING = ("step", "key", "br_window/count", "controller/count",
                          "controller/level")


def state_arrays(state) -> dict[str, np.ndarray]:
    """Every leaf of a train state as a host array named by its path ("g_params/dense/kernel");
    typed PRNG keys as their key data."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        out[jax.tree_util.keystr(path, simple=True, separator="/")] = np.asarray(
            jax.device_get(leaf))
    return out


def sample_images(setup, state) -> np.ndarray:
    """(4, 32, 32, 3) float32: the generator's output on a fixed noise batch (train-mode BN)."""
    z = jax.random.normal(jax.random.key(7), (4, setup.model.z_dim))
    return np.asarray(steps.generate(setup, state.g_params, state.g_state, state.g_masks, z))


def _losses(workdir) -> dict[int, tuple[float, float]]:
    return {r["step"]: (r["loss/d"], r["loss/g"])
            for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "loss/d" in r}


def _resume_elsewhere(written, out) -> str:
    env = {**os.environ, "PYTHONPATH": os.path.dirname(HERE)}
    proc = subprocess.run([sys.executable, WORKER, str(written), str(out), *map(str, COUNTS)],
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc.stdout


def test_checkpoint_written_on_8_devices_resumes_on_4_2_and_1(tmp_path):
    assert jax.device_count() == 8
    config = tiny_config(**RESUME_OVERRIDES)
    straight, written = tmp_path / "straight", tmp_path / "written"
    train.train_and_evaluate(config, str(straight))  # 8 iterations, checkpoints at 4 and 8
    saved = state_arrays(restore_final(str(straight), config, step=WRITTEN_STEP)[0].state)
    final, setup = restore_final(str(straight), config)
    want = state_arrays(final.state)
    # As if preempted between the two checkpoints: the run resumes from iteration 4.
    shutil.copytree(straight, written)
    shutil.rmtree(written / "checkpoints" / "8")

    out = tmp_path / "elsewhere"
    out.mkdir()
    printed = _resume_elsewhere(written, out)
    for m in COUNTS:
        assert f"restored on {m} of 4 devices" in printed
        # Restoring: bit for bit, every leaf, placed on the M devices of the new mesh.
        restored = np.load(out / f"restored_{m}.npz")
        assert sorted(restored.files) == sorted(saved)
        for name, value in saved.items():
            np.testing.assert_array_equal(restored[name], value, err_msg=f"{name} on {m}")
            assert restored[name].dtype == value.dtype, name
        with open(out / f"restored_{m}.json", encoding="utf-8") as f:
            assert json.load(f) == {"devices_per_leaf": [m]}

    # Continuing on CONTINUE_ON devices, compared with the uninterrupted 8-device run.
    got = np.load(out / "final.npz")
    for name in EXACT_AFTER_CONTINUING:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    for net in ("g_masks", "d_masks"):
        names = [n for n in want if n.startswith(net + "/")]
        assert_masks_match([got[n] for n in names], [want[n] for n in names])
    np.testing.assert_allclose(got["images"], sample_images(setup, final.state), atol=2e-3)
    straight_losses, resumed_losses = _losses(straight), _losses(out / "resumed")
    assert sorted(resumed_losses) == sorted(straight_losses) == [4, 8]
    assert resumed_losses[4] == straight_losses[4]  # logged before the checkpoint, kept
    np.testing.assert_allclose(resumed_losses[8], straight_losses[8], rtol=2e-4, atol=2e-5)
    with open(out / "resumed" / "config_history.jsonl", encoding="utf-8") as f:
        (change,) = [json.loads(line) for line in f]
    assert change["changes"] == {"parallel.num_devices": [0, CONTINUE_ON]}


@pytest.mark.parametrize("batch,visible,processes,suggested", [
    (12, 8, 1, 6),   # 12 and 24 on 8 devices: 6 splits both
    (16, 12, 1, 8),
    (8, 8, 2, 8),
    (6, 4, 2, 2),    # multi-process: a multiple of the process count
    (7, 4, 2, None),
])
def test_most_devices_that_split_every_batch(batch, visible, processes, suggested):
    assert train.usable_device_count([batch, 2 * batch], visible, processes) == suggested


def test_indivisible_batch_names_the_device_count_that_works():
    with pytest.raises(ValueError, match=(
            r"config.train.batch_size_d: 12 is not divisible by the 8 devices.*"
            r"--config.parallel.num_devices=4, or use a multiple")):
        train.validate_config(tiny_config(**{"train.batch_size_d": 12}))
