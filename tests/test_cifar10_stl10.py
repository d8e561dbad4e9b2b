"""CIFAR-10 and STL-10 builders: prepared without TensorFlow from small archives in the official
formats, read back with ``tfds.data_source`` (that is, by TFDS's own registered builders).

The archives are written from the format descriptions, not from the builders' code: CIFAR-10
records are a label byte then each channel row-major (``ravel()``), STL-10 records each channel
column-major (``ravel(order="F")``) with 1-based labels. Images are random, so a transposed or
mirrored reading, or a label off by one, changes what is read back.
"""

from __future__ import annotations

import dataclasses
import io
import os
import subprocess
import sys
import tarfile
import textwrap

import numpy as np
import pytest
import tensorflow_datasets as tfds

from ddst_jax import data, datasets
from ddst_jax.datasets import builder
from ddst_jax.datasets import cifar10 as cifar
from ddst_jax.datasets import stl10 as stl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Not the official order: the names must come from the archive.
CIFAR_NAMES = ["truck", "ship", "horse", "frog", "dog", "deer", "cat", "bird", "automobile",
               "airplane"]  # fmt: skip
STL_NAMES = ["monkey", "airplane", "bird", "car", "cat", "deer", "dog", "horse", "ship", "truck"]
CIFAR_PER_BATCH = 2  # Images per data_batch_i.bin (5 files); the test batch has 3.
STL_COUNTS = {"train": 3, "test": 2, "unlabelled": 4}


def _images(seed: int, n: int, size: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _cifar_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Expected (images (n, 32, 32, 3), labels (n,)) of a split, in file order."""
    n = 5 * CIFAR_PER_BATCH if split == "train" else 3
    labels = np.random.default_rng(len(split)).integers(0, 10, n)
    labels[:2] = [0, 9]  # Both ends of the label range.
    return _images(1 if split == "train" else 2, n, 32), labels


def _cifar_records(images: np.ndarray, labels: np.ndarray) -> bytes:
    """The binary version's records: label byte, then red, green, blue, each row-major."""
    return b"".join(
        bytes([label]) + b"".join(image[:, :, c].ravel().tobytes() for c in range(3))
        for image, label in zip(images, labels, strict=True)
    )


def _stl_split(split: str) -> tuple[np.ndarray, np.ndarray | None]:
    n = STL_COUNTS[split]
    labels = None if split == "unlabelled" else np.arange(n) % 10
    if split == "test":
        labels = np.array([9, 4])  # Class 10 in the file: the 1-based maximum.
    return _images({"train": 3, "test": 4, "unlabelled": 5}[split], n, 96), labels


def _stl_images_file(images: np.ndarray) -> bytes:
    """``*_X.bin``: red, green, blue, each channel column-major (Fortran order)."""
    return b"".join(image[:, :, c].ravel(order="F").tobytes() for image in images for c in range(3))


def _cifar_files() -> dict[str, bytes]:
    train_images, train_labels = _cifar_split("train")
    files = {"batches.meta.txt": ("\n".join(CIFAR_NAMES) + "\n\n").encode(), "readme.html": b"x"}
    for i in (4, 2, 5, 1, 3):  # The archive need not hold the batches in order.
        part = slice((i - 1) * CIFAR_PER_BATCH, i * CIFAR_PER_BATCH)
        files[f"data_batch_{i}.bin"] = _cifar_records(train_images[part], train_labels[part])
    files["test_batch.bin"] = _cifar_records(*_cifar_split("test"))
    return {f"{cifar.ROOT_DIR}/{name}": content for name, content in files.items()}


def _stl_files() -> dict[str, bytes]:
    files = {"class_names.txt": ("\n".join(STL_NAMES) + "\n").encode(), "fold_indices.txt": b"0"}
    for split, (image_file, label_file) in stl.SPLIT_FILES.items():
        images, labels = _stl_split(split)
        files[image_file] = _stl_images_file(images)
        if label_file:
            files[label_file] = bytes((labels + 1).tolist())  # 1-based in the file.
    return {f"{stl.ROOT_DIR}/{name}": content for name, content in files.items()}


def _write_tar(path, files: dict[str, bytes]) -> datasets.Archive:
    """Writes a .tar.gz holding ``files`` under their folder; returns its Archive (checksums)."""
    with tarfile.open(path, "w:gz") as tar:
        folder = tarfile.TarInfo(next(iter(files)).split("/")[0])
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    size, sha256 = datasets.file_digest(path)
    return datasets.Archive(os.path.basename(path), path.as_uri(), size, sha256)


# name -> (module, builder class, archive contents)
DATASETS = {"cifar10": (cifar, cifar.Cifar10, _cifar_files), "stl10": (stl, stl.Stl10, _stl_files)}


def _place_archive(tmp_path, name: str, monkeypatch) -> str:
    """A data dir with ``name``'s small archive in downloads/manual; ARCHIVE set to its checksum."""
    _, cls, files = DATASETS[name]
    data_dir = tmp_path / "tfds"
    manual = data_dir / "downloads" / "manual"
    manual.mkdir(parents=True)
    archive = _write_tar(manual / cls.ARCHIVE.name, files())
    monkeypatch.setattr(cls, "ARCHIVE", dataclasses.replace(cls.ARCHIVE, **_sums(archive)))
    return str(data_dir)


def _sums(archive: datasets.Archive) -> dict:
    return {"size": archive.size, "sha256": archive.sha256}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """name -> a data dir where the dataset was prepared from the archive in the manual dir."""
    out = {}
    for name, (module, _, _) in DATASETS.items():
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(datasets, "download_archive", _no_download)
            data_dir = _place_archive(tmp_path_factory.mktemp(name), name, mp)
            module.prepare(data_dir)
        out[name] = data_dir
    return out


def _no_download(*args, **kwargs):
    raise AssertionError("the archive in the manual dir should be used")


def _read(data_dir: str, name: str, split: str) -> list[dict]:
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    return [source[i] for i in range(len(source))]


@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar10_reads_back_exactly(prepared, split):
    images, labels = _cifar_split(split)
    examples = _read(prepared["cifar10"], "cifar10", split)
    ids = [ex["id"].decode() if isinstance(ex["id"], bytes) else ex["id"] for ex in examples]
    assert sorted(ids) == [f"{split}_{i:05d}" for i in range(len(images))]  # TFDS's ids.
    for image_id, ex in zip(ids, examples, strict=True):
        i = int(image_id.rpartition("_")[2])  # Position in data_batch_1..5 order.
        assert ex["image"].dtype == np.uint8 and ex["image"].shape == (32, 32, 3)
        np.testing.assert_array_equal(ex["image"], images[i], err_msg=image_id)
        assert ex["label"] == labels[i], image_id


@pytest.mark.parametrize("split", list(STL_COUNTS))
def test_stl10_reads_back_exactly(prepared, split):
    images, labels = _stl_split(split)
    examples = _read(prepared["stl10"], "stl10", split)
    # No id feature: find each example's image among the written ones (all distinct).
    index = {image.tobytes(): i for i, image in enumerate(images)}
    found = [index.get(ex["image"].tobytes()) for ex in examples]
    assert None not in found and sorted(found) == list(range(len(images)))  # Pixels exact.
    for i, ex in zip(found, examples, strict=True):
        assert ex["image"].shape == (96, 96, 3)
        assert ex["label"] == (-1 if labels is None else labels[i])


@pytest.mark.parametrize(
    "name, version, names, counts, features",
    [
        ("cifar10", "3.0.2", CIFAR_NAMES, {"train": 10, "test": 3}, {"id", "image", "label"}),
        ("stl10", "1.0.0", STL_NAMES, STL_COUNTS, {"image", "label"}),
    ],
)
def test_prepared_as_tfds_own_dataset(prepared, name, version, names, counts, features):
    reader = tfds.builder(name, data_dir=prepared[name])
    # TFDS's own builder reads it: the project's is not registered under TFDS's name.
    assert type(reader).__module__.startswith("tensorflow_datasets.")
    assert datasets.ensure_registered(name)  # The project prepares it, without TensorFlow.
    assert reader.info.version == version
    assert reader.info.file_format == tfds.core.FileFormat.ARRAY_RECORD
    assert reader.info.features["label"].names == names
    assert set(reader.info.features.keys()) == features
    assert {s: split.num_examples for s, split in reader.info.splits.items()} == counts


@pytest.mark.parametrize(
    "name, split, size", [("cifar10", "train", 32), ("stl10", "unlabelled", 48)]
)
def test_experiment_data_prepares_on_first_use(tmp_path, monkeypatch, name, split, size):
    monkeypatch.setattr(datasets, "download_archive", _no_download)
    data_dir = _place_archive(tmp_path, name, monkeypatch)
    config = data.default_config()
    config.update(dict(name=name, split=split, data_dir=data_dir, image_size=size))
    source = data.load_source(config, seed=0)  # Not prepared: prepares it, no TensorFlow.
    expected = (_cifar_split if name == "cifar10" else _stl_split)(split)[0]
    assert len(source) == len(expected)
    images, _ = source.read(np.arange(len(source)))
    assert images.shape == (len(expected), size, size, 3)
    if name == "cifar10":  # Full size: the same images, in TFDS's order.
        assert sorted(im.tobytes() for im in images) == sorted(im.tobytes() for im in expected)


def test_downloads_and_verifies_when_no_archive_is_there(tmp_path, monkeypatch):
    archive = _write_tar(tmp_path / cifar.ARCHIVE.name, _cifar_files())
    monkeypatch.setattr(cifar.Cifar10, "ARCHIVE", archive)  # file:// URL, the archive's sums
    data_dir = tmp_path / "tfds"
    builder_ = cifar.prepare(str(data_dir))
    assert builder_.info.splits["test"].num_examples == 3
    downloaded = data_dir / "downloads" / archive.name
    assert datasets.file_digest(downloaded) == (archive.size, archive.sha256)
    assert not list((data_dir / "downloads").glob("*.part"))


def test_wrong_archive_in_manual_dir_is_refused(tmp_path, monkeypatch):
    data_dir = _place_archive(tmp_path, "cifar10", monkeypatch)
    wrong = dataclasses.replace(cifar.Cifar10.ARCHIVE, sha256="0" * 64)
    monkeypatch.setattr(cifar.Cifar10, "ARCHIVE", wrong)
    with pytest.raises(datasets.ArchiveError) as info:
        cifar.prepare(data_dir)
    message = str(info.value)
    assert "not the official cifar-10-binary.tar.gz" in message and "Delete it" in message
    assert len(message.splitlines()) == 1
    assert not os.path.exists(os.path.join(data_dir, "cifar10"))  # Nothing half-written.


def test_download_with_wrong_checksum_is_deleted(tmp_path, monkeypatch):
    archive = _write_tar(tmp_path / cifar.ARCHIVE.name, _cifar_files())
    monkeypatch.setattr(
        cifar.Cifar10, "ARCHIVE", dataclasses.replace(archive, size=archive.size + 1)
    )
    data_dir = tmp_path / "tfds"
    with pytest.raises(datasets.ArchiveError, match="downloading it failed") as info:
        cifar.prepare(str(data_dir))
    assert "not the official" in str(info.value) and "it was deleted" in str(info.value)
    assert not data_dir.exists()  # The download and the folders TFDS made are gone.


def test_offline_without_archive_says_where_to_put_it(tmp_path, monkeypatch):
    def offline(url):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(datasets, "check_reachable", offline)
    data_dir = str(tmp_path / "tfds")
    with pytest.raises(SystemExit) as info:
        stl.main(["--data_dir", data_dir])
    message = str(info.value)
    assert message.startswith("error: stl10_binary.tar.gz is not in ")
    assert f"{data_dir}/downloads/manual/" in message and stl.ARCHIVE.url in message
    assert "name resolution" in message and len(message.splitlines()) == 1
    assert not os.path.exists(data_dir)
    config = data.default_config()
    config.update(dict(name="cifar10", data_dir=data_dir))
    with pytest.raises(data.DatasetUnavailableError) as info:  # The experiments' path.
        data.load_source(config, seed=0)
    assert "python -m ddst_jax.datasets.cifar10" in str(info.value)
    assert "cifar-10-binary.tar.gz is not in" in str(info.value)


def test_command_line_prepares(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(datasets, "download_archive", _no_download)
    data_dir = _place_archive(tmp_path, "cifar10", monkeypatch)
    cifar.main(["--data_dir", data_dir])
    out = capsys.readouterr().out
    assert "Prepared cifar10 3.0.2 in " in out and "'train': 10, 'test': 3}" in out


def test_formats_are_decoded_as_documented():
    record = np.zeros((1, cifar.RECORD_BYTES), np.uint8)
    record[0, 0] = 7
    record[0, 1:33] = np.arange(32)  # The first row of red.
    record[0, 1 + 1024] = 200  # Green of the top-left pixel.
    images, labels = cifar.decode_records(record, "x")
    assert labels.tolist() == [7]
    assert images[0, 0, :, 0].tolist() == list(range(32)) and images[0, 0, 0, 1] == 200
    with pytest.raises(ValueError, match="label 10"):
        cifar.decode_records(np.full((1, cifar.RECORD_BYTES), 10, np.uint8), "x")
    stl_record = np.zeros((1, stl.IMAGE_BYTES), np.uint8)
    stl_record[0, :96] = np.arange(96)  # The first column of red.
    assert stl.decode_images(stl_record)[0, :, 0, 0].tolist() == list(range(96))
    assert stl.decode_labels(bytes([1, 10]), "y").tolist() == [0, 9]
    with pytest.raises(ValueError, match="1-based"):
        stl.decode_labels(bytes([0]), "y")


def test_archive_structure_errors(tmp_path):
    files = _cifar_files()
    del files[f"{cifar.ROOT_DIR}/test_batch.bin"]
    _write_tar(tmp_path / "a.tar.gz", files)
    with pytest.raises(ValueError, match="holds no cifar-10-batches-bin/test_batch.bin"):
        builder.read_tar_members(tmp_path / "a.tar.gz", [f"{cifar.ROOT_DIR}/test_batch.bin"])
    chunks = builder.read_records(io.BytesIO(bytes(10)), 2, "f", chunk_records=2)
    assert [c.shape for c in chunks] == [(2, 2), (2, 2), (1, 2)]
    with pytest.raises(ValueError, match="f does not hold whole 3-byte records"):
        list(builder.read_records(io.BytesIO(bytes(10)), 3, "f"))
    labels = np.arange(3)
    with pytest.raises(ValueError, match="holds 2 images but its labels file 3"):
        list(stl.generate_examples(io.BytesIO(bytes(2 * stl.IMAGE_BYTES)), labels, "X"))


# Run in a fresh interpreter, so that nothing else has imported TensorFlow before.
_NO_TENSORFLOW = """
import dataclasses, importlib.util, sys

import tensorflow_datasets as tfds
from ddst_jax.datasets import cifar10

cifar10.Cifar10.ARCHIVE = dataclasses.replace(cifar10.ARCHIVE, size={size}, sha256={sha256!r})
cifar10.prepare({data_dir!r})
source = tfds.data_source("cifar10", split="test", data_dir={data_dir!r}, download=False)
print("read", sorted(int(source[i]["label"]) for i in range(len(source))))
print("tensorflow imported:", any(m.split(".")[0] == "tensorflow" for m in sys.modules))
print("tensorflow installed:", importlib.util.find_spec("tensorflow") is not None)
"""


def test_preparing_needs_no_tensorflow(tmp_path, monkeypatch):
    data_dir = _place_archive(tmp_path, "cifar10", monkeypatch)
    script = _NO_TENSORFLOW.format(data_dir=data_dir, **_sums(cifar.Cifar10.ARCHIVE))
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, env=env,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"read {sorted(_cifar_split('test')[1].tolist())}" in result.stdout
    # Where TensorFlow is not installed (this venv, CI) preparing works at all; where it is,
    # preparing and reading still do not import it.
    assert "tensorflow imported: False" in result.stdout
