"""STL-10 prepared for TFDS without TensorFlow, from the official binary archive.

TFDS ships an ``stl10`` builder, but preparing it needs TensorFlow. This builder writes the
same dataset: name ``stl10``, version 1.0.0, features ``image`` uint8 (96, 96, 3) stored as PNG
and ``label`` ClassLabel (10 names, from ``class_names.txt``; -1 in ``unlabelled``), splits
``train`` (5000), ``test`` (8000) and ``unlabelled`` (100000), and TFDS's example keys (the
index within the split, so the written order should match too; see ``cifar10``). TFDS's own
registered ``stl10`` builder and ``tfds.data_source("stl10")`` read the result; this class is
therefore not registered under the name, and ``prepare`` runs it.

Source: ``stl10_binary.tar.gz`` (2.6 GB, the file TFDS uses), from the manual directory
(``<data_dir>/downloads/manual/`` by default) or the download directory, else downloaded from
http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz; its size and SHA-256 are checked
(plain http: the checksum is what makes the download trustworthy). In ``stl10_binary/``,
``*_X.bin`` hold 96x96 images of 27648 bytes: red, then green, then blue, each channel
*column-major* (the first 96 bytes are the first column); ``*_y.bin`` hold one label byte per
image, 1-based (1..10). The archive is read as it streams; nothing is extracted::

    python -m ddst_jax.datasets.stl10 --data_dir ~/tensorflow_datasets
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from ddst_jax import datasets
from ddst_jax.datasets import builder

# Size and SHA-256 as in TFDS's checksums.tsv for stl10 (tensorflow_datasets 4.9).
ARCHIVE = datasets.Archive(
    name="stl10_binary.tar.gz",
    url="http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz",
    size=2640397119,
    sha256="f31fd99273a1acb8609c8db427cebb1de3f71de77758cdc0e22956e1289b9866",
)
ROOT_DIR = "stl10_binary"
# Split -> (images file, labels file or None).
SPLIT_FILES: Mapping[str, tuple[str, str | None]] = {
    "train": ("train_X.bin", "train_y.bin"),
    "test": ("test_X.bin", "test_y.bin"),
    "unlabelled": ("unlabeled_X.bin", None),
}
CLASS_NAMES_FILE = "class_names.txt"
IMAGE_SIZE = 96
NUM_CLASSES = 10
IMAGE_BYTES = 3 * IMAGE_SIZE * IMAGE_SIZE

_CITATION = """\
@inproceedings{coates2011stl10,
  title={An Analysis of Single-Layer Networks in Unsupervised Feature Learning},
  author={Coates, Adam and Ng, Andrew and Lee, Honglak},
  booktitle={AISTATS},
  year={2011}
}"""


def decode_images(records: np.ndarray) -> np.ndarray:
    """STL-10 image records uint8 (n, 27648) -> uint8 (n, 96, 96, 3) HWC RGB.

    A record is channel-major, each channel column-major: (c, column, row) in C order.
    """
    return records.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 3, 2, 1)


def decode_labels(data: bytes, what: str) -> np.ndarray:
    """A ``*_y.bin`` file (one byte per image, 1..10) -> int64 (n,) labels 0..9.

    Raises:
      ValueError: a byte is not in 1..10 (``what`` names the file).
    """
    labels = np.frombuffer(data, np.uint8).astype(np.int64)
    if labels.size and (labels.min() < 1 or labels.max() > NUM_CLASSES):
        raise ValueError(f"{what} has labels outside 1..10 (STL-10 labels are 1-based).")
    return labels - 1


def generate_examples(
    image_file: Any, labels: np.ndarray | None, what: str
) -> Iterator[tuple[int, dict[str, Any]]]:
    """TFDS examples ``(index, {"image": PNG bytes, "label"})`` from a ``*_X.bin`` stream.

    Args:
      image_file: binary file object of the images (read in chunks; any size).
      labels: int (n,) 0-based labels of the n images, or None (unlabelled: label -1).
      what: the images file's name, for error messages.

    Raises:
      ValueError: the file's image count differs from ``len(labels)``.
    """
    index = 0
    for records in builder.read_records(image_file, IMAGE_BYTES, what):
        for image in decode_images(records):
            if labels is not None and index >= len(labels):
                raise ValueError(f"{what} holds more images than its labels file has labels.")
            label = -1 if labels is None else int(labels[index])
            yield index, {"image": builder.png_bytes(image), "label": label}
            index += 1
    if labels is not None and index != len(labels):
        raise ValueError(f"{what} holds {index} images but its labels file {len(labels)} labels.")


class Stl10(builder.TarArchiveBuilder, skip_registration=True):
    """STL-10 (TFDS name ``stl10``, version 1.0.0), prepared without TensorFlow."""

    name = "stl10"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "As TFDS's stl10 1.0.0, prepared without TensorFlow."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = builder.manual_instructions(ARCHIVE)
    ARCHIVE = ARCHIVE
    CLASS_NAMES_MEMBER = f"{ROOT_DIR}/{CLASS_NAMES_FILE}"
    NUM_CLASSES = NUM_CLASSES
    SPLITS = tuple(SPLIT_FILES)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "STL-10: 96x96 colour images of 10 classes, 500 training and 800 test images "
                "per class, and 100000 unlabelled images (label -1)."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3)),
                    "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="http://ai.stanford.edu/~acoates/stl10/",
            citation=_CITATION,
        )

    def _generate_examples(
        self, path: epath.PathLike, split: str
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        image_name, label_name = (f"{ROOT_DIR}/{f}" if f else None for f in SPLIT_FILES[split])
        labels = None
        if label_name:
            data = builder.read_tar_members(path, [label_name])[label_name]
            labels = decode_labels(data, label_name)
        # One pass for the labels (small), one streaming pass for the images (up to 2.8 GB).
        for _, image_file in builder.tar_members(path, [image_name]):
            yield from generate_examples(image_file, labels, image_name)


def prepare(data_dir: str | None = None, *, manual_dir: str | None = None) -> Stl10:
    """Prepares ``stl10`` as array_record under ``data_dir`` (TFDS default if None).

    No TensorFlow needed; a no-op when already prepared. See ``builder.prepare``.
    """
    return builder.prepare(Stl10, data_dir, manual_dir=manual_dir)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``--data_dir``, ``--manual_dir``."""
    builder.main(Stl10, argv)


if __name__ == "__main__":
    main()
