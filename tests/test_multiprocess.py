"""Two JAX processes on localhost (4 fake CPU devices each) train like one process with 8."""

import os
import socket
import subprocess
import sys

import chex
import jax
import numpy as np
from test_train import assert_masks_match, read_jsonl, restore_final, tiny_config

from ddst_jax import train
from ddst_jax.gan import steps

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "multiprocess_worker.py")
# The step of test_train's 8-device test (same program, so compiled steps can be reused).
MP_OVERRIDES = {"sparsity.method": "adapt", "train.checkpoint_every": 4, "train.log_every": 4}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run_cluster(workdir, stop_after=0):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.path.dirname(HERE)}
    procs = [subprocess.Popen([sys.executable, WORKER, str(i), str(port), str(workdir),
                               str(stop_after)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    return outs


def test_two_processes_match_one_process_with_all_devices(tmp_path):
    multi, single = tmp_path / "multi", tmp_path / "single"
    # Two processes, stopped after 3 iterations and resumed: checkpoints written and restored
    # across processes.
    outs = _run_cluster(multi, stop_after=4)
    assert all("iteration 4 devices 8 processes 2" in o for o in outs)
    outs = _run_cluster(multi)
    assert all("iteration 8 devices 8 processes 2" in o for o in outs)
    # One process holding all 8 devices, straight through.
    config = tiny_config(**MP_OVERRIDES)
    train.train_and_evaluate(config, str(single))
    assert jax.device_count() == 8

    a, setup = restore_final(str(multi), config)  # a checkpoint written by two processes
    b, _ = restore_final(str(single), config)
    assert_masks_match(a.state.g_masks, b.state.g_masks)  # counts exact; near-tie swaps only
    assert_masks_match(a.state.d_masks, b.state.d_masks)
    assert int(a.state.controller.count) == int(b.state.controller.count)
    chex.assert_trees_all_equal(a.state.br_window.count, b.state.br_window.count)
    # Params are compared through the generator's output, not leaf by leaf: a conv bias right
    # before a BatchNorm has an exactly-zero gradient up to rounding, and Adam turns the
    # rounding noise of different reduction orders into +-lr steps of no consequence.
    z = jax.random.normal(jax.random.key(7), (4, setup.model.z_dim))
    images = [np.asarray(steps.generate(setup, s.state.g_params, s.state.g_state,
                                        s.state.g_masks, z)) for s in (a, b)]
    np.testing.assert_allclose(images[0], images[1], atol=2e-3)

    # Process 0 alone wrote the logs: one row per logged step, the same losses as one process.
    rows_m = [r for r in read_jsonl(multi / "metrics.jsonl") if "loss/d" in r]
    rows_s = [r for r in read_jsonl(single / "metrics.jsonl") if "loss/d" in r]
    assert [r["step"] for r in rows_m] == [r["step"] for r in rows_s] == [4, 8]
    for key in ("loss/d", "loss/g"):
        np.testing.assert_allclose([r[key] for r in rows_m], [r[key] for r in rows_s],
                                   rtol=2e-4, atol=2e-5)
    assert len(os.listdir(multi / "tensorboard")) >= 1
