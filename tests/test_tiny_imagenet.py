"""TinyImageNet builder: prepared without TensorFlow from a small synthetic archive, read back.

The synthetic archive has the official layout (``tiny-imagenet-200/wnids.txt``, ``train/<wnid>/
images``, ``val/images`` + ``val/val_annotations.txt``, ``test/images``), 3 classes whose
wnids.txt order is not sorted, and a mix of RGB, grayscale and CMYK JPEGs.
"""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from ddst_jax import data, datasets
from ddst_jax.datasets import ensure_registered
from ddst_jax.datasets import tiny_imagenet as tin

WNIDS = ["n09256479", "n01443537", "n02124075"]  # Deliberately not sorted: order is the label.
TRAIN_PER_CLASS = 4
VAL = [("val_0.JPEG", 2), ("val_1.JPEG", 0), ("val_2.JPEG", 1), ("val_3.JPEG", 1),
       ("val_4.JPEG", 0), ("val_5.JPEG", 2)]  # fmt: skip
NUM_TEST = 2
MODES = ("RGB", "L", "RGB", "CMYK")  # Mode of image i within a folder, cycled.


def _jpeg(seed: int, mode: str) -> bytes:
    rng = np.random.default_rng(seed)
    rgb = (rng.random((1, 1, 3)) * 200 + rng.random((64, 64, 1)) * 55).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).convert(mode).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _archive_files() -> dict[str, bytes]:
    """Path under tiny-imagenet-200/ -> content."""
    files = {
        "wnids.txt": "\n".join(WNIDS).encode() + b"\n",
        "words.txt": b"".join(f"{w}\tthing {i}\n".encode() for i, w in enumerate(WNIDS)),
    }
    seed = 0
    for wnid in WNIDS:
        files[f"train/{wnid}/{wnid}_boxes.txt"] = b""
        for i in range(TRAIN_PER_CLASS):
            files[f"train/{wnid}/images/{wnid}_{i}.JPEG"] = _jpeg(seed := seed + 1, MODES[i % 4])
    for i, (name, _label) in enumerate(VAL):
        files[f"val/images/{name}"] = _jpeg(seed := seed + 1, MODES[i % 4])
    files["val/val_annotations.txt"] = b"".join(
        f"{name}\t{WNIDS[label]}\t0\t1\t60\t62\n".encode() for name, label in VAL
    )
    for i in range(NUM_TEST):
        files[f"test/images/test_{i}.JPEG"] = _jpeg(seed := seed + 1, MODES[(i + 1) % 4])
    return files


FILES = _archive_files()


def _expected(split: str) -> dict[str, tuple[np.ndarray, int]]:
    """file name -> (RGB pixels as PIL decodes and converts the file, label)."""
    if split == "train":
        items = [(f"train/{w}/images/{w}_{i}.JPEG", c) for c, w in enumerate(WNIDS)
                 for i in range(TRAIN_PER_CLASS)]  # fmt: skip
    elif split == "validation":
        items = [(f"val/images/{name}", label) for name, label in VAL]
    else:
        items = [(f"test/images/test_{i}.JPEG", -1) for i in range(NUM_TEST)]
    out = {}
    for path, label in items:
        pixels = np.asarray(Image.open(io.BytesIO(FILES[path])).convert("RGB"))
        out[path.rpartition("/")[2]] = (pixels, label)
    return out


def _write_zip(path) -> None:
    with zipfile.ZipFile(path, "w") as z:
        for name, content in FILES.items():
            z.writestr(f"{tin.ROOT_DIR}/{name}", content)


def _write_dir(root) -> None:
    for name, content in FILES.items():
        target = root / tin.ROOT_DIR / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A data_dir where tiny_imagenet was prepared from the zip in the default manual dir."""
    data_dir = tmp_path_factory.mktemp("tfds")
    manual = data_dir / "downloads" / "manual"
    manual.mkdir(parents=True)
    _write_zip(manual / tin.ARCHIVE_NAME)
    tin.prepare(str(data_dir))
    return str(data_dir)


def _read_split(data_dir: str, split: str) -> dict[str, dict]:
    source = tfds.data_source("tiny_imagenet", split=split, data_dir=data_dir)
    examples = [source[i] for i in range(len(source))]
    return {ex["file_name"].decode() if isinstance(ex["file_name"], bytes) else ex["file_name"]:
            ex for ex in examples}  # fmt: skip


@pytest.mark.parametrize("split", tin.SPLITS)
def test_prepared_split_reads_back_exactly(prepared, split):
    examples = _read_split(prepared, split)
    expected = _expected(split)
    assert sorted(examples) == sorted(expected)
    for name, (pixels, label) in expected.items():
        image = examples[name]["image"]
        assert image.dtype == np.uint8 and image.shape == (64, 64, 3), name
        # RGB JPEGs are stored as-is, others converted to RGB losslessly: PIL pixels exactly.
        np.testing.assert_array_equal(image, pixels, err_msg=name)
        assert examples[name]["label"] == label, name


def test_prepared_info(prepared):
    builder = tfds.builder("tiny_imagenet", data_dir=prepared)
    assert builder.info.version == "1.0.0"
    assert builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD
    assert builder.info.features["label"].names == WNIDS  # wnids.txt order, not sorted.
    assert builder.info.features["image"].shape == (64, 64, 3)
    counts = {name: split.num_examples for name, split in builder.info.splits.items()}
    assert counts == {"train": 3 * TRAIN_PER_CLASS, "validation": len(VAL), "test": NUM_TEST}


def test_grayscale_and_cmyk_become_rgb(prepared):
    examples = _read_split(prepared, "train")
    gray = examples[f"{WNIDS[0]}_1.JPEG"]["image"]  # MODES[1] == "L"
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 0], gray[..., 2])
    colour = examples[f"{WNIDS[0]}_0.JPEG"]["image"]
    assert not np.array_equal(colour[..., 0], colour[..., 2])
    with tin.TinyImagenetArchive(_zip_in(prepared)) as archive:
        stored = dict(tin.generate_examples(archive, "train", WNIDS))
    original = FILES[f"train/{WNIDS[0]}/images/{WNIDS[0]}_0.JPEG"]
    assert stored[f"{WNIDS[0]}_0.JPEG"]["image"] == original  # RGB JPEG: bytes kept.
    for converted in (f"{WNIDS[0]}_1.JPEG", f"{WNIDS[0]}_3.JPEG"):  # L and CMYK: RGB PNG.
        image = Image.open(io.BytesIO(stored[converted]["image"]))
        assert (image.format, image.mode) == ("PNG", "RGB")


def _zip_in(data_dir: str) -> str:
    return f"{data_dir}/downloads/manual/{tin.ARCHIVE_NAME}"


def test_project_input_pipeline_reads_it(prepared):
    source = data.load_tfds("tiny_imagenet", data_dir=prepared, image_size=64, download=False)
    assert len(source) == 3 * TRAIN_PER_CLASS
    images, labels = source.read(np.arange(len(source)))
    assert images.shape == (12, 64, 64, 3) and images.dtype == np.uint8
    assert sorted(labels.tolist()) == sorted([0, 1, 2] * TRAIN_PER_CLASS)
    small = data.load_tfds("tiny_imagenet", data_dir=prepared, image_size=32, download=False)
    assert small.read(np.arange(2))[0].shape == (2, 32, 32, 3)


def test_ensure_registered():
    assert ensure_registered("tiny_imagenet") and ensure_registered("tiny_imagenet/1.0.0")
    assert "tiny_imagenet" in tfds.list_builders(with_community_datasets=False)
    assert not ensure_registered("mnist")


def test_default_file_format_is_array_record(tmp_path):
    assert tin.TinyImagenet(data_dir=str(tmp_path)).info.file_format.value == "array_record"


def test_downloads_url_without_manual_archive(tmp_path, monkeypatch):
    extracted = tmp_path / "extracted"
    _write_dir(extracted)
    requested = []

    def fake_download_and_extract(self, url):
        requested.append(url)
        return extracted

    monkeypatch.setattr(
        tfds.download.DownloadManager, "download_and_extract", fake_download_and_extract
    )
    monkeypatch.setattr(datasets, "check_reachable", lambda url: None)  # "online"
    builder = tin.prepare(str(tmp_path / "tfds"))
    assert requested == [tin.URL]
    assert builder.info.splits["validation"].num_examples == len(VAL)
    examples = _read_split(str(tmp_path / "tfds"), "validation")
    assert {name: int(ex["label"]) for name, ex in examples.items()} == dict(VAL)


def test_extracted_folder_in_given_manual_dir(tmp_path, monkeypatch):
    def no_download(self, url):
        raise AssertionError("the manual archive should be used")

    monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract", no_download)
    _write_dir(tmp_path / "manual")  # manual/tiny-imagenet-200/...
    builder = tin.prepare(str(tmp_path / "tfds"), manual_dir=str(tmp_path / "manual"))
    assert builder.info.splits["train"].num_examples == 3 * TRAIN_PER_CLASS
    examples = _read_split(str(tmp_path / "tfds"), "test")
    assert sorted(examples) == ["test_0.JPEG", "test_1.JPEG"]
    assert all(ex["label"] == -1 for ex in examples.values())


def test_failed_download_says_where_to_put_the_archive(tmp_path, monkeypatch):
    def offline(self, url):
        raise ConnectionError("no network")

    monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract", offline)
    monkeypatch.setattr(datasets, "check_reachable", lambda url: None)  # the host answers
    with pytest.raises(FileNotFoundError, match="downloads/manual") as info:
        tin.prepare(str(tmp_path))
    assert tin.ARCHIVE_NAME in str(info.value) and "no network" in str(info.value)


def test_archive_reads_zip_and_folders_alike(tmp_path):
    _write_zip(tmp_path / "a.zip")
    _write_dir(tmp_path / "d")
    for path in (tmp_path / "a.zip", tmp_path / "d", tmp_path / "d" / tin.ROOT_DIR):
        with tin.TinyImagenetArchive(path) as archive:
            assert tin.read_wnids(archive) == WNIDS
            assert archive.list_files("test/images") == ["test_0.JPEG", "test_1.JPEG"]
            files = tin.split_files(archive, "validation", WNIDS)
            assert files == [(f"val/images/{name}", label) for name, label in VAL]
    with pytest.raises(FileNotFoundError, match="wnids.txt"):
        tin.TinyImagenetArchive(tmp_path)
    (tmp_path / "junk.zip").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a zip"):
        tin.TinyImagenetArchive(tmp_path / "junk.zip")


def test_bad_inputs_are_reported(tmp_path):
    _write_dir(tmp_path)
    root = tmp_path / tin.ROOT_DIR
    with open(root / "val/val_annotations.txt", "a") as f:
        f.write("val_9.JPEG\tn00000000\t0\t0\t1\t1\n")
    with tin.TinyImagenetArchive(tmp_path) as archive:
        with pytest.raises(ValueError, match="line 7"):
            tin.split_files(archive, "validation", WNIDS)
        with pytest.raises(ValueError, match="unknown TinyImageNet split"):
            tin.split_files(archive, "val", WNIDS)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 32)).save(buffer, format="JPEG")
    with pytest.raises(ValueError, match="x.JPEG is 64x32, expected 64x64"):
        tin.encode_image(buffer.getvalue(), "x.JPEG")
    with pytest.raises(ValueError, match="not an image"):
        tin.decode_image(b"text", "y")


@pytest.mark.parametrize("split", ["train", "test"])
def test_prepare_npz_feeds_the_npz_source(tmp_path, split):
    _write_zip(tmp_path / tin.ARCHIVE_NAME)
    out = tmp_path / "out" / "tin.npz"
    count = tin.prepare_npz(tmp_path / tin.ARCHIVE_NAME, str(out), split=split)
    expected = _expected(split)
    assert count == len(expected)
    with np.load(out) as f:
        assert f["class_names"].tolist() == WNIDS
        images, labels = f["train_images"], f["train_labels"]
    assert images.dtype == np.uint8 and images.shape == (count, 64, 64, 3)
    for (pixels, label), image, got in zip(expected.values(), images, labels, strict=True):
        np.testing.assert_array_equal(image, pixels)  # Same order as split_files.
        assert got == label
    source = data.load_npz(str(out), 64)
    assert len(source) == count and source.read(np.arange(1))[0].shape == (1, 64, 64, 3)


def test_command_line_writes_npz(tmp_path, capsys):
    _write_dir(tmp_path)
    tin.main(["--npz", str(tmp_path / "v.npz"), "--archive", str(tmp_path), "--split",
              "validation"])  # fmt: skip
    assert "Wrote 6 images" in capsys.readouterr().out
    with np.load(tmp_path / "v.npz") as f:
        assert f["train_labels"].tolist() == [label for _, label in VAL]
