"""A run whose --workdir is a bucket (gs://): every file goes through epath, and it resumes.

No test can reach a real bucket, so ``gs://`` is served by a stand-in at the cloud-client
layer, below everything the project and its libraries do:

* epath's backend for ``gs://`` (in production ``gcsfs`` through fsspec, or ``tf.io.gfile``)
  is ``FakeBucket``: objects stored under a local folder, with an object store's rules (no
  append; a written object appears only when its upload completes, whole);
* tensorstore's ``gcs`` driver, which orbax uses for the array data, is pointed at the same
  folder through tensorstore's ``file`` driver (orbax's ``get_kvstore_for_gcs``);
* orbax's Google Cloud Storage client, which it asks whether the bucket has a hierarchical
  namespace, answers "no" (a default bucket).

Everything above that -- the runner, ``ddst_jax.storage``, orbax's GCS code paths (commit-file
atomicity instead of renames), tensorboardX, matplotlib -- runs unchanged. The test runs from
an empty current directory: a write that bypasses epath and treats ``gs://b/x`` as a local
path lands there (as ``gs:/b/x``), and the test fails.
"""

from __future__ import annotations

import io
import json
import os
import socket
import types

import chex
import jax
import pytest
from etils import epath
from etils.epath import backend as epath_backend
from etils.epath import gpath
from orbax.checkpoint._src.path import gcs_utils
from test_train import _stand_in_features, _StopAfter, tiny_config

from ddst_jax import checkpoint, rundir, storage, train
from experiments import report

PREFIX = "gs://"


class _Upload(io.BytesIO):
    """A write to an object: nothing is visible until ``close`` stores it whole."""

    def __init__(self, target: str):
        super().__init__()
        self._target = target

    def close(self) -> None:
        if not self.closed:
            os.makedirs(os.path.dirname(self._target), exist_ok=True)
            with open(self._target, "wb") as f:
                f.write(self.getvalue())
        super().close()


class FakeBucket(epath_backend.Backend):
    """epath's ``gs://`` backend over a local folder (``gs://b/x`` is ``root/b/x``).

    Object-store rules that local files lack: no append mode (GCS has none), and an object
    written through ``open`` appears only on close.
    """

    def __init__(self, root: str):
        self.root = root
        self.os = epath_backend.os_backend

    def local(self, path) -> str:
        path = os.fspath(path)
        assert path.startswith(PREFIX), path
        return os.path.join(self.root, path[len(PREFIX):])

    def uri(self, local: str) -> str:
        return PREFIX + os.path.relpath(os.fspath(local), self.root)

    def open(self, path, mode):
        if "a" in mode or "+" in mode:
            raise NotImplementedError(f"{path}: an object store has no mode {mode!r}.")
        if "r" in mode:
            return self.os.open(self.local(path), mode)
        upload = _Upload(self.local(path))
        return upload if "b" in mode else io.TextIOWrapper(upload, encoding="utf-8")

    def exists(self, path):
        return self.os.exists(self.local(path))

    def isdir(self, path):
        return self.os.isdir(self.local(path))

    def listdir(self, path):
        return self.os.listdir(self.local(path))

    def glob(self, path):
        return [self.uri(p) for p in self.os.glob(self.local(path))]

    def walk(self, top, *, top_down=True, on_error=None):
        for root, dirs, files in self.os.walk(self.local(top), top_down=top_down,
                                              on_error=on_error):
            yield self.uri(root), dirs, files

    def makedirs(self, path, *, exist_ok=False, mode=None):
        self.os.makedirs(self.local(path), exist_ok=exist_ok)

    def mkdir(self, path, *, exist_ok=False, mode=None):
        self.os.mkdir(self.local(path), exist_ok=exist_ok)

    def rmtree(self, path):
        self.os.rmtree(self.local(path))

    def remove(self, path):
        self.os.remove(self.local(path))

    def rename(self, path, dst):
        self.os.rename(self.local(path), self.local(dst))

    def replace(self, path, dst):
        self.os.replace(self.local(path), self.local(dst))

    def copy(self, path, dst, overwrite=False):
        self.os.copy(self.local(path), self.local(dst), overwrite=overwrite)

    def stat(self, path):
        return self.os.stat(self.local(path))


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """``gs://`` served from ``tmp_path/bucket``; the test runs in the empty ``tmp_path/cwd``,
    which must still be empty at the end (nothing bypassed epath)."""
    fake = FakeBucket(str(tmp_path / "bucket"))
    os.makedirs(fake.root)
    monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "gs", fake)
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # else gfile is chosen
    monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs",
                        lambda path: {"driver": "file", "path": fake.local(path)})
    monkeypatch.setattr(gcs_utils, "get_bucket",
                        lambda name: types.SimpleNamespace(hierarchical_namespace_enabled=False))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield fake
    assert sorted(os.listdir(cwd)) == [], "a write bypassed epath: it landed in the local cwd"


def _files(folder: str) -> set[str]:
    """Every file below ``folder``, relative to it."""
    return {os.path.relpath(os.path.join(root, name), folder)
            for root, _, names in os.walk(folder) for name in names}


def test_fake_bucket_has_no_append_and_uploads_on_close(bucket):
    path = "gs://b/x.txt"
    with pytest.raises(NotImplementedError):
        epath.Path(path).open("a")
    with epath.Path(path).open("w") as f:
        f.write("partial")
        assert not os.path.exists(bucket.local(path))  # not visible before the upload ends
    assert storage.read_text(path) == "partial"


def test_appender_on_a_bucket_uploads_whole_file_on_flush(bucket):
    path = "gs://b/logs/metrics.jsonl"
    storage.write_text(path, '{"step": 1}\n')
    log = storage.Appender(path, interval_s=3600.0)
    log.write('{"step": 2}\n')
    assert storage.read_text(path) == '{"step": 1}\n'  # buffered: no upload yet
    log.flush()
    assert storage.read_text(path) == '{"step": 1}\n{"step": 2}\n'
    log.write('{"step": 3}\n')
    log.close()
    assert storage.read_text(path).count("\n") == 3


def test_bucket_lock_is_a_marker_refusing_a_live_holder_on_this_host(bucket):
    workdir = "gs://b/run"
    storage.makedirs(workdir)
    lock = rundir.RunLock(workdir).acquire()
    assert storage.exists(storage.join(workdir, rundir.LOCK_NAME))
    # Another live process of this host (pid 1 stands in for it) holds the marker.
    storage.write_text(storage.join(workdir, rundir.LOCK_NAME),
                       json.dumps({"pid": 1, "host": socket.gethostname()}))
    with pytest.raises(rundir.WorkdirLocked, match="in use by another run"):
        rundir.RunLock(workdir).acquire()
    # A marker from another host cannot be checked: a warning names it and the run goes on.
    storage.write_text(storage.join(workdir, rundir.LOCK_NAME),
                       json.dumps({"pid": 7, "host": "elsewhere", "since": "t0"}))
    other = rundir.RunLock(workdir).acquire()
    assert "another host" in other.stale_message() and "elsewhere" in other.stale_message()
    other.release()
    lock.release()
    assert not storage.exists(storage.join(workdir, rundir.LOCK_NAME))


def test_bucket_workdir_without_its_filesystem_package_is_one_line(bucket, monkeypatch):
    def missing(*args, **kwargs):
        raise ImportError("Install gcsfs to access Google Storage")  # fsspec's own words

    with monkeypatch.context() as m:
        m.setattr(bucket, "exists", missing)
        with pytest.raises(rundir.WorkdirUnusable, match=r"gcsfs.*pip install -e '\.\[cloud\]'"):
            rundir.prepare_workdir("gs://b/run")
    storage.write_text("gs://b/file", "x")
    with pytest.raises(rundir.WorkdirUnusable, match="is a file"):
        rundir.prepare_workdir("gs://b/file")


def test_a_run_in_a_bucket_writes_everything_there_and_resumes(bucket, monkeypatch):
    workdir = "gs://test-bucket/runs/smoke"
    # One device: the 8-device mesh would only add compile time; the mesh is not under test.
    config = tiny_config(**{"sparsity.method": "adapt", "parallel.num_devices": 1,
                            "eval.every": 4, "eval.num_samples": 24, "eval.batch_size": 8})
    features = jax.jit(_stand_in_features)
    saved, restored, uploaded = {}, [], {}
    metrics = storage.join(workdir, "metrics.jsonl")
    copy = lambda tree: jax.tree.map(lambda x: x.copy(), tree)  # the loop donates its buffers
    save, restore = checkpoint.Checkpointer.save, checkpoint.Checkpointer.restore

    def recording_save(self, step, state, metadata=None, *, force=False):
        saved[step] = copy(state)
        # What a crash now would leave in the bucket: the log rows uploaded so far.
        rows = storage.read_text(metrics).splitlines()
        uploaded[step] = [json.loads(row)["step"] for row in rows]
        return save(self, step, state, metadata, force=force)

    def recording_restore(self, target):
        result = restore(self, target)
        restored.append(result and result._replace(state=copy(result.state)))
        return result

    monkeypatch.setattr(checkpoint.Checkpointer, "save", recording_save)
    monkeypatch.setattr(checkpoint.Checkpointer, "restore", recording_restore)
    with monkeypatch.context() as m:  # stopped (as by SIGTERM) after iteration 5
        m.setattr(checkpoint, "install_stop_handler", lambda *a, **k: _StopAfter(5))
        first = train.train_and_evaluate(config, workdir, features_fn=features)
    assert not first["finished"] and first["iteration"] == 5
    second = train.train_and_evaluate(config, workdir, features_fn=features)
    assert second["finished"] and second["iterations_this_session"] == 3
    # The resume restored iteration 5 from the bucket, exactly as it was saved.
    assert restored[-1].metadata["iteration"] == 5
    chex.assert_trees_all_equal(restored[-1].state, saved[5])
    # Before each checkpoint the logs up to its step were in the bucket (not only in memory).
    assert sorted(uploaded) == [4, 5, 8]
    assert all(max(rows) == step for step, rows in uploaded.items())

    assert report.main([workdir, "--out", "gs://test-bucket/report"]) == 0
    run = _files(bucket.local(workdir))
    for expected in ("config.json", "summary.json", "metrics.jsonl", "density_log.jsonl",
                     "reference_stats.npz", "samples/iter_0000008.png", "plots/br.png",
                     "plots/density.png"):
        assert expected in run, expected
    assert any(f.startswith("checkpoints/8/") for f in run)
    assert any(f.startswith("best/") for f in run)
    assert rundir.LOCK_NAME not in run  # the marker goes with the run
    events = [f for f in run if f.startswith("tensorboard/events.out.tfevents")]
    assert events  # one per session (two, unless both started in the same second)
    assert all(b"loss/d" in storage.read_bytes(storage.join(workdir, f)) for f in events)
    # Every iteration's BR row once: rows after the stop's checkpoint were dropped on resume
    # and none was lost between uploads.
    rows = [json.loads(line) for line in storage.read_text(
        storage.join(workdir, "metrics.jsonl")).splitlines()]
    assert [r["step"] for r in rows if "br/ratio" in r] == list(range(1, 9))
    assert json.loads(storage.read_text(storage.join(workdir, "summary.json")))["finished"]
    assert {"report.txt", "report.json", "cifar10_curves.png"} <= _files(
        bucket.local("gs://test-bucket/report"))
