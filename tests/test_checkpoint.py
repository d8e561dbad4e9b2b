"""Checkpoint round trips, damage handling, the best slot, and the stop-signal flag."""

import hashlib
import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ddst_jax.checkpoint import (
    Checkpointer,
    CheckpointError,
    abstract_state,
    install_stop_handler,
)


def _state(seed: int = 0) -> dict:
    """A small train state with every kind of leaf the runner checkpoints."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    params = {
        "dense": {"kernel": jax.random.normal(k1, (4, 3)), "bias": jnp.zeros((3,))},
        "conv": {"kernel": jax.random.normal(k2, (3, 3, 2, 5))},
    }
    return {
        "params": params,
        "opt_state": optax.adam(1e-3).init(params),  # tuple of namedtuples
        "masks": jax.tree.map(lambda p: jnp.abs(p) > 0.5, params),
        "ema": jax.tree.map(lambda p: (0.5 * p).astype(jnp.float32), params),
        "rng": jax.random.key(seed + 7),
        "step": jnp.int32(123),
        "br_window": {"values": jnp.full((5,), jnp.nan), "count": jnp.int32(2)},
    }


def _tree_hash(root: str) -> str:
    """Hash of every path and file content under `root`."""
    digest = hashlib.sha256()
    for directory, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        digest.update(os.path.relpath(directory, root).encode())
        for name in sorted(files):
            digest.update(name.encode())
            with open(os.path.join(directory, name), "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


def _truncate_files(directory: str) -> None:
    for parent, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(parent, name)
            size = os.path.getsize(path)
            if size > 1:
                with open(path, "r+b") as f:
                    f.truncate(size // 2)


def _assert_same_tree(restored, original) -> None:
    assert jax.tree.structure(restored) == jax.tree.structure(original)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(original), strict=True):
        assert got.dtype == want.dtype
        if jax.dtypes.issubdtype(want.dtype, jax.dtypes.prng_key):
            got, want = jax.random.key_data(got), jax.random.key_data(want)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_round_trip_restores_every_leaf_and_the_key_behaviour(tmp_path):
    state = _state()
    metadata = {"iteration": 123, "data_position": 4096, "finished": False,
                "config": {"g": {"density": 0.2}, "methods": ["ddst", "sdst"]}}
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.restore(abstract_state(state)) is None  # nothing saved yet
        assert ckpt.save(123, state, metadata)
        restored, meta = ckpt.restore(jax.eval_shape(lambda: state))
    _assert_same_tree(restored, state)
    assert type(restored["opt_state"][0]) is type(state["opt_state"][0])
    assert meta == metadata
    # The restored typed key draws the same numbers as the original.
    np.testing.assert_array_equal(jax.random.normal(restored["rng"], (6,)),
                                  jax.random.normal(state["rng"], (6,)))


def test_steps_and_max_to_keep(tmp_path):
    state = _state()
    with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        for step in (10, 20, 30):
            assert ckpt.save(step, state, {"iteration": step})
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [20, 30]
        assert ckpt.latest_step() == 30
        # An existing step is left alone unless forced.
        assert not ckpt.save(30, state, {"iteration": -1})
        assert ckpt.restore(abstract_state(state)).metadata == {"iteration": 30}
        assert ckpt.save(30, state, {"iteration": 31}, force=True)
        assert ckpt.restore(abstract_state(state)).metadata == {"iteration": 31}
        assert ckpt.restore(abstract_state(state), step=20).metadata == {"iteration": 20}
        with pytest.raises(CheckpointError, match="No checkpoint for step 5"):
            ckpt.restore(abstract_state(state), step=5)
    with Checkpointer(tmp_path, max_to_keep=2) as reopened:
        assert reopened.all_steps() == [20, 30]


def test_bad_arguments_are_rejected(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(TypeError, match="JSON-serializable"):
            ckpt.save(1, _state(), {"array": np.zeros(2)})
        with pytest.raises(ValueError, match="non-negative int"):
            ckpt.save(-1, _state(), {})
        assert ckpt.all_steps() == []
    with pytest.raises(ValueError, match="max_to_keep"):
        Checkpointer(tmp_path, max_to_keep=0)


def test_damaged_latest_step_raises_and_can_fall_back(tmp_path):
    state = _state()
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state, {"iteration": 1})
        ckpt.save(2, jax.tree.map(lambda x: x, state), {"iteration": 2})
    step_dir = os.path.join(tmp_path, "checkpoints", "2")
    _truncate_files(os.path.join(step_dir, "state"))
    with Checkpointer(tmp_path) as ckpt:
        before = _tree_hash(tmp_path)
        with pytest.raises(CheckpointError) as info:
            ckpt.restore(abstract_state(state))
        message = str(info.value)
        assert step_dir in message and "delete" in message and "fallback" in message
        assert _tree_hash(tmp_path) == before  # a failed restore modifies nothing

        restored, meta = ckpt.restore(abstract_state(state), fallback_to_previous=True)
        assert meta == {"iteration": 1}
        _assert_same_tree(restored, state)
        assert _tree_hash(tmp_path) == before


def test_missing_metadata_item_is_reported(tmp_path):
    state = _state()
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state, {"iteration": 1})
    metadata_dir = os.path.join(tmp_path, "checkpoints", "1", "metadata")
    for name in os.listdir(metadata_dir):
        os.remove(os.path.join(metadata_dir, name))
    os.rmdir(metadata_dir)
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(CheckpointError, match="metadata"):
            ckpt.restore(abstract_state(state))
        # No older step to fall back to: the error still names the damaged step.
        with pytest.raises(CheckpointError, match=r"checkpoints/1"):
            ckpt.restore(abstract_state(state), fallback_to_previous=True)


def test_structure_mismatch_is_a_clear_error_without_fallback(tmp_path):
    state = _state()
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state, {})
        ckpt.save(2, state, {})
        ckpt.wait_until_finished()  # saves are asynchronous
        other = dict(state, extra=jnp.zeros(2))
        other["masks"] = dict(other["masks"], dense={"kernel": jnp.zeros((5, 3), bool),
                                                     "bias": jnp.zeros((3,), bool)})
        before = _tree_hash(tmp_path)
        with pytest.raises(CheckpointError) as info:
            ckpt.restore(abstract_state(other), fallback_to_previous=True)
        message = str(info.value)
        assert "does not match" in message and "extra" in message
        assert "masks/dense/kernel is bool[4, 3] in the checkpoint but bool[5, 3]" in message
        assert "fresh --workdir" in message
        with pytest.raises(CheckpointError, match="float32"):  # int -> float changes the kind
            ckpt.restore(abstract_state(dict(state, step=jnp.float32(0))))
        assert _tree_hash(tmp_path) == before


def test_restore_into_replicated_mesh_sharding(tmp_path):
    mesh = jax.make_mesh((8,), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = _state()
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(5, state, {})
        restored, _ = ckpt.restore(abstract_state(state, replicated))
    for leaf in jax.tree.leaves(restored):
        assert leaf.sharding.is_equivalent_to(replicated, leaf.ndim)
        assert len(leaf.sharding.device_set) == 8
    _assert_same_tree(restored, state)


def test_best_slot_keeps_the_lowest_metric(tmp_path):
    state, better = _state(0), _state(1)
    with Checkpointer(tmp_path, max_to_keep=1) as ckpt:
        assert ckpt.restore_best(abstract_state(state)) is None
        assert ckpt.save_best(100, state, 30.0, {"iteration": 100})
        assert not ckpt.save_best(200, better, 35.0)  # worse: not saved
        assert not ckpt.save_best(250, better, float("nan"))
        assert ckpt.save_best(300, better, 20.0, {"iteration": 300})
        ckpt.save(300, state, {"iteration": 300})
        ckpt.wait_until_finished()
        assert ckpt.best_step() == 300 and ckpt.best_value() == 20.0
        assert ckpt.all_steps() == [300]  # periodic checkpoints are separate
    with Checkpointer(tmp_path, max_to_keep=1) as reopened:
        assert reopened.best_value() == 20.0  # read back from disk
        assert not reopened.save_best(400, state, 25.0)
        restored, meta = reopened.restore_best(abstract_state(state))
    assert meta == {"iteration": 300}
    _assert_same_tree(restored, better)
    assert sorted(os.listdir(os.path.join(tmp_path, "best"))) == ["300"]


def test_best_slot_ranks_by_metric_not_by_step(tmp_path):
    # A run resumed from an older checkpoint can find a better value at a lower step.
    state = _state()
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save_best(1000, state, 12.0, {"iteration": 1000})
        assert ckpt.save_best(900, state, 11.0, {"iteration": 900})
        ckpt.wait_until_finished()
        assert ckpt.best_step() == 900
        assert ckpt.restore_best(abstract_state(state)).metadata == {"iteration": 900}
    assert os.listdir(os.path.join(tmp_path, "best")) == ["900"]
    with Checkpointer(tmp_path, best_mode="max") as ckpt:
        assert ckpt.best_value() == 11.0 and not ckpt.save_best(950, state, 10.0)


def _wait_for(predicate) -> bool:
    for _ in range(200):
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


def test_stop_handler_sets_flag_then_second_signal_uses_previous_handler():
    received = []
    previous = lambda signum, frame: received.append(signum)
    original = signal.signal(signal.SIGTERM, previous)
    try:
        flag = install_stop_handler(signals=(signal.SIGTERM,))
        assert not flag and signal.getsignal(signal.SIGTERM) is not previous
        os.kill(os.getpid(), signal.SIGTERM)
        assert _wait_for(lambda: flag.requested)
        assert flag.signum == signal.SIGTERM and not received
        # The second signal restores the previous handler and is delivered to it.
        os.kill(os.getpid(), signal.SIGTERM)
        assert _wait_for(lambda: received == [signal.SIGTERM])
        assert signal.getsignal(signal.SIGTERM) is previous
        assert flag.requested_anywhere()

        with install_stop_handler(signals=(signal.SIGTERM,)) as second:
            assert signal.getsignal(signal.SIGTERM) is not previous
            assert not second
        assert signal.getsignal(signal.SIGTERM) is previous  # restored on close
    finally:
        signal.signal(signal.SIGTERM, original)


def test_stop_handler_requires_the_main_thread():
    errors = []

    def install():
        try:
            install_stop_handler()
        except RuntimeError as e:
            errors.append(str(e))

    thread = threading.Thread(target=install)
    thread.start()
    thread.join()
    assert errors and "main thread" in errors[0]
