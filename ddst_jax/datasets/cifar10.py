"""CIFAR-10 prepared for TFDS without TensorFlow, from the official binary archive.

TFDS ships a ``cifar10`` builder, but preparing it needs TensorFlow. This builder writes the
same dataset: name ``cifar10``, version 3.0.2, features ``id`` (``"train_00000"``...), ``image``
uint8 (32, 32, 3) stored as PNG, ``label`` ClassLabel (10 names, from ``batches.meta.txt``),
splits ``train`` (50000) and ``test`` (10000), and TFDS's example keys (the index within the
split; TFDS orders the written examples by a hash of the key, so the order should match too:
not compared with a TensorFlow-prepared copy, which needs TensorFlow). TFDS's own registered
``cifar10`` builder and ``tfds.data_source("cifar10")`` read the result; this class is
therefore not registered under the name, and ``prepare`` runs it.

Source: ``cifar-10-binary.tar.gz`` (the file TFDS uses), from the manual directory
(``<data_dir>/downloads/manual/`` by default) or the download directory, else downloaded from
https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz; its size and SHA-256 are checked.
Each ``.bin`` file in ``cifar-10-batches-bin/`` holds records of 1 label byte and 3072 image
bytes: 1024 red, then 1024 green, then 1024 blue, each channel row-major (CHW)::

    python -m ddst_jax.datasets.cifar10 --data_dir ~/tensorflow_datasets
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from ddst_jax import datasets
from ddst_jax.datasets import builder

# Size and SHA-256 as in TFDS's url_checksums (tensorflow_datasets 4.9).
ARCHIVE = datasets.Archive(
    name="cifar-10-binary.tar.gz",
    url="https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
    size=170052171,
    sha256="c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
)
ROOT_DIR = "cifar-10-batches-bin"
SPLIT_FILES: Mapping[str, Sequence[str]] = {
    "train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
    "test": ("test_batch.bin",),
}
LABEL_NAMES_FILE = "batches.meta.txt"
IMAGE_SIZE = 32
NUM_CLASSES = 10
RECORD_BYTES = 1 + 3 * IMAGE_SIZE * IMAGE_SIZE

_CITATION = """\
@TECHREPORT{Krizhevsky09learningmultiple,
    author = {Alex Krizhevsky},
    title = {Learning multiple layers of features from tiny images},
    institution = {},
    year = {2009}
}"""


def decode_records(records: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 binary records -> ``(images uint8 (n, 32, 32, 3) HWC RGB, labels int64 (n,))``.

    Args:
      records: uint8 (n, 3073): a label byte, then the image as CHW (see the module docstring).
      what: the file the records come from, for the error message.

    Raises:
      ValueError: a label is not in [0, 10).
    """
    labels = records[:, 0].astype(np.int64)
    if labels.size and labels.max() >= NUM_CLASSES:
        raise ValueError(f"{what} has label {labels.max()}; CIFAR-10 labels are 0..9.")
    images = records[:, 1:].reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 2, 3, 1)
    return images, labels


def generate_examples(
    files: Mapping[str, bytes], split: str
) -> Iterator[tuple[int, dict[str, Any]]]:
    """TFDS examples ``(index, {"id": "<split>_<index:05d>", "image": PNG bytes, "label"})``.

    Keys and ids are TFDS's: the index within the split, counted over its files in order.

    Args:
      files: the contents of the split's files, by path in the archive
        (``cifar-10-batches-bin/data_batch_1.bin``...).
      split: ``"train"`` or ``"test"``; its files are read in ``SPLIT_FILES`` order.
    """
    index = 0
    for file in SPLIT_FILES[split]:
        path = f"{ROOT_DIR}/{file}"
        for records in builder.read_records(io.BytesIO(files[path]), RECORD_BYTES, path):
            images, labels = decode_records(records, path)
            for image, label in zip(images, labels, strict=True):
                png = builder.png_bytes(image)
                yield index, {"id": f"{split}_{index:05d}", "image": png, "label": int(label)}
                index += 1


class Cifar10(builder.TarArchiveBuilder, skip_registration=True):
    """CIFAR-10 (TFDS name ``cifar10``, version 3.0.2), prepared without TensorFlow."""

    name = "cifar10"
    VERSION = tfds.core.Version("3.0.2")
    RELEASE_NOTES = {"3.0.2": "As TFDS's cifar10 3.0.2, prepared without TensorFlow."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = builder.manual_instructions(ARCHIVE)
    ARCHIVE = ARCHIVE
    CLASS_NAMES_MEMBER = f"{ROOT_DIR}/{LABEL_NAMES_FILE}"
    NUM_CLASSES = NUM_CLASSES
    SPLITS = tuple(SPLIT_FILES)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "CIFAR-10: 60000 32x32 colour images in 10 classes, 6000 per class; 50000 "
                "training and 10000 test images."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "id": tfds.features.Text(),
                    "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3)),
                    "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://www.cs.toronto.edu/~kriz/cifar.html",
            citation=_CITATION,
        )

    def _generate_examples(
        self, path: epath.PathLike, split: str
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        # The archive need not hold the train files in order: read all (150 MB), then in order.
        files = builder.read_tar_members(path, [f"{ROOT_DIR}/{f}" for f in SPLIT_FILES[split]])
        yield from generate_examples(files, split)


def prepare(data_dir: str | None = None, *, manual_dir: str | None = None) -> Cifar10:
    """Prepares ``cifar10`` as array_record under ``data_dir`` (TFDS default if None).

    No TensorFlow needed; a no-op when already prepared. See ``builder.prepare``.
    """
    return builder.prepare(Cifar10, data_dir, manual_dir=manual_dir)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``--data_dir``, ``--manual_dir``."""
    builder.main(Cifar10, argv)


if __name__ == "__main__":
    main()
