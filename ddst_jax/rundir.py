"""A run directory that one writer owns and whose configuration has a history.

* ``RunLock``: an exclusive lock for the life of a run (``<workdir>/run.lock``, an OS file lock
  plus the holder's pid, host, start time and command). A second run on the same workdir
  refuses in one line naming the holder. The OS releases the lock when its process dies, even
  by ``kill -9``; the next run then finds the dead holder's record, says so, and goes on.
  Multi-host: process 0 takes the lock and every process learns the outcome. On an object
  store (``gs://``) there is no file lock: the record is a best-effort marker (see
  ``RunLock``).
* ``config_changes`` / ``check_resume``: a resumed run must have the configuration it was
  started with; a change is allowed only when named (``--change=train.iterations``), and every
  allowed change is appended to ``<workdir>/config_history.jsonl`` so ``config.json``,
  ``summary.json`` and the report agree. Where the run executes (``parallel.*``, the dataset
  and weights locations, the progress bar) is not part of its identity: such fields change
  freely and are recorded too.

Typical use::

    with RunLock(workdir):
        changes = check_resume(old_config_dict, config_dict, allowed={"train.iterations"})
        record_changes(workdir, iteration, changes)
"""

from __future__ import annotations

import datetime
import difflib
import errno
import fcntl
import json
import os
import socket
import sys
from collections.abc import Iterable, Mapping
from typing import Any

from ddst_jax import storage

LOCK_NAME = "run.lock"
HISTORY_NAME = "config_history.jsonl"

#: Fields that say where and how a run executes, not what it computes: they may differ on
#: resume without being named (still recorded). Prefixes end with ".".
ENVIRONMENT_FIELDS: tuple[str, ...] = (
    "parallel.", "data.data_dir", "data.prefetch", "data.download", "train.progress_bar",
    "eval.inception_weights", "eval.reference_stats",
)


class WorkdirLocked(RuntimeError):
    """Another live run holds the workdir."""


class ConfigMismatch(ValueError):
    """A resumed run's configuration differs from the one it was started with."""


class WorkdirUnusable(ValueError):
    """The workdir cannot be created or written (a file, read-only, ...)."""


# ----------------------------------------------------------------------------- the workdir


def prepare_workdir(workdir: str) -> str:
    """Creates ``workdir`` if needed and checks it is a writable directory; returns its abspath
    (a bucket URI unchanged: its writability shows at the first write).

    Raises ``WorkdirUnusable`` with the cause and the fix.
    """
    path = storage.resolve(workdir)
    if storage.is_remote(path):
        try:
            is_file = storage.isfile(path)
            if not is_file:
                storage.makedirs(path)
        except ImportError as e:  # e.g. fsspec without gcsfs: "Install gcsfs to access ..."
            raise WorkdirUnusable(f"--workdir {path} needs a filesystem package that is not "
                                  f"installed ({e}): pip install -e '.[cloud]'.") from None
        if is_file:
            raise WorkdirUnusable(f"--workdir {path} is a file, not a directory: pass a "
                                  "directory (a prefix in the bucket).")
        return path
    if os.path.exists(path) and not os.path.isdir(path):
        raise WorkdirUnusable(f"--workdir {path} is a file, not a directory: pass a directory "
                              "(it is created if missing).")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise WorkdirUnusable(f"--workdir {path} cannot be created ({e.strerror}): choose a "
                              "directory you can write to.") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise WorkdirUnusable(f"--workdir {path} is not writable (permission denied): choose a "
                              "directory you can write to.")
    return path


# ----------------------------------------------------------------------------- the lock


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _describe(holder: Mapping[str, Any]) -> str:
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since "
            f"{holder.get('since', '?')}")


class RunLock:
    """Exclusive ownership of a workdir for the life of a run (a context manager).

    ``acquire`` raises ``WorkdirLocked`` when a live process holds the lock. The lock is an OS
    file lock (``flock``), so it disappears with its process; the file also records the holder,
    which names it in the refusal and lets the next run explain a lock left by a dead process
    (``stale``: that holder's record, else None). On filesystems without ``flock`` (some FUSE
    mounts) only a holder on the same host is detected (by its pid).

    On an object store (``gs://``...) there is no lock at all: objects cannot be locked, and a
    marker cannot tell a live holder on another host from a dead one (refusing on any marker
    would block a workdir forever after a crash). There the record is a best-effort marker:
    a holder on this host whose pid lives is refused as above; a marker from another host is
    named in a warning (``foreign``) and the run goes on. Two hosts must not run one bucket
    workdir at once; nothing enforces it.
    """

    def __init__(self, workdir: str):
        self.path = storage.join(workdir, LOCK_NAME)
        self._fd: int | None = None
        self._marker = False
        self.stale: dict[str, Any] | None = None
        self.foreign: dict[str, Any] | None = None

    def _read(self, fd: int) -> dict[str, Any] | None:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 1 << 16).decode("utf-8", "replace").strip()
        return _parse_record(raw)

    def _acquire_marker(self) -> RunLock:
        """The object-store variant of ``acquire`` (see the class docstring)."""
        previous = _parse_record(storage.read_text(self.path)) if storage.exists(self.path) \
            else None
        if _live_holder_here(previous):
            raise WorkdirLocked(
                f"{os.path.dirname(self.path)} is in use by another run ({_describe(previous)}): "
                "wait for it to finish, stop it, or use another --workdir.")
        if previous and previous.get("host") == socket.gethostname():
            self.stale = previous
        elif previous:
            self.foreign = previous
        storage.write_text(self.path, json.dumps(_holder_record()) + "\n")
        self._marker = True
        return self

    def acquire(self) -> RunLock:
        if storage.is_remote(self.path):
            return self._acquire_marker()
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise WorkdirUnusable(f"cannot create the lock file {self.path} ({e.strerror}): "
                                  "choose a --workdir you can write to.") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                os.close(fd)
                raise
            holder = self._read(fd) or {}
            os.close(fd)
            raise WorkdirLocked(
                f"{os.path.dirname(self.path)} is in use by another run ({_describe(holder)}"
                f"{', command: ' + holder['command'] if holder.get('command') else ''}): wait "
                "for it to finish, stop it (Ctrl-C, or kill -TERM it: it saves a checkpoint), "
                "or use another --workdir.") from None
        previous = self._read(fd)
        if _live_holder_here(previous):
            # flock succeeded although the recorded holder lives: a filesystem without flock.
            os.close(fd)
            raise WorkdirLocked(
                f"{os.path.dirname(self.path)} is in use by another run ({_describe(previous)}): "
                "wait for it to finish, stop it, or use another --workdir.")
        self.stale = previous
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(_holder_record()) + "\n").encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def stale_message(self) -> str | None:
        """One line about a lock left by a process that died holding it (or, on an object
        store, a marker of another host that may still be running), or None."""
        if self.foreign:
            return (f"{os.path.dirname(self.path)} is marked as used by a run on another host "
                    f"({_describe(self.foreign)}); a bucket workdir cannot be locked, so this "
                    "run goes on. If that run is still alive, stop one of them now: two runs "
                    "in one workdir overwrite each other's checkpoints and logs.")
        if not self.stale:
            return None
        return (f"The previous run in this workdir ({_describe(self.stale)}) ended without "
                "releasing its lock (killed or crashed); it no longer holds it. Continuing from "
                "its last complete checkpoint.")

    def release(self) -> None:
        """Clears the holder record and drops the lock (idempotent)."""
        if self._marker:
            storage.remove(self.path)
            self._marker = False
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass  # e.g. a full disk: the OS lock still goes with the descriptor
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def _parse_record(raw: str) -> dict[str, Any] | None:
    """The holder record of a lock file's text (None if empty)."""
    raw = raw.strip()
    if not raw:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return {"pid": "?", "host": "?", "since": "?", "note": "unreadable lock record"}


def _live_holder_here(record: Mapping[str, Any] | None) -> bool:
    """Whether ``record`` names another process of this host that is alive."""
    return bool(record) and record.get("host") == socket.gethostname() \
        and isinstance(record.get("pid"), int) and record["pid"] != os.getpid() \
        and _pid_alive(record["pid"])


def _holder_record() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": _now(),
            "command": " ".join(sys.argv)}


def acquire_for_all_processes(workdir: str) -> RunLock | None:
    """Process 0 takes the lock; every process learns whether it did (a collective).

    Returns the lock on process 0, None elsewhere; raises ``WorkdirLocked`` on every process
    when process 0 could not take it.
    """
    import jax  # noqa: PLC0415 (only the multi-process path needs it)

    if jax.process_count() == 1:
        return RunLock(workdir).acquire()
    import numpy as np
    from jax.experimental import multihost_utils

    lock, error = None, ""
    if jax.process_index() == 0:
        try:
            lock = RunLock(workdir).acquire()
        except (WorkdirLocked, WorkdirUnusable) as e:
            error = str(e)
    ok = multihost_utils.broadcast_one_to_all(np.asarray(not error))
    if not bool(ok):
        raise WorkdirLocked(error or f"Process 0 could not lock {workdir}; its log says why.")
    return lock


# ----------------------------------------------------------------------------- configuration


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train.iterations": 100, ...}`` from a nested config dict.

    >>> flatten({"a": {"b": 1, "c": [2, 3]}, "d": None})
    {'a.b': 1, 'a.c': [2, 3], 'd': None}
    """
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, list[Any]]:
    """``{field: [old, new]}`` for every field whose value differs (missing fields as None).

    >>> config_changes({"t": {"n": 1, "lr": 0.1}}, {"t": {"n": 2, "lr": 0.1}})
    {'t.n': [1, 2]}
    """
    a, b = flatten(old), flatten(new)
    return {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def is_environment_field(name: str) -> bool:
    """Whether a field only says where/how the run executes (see ``ENVIRONMENT_FIELDS``).

    >>> is_environment_field("parallel.num_devices"), is_environment_field("train.lr_g")
    (True, False)
    """
    return any(name.startswith(p) if p.endswith(".") else name == p for p in ENVIRONMENT_FIELDS)


def check_resume(old: Mapping[str, Any], new: Mapping[str, Any], *,
                 allowed: Iterable[str] = (), iteration: int | None = None
                 ) -> dict[str, list[Any]]:
    """The changes of a resume, or ``ConfigMismatch`` listing those not ``allowed``.

    Environment fields never need allowing. ``allowed`` names fields (``train.iterations``)
    or whole sections (``eval``).
    """
    changes = config_changes(old, new)
    allowed = {a.strip() for a in allowed if a.strip()}
    flat = flatten(new)
    unknown = sorted(a for a in allowed if a not in flat and not any(
        f.startswith(a + ".") for f in flat))
    if unknown:
        raise ConfigMismatch(f"--change names no config field: {', '.join(unknown)}"
                             f"{_suggest(unknown[0], flat)}.")
    refused = {k: v for k, v in changes.items()
               if not is_environment_field(k)
               and not any(k == a or k.startswith(a + ".") for a in allowed)}
    if refused:
        where = f" at iteration {iteration}" if iteration is not None else ""
        listed = "; ".join(f"{k}: {_show(v[0])} (run) vs {_show(v[1])} (now)"
                           for k, v in refused.items())
        raise ConfigMismatch(
            f"This workdir holds a run{where} with a different configuration: {listed}. Re-run "
            "with the run's settings (its config.json), use a fresh --workdir, or, if the change "
            f"is intended, add --change={','.join(refused)} (it is recorded in {HISTORY_NAME}).")
    return changes


def _show(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else repr(value)


def _suggest(name: str, flat: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(name, list(flat), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def record_changes(workdir: str, iteration: int, changes: Mapping[str, list[Any]],
                   event: str = "resume") -> dict[str, Any] | None:
    """Appends one row ``{iteration, time, event, changes}`` to the history; None if no change."""
    if not changes:
        return None
    row = {"iteration": int(iteration), "time": _now(), "event": event,
           "changes": {k: list(v) for k, v in changes.items()}}
    storage.append_text(storage.join(workdir, HISTORY_NAME), json.dumps(row) + "\n")
    return row


def read_history(workdir: str) -> list[dict[str, Any]]:
    """The rows of ``config_history.jsonl`` (empty if the config never changed)."""
    path = storage.join(workdir, HISTORY_NAME)
    if not storage.exists(path):
        return []
    return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]
