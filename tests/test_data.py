"""Tests for the stateless, resumable input pipeline (ddst_jax.data)."""

import itertools
import threading

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P

from ddst_jax import data


def _random_source(n=40, size=8, seed=0) -> data.ArraySource:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return data.ArraySource(images, np.arange(n, dtype=np.int32))


def _config(**fields) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(fields)


# ------------------------------------------------------------------------------ positions


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 30),
    b=st.integers(1, 17),
    seed=st.integers(0, 2**32),
)
def test_stream_is_a_concatenation_of_epoch_permutations(n, b, seed):
    epochs = 3
    num_batches = -(-epochs * n // b)  # Enough batches to cover `epochs` whole epochs.
    stream = np.concatenate([data.global_batch_indices(n, seed, p, b) for p in range(num_batches)])[
        : epochs * n
    ]
    perms = stream.reshape(epochs, n)
    for perm in perms:
        np.testing.assert_array_equal(np.sort(perm), np.arange(n))
    if n >= 8:  # Fresh shuffle per epoch (8! orderings: a repeat is practically impossible).
        assert not np.array_equal(perms[0], perms[1])


def test_batch_indices_depend_on_seed_and_position_only():
    a = data.global_batch_indices(1000, 3, 7, 64)
    np.testing.assert_array_equal(a, data.global_batch_indices(1000, 3, 7, 64))
    assert not np.array_equal(a, data.global_batch_indices(1000, 3, 8, 64))
    assert not np.array_equal(a, data.global_batch_indices(1000, 4, 7, 64))


def test_flip_mask_is_pure_and_fair():
    np.testing.assert_array_equal(data.flip_mask(1, 5, 64), data.flip_mask(1, 5, 64))
    flips = np.concatenate([data.flip_mask(1, p, 64) for p in range(64)])
    assert 0.45 < flips.mean() < 0.55  # 4096 seeded draws: exact, not flaky.


# ------------------------------------------------------------------------------ get_batch


def test_get_batch_pixels_labels_and_range_exact():
    source = _random_source()
    batch = data.get_batch(source, 3, 16, seed=5, flip=False)
    idx = data.global_batch_indices(len(source), 5, 3, 16)
    assert batch["image"].dtype == np.float32 and batch["image"].shape == (16, 8, 8, 3)
    assert batch["label"].dtype == np.int32
    np.testing.assert_array_equal(batch["label"], idx)  # labels == example index here
    np.testing.assert_array_equal(batch["image"], source.images[idx] / np.float32(127.5) - 1)
    extremes = data.ArraySource(
        np.stack([np.zeros((2, 2, 3), np.uint8), np.full((2, 2, 3), 255, np.uint8)]),
        np.zeros(2, np.int32),
    )
    image = data.get_batch(extremes, 0, 2, seed=0)["image"]
    assert sorted(np.unique(image)) == [-1.0, 1.0]


def test_flips_mirror_about_half_the_rows_and_keep_pixels():
    source = _random_source(n=256)
    flipped_rows = 0
    for position in range(8):
        plain = data.get_batch(source, position, 64, seed=2, flip=False)["image"]
        flipped = data.get_batch(source, position, 64, seed=2, flip=True)["image"]
        mask = data.flip_mask(2, position, 64)
        np.testing.assert_array_equal(flipped[mask], plain[mask][:, :, ::-1])
        np.testing.assert_array_equal(flipped[~mask], plain[~mask])
        flipped_rows += int(mask.sum())
    assert 0.4 < flipped_rows / 512 < 0.6


def test_get_batch_is_deterministic_and_positions_differ():
    source = _random_source()
    a = data.get_batch(source, 4, 8, seed=1)
    b = data.get_batch(source, 4, 8, seed=1)
    c = data.get_batch(source, 5, 8, seed=1)
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
    assert not np.array_equal(a["image"], c["image"])


def test_process_slices_concatenate_to_the_global_batch():
    source = _random_source()
    full = data.get_batch(source, 6, 16, seed=3)
    parts = [
        data.get_batch(source, 6, 16, seed=3, process_index=i, process_count=4) for i in range(4)
    ]
    for key in ("image", "label"):
        assert parts[0][key].shape[0] == 4
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), full[key])


def test_stacked_batch_stacks_consecutive_positions():
    source = _random_source()
    stacked = data.get_stacked_batch(source, 2, 8, 3, seed=0, flip=True)
    assert stacked["image"].shape == (3, 8, 8, 8, 3) and stacked["label"].shape == (3, 8)
    for i in range(3):
        single = data.get_batch(source, 2 + i, 8, seed=0, flip=True)
        np.testing.assert_array_equal(stacked["image"][i], single["image"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(batch_size=10, process_count=4), "not divisible by the process count 4"),
        (dict(batch_size=16, device_count=3), "not divisible by the data-axis device count 3"),
        (dict(batch_size=0), "must be a positive int"),
    ],
)
def test_check_batch_size_names_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        data.check_batch_size(**kwargs, field="config.batch_size_d")
    assert "config.batch_size_d" in str(info.value)


def test_get_batch_rejects_bad_process_arguments():
    with pytest.raises(ValueError, match="process count 3"):
        data.get_batch(_random_source(), 0, 8, seed=0, process_count=3)
    with pytest.raises(ValueError, match="process_index=2"):
        data.get_batch(_random_source(), 0, 8, seed=0, process_index=2, process_count=2)


# ------------------------------------------------------------------------------ iterator


def _collect(iterator, n):
    with iterator:
        return list(itertools.islice(iterator, n))


@pytest.mark.parametrize("prefetch", [0, 3])
def test_resumed_iterator_continues_the_same_stream(prefetch):
    source = _random_source()
    kw = dict(seed=9, prefetch=prefetch, process_index=0, process_count=1)
    full = _collect(data.BatchIterator(source, 0, 8, **kw), 10)
    resumed_it = data.BatchIterator(source, 5, 8, **kw)
    resumed = _collect(resumed_it, 5)
    assert [p for p, _ in full] == list(range(10))
    assert [p for p, _ in resumed] == list(range(5, 10))
    assert resumed_it.next_position == 10
    for (_, a), (_, b) in zip(full[5:], resumed, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


def test_stacked_iterator_advances_by_stack():
    source = _random_source()
    it = data.BatchIterator(source, 4, 8, seed=0, stack=3, process_index=0, process_count=1)
    items = _collect(it, 2)
    assert [p for p, _ in items] == [4, 7] and it.next_position == 10
    np.testing.assert_array_equal(
        items[1][1]["image"], data.get_stacked_batch(source, 7, 8, 3, seed=0)["image"]
    )


def test_iterator_reraises_source_errors_and_close_stops_the_thread():
    class Broken:
        image_size = 8

        def __len__(self):
            return 10

        def read(self, indices):
            raise RuntimeError("disk gone")

    it = data.BatchIterator(Broken(), 0, 2, seed=0, process_index=0, process_count=1)
    with pytest.raises(RuntimeError, match="disk gone"):
        next(it)
    before = set(threading.enumerate())
    live = data.BatchIterator(_random_source(), 0, 2, seed=0, process_index=0, process_count=1)
    next(live)
    assert len(set(threading.enumerate()) - before) == 1  # The prefetch thread.
    live.close()
    assert not set(threading.enumerate()) - before
    with pytest.raises(StopIteration):
        next(live)


# ------------------------------------------------------------------------------ devices


def test_shard_batch_on_8_device_mesh():
    assert jax.device_count() == 8
    mesh = jax.make_mesh((8,), ("data",))
    source = _random_source()
    host = data.get_batch(source, 0, 16, seed=0)
    arrays = data.shard_batch(host, mesh)
    assert arrays["image"].shape == (16, 8, 8, 3) and arrays["label"].shape == (16,)
    assert arrays["image"].sharding.spec == P("data")
    assert {s.data.shape for s in arrays["image"].addressable_shards} == {(2, 8, 8, 3)}
    np.testing.assert_array_equal(np.asarray(arrays["image"]), host["image"])

    stacked = data.shard_batch(data.get_stacked_batch(source, 0, 16, 5, seed=0), mesh, batch_axis=1)
    assert stacked["image"].shape == (5, 16, 8, 8, 3)
    assert stacked["image"].sharding.spec == P(None, "data")
    assert {s.data.shape for s in stacked["image"].addressable_shards} == {(5, 2, 8, 8, 3)}

    with pytest.raises(ValueError, match="device count 8"):
        data.shard_batch(data.get_batch(source, 0, 12, seed=0), mesh)
    with pytest.raises(ValueError, match="no axis 'batch'"):
        data.shard_batch(host, mesh, axis_name="batch")


def test_iterator_with_mesh_yields_sharded_stacked_arrays():
    mesh = jax.make_mesh((8,), ("data",))
    it = data.BatchIterator(_random_source(), 0, 8, seed=0, stack=2, mesh=mesh)
    ((position, batch),) = _collect(it, 1)
    assert position == 0 and isinstance(batch["image"], jax.Array)
    assert batch["image"].shape == (2, 8, 8, 8, 3)
    assert batch["image"].sharding.spec == P(None, "data")
    with pytest.raises(ValueError, match="device count 8"):
        data.BatchIterator(_random_source(), 0, 12, seed=0, mesh=mesh)


# ------------------------------------------------------------------------------ sources


def test_synthetic_source_is_deterministic_and_learnable():
    cfg = _config(source="synthetic", image_size=16, synthetic_size=64)
    a = data.load_source(cfg, seed=1)
    assert len(a) == 64 and a.image_size == 16 and a.images.dtype == np.uint8
    assert a.images.shape == (64, 16, 16, 3)
    assert a.labels.dtype == np.int32 and set(np.unique(a.labels)) <= set(range(10))
    np.testing.assert_array_equal(a.images, data.load_source(cfg, seed=1).images)
    assert not np.array_equal(a.images, data.load_source(cfg, seed=2).images)
    # Structure, not noise: neighbouring pixels are close.
    diffs = np.abs(np.diff(a.images.astype(int), axis=2))
    assert diffs.mean() < 10


def test_npz_source_loads_and_resizes(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    images[0] = 77  # A flat image stays flat under resizing.
    path = tmp_path / "d.npz"
    np.savez(path, train_images=images, train_labels=np.arange(6))
    src = data.load_source(_config(source="npz", path=str(path), image_size=8), seed=0)
    np.testing.assert_array_equal(src.images, images)
    np.testing.assert_array_equal(src.labels, np.arange(6))
    assert src.labels.dtype == np.int32

    small = data.load_source(_config(source="npz", path=str(path), image_size=4), seed=0)
    assert small.images.shape == (6, 4, 4, 3) and small.image_size == 4
    np.testing.assert_array_equal(small.images[0], np.full((4, 4, 3), 77, np.uint8))

    np.savez(path, train_images=images)  # Labels are optional.
    np.testing.assert_array_equal(
        data.load_source(_config(source="npz", path=str(path), image_size=8), seed=0).labels,
        np.full(6, -1),
    )


@pytest.mark.parametrize(
    ("arrays", "error", "message"),
    [
        (dict(other=np.zeros(3)), ValueError, "no 'train_images'"),
        (dict(train_images=np.zeros((2, 4, 4, 3), np.float32)), ValueError, "expected uint8"),
        (dict(train_images=np.zeros((2, 4, 4), np.uint8)), ValueError, "expected uint8"),
        (
            dict(train_images=np.zeros((2, 4, 4, 3), np.uint8), train_labels=np.zeros(3)),
            ValueError,
            "train_labels",
        ),
    ],
)
def test_npz_bad_contents_are_named(tmp_path, arrays, error, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(error, match=message):
        data.load_source(_config(source="npz", path=str(path), image_size=4), seed=0)


def test_npz_missing_or_unreadable_file(tmp_path):
    with pytest.raises(data.DatasetUnavailableError, match="config.data.path=.*does not exist"):
        data.load_source(_config(source="npz", path=str(tmp_path / "none.npz")), seed=0)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip")
    with pytest.raises(data.DatasetUnavailableError, match="not a readable .npz"):
        data.load_source(_config(source="npz", path=str(garbage)), seed=0)
    with pytest.raises(ValueError, match="config.data.path is not set"):
        data.load_source(_config(source="npz"), seed=0)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="config.data.source='hdf5'"):
        data.load_source(_config(source="hdf5"), seed=0)
    with pytest.raises(ValueError, match="config.data.image_size"):
        data.load_source(_config(source="synthetic", image_size=0), seed=0)
    assert set(data.default_config().keys()) >= {"source", "name", "split", "image_size", "flip"}


# ------------------------------------------------------------------------------ tfds


def test_tfds_source_reads_mocked_data_source():
    cfg = _config(source="tfds", name="cifar10", split="train", image_size=32)
    with tfds.testing.mock_data(num_examples=20):
        src = data.load_source(cfg, seed=0)
        assert isinstance(src, data.TfdsSource) and len(src) == 20
        a = data.get_batch(src, 0, 8, seed=0)
        b = data.get_batch(src, 0, 8, seed=0)
        halves = [
            data.get_batch(src, 0, 8, seed=0, process_index=i, process_count=2) for i in range(2)
        ]
        cfg.in_memory = True
        cached = data.load_source(cfg, seed=0)
        assert isinstance(cached, data.ArraySource)
        c = data.get_batch(cached, 0, 8, seed=0)
    assert a["image"].shape == (8, 32, 32, 3) and a["image"].dtype == np.float32
    assert a["label"].dtype == np.int32 and ((a["label"] >= 0) & (a["label"] < 10)).all()
    assert -1 <= a["image"].min() and a["image"].max() <= 1
    for other in (b, c):
        np.testing.assert_array_equal(a["image"], other["image"])
        np.testing.assert_array_equal(a["label"], other["label"])
    np.testing.assert_array_equal(np.concatenate([h["image"] for h in halves]), a["image"])


def test_tfds_images_are_resized_to_image_size():
    cfg = _config(source="tfds", name="stl10", split="unlabelled", image_size=48)
    with tfds.testing.mock_data(num_examples=4):
        batch = data.get_batch(data.load_source(cfg, seed=0), 0, 4, seed=0)
    assert batch["image"].shape == (4, 48, 48, 3)


@pytest.fixture
def no_network(monkeypatch):
    """Fails the test if anything tries to prepare (download) a TFDS dataset."""

    def forbidden(self, *args, **kwargs):
        raise AssertionError("the test tried to download a dataset")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", forbidden)


def _assert_fix_instructions(message, where, name="mnist"):
    for part in (
        where,
        "config.data.data_dir",
        "pip install tensorflow-cpu",
        f"tfds build {name} --file_format=array_record",
        "download_and_prepare()",
        "--config.data.source=npz --config.data.path=FILE",
        "--config.data.source=synthetic",
    ):
        assert part in message, part


# mnist: a TFDS dataset the project does not prepare (cifar10/stl10: tests/test_cifar10_stl10.py).
def test_missing_tfds_dataset_without_tensorflow(tmp_path, monkeypatch, no_network):
    monkeypatch.setattr(data, "_tensorflow_installed", lambda: False)
    cfg = _config(source="tfds", name="mnist", data_dir=str(tmp_path))
    with pytest.raises(data.DatasetUnavailableError, match="TensorFlow") as info:
        data.load_source(cfg, seed=0)
    _assert_fix_instructions(str(info.value), str(tmp_path))
    cfg.download = False
    with pytest.raises(data.DatasetUnavailableError, match="download=False"):
        data.load_source(cfg, seed=0)


def test_missing_tfds_dataset_when_preparing_fails(tmp_path, monkeypatch):
    def offline(self, *args, **kwargs):
        raise ConnectionError("network is unreachable")

    monkeypatch.setattr(data, "_tensorflow_installed", lambda: True)
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", offline)
    cfg = _config(source="tfds", name="mnist", data_dir=str(tmp_path))
    with pytest.raises(data.DatasetUnavailableError, match="preparing it failed") as info:
        data.load_source(cfg, seed=0)
    assert isinstance(info.value.__cause__, ConnectionError)
    assert isinstance(info.value, ValueError)
    _assert_fix_instructions(str(info.value), str(tmp_path))


def test_unknown_tfds_name(no_network):
    with pytest.raises(data.DatasetUnavailableError, match="config.data.name='no_such_set'"):
        data.load_source(_config(source="tfds", name="no_such_set"), seed=0)
