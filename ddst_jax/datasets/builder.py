"""Pieces the project's TFDS builders share: array_record by default, the official archive
(found, verified or downloaded), tar members read as they stream, PNG encoding with PIL,
``prepare`` and the command line. Nothing here needs TensorFlow.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
from collections.abc import Iterator, Sequence
from typing import IO, Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from ddst_jax import datasets


class ArrayRecordBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A ``GeneratorBasedBuilder`` that writes array_record unless another format is given.

    TFDS defaults to tfrecord, which needs TensorFlow to write and has no random access.
    """

    def __init__(self, *, file_format: str | tfds.core.FileFormat | None = None, **kwargs: Any):
        super().__init__(file_format=file_format, **kwargs)
        if file_format is None and not self.is_prepared():
            self.info.set_file_format(tfds.core.FileFormat.ARRAY_RECORD, override=True)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        """The builder's file. (TFDS's lookup needs the importlib_resources backport on
        Python >= 3.9.)"""
        return epath.Path(sys.modules[cls.__module__].__file__)


class TarArchiveBuilder(ArrayRecordBuilder, skip_registration=True):
    """A builder whose splits all come from one official tar archive that names the classes.

    Subclasses set the class attributes below and define ``_info`` and
    ``_generate_examples(path, split)`` (``path``: the verified archive).
    """

    ARCHIVE: ClassVar[datasets.Archive]
    CLASS_NAMES_MEMBER: ClassVar[str]  # Path in the archive of the names, one per line.
    NUM_CLASSES: ClassVar[int]
    SPLITS: ClassVar[Sequence[str]]

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        path = archive_path(dl_manager, self.ARCHIVE)
        names = read_class_names(path, self.CLASS_NAMES_MEMBER, self.NUM_CLASSES)
        self.info.features["label"].names = names
        return {split: self._generate_examples(path, split) for split in self.SPLITS}


def manual_instructions(archive: datasets.Archive) -> str:
    """A builder's MANUAL_DOWNLOAD_INSTRUCTIONS for an archive that is downloaded if absent."""
    return (
        f"Optional: put {archive.name} ({archive.url}, {archive.size} bytes, sha256 "
        f"{archive.sha256}) in the manual directory, <data_dir>/downloads/manual/ by default; "
        "without it the builder downloads the URL."
    )


def manual_dir(dl_manager: tfds.download.DownloadManager) -> epath.Path:
    """The manual directory of ``dl_manager``, also when it is missing or empty.

    (TFDS's public ``dl_manager.manual_dir`` raises then; the path is still wanted, to say
    where the archive goes.)
    """
    given = getattr(dl_manager, "_manual_dir", None)
    return epath.Path(given) if given else epath.Path(dl_manager.download_dir) / "manual"


def archive_path(
    dl_manager: tfds.download.DownloadManager, archive: datasets.Archive
) -> epath.Path:
    """The verified official archive: from the manual dir, the download dir, or downloaded.

    Raises:
      datasets.ArchiveError: see ``datasets.find_or_download``.
    """
    return epath.Path(
        datasets.find_or_download(archive, manual_dir(dl_manager), dl_manager.download_dir)
    )


def tar_members(path: epath.PathLike, names: Sequence[str]) -> Iterator[tuple[str, IO[bytes]]]:
    """``(name, file object)`` of the members ``names`` of tar ``path`` (any compression), in
    the archive's order, read as the archive streams: nothing is extracted to disk.

    A file object is valid until the next item. Member names are compared without a leading
    ``./``.

    Raises:
      ValueError: a member is missing (only known once the archive has been read to its end).
    """
    wanted, seen = set(names), set()
    with tarfile.open(os.fspath(path), "r|*") as tar:
        for info in tar:
            name = info.name.removeprefix("./")
            if name in wanted and info.isfile():
                seen.add(name)
                yield name, tar.extractfile(info)
                if seen == wanted:
                    return
    missing = sorted(wanted - seen)
    raise ValueError(f"{path} holds no {missing[0]}: it is not the expected archive.")


def read_tar_members(path: epath.PathLike, names: Sequence[str]) -> dict[str, bytes]:
    """The contents of members ``names`` of tar ``path``, read in one pass (see ``tar_members``)."""
    return {name: f.read() for name, f in tar_members(path, names)}


def read_records(
    f: IO[bytes], record_bytes: int, what: str, chunk_records: int = 1024
) -> Iterator[np.ndarray]:
    """Fixed-size records of a stream as uint8 ``(n, record_bytes)`` chunks, n <= chunk_records.

    Raises:
      ValueError: the stream does not end on a record boundary (``what`` names it).
    """
    while data := f.read(record_bytes * chunk_records):
        if len(data) % record_bytes:
            raise ValueError(f"{what} does not hold whole {record_bytes}-byte records.")
        yield np.frombuffer(data, np.uint8).reshape(-1, record_bytes)


def read_class_names(path: epath.PathLike, member: str, num_classes: int) -> list[str]:
    """The class names in member ``member`` of tar ``path``: its non-blank lines, stripped.

    Raises:
      ValueError: the member is missing or does not list ``num_classes`` names.
    """
    text = read_tar_members(path, [member])[member].decode("utf-8")
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if len(names) != num_classes:
        raise ValueError(f"{member} in {path} lists {len(names)} names, expected {num_classes}.")
    return names


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 (H, W, 3) RGB as a PNG file: lossless, and what TFDS's ``Image`` feature stores
    by default (TFDS itself would encode with TensorFlow)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def prepare(
    builder_cls: type[tfds.core.DatasetBuilder],
    data_dir: str | None = None,
    *,
    manual_dir: str | None = None,
) -> tfds.core.DatasetBuilder:
    """Prepares ``builder_cls`` as array_record under ``data_dir`` (TFDS default if None).

    ``manual_dir`` overrides ``<data_dir>/downloads/manual``. Returns the prepared builder; a
    no-op when already prepared. A failure leaves nothing new behind in ``data_dir``.
    """
    builder = builder_cls(data_dir=data_dir, file_format=tfds.core.FileFormat.ARRAY_RECORD)
    config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    with datasets.removed_on_failure(data_dir):
        builder.download_and_prepare(download_config=config)
    return builder


def prepare_and_report(
    builder_cls: type[tfds.core.DatasetBuilder], data_dir: str | None, manual_dir: str | None
) -> None:
    """``prepare``, then print the split sizes; a missing or wrong archive exits with the
    error's message (which says what to do), without a traceback."""
    try:
        builder = prepare(builder_cls, data_dir, manual_dir=manual_dir)
    except (FileNotFoundError, datasets.ArchiveError) as e:
        raise SystemExit(f"error: {e}") from None
    splits = {name: info.num_examples for name, info in builder.info.splits.items()}
    print(f"Prepared {builder.name} {builder.version} in {builder.data_dir}: {splits}.")


def main(builder_cls: type[TarArchiveBuilder], argv: Sequence[str] | None = None) -> None:
    """Command line of a builder read from one archive: ``--data_dir``, ``--manual_dir``."""
    name, archive = builder_cls.name, builder_cls.ARCHIVE
    parser = argparse.ArgumentParser(
        prog=f"python -m ddst_jax.datasets.{name}",
        description=(
            f"Prepare {name} for TFDS without TensorFlow (array_record), from {archive.name} in "
            "the manual dir, or downloaded from its official address; its checksum is checked."
        ),
    )
    parser.add_argument("--data_dir", help="TFDS data dir (default: TFDS's, ~/tensorflow_datasets)")
    parser.add_argument(
        "--manual_dir", help=f"folder holding {archive.name} (default: <data_dir>/downloads/manual)"
    )
    args = parser.parse_args(argv)
    prepare_and_report(builder_cls, args.data_dir, args.manual_dir)
