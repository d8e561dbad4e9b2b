"""TFDS builders that prepare datasets without TensorFlow (array_record files, PIL images).

``tiny_imagenet`` (``ddst_jax.datasets.tiny_imagenet``): TinyImageNet-200 at 64x64, which TFDS
does not ship; importing the module registers it.

``cifar10`` and ``stl10`` (``ddst_jax.datasets.cifar10`` / ``.stl10``): TFDS ships these, but its
builders need TensorFlow to prepare them. The project's builders write the same dataset (same
name, version, features, splits and example keys) from the same official archive, so TFDS's own
registered builders, and ``tfds.data_source``, read the result. They are not registered (the
names are TFDS's): ``prepare(name)`` runs them.

``ensure_registered(name)`` imports the module of a project builder by its TFDS name, so that
``tfds.builder(name)`` / ``tfds.data_source(name)`` find it; ``prepare(name)`` prepares it.
The archives are checked (size and SHA-256) and downloaded by ``find_or_download``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import os
import shutil
import socket
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

# TFDS name -> module defining the builder. All of them prepare without TensorFlow.
BUILDER_MODULES: dict[str, str] = {
    "tiny_imagenet": "ddst_jax.datasets.tiny_imagenet",
    "cifar10": "ddst_jax.datasets.cifar10",
    "stl10": "ddst_jax.datasets.stl10",
}


def _base_name(name: str) -> str:
    """``"cifar10:3.0.2"`` / ``"cifar10/plain"`` -> ``"cifar10"``."""
    return name.split("/")[0].split(":")[0]


def ensure_registered(name: str) -> bool:
    """Imports the project's TFDS builder ``name`` (a TFDS name, config/version allowed).

    Returns:
      True when the project prepares ``name`` without TensorFlow (``prepare(name)``; a builder
      TFDS does not ship is registered by the import); False for any other name (nothing is
      imported).
    """
    module = BUILDER_MODULES.get(_base_name(name))
    if module is None:
        return False
    importlib.import_module(module)
    return True


def prepare(name: str, data_dir: str | None = None) -> Any:
    """Prepares the project's dataset ``name`` under ``data_dir`` (TFDS default if None).

    Returns the prepared ``tfds.core.DatasetBuilder``; a no-op when already prepared.

    Raises:
      KeyError: the project has no builder for ``name`` (see ``BUILDER_MODULES``).
      ArchiveError: the archive is missing and cannot be downloaded, or is not the official one.
    """
    module = importlib.import_module(BUILDER_MODULES[_base_name(name)])
    return module.prepare(data_dir)


def default_data_dir(data_dir: str | None) -> str:
    """The TFDS data directory a builder uses for ``data_dir`` (TFDS's default when None)."""
    if data_dir:
        return os.path.abspath(os.path.expanduser(data_dir))
    return os.path.abspath(
        os.path.expanduser(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))
    )


def _paths_under(root: str) -> set[str]:
    found = set()
    for parent, dirs, files in os.walk(root):
        found.update(os.path.join(parent, n) for n in (*dirs, *files))
    return found


@contextlib.contextmanager
def removed_on_failure(data_dir: str | None) -> Iterator[None]:
    """Deletes everything a failed preparation created under the TFDS data dir (its
    ``incomplete.*`` folders, partial downloads, empty ``downloads/extracted``), and nothing
    that was there before; re-raises the error.

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> try:
    ...     with removed_on_failure(d):
    ...         os.makedirs(os.path.join(d, "x", "incomplete.1"))
    ...         raise OSError("offline")
    ... except OSError:
    ...     os.listdir(d)
    []
    """
    root = default_data_dir(data_dir)
    existed = os.path.isdir(root)
    before = _paths_under(root) if existed else set()
    try:
        yield
    except BaseException:
        if not existed:
            shutil.rmtree(root, ignore_errors=True)
        else:
            for path in sorted(_paths_under(root) - before, key=len, reverse=True):
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                elif os.path.lexists(path):
                    os.remove(path)
        raise


def check_reachable(url: str, timeout: float = 5.0) -> None:
    """Raises ``OSError`` within ``timeout`` seconds when ``url``'s host cannot be reached
    (no network, no DNS), instead of the minutes a downloader spends retrying."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    with socket.create_connection((parts.hostname, port), timeout=timeout):
        pass


@dataclasses.dataclass(frozen=True)
class Archive:
    """An official dataset archive: file name, where to download it, and its checksum.

    Attributes:
      name: the file name, e.g. ``cifar-10-binary.tar.gz``.
      url: the official download address.
      size: the size in bytes.
      sha256: the SHA-256 digest, lowercase hex (as TFDS's checksums.tsv lists it).
    """

    name: str
    url: str
    size: int
    sha256: str


class ArchiveError(Exception):
    """An archive is missing and cannot be downloaded, or is not the official file.

    The message names the cause and what to do.
    """


def file_digest(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> tuple[int, str]:
    """``(size in bytes, SHA-256 hex digest)`` of a file, read in chunks (any size fits)."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _mismatch(archive: Archive, size: int, sha256: str) -> str | None:
    """What differs from the official archive (None when nothing does)."""
    if (size, sha256) == (archive.size, archive.sha256):
        return None
    return (
        f"{size} bytes, sha256 {sha256[:16]}...; the official file has {archive.size} bytes, "
        f"sha256 {archive.sha256}"
    )


def verify_archive(path: str | os.PathLike, archive: Archive) -> None:
    """Raises ``ArchiveError`` unless ``path`` has the official size and SHA-256."""
    wrong = _mismatch(archive, *file_digest(path))
    if wrong:
        raise ArchiveError(
            f"{path} is not the official {archive.name} ({wrong}): it is damaged or incomplete. "
            f"Delete it, or replace it with the file from {archive.url}."
        )


def download_archive(archive: Archive, target: str | os.PathLike, timeout: float = 60.0) -> None:
    """Downloads ``archive.url`` to ``target``, checking size and SHA-256 while it streams.

    The file appears at ``target`` only once verified (it is written to ``target + ".part"``
    first, deleted on any failure).

    Raises:
      OSError: no network, or the transfer failed.
      ArchiveError: the downloaded bytes are not the official archive.
    """
    target = os.fspath(target)
    part = target + ".part"
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    url = urllib.parse.urlsplit(archive.url)
    if url.scheme in ("http", "https"):
        try:  # Offline: fail in seconds, not after urlopen's timeouts.
            check_reachable(archive.url)
        except OSError as e:
            raise OSError(f"cannot reach {url.hostname}, no network? {e}") from e
    print(f"Downloading {archive.url} ({archive.size / 1e6:.0f} MB) to {target}", file=sys.stderr)
    digest, size = hashlib.sha256(), 0
    try:
        with urllib.request.urlopen(archive.url, timeout=timeout) as response:
            with open(part, "wb") as f:
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    size += len(chunk)
                    f.write(chunk)
        wrong = _mismatch(archive, size, digest.hexdigest())
        if wrong:
            raise ArchiveError(
                f"the download of {archive.url} is not the official {archive.name} ({wrong}); "
                "it was deleted"
            )
        os.replace(part, target)
    finally:
        if os.path.exists(part):
            os.remove(part)


def find_or_download(
    archive: Archive, manual_dir: str | os.PathLike, download_dir: str | os.PathLike
) -> str:
    """The verified archive: ``manual_dir/<name>``, else ``download_dir/<name>``, else downloaded.

    Args:
      archive: the official archive.
      manual_dir: where a user puts a file downloaded by hand (TFDS's manual dir,
        ``<data_dir>/downloads/manual`` by default).
      download_dir: where a download goes (TFDS's ``<data_dir>/downloads``).

    Returns:
      The path of a file with the official size and SHA-256.

    Raises:
      ArchiveError: a present file is not the official one, or there is none and downloading
        fails (no network, HTTP error, wrong bytes); the message says where to put the file.
    """
    for folder in (manual_dir, download_dir):
        path = os.path.join(folder, archive.name)
        if os.path.isfile(path):
            verify_archive(path, archive)
            return path
    target = os.path.join(download_dir, archive.name)
    try:
        download_archive(archive, target)
    except (OSError, ArchiveError) as e:  # URLError and socket errors are OSErrors.
        raise ArchiveError(
            f"{archive.name} is not in {manual_dir} and downloading it failed ({e}). Download "
            f"{archive.url} ({archive.size} bytes, sha256 {archive.sha256}) where there is "
            f"network and put it in {manual_dir}/."
        ) from e
    return target
