"""TFDS builders for datasets TFDS does not ship (importing a builder's module registers it).

``tiny_imagenet`` (``ddst_jax.datasets.tiny_imagenet``): TinyImageNet-200 at 64x64. It is
prepared without TensorFlow (array_record files, images decoded with PIL).

``ensure_registered(name)`` imports the module of a project builder by its TFDS name, so that
``tfds.builder(name)`` / ``tfds.data_source(name)`` find it.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import socket
import urllib.parse
from collections.abc import Iterator

# TFDS name -> module defining the builder. All of them prepare without TensorFlow.
BUILDER_MODULES: dict[str, str] = {"tiny_imagenet": "ddst_jax.datasets.tiny_imagenet"}


def ensure_registered(name: str) -> bool:
    """Registers the project's TFDS builder ``name`` (a TFDS name, config/version allowed).

    Returns:
      True when the project provides the builder (it is then registered, and preparing it
      needs no TensorFlow); False for any other name (nothing is imported).
    """
    module = BUILDER_MODULES.get(name.split("/")[0].split(":")[0])
    if module is None:
        return False
    importlib.import_module(module)
    return True


def default_data_dir(data_dir: str | None) -> str:
    """The TFDS data directory a builder uses for ``data_dir`` (TFDS's default when None)."""
    if data_dir:
        return os.path.abspath(os.path.expanduser(data_dir))
    return os.path.abspath(os.path.expanduser(
        os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")))


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
