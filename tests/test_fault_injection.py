"""Fault injection: what happens to a run directory when things go wrong.

One test per case of the README's "What happens when" table: two runs on one workdir (and a
2-process cluster on a held one), a run killed with -9, a signal to a grid, a resume with a
changed config, an extended run, a collapsed run, and each bad input (misspelt field, a file or
a read-only directory as workdir, a full disk, non-finite numbers, Ctrl-C during start-up,
offline dataset preparation). Each checks the message, and that what was already written is
neither lost nor changed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import pytest
from test_train import _StopAfter, read_jsonl, tiny_config

from ddst_jax import checkpoint, datasets, rundir, train
from ddst_jax.datasets import tiny_imagenet
from experiments import grid, report, runner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.join(REPO, "tests")
SMOKE = ["--config=experiments/configs/cifar10.py:smoke", "--config.data.source=synthetic"]
# absl's INFO line prefix, e.g. "I1202 09:25:02.385036 1400... file.py:74] ..."
_ABSL_INFO = re.compile(r"^I\d{4} \d\d:\d\d:\d\d", re.M)


def _env() -> dict[str, str]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_backend_optimization_level=0"}
    cache = jax.config.jax_compilation_cache_dir  # conftest's: re-runs skip the compiles
    if cache:
        env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1")
    return env


def _cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "experiments.cifar10", *args], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=timeout)


def _popen_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "experiments.cifar10", *args], cwd=REPO,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _snapshot(workdir) -> dict[str, str]:
    """Every file under ``workdir`` -> sha256 of its bytes."""
    out = {}
    for root, _, files in os.walk(workdir):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, workdir)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _lines(text: str) -> list[str]:
    """Non-empty lines of a captured stream, with progress-bar redraws removed."""
    return [line for line in text.replace("\r", "\n").splitlines()
            if line.strip() and "it/s" not in line and "s/it" not in line]


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _lock_held(workdir) -> bool:
    path = os.path.join(workdir, rundir.LOCK_NAME)
    return os.path.exists(path) and os.path.getsize(path) > 0


# ----------------------------------------------------------------------------- one writer


def test_second_run_on_a_workdir_refuses_and_the_first_finishes_untouched(tmp_path):
    workdir = tmp_path / "run"
    first = _popen_cli(*SMOKE, f"--workdir={workdir}", "--config.seed=0",
                       "--config.train.iterations=20")
    _wait_for(lambda: _lock_held(workdir) or first.poll() is not None, 300, "the first lock")
    second = _cli(*SMOKE, f"--workdir={workdir}", "--config.seed=1", timeout=300)
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert second.returncode == 1
    lines = _lines(second.stderr)
    assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
    assert re.search(rf"in use by another run \(pid {first.pid} on host \S+ since \d{{4}}-",
                     lines[0]), lines[0]
    # The first run's files are its own: seed 0 everywhere, one density-log row per change.
    with open(workdir / "config.json", encoding="utf-8") as f:
        assert json.load(f)["seed"] == 0
    with open(workdir / "summary.json", encoding="utf-8") as f:
        summary = json.load(f)
    assert summary["config"]["seed"] == 0 and summary["finished"]
    steps = [row["iteration"] for row in read_jsonl(workdir / "density_log.jsonl")]
    assert steps == sorted(set(steps)) and steps[0] == 0
    # Quiet by default: no library INFO lines, only the progress bar and the runner's lines.
    assert not _ABSL_INFO.search(err), err[:2000]
    assert out.strip() == f"Run finished at iteration 20 in {workdir}."
    assert os.path.getsize(workdir / rundir.LOCK_NAME) == 0  # released


def test_lock_of_a_killed_run_is_detected_and_explained(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from ddst_jax.rundir import RunLock; "
         "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)",
         str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(rundir.WorkdirLocked, match=rf"pid {holder.pid} on host"):
            rundir.RunLock(str(tmp_path)).acquire()
    finally:
        holder.kill()  # kill -9: no chance to release
        holder.wait()
    lock = rundir.RunLock(str(tmp_path)).acquire()
    message = lock.stale_message()
    lock.release()
    assert message and f"pid {holder.pid}" in message and "no longer holds it" in message
    with rundir.RunLock(str(tmp_path)) as clean:  # released properly: nothing to explain
        assert clean.stale_message() is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _lock_cluster(workdir) -> list[str]:
    port = _free_port()
    env = {**_env(), "PYTHONPATH": REPO}
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "lock_worker.py"), str(i),
                               str(port), str(workdir)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        outs.append(out.strip().splitlines()[-1])
    return outs


def test_a_cluster_takes_one_lock_and_every_process_learns_the_outcome(tmp_path):
    with rundir.RunLock(str(tmp_path)):  # another run holds the workdir
        outs = _lock_cluster(tmp_path)
    assert all(o.startswith("refused:") for o in outs), outs
    assert f"pid {os.getpid()}" in outs[0]  # process 0 names the holder
    assert _lock_cluster(tmp_path) == ["held", "not process 0"]


# ----------------------------------------------------------------------------- resumes


def test_resume_with_a_different_config_refuses_and_changes_nothing(tmp_path, monkeypatch):
    config = tiny_config(**{"sparsity.method": "adapt", "sparsity.g_density": 0.3})
    with monkeypatch.context() as m:
        m.setattr(checkpoint, "install_stop_handler", lambda *a, **k: _StopAfter(4))
        assert train.train_and_evaluate(config, str(tmp_path))["iteration"] == 4
    before = _snapshot(tmp_path)
    other = tiny_config(**{"sparsity.method": "static", "sparsity.g_density": 0.5})
    with pytest.raises(rundir.ConfigMismatch) as e:
        train.train_and_evaluate(other, str(tmp_path))
    message = str(e.value)
    assert "at iteration 4" in message
    assert "sparsity.method: 'adapt' (run) vs 'static' (now)" in message
    assert "sparsity.g_density: 0.3 (run) vs 0.5 (now)" in message
    assert "--change=sparsity.g_density,sparsity.method" in message
    assert _snapshot(tmp_path) == before  # nothing written, nothing lost
    # The run's own config resumes it.
    assert train.train_and_evaluate(config, str(tmp_path))["finished"]


def test_extending_a_finished_run_is_explicit_recorded_and_continues(tmp_path):
    # G updates every 2 iterations, never at a run's final iteration.
    config = tiny_config(**{"sparsity.method": "sdst", "train.iterations": 4})
    assert train.train_and_evaluate(config, str(tmp_path))["finished"]
    longer = tiny_config(**{"sparsity.method": "sdst", "train.iterations": 8})
    with pytest.raises(rundir.ConfigMismatch, match=r"train\.iterations: 4 \(run\) vs 8 \(now\)"
                       r".*--change=train\.iterations"):
        train.train_and_evaluate(longer, str(tmp_path))
    summary = train.train_and_evaluate(longer, str(tmp_path), allow_changes=["train.iterations"])
    assert summary["finished"] and summary["iteration"] == 8
    assert summary["iterations_this_session"] == 4
    history = rundir.read_history(str(tmp_path))
    assert [(h["iteration"], h["changes"]) for h in history] == [
        (4, {"train.iterations": [4, 8]})]
    assert summary["config_history"] == history
    with open(tmp_path / "config.json", encoding="utf-8") as f:
        assert json.load(f)["train"]["iterations"] == 8 == summary["config"]["train"]["iterations"]
    # Iteration 4 was the final iteration of the first run, so G's mask did not change there;
    # after the extension the schedule runs over the new total: updates at 2 and 6.
    g_updates = [row["iteration"] for row in read_jsonl(tmp_path / "density_log.jsonl")
                 if "g" in row["changed"] and row["iteration"] > 0]
    assert g_updates == [2, 6]
    # The report labels the run by its latest config and says what changed.
    notes = report.load_run(str(tmp_path), with_flops=False).notes
    assert "config changed at iteration 4: train.iterations 4 -> 8" in notes
    # A run cannot be shortened.
    with pytest.raises(rundir.ConfigMismatch, match="cannot be shortened"):
        train.train_and_evaluate(config, str(tmp_path), allow_changes=["train.iterations"])


# ----------------------------------------------------------------------------- collapse


def test_collapsed_run_stops_with_a_message_and_keeps_its_checkpoints(tmp_path):
    # An exploding D learning rate pins the hinge losses at 2 and 0 within 3 iterations.
    config = tiny_config(**{"train.lr_d": 1e6, "train.iterations": 40, "train.log_every": 1,
                            "health.pinned_iterations": 6, "health.nonfinite_br": False})
    with pytest.raises(train.TrainingCollapsed, match=r"loss/d stayed at 2 and loss/g at 0 "
                       r"from iteration \d+ to \d+") as e:
        train.train_and_evaluate(config, str(tmp_path / "pinned"))
    assert "health.pinned_iterations=0 turns this check off" in str(e.value)
    kept = sorted(int(s) for s in os.listdir(tmp_path / "pinned" / "checkpoints"))
    assert kept and max(kept) < 40  # earlier checkpoints stay; the collapsed state was not saved
    assert not os.path.exists(tmp_path / "pinned" / "summary.json")

    config = tiny_config(**{"train.lr_d": 1e6, "train.iterations": 40, "train.log_every": 1,
                            "health.pinned_iterations": 0, "health.nonfinite_br": True})
    with pytest.raises(train.TrainingCollapsed, match="every ratio in the full BR window"):
        train.train_and_evaluate(config, str(tmp_path / "blind"))


@pytest.mark.parametrize("field", ["train.lr_d", "train.ema_decay", "control.band_low"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_numbers_are_rejected_by_name(field, value):
    config = tiny_config(**{field: value})
    with pytest.raises(ValueError, match=rf"config\.{re.escape(field)}: must be a finite number"):
        train.validate_config(config)


# ----------------------------------------------------------------------------- bad inputs


def test_misspelt_config_field_is_one_line_with_the_suggestion(tmp_path):
    proc = _cli(*SMOKE, f"--workdir={tmp_path / 'run'}", "--config.train.iteratons=5",
                timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert _lines(proc.stderr) == [
        "error: --config.train.iteratons: config.train has no field 'iteratons'; did you mean "
        "--config.train.iterations? (--help lists every field)"]
    assert not os.path.exists(tmp_path / "run")


def test_workdir_that_is_a_file_is_one_line(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("mine")
    proc = _cli(*SMOKE, f"--workdir={path}", timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert _lines(proc.stderr) == [f"error: --workdir {path} is a file, not a directory: pass a "
                                   "directory (it is created if missing)."]
    assert path.read_text() == "mine"


def test_read_only_workdir_is_one_line(tmp_path, monkeypatch):
    # Tests may run as root, which ignores permission bits: simulate the filesystem's answer.
    monkeypatch.setattr(rundir.os, "access", lambda path, mode: False)
    with pytest.raises(rundir.WorkdirUnusable, match="is not writable"):
        train.train_and_evaluate(tiny_config(), str(tmp_path / "run"))
    e = OSError(errno.EROFS, "Read-only file system", str(tmp_path / "run" / "metrics.jsonl"))
    assert runner.user_error(e, str(tmp_path / "run")) == (
        f"read-only file system: cannot write {tmp_path / 'run' / 'metrics.jsonl'}; use a "
        "--workdir you can write to.")


def test_full_disk_is_one_line_and_the_last_checkpoint_stays(tmp_path, monkeypatch):
    config = tiny_config(**{"train.iterations": 8, "train.checkpoint_every": 2})
    save = checkpoint.Checkpointer.save

    def save_until_full(self, step, *args, **kwargs):
        if step >= 6:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "checkpoints"))
        return save(self, step, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(checkpoint.Checkpointer, "save", save_until_full)
        with pytest.raises(OSError) as e:
            train.train_and_evaluate(config, str(tmp_path))
    message = runner.user_error(e.value, str(tmp_path))
    assert message.startswith("no space left on device while writing ")
    assert "re-run the same command; it resumes from the last complete checkpoint (iteration 4)" \
        in message
    assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoints")) == [2, 4]
    summary = train.train_and_evaluate(config, str(tmp_path))  # space freed: resumes at 4
    assert summary["finished"] and summary["iterations_this_session"] == 4


def test_ctrl_c_during_start_up_stops_cleanly(tmp_path):
    proc = _popen_cli(*SMOKE, f"--workdir={tmp_path / 'run'}")
    time.sleep(1.0)  # inside imports / flag parsing / the first compile
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    for crash in ("Fatal Python error", "Segmentation fault", "Traceback"):
        assert crash not in err
    assert "Got SIGINT: stopping at the next safe point" in err
    assert "Stopped (signal 2)" in err


def test_offline_dataset_preparation_fails_fast_and_cleans_up(tmp_path, monkeypatch):
    data_dir = tmp_path / "tfds"
    (data_dir / "other").mkdir(parents=True)  # what was there before stays

    def offline(url, timeout=5.0):
        raise OSError(errno.ENETUNREACH, "Network is unreachable")

    monkeypatch.setattr(datasets, "check_reachable", offline)
    started = time.time()
    with pytest.raises(FileNotFoundError, match=r"(?s)tiny-imagenet-200\.zip is not in the "
                       r"manual directory.*Network is unreachable.*manual directory"):
        tiny_imagenet.prepare(str(data_dir))
    assert time.time() - started < 30
    assert sorted(os.listdir(data_dir)) == ["other"]  # no incomplete.* or partial downloads


# ----------------------------------------------------------------------------- grids


_CHILD = """
import os, signal, sys, time
marks = sys.argv[1]
def stop(signum, frame):
    time.sleep(1.0)  # a checkpoint takes a moment
    open(os.path.join(marks, "saved"), "w").write(str(signum))
    sys.exit(0)
signal.signal(signal.SIGINT, stop)
signal.signal(signal.SIGTERM, stop)
open(os.path.join(marks, "started"), "w").write(str(os.getpid()))
time.sleep(120)
"""

_PARENT = """
import sys
from experiments import grid
try:
    grid.launch([["python", sys.argv[1], sys.argv[2]], ["python", sys.argv[1], sys.argv[3]]],
                python=sys.executable)
except grid.GridInterrupted as e:
    print(e, flush=True)
    sys.exit(128 + e.signum)
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_to_a_grid_reaches_its_run_and_the_grid_waits(tmp_path, signum):
    child = tmp_path / "child.py"
    child.write_text(_CHILD)
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, str(child), str(first),
                               str(second)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    _wait_for(lambda: (first / "started").exists(), 60, "the first run")
    parent.send_signal(signum)  # to the grid alone, as a scheduler or `kill` would
    out, _ = parent.communicate(timeout=60)
    assert parent.returncode == 128 + signum
    assert (first / "saved").read_text() == str(int(signum))  # the run saved before the exit
    assert not (second / "started").exists()  # later runs not started
    assert "re-run the grid to go on" in out.lower()
    pid = int((first / "started").read_text())
    with pytest.raises(ProcessLookupError):  # no orphan left running
        os.kill(pid, 0)


def test_relaunched_grid_skips_finished_runs(tmp_path):
    done, todo = tmp_path / "done", tmp_path / "todo"
    done.mkdir()
    (done / "summary.json").write_text(json.dumps({"finished": True}))

    def marker_command(path):
        return ["python", "-c", f"open({str(path / 'ran')!r}, 'w')"]

    log = __import__("io").StringIO()
    todo.mkdir()
    grid.launch([marker_command(done), marker_command(todo)], stdout=log,
                workdirs=[str(done), str(todo)])
    assert not (done / "ran").exists() and (todo / "ran").exists()
    assert f"[1/2] finished, skipped: {done}" in log.getvalue()
