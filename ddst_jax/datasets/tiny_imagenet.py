"""TinyImageNet-200 (64x64, 200 classes) as a TFDS builder that prepares without TensorFlow.

TFDS ships no TinyImageNet builder. Importing this module registers ``tiny_imagenet``
(version 1.0.0); ``tfds.builder`` / ``tfds.data_source`` then find it. The builder reads the
official archive ``tiny-imagenet-200.zip`` (http://cs231n.stanford.edu/tiny-imagenet-200.zip),
from the manual directory (``<data_dir>/downloads/manual/`` by default; the zip or its
extracted ``tiny-imagenet-200/`` folder) or, failing that, downloads it.

Features: ``image`` uint8 (64, 64, 3), ``label`` ClassLabel (names: the wnids, in wnids.txt
order; -1 in the unlabelled test split), ``file_name`` (e.g. ``n01443537_0.JPEG``).
Splits: ``train`` (500 per class), ``validation`` (50 per class), ``test`` (no labels).

Preparing needs no TensorFlow: images are read with PIL, RGB JPEGs are stored byte-for-byte,
other modes (grayscale, CMYK) are converted to RGB and stored as lossless PNG, and the files
are written as array_record (the default here, and the format ``tfds.data_source`` reads).
TFDS's own ``tfds build`` command imports TensorFlow; use this module's command instead::

    python -m ddst_jax.datasets.tiny_imagenet --data_dir ~/tensorflow_datasets

``prepare_npz`` converts one split to the project's ``.npz`` format instead.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image, UnidentifiedImageError

from ddst_jax import datasets
from ddst_jax.datasets import builder

URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
ARCHIVE_NAME = "tiny-imagenet-200.zip"
ARCHIVE_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"  # Of the official zip (for manual checks).
ROOT_DIR = "tiny-imagenet-200"
IMAGE_SIZE = 64
SPLITS = ("train", "validation", "test")

_CITATION = """\
@article{le2015tiny,
  title={Tiny ImageNet Visual Recognition Challenge},
  author={Le, Ya and Yang, Xuan},
  journal={CS 231N},
  year={2015}
}"""

_IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


class TinyImagenetArchive:
    """Reads the files of ``tiny-imagenet-200`` from the zip or from an extracted folder.

    ``path`` is the zip file, the ``tiny-imagenet-200`` folder, or a folder holding it. Paths
    given to the methods are relative to the ``tiny-imagenet-200`` folder, with ``/``.
    """

    def __init__(self, path: epath.PathLike):
        self.path = epath.Path(path)
        self._zip: zipfile.ZipFile | None = None
        self._file: Any = None
        if self.path.is_dir():
            roots = [r for r in (self.path, self.path / ROOT_DIR) if (r / "wnids.txt").exists()]
            if not roots:
                raise FileNotFoundError(
                    f"{self.path} holds neither wnids.txt nor {ROOT_DIR}/wnids.txt: it is not "
                    f"an extracted {ARCHIVE_NAME}."
                )
            self._root = roots[0]
            return
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path} does not exist (expected {ARCHIVE_NAME}).")
        self._file = self.path.open("rb")
        try:
            self._zip = zipfile.ZipFile(self._file)
        except zipfile.BadZipFile as e:
            self.close()
            raise ValueError(f"{self.path} is not a zip file (expected {ARCHIVE_NAME}).") from e
        names = self._zip.namelist()
        wnids = sorted((n for n in names if n.rpartition("/")[2] == "wnids.txt"), key=len)
        if not wnids:
            self.close()
            raise FileNotFoundError(f"{self.path} holds no wnids.txt: it is not {ARCHIVE_NAME}.")
        self._prefix = wnids[0][: -len("wnids.txt")]
        self._dirs: dict[str, list[str]] = {}
        for name in names:
            if name.startswith(self._prefix) and not name.endswith("/"):
                folder, _, file = name[len(self._prefix) :].rpartition("/")
                self._dirs.setdefault(folder, []).append(file)

    def read_bytes(self, relpath: str) -> bytes:
        """The content of a file, e.g. ``"val/val_annotations.txt"``."""
        if self._zip is None:
            return (self._root / relpath).read_bytes()
        try:
            return self._zip.read(self._prefix + relpath)
        except KeyError as e:
            raise FileNotFoundError(f"{self.path} has no {ROOT_DIR}/{relpath}.") from e

    def read_text(self, relpath: str) -> str:
        """The content of a UTF-8 text file."""
        return self.read_bytes(relpath).decode("utf-8")

    def list_files(self, relpath: str) -> list[str]:
        """Names of the files directly in folder ``relpath``, in natural order (2 before 10)."""
        if self._zip is None:
            folder = self._root / relpath
            if not folder.is_dir():
                raise FileNotFoundError(f"{folder} is not a folder.")
            names = [p.name for p in folder.iterdir()]
        elif relpath in self._dirs:
            names = self._dirs[relpath]
        else:
            raise FileNotFoundError(f"{self.path} has no folder {ROOT_DIR}/{relpath}.")
        return sorted(names, key=_natural_key)

    def close(self) -> None:
        """Closes the zip file (a no-op for a folder)."""
        if self._zip is not None:
            self._zip.close()
            self._zip = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> TinyImagenetArchive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _natural_key(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def read_wnids(archive: TinyImagenetArchive) -> list[str]:
    """The class ids of ``wnids.txt`` in file order (the label of a class is its index)."""
    wnids = [w.strip() for w in archive.read_text("wnids.txt").splitlines() if w.strip()]
    if not wnids or len(set(wnids)) != len(wnids):
        raise ValueError("wnids.txt must list distinct class ids, one per line.")
    return wnids


def split_files(
    archive: TinyImagenetArchive, split: str, wnids: Sequence[str]
) -> list[tuple[str, int]]:
    """``(path in the archive, label)`` of every image of ``split``; label -1 for ``test``.

    ``train`` is ordered by class (wnids order), then file; ``validation`` and ``test`` by file.
    """
    if split == "train":
        files = []
        for label, wnid in enumerate(wnids):
            folder = f"train/{wnid}/images"
            files += [(f"{folder}/{f}", label) for f in _images(archive.list_files(folder))]
        return files
    if split == "validation":
        index = {wnid: i for i, wnid in enumerate(wnids)}
        labels = {}
        lines = archive.read_text("val/val_annotations.txt").splitlines()
        for line_no, line in enumerate(lines, 1):
            if not line.strip():
                continue
            fields = [f.strip() for f in line.split("\t")]
            if len(fields) < 2 or fields[1] not in index:
                raise ValueError(
                    f"val/val_annotations.txt line {line_no} ({line!r}) does not give a file "
                    "name and a class id of wnids.txt, separated by a tab."
                )
            labels[fields[0]] = index[fields[1]]
        return [(f"val/images/{f}", labels[f]) for f in sorted(labels, key=_natural_key)]
    if split == "test":
        return [(f"test/images/{f}", -1) for f in _images(archive.list_files("test/images"))]
    raise ValueError(f"unknown TinyImageNet split {split!r}; the splits are {SPLITS}.")


def _images(names: list[str]) -> list[str]:
    return [n for n in names if n.lower().endswith(_IMAGE_SUFFIXES)]


def encode_image(data: bytes, what: str = "image") -> bytes:
    """The bytes to store for an image file: RGB JPEGs unchanged, others as RGB PNG (lossless).

    Raises:
      ValueError: ``data`` is not an image, or not 64x64 (``what`` names it in the message).
    """
    with _open_image(data, what) as image:
        if image.mode == "RGB" and image.format == "JPEG":
            return data
        rgb = image.convert("RGB")
    buffer = io.BytesIO()
    rgb.save(buffer, format="PNG")
    return buffer.getvalue()


def decode_image(data: bytes, what: str = "image") -> np.ndarray:
    """An image file as uint8 RGB (64, 64, 3), decoded with PIL (grayscale/CMYK converted)."""
    with _open_image(data, what) as image:
        return np.asarray(image.convert("RGB"))


def _open_image(data: bytes, what: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as e:
        raise ValueError(f"{what} is not an image file PIL can read.") from e
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        image.close()
        raise ValueError(f"{what} is {image.size[0]}x{image.size[1]}, expected 64x64.")
    return image


def generate_examples(
    archive: TinyImagenetArchive, split: str, wnids: Sequence[str]
) -> Iterator[tuple[str, dict[str, Any]]]:
    """TFDS examples ``(key, {"image": bytes, "label": int, "file_name": str})`` of ``split``.

    Keys are the file names (unique within a split); images are ``encode_image``'s bytes.
    """
    for relpath, label in split_files(archive, split, wnids):
        name = relpath.rpartition("/")[2]
        image = encode_image(archive.read_bytes(relpath), f"{ROOT_DIR}/{relpath}")
        yield name, {"image": image, "label": label, "file_name": name}


class TinyImagenet(builder.ArrayRecordBuilder, skip_registration=__name__ == "__main__"):
    """TinyImageNet-200: 64x64 RGB images of 200 ImageNet classes (TFDS name tiny_imagenet).

    Written as array_record unless another ``file_format`` is given (others need TensorFlow).
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: train, validation, test (test has label -1)."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Download {URL} (md5 {ARCHIVE_MD5}, about 240 MB) and put {ARCHIVE_NAME}, or the
{ROOT_DIR}/ folder extracted from it, in the manual directory: <data_dir>/downloads/manual/
by default (e.g. ~/tensorflow_datasets/downloads/manual/{ARCHIVE_NAME}), or the folder given
as DownloadConfig(manual_dir=...) / --manual_dir. Without it the builder downloads the URL."""

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "Tiny ImageNet (CS231N): 64x64 images of 200 ImageNet classes, 500 train, 50 "
                "validation and 50 unlabelled test images per class."
            ),
            features=tfds.features.FeaturesDict(
                {
                    # Mostly the archive's JPEG bytes; converted (grayscale/CMYK) images are PNG.
                    # Every TFDS decoder (PIL, OpenCV, tf.image.decode_image) detects the format.
                    "image": tfds.features.Image(
                        shape=(IMAGE_SIZE, IMAGE_SIZE, 3), encoding_format="jpeg"
                    ),
                    # Names (the wnids, in wnids.txt order) are read from the archive.
                    "label": tfds.features.ClassLabel(),
                    "file_name": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="http://cs231n.stanford.edu/",
            citation=_CITATION,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        path = self._archive_path(dl_manager)
        with TinyImagenetArchive(path) as archive:
            wnids = read_wnids(archive)
        self.info.features["label"].names = wnids
        return {split: self._generate_examples(path, split, wnids) for split in SPLITS}

    def _generate_examples(
        self, path: epath.PathLike, split: str, wnids: Sequence[str]
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        with TinyImagenetArchive(path) as archive:
            yield from generate_examples(archive, split, wnids)

    def _archive_path(self, dl_manager: tfds.download.DownloadManager) -> epath.Path:
        """The archive in the manual directory; else the downloaded and extracted URL."""
        try:
            manual_dir = dl_manager.manual_dir
        except AssertionError:  # The manual directory is missing or empty.
            manual_dir = None
        if manual_dir is not None:
            for candidate in (manual_dir / ARCHIVE_NAME, manual_dir / ROOT_DIR):
                if candidate.exists():
                    return candidate
        try:
            # Offline, TFDS's downloader retries for minutes: find out in seconds instead.
            datasets.check_reachable(URL)
            return dl_manager.download_and_extract(URL)
        except Exception as e:  # No network, HTTP error, bad archive: say how to do it by hand.
            raise FileNotFoundError(
                f"{ARCHIVE_NAME} is not in the manual directory and downloading it failed "
                f"({type(e).__name__}: {e}).\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}"
            ) from e


def prepare(
    data_dir: str | None = None, *, manual_dir: str | None = None
) -> tfds.core.DatasetBuilder:
    """Prepares ``tiny_imagenet`` as array_record under ``data_dir`` (TFDS default if None).

    Returns the prepared builder. No TensorFlow needed; a no-op when already prepared.
    """
    return builder.prepare(TinyImagenet, data_dir, manual_dir=manual_dir)


def prepare_npz(archive_or_dir: epath.PathLike, out_path: str, split: str = "train") -> int:
    """Writes one split as ``.npz`` for ``config.data.source=npz``; returns the image count.

    Arrays: ``train_images`` uint8 (N, 64, 64, 3) RGB, ``train_labels`` int32 (N,) (-1 for
    ``test``), ``class_names`` (the wnids). Order: as ``split_files``. Pure Python (PIL).
    """
    with TinyImagenetArchive(archive_or_dir) as archive:
        wnids = read_wnids(archive)
        files = split_files(archive, split, wnids)
        if not files:
            raise ValueError(f"split {split!r} of {archive.path} holds no images.")
        images = np.empty((len(files), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
        labels = np.empty(len(files), np.int32)
        for i, (relpath, label) in enumerate(files):
            images[i] = decode_image(archive.read_bytes(relpath), f"{ROOT_DIR}/{relpath}")
            labels[i] = label
    out_dir = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out_dir, suffix=".npz.tmp", delete=False) as f:
        np.savez(f, train_images=images, train_labels=labels, class_names=np.asarray(wnids))
    os.replace(f.name, out_path)  # Atomic: a reader never sees a partial file.
    return len(files)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: prepare the TFDS dataset, or (with --npz) write one split as .npz."""
    parser = argparse.ArgumentParser(
        prog="python -m ddst_jax.datasets.tiny_imagenet",
        description="Prepare TinyImageNet-200 for ddst_jax without TensorFlow.",
    )
    parser.add_argument("--data_dir", help="TFDS data dir (default: TFDS's, ~/tensorflow_datasets)")
    parser.add_argument(
        "--manual_dir", help=f"folder holding {ARCHIVE_NAME} (default: <data_dir>/downloads/manual)"
    )
    parser.add_argument("--npz", metavar="OUT", help="write an .npz file instead of TFDS files")
    parser.add_argument("--archive", help=f"with --npz: {ARCHIVE_NAME} or its extracted folder")
    parser.add_argument("--split", default="train", choices=SPLITS, help="with --npz")
    args = parser.parse_args(argv)
    if args.npz:
        if not args.archive:
            parser.error("--npz needs --archive")
        count = prepare_npz(args.archive, args.npz, args.split)
        print(f"Wrote {count} images of split {args.split!r} to {args.npz}.")
        return
    builder.prepare_and_report(TinyImagenet, args.data_dir, args.manual_dir)


if __name__ == "__main__":
    # Run the registered module's main (this __main__ copy does not register the builder).
    from ddst_jax.datasets.tiny_imagenet import main as _main

    _main()
