"""The one path abstraction for every file a run writes or reads: local disks and cloud URIs.

Every run file (config, summaries, JSONL logs, TensorBoard events, sample grids, plots, FID
statistics, evaluation results, the report) goes through these functions, which go through
``etils.epath`` -- what orbax already uses for checkpoints. So ``--workdir=gs://bucket/run``
stores the whole run in the bucket, with the same credentials and backend as the checkpoints
(``tf.io.gfile`` when TensorFlow is installed, else ``fsspec``: ``pip install -e '.[cloud]'``
brings ``gcsfs`` and the Google client orbax needs for ``gs://``). A plain path is a local
path, and there the behaviour is what it always was.

What a reader can rely on:

* **Local paths**: ``write_text``/``atomic_write`` write a temporary file in
  the same directory, fsync it and rename it over the target, so a crash leaves the old file or
  the new one. ``Appender`` appends, one flushed ``write`` at a time, so a crash can only cut
  the last line (readers skip a half-written last line).
* **Object stores** (a path with ``scheme://``; orbax writes checkpoint arrays to ``gs://``
  only, through tensorstore, so ``gs://`` is the one cloud workdir): there is no rename
  (``gcsfs`` and ``gfile`` copy then delete) and no append. A file is written as **one object
  upload**, which the store makes visible only once complete, so a reader again sees the old or
  the new whole file; the temporary-file dance would only add a copy. ``Appender`` keeps the
  file's text in memory and uploads it whole on ``flush`` and at most every ``interval_s``
  seconds: a crash loses the lines since the last upload. The runner flushes before every
  checkpoint, so what is lost lies after the last checkpoint, which a resume drops anyway.
* There is no file lock on an object store: see ``ddst_jax.rundir.RunLock``.

Not verified against a real bucket from here (the tests use a stand-in ``gs://`` backend, see
``tests/test_cloud_workdir.py``).
"""

from __future__ import annotations

import io
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from etils import epath

PathLike = str | os.PathLike


def is_remote(path: PathLike) -> bool:
    """Whether ``path`` names an object store (``gs://b/x``, ``s3://...``), not a local path.

    >>> is_remote("gs://bucket/run"), is_remote("/tmp/run"), is_remote("runs/x")
    (True, False, False)
    """
    return "://" in os.fspath(path)


def resolve(path: PathLike) -> str:
    """An absolute local path, or the URI unchanged (``os.path.abspath`` would mangle it).

    >>> resolve("gs://bucket/run")
    'gs://bucket/run'
    """
    path = os.fspath(path)
    return path if is_remote(path) else os.path.abspath(path)


def join(path: PathLike, *parts: str) -> str:
    """``path/part/...`` as a string, for local paths and URIs alike.

    >>> join("gs://bucket/run", "plots", "br.png")
    'gs://bucket/run/plots/br.png'
    """
    return os.fspath(epath.Path(path).joinpath(*parts))


def exists(path: PathLike) -> bool:
    """Whether a file or directory exists at ``path``."""
    return epath.Path(path).exists()


def isdir(path: PathLike) -> bool:
    """Whether ``path`` is a directory (on an object store: a prefix with objects below it)."""
    return epath.Path(path).is_dir()


def isfile(path: PathLike) -> bool:
    """Whether ``path`` exists and is not a directory."""
    p = epath.Path(path)
    return p.exists() and not p.is_dir()


def listdir(path: PathLike) -> list[str]:
    """The names (not paths) in directory ``path``, sorted."""
    return sorted(p.name for p in epath.Path(path).iterdir())


def walk(path: PathLike) -> Iterator[tuple[str, list[str], list[str]]]:
    """``os.walk`` for local paths and URIs: ``(root, dirs, files)``, top-down; ``dirs`` may be
    pruned in place, as with ``os.walk``."""
    for root, dirs, files in epath.Path(path).walk():
        yield os.fspath(root), dirs, files


def mtime(path: PathLike) -> float:
    """Last modification time in seconds since the epoch (whole seconds on object stores)."""
    return float(epath.Path(path).stat().mtime)


def makedirs(path: PathLike) -> None:
    """Creates directory ``path`` and its parents if missing (a no-op on most object stores,
    whose directories are implicit)."""
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def remove(path: PathLike) -> None:
    """Deletes file ``path`` if it exists."""
    epath.Path(path).unlink(missing_ok=True)


def read_bytes(path: PathLike) -> bytes:
    """The whole file ``path`` (``FileNotFoundError`` if missing)."""
    return epath.Path(path).read_bytes()


def read_text(path: PathLike) -> str:
    """The whole UTF-8 text file ``path`` (``FileNotFoundError`` if missing)."""
    return read_bytes(path).decode("utf-8")


def open_read(path: PathLike) -> Any:
    """A binary file object for reading ``path`` (e.g. for ``np.load``); close it after use."""
    return epath.Path(path).open("rb")


def atomic_write(path: PathLike, write: Callable[[Any], None], mode: str = "wb") -> str:
    """Calls ``write(file)`` and stores what it wrote at ``path``, all or nothing.

    Args:
      path: the target, local or ``scheme://``; missing parent directories are created.
      write: writes the content to the file object it is given (``figure.savefig(f)``...).
      mode: ``"wb"`` (bytes) or ``"w"`` (UTF-8 text).

    Returns:
      ``path`` as a string. Local: temporary file, fsync, rename. Remote: the content is built
      in memory and uploaded as one object (see the module docstring for both guarantees).
    """
    path = os.fspath(path)
    if mode not in ("wb", "w"):
        raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}.")
    if is_remote(path):
        buffer = io.BytesIO() if mode == "wb" else io.StringIO()
        write(buffer)
        data = buffer.getvalue()
        target = epath.Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
        return path
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def put(path: PathLike, data: bytes) -> None:
    """Writes ``data`` at ``path`` in one plain write: no temporary file, no fsync (for many
    small files that a re-run rewrites anyway, e.g. generated samples)."""
    epath.Path(path).write_bytes(data)


def write_text(path: PathLike, text: str) -> str:
    """Stores UTF-8 ``text`` at ``path`` atomically (see ``atomic_write``); returns ``path``."""
    return atomic_write(path, lambda f: f.write(text), mode="w")


class Appender:
    """Appends to a file, locally or on an object store (which has no append).

    Local: the file opened for appending; every ``write`` is flushed to the OS at once, so a
    crash cuts at most the last write. Remote: the file's current bytes are read once, writes
    go to memory, and the whole object is uploaded on ``flush``/``close`` and by a ``write``
    that comes ``interval_s`` or more after the last upload. The whole file is held in memory
    and re-uploaded each time (a metrics log of a long run is a few MB: fine at one upload per
    ``interval_s``). Thread-safe (TensorBoard flushes from its own thread).
    """

    def __init__(self, path: PathLike, *, interval_s: float = 30.0, binary: bool = False):
        """Opens ``path`` for appending, creating it (and its directory) if missing.

        Args:
          path: local path or ``scheme://`` URI.
          interval_s: remote only: the longest a write waits in memory before an upload.
          binary: ``write`` takes bytes (else UTF-8 text).
        """
        self.path = os.fspath(path)
        self.binary = binary
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._file = None
        self._data: bytearray | None = None
        self._dirty = False
        self._uploaded = time.monotonic()
        if is_remote(self.path):
            target = epath.Path(self.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            existing = target.exists()
            self._data = bytearray(target.read_bytes() if existing else b"")
            self._dirty = not existing  # the first flush creates it, as a local open does
        else:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self._file = open(self.path, "ab")  # noqa: SIM115 (closed in close)

    def write(self, data: bytes | str) -> None:
        """Appends ``data`` (bytes if ``binary``, else text)."""
        raw = data if isinstance(data, bytes) else data.encode("utf-8")
        with self._lock:
            if self._file is not None:
                self._file.write(raw)
                self._file.flush()
                return
            if self._data is None:
                raise ValueError(f"{self.path} is closed.")
            self._data.extend(raw)
            self._dirty = True
            due = time.monotonic() - self._uploaded >= self.interval_s
        if due:
            self.flush()

    def flush(self) -> None:
        """Local: pushes buffered bytes to the OS. Remote: uploads the file if it changed."""
        with self._lock:
            if self._file is not None:
                self._file.flush()
            elif self._data is not None and self._dirty:
                epath.Path(self.path).write_bytes(bytes(self._data))
                self._dirty = False
                self._uploaded = time.monotonic()

    def close(self) -> None:
        """Flushes and closes (idempotent)."""
        self.flush()
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
            self._data = None

    def __enter__(self) -> Appender:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def append_text(path: PathLike, text: str) -> None:
    """Appends ``text`` to ``path`` once (a remote file is re-uploaded whole: for rare rows)."""
    with Appender(path) as f:
        f.write(text)


# ----------------------------------------------------------------------------- TensorBoard


class _EventFileFactory:
    """tensorboardX writer factory that writes event files through ``Appender`` (epath).

    tensorboardX writes ``gs://`` itself only with ``google-cloud-storage`` (and ``s3://`` only
    with boto3), another client with its own credentials; this one uses epath's, like the
    checkpoints, and its uploads follow the runner's ``flush_secs``.
    """

    def open(self, path: str) -> Appender:
        return Appender(path, binary=True, interval_s=float("inf"))  # uploads on flush only

    def directory_check(self, path: str) -> None:
        makedirs(path)


_SCHEMES_WITH_EVENTS: set[str] = set()


def register_event_writer(logdir: PathLike) -> None:
    """Routes tensorboardX's event files under ``logdir``'s scheme through epath (remote only;
    local event files stay tensorboardX's plain files)."""
    logdir = os.fspath(logdir)
    if not is_remote(logdir):
        return
    scheme = logdir.split("://", 1)[0]
    if scheme in _SCHEMES_WITH_EVENTS:
        return
    from tensorboardX import record_writer  # noqa: PLC0415 (optional dependency)

    record_writer.register_writer_factory(scheme, _EventFileFactory())
    _SCHEMES_WITH_EVENTS.add(scheme)
