"""Tests of the FID Inception: .pth reader, weight mapping, blocks vs a numpy reference, forward.

The weights file is never downloaded: the tests write synthetic state dicts in both PyTorch
file layouts themselves (zip and legacy), with pickles shaped like ``torch.save``'s.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pathlib
import pickle
import struct
import urllib.error
import urllib.request
import zipfile

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from ddst_jax.metrics import inception, torch_weights

# CI keeps the project's shared folder beside the repository: ../shared from the repo root.
REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_KEYS = REPO.parent / "shared" / "data" / "pt_inception_fid_keys.json"

# ------------------------------------------------------------------------------------------
# A torch.save look-alike (no PyTorch): stand-ins whose pickled names are torch's.
# ------------------------------------------------------------------------------------------


class _TorchGlobal:
    """Pickles as the global ``module.name`` (e.g. ``torch._utils._rebuild_tensor_v2``)."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle's save_reduce insists on a callable.
        raise AssertionError("stand-in only")


_REBUILD = _TorchGlobal("torch._utils", "_rebuild_tensor_v2")
_STORAGE_NAMES = {
    "float32": "FloatStorage",
    "float16": "HalfStorage",
    "float64": "DoubleStorage",
    "int64": "LongStorage",
    "int32": "IntStorage",
    "uint8": "ByteStorage",
    "bool": "BoolStorage",
    "bfloat16": "BFloat16Storage",
}


class _FakeStorage:
    def __init__(self, flat: np.ndarray, key: str):
        self.flat, self.key = flat, key
        self.type = _TorchGlobal("torch", _STORAGE_NAMES[flat.dtype.name])


class _FakeTensor:
    """Reduces like a torch tensor: ``_rebuild_tensor_v2(storage, offset, size, stride, ...)``."""

    def __init__(self, storage: _FakeStorage, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def __reduce_ex__(self, protocol):
        args = (self.storage, self.offset, self.size, self.stride, False, collections.OrderedDict())
        return (_REBUILD, args)


def _contiguous(array: np.ndarray, key: str) -> _FakeTensor:
    array = np.array(array, order="C")  # (ascontiguousarray would make 0-d arrays 1-d.)
    stride = tuple(s // array.itemsize for s in array.strides)
    return _FakeTensor(_FakeStorage(array.reshape(-1), key), 0, array.shape, stride)


class _TorchPickler(pickle._Pickler):  # The pure-Python pickler lets us emit chosen globals.
    dispatch = pickle._Pickler.dispatch.copy()

    def __init__(self, file, legacy: bool):
        super().__init__(file, protocol=2)  # torch.save's default protocol.
        self.legacy = legacy

    def _save_torch_global(self, obj: _TorchGlobal):
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    dispatch[_TorchGlobal] = _save_torch_global

    def persistent_id(self, obj):
        if not isinstance(obj, _FakeStorage):
            return None
        if self.legacy:
            return ("storage", obj.type, obj.key, "cpu", obj.flat.size, None)
        return ("storage", obj.type, obj.key, "cpu", obj.flat.size)


def _pickle_bytes(obj, legacy: bool) -> bytes:
    buf = io.BytesIO()
    _TorchPickler(buf, legacy).dump(obj)
    return buf.getvalue()


def _storages(state: dict) -> dict[str, _FakeStorage]:
    return {t.storage.key: t.storage for t in state.values()}


def write_zip(path, state: dict, *, byteorder: str | None = "little", prefix: str = "archive"):
    """``state``: name -> _FakeTensor. Layout of torch.save (PyTorch >= 1.6)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{prefix}/data.pkl", _pickle_bytes(state, legacy=False))
        if byteorder is not None:
            zf.writestr(f"{prefix}/byteorder", byteorder)
        for key, storage in _storages(state).items():
            flat = storage.flat
            if byteorder == "big" and flat.itemsize > 1:
                flat = flat.view(f"u{flat.itemsize}").astype(f">u{flat.itemsize}")
            zf.writestr(f"{prefix}/data/{key}", flat.tobytes())
        zf.writestr(f"{prefix}/version", "3\n")


def write_legacy(path, state: dict):
    """Legacy torch.save layout: magic, protocol, sys info, object, keys, then raw storages."""
    storages = _storages(state)
    with open(path, "wb") as f:
        for header in (
            0x1950A86A20F9469CFC6C,
            1001,
            {
                "protocol_version": 1001,
                "little_endian": True,
                "type_sizes": {"short": 2, "int": 4, "long": 4},
            },
        ):
            pickle.dump(header, f, protocol=2)
        f.write(_pickle_bytes(state, legacy=True))
        pickle.dump(list(storages), f, protocol=2)
        for storage in storages.values():
            f.write(struct.pack("<q", storage.flat.size))
            f.write(storage.flat.tobytes())


def as_torch_state(arrays: dict[str, np.ndarray]) -> collections.OrderedDict:
    state = collections.OrderedDict(
        (name, _contiguous(a, str(i))) for i, (name, a) in enumerate(arrays.items())
    )
    state._metadata = collections.OrderedDict({"": {"version": 1}})  # As module.state_dict().
    return state


def random_inception_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
    """A He-initialised stand-in for pytorch-fid's weights, with non-trivial BN statistics."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in inception.expected_state_dict_shapes().items():
        leaf = key.rsplit(".", 1)[1]
        if leaf == "num_batches_tracked":
            out[key] = np.array(12345, np.int64)
        elif leaf == "weight" and len(shape) > 1:
            fan_in = int(np.prod(shape[1:]))
            out[key] = rng.standard_normal(shape, np.float32) * np.float32(np.sqrt(2 / fan_in))
        elif leaf == "weight":
            out[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        elif leaf == "running_var":
            out[key] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
        else:  # bias, running_mean
            out[key] = rng.normal(0.0, 0.1, shape).astype(np.float32)
    return out


# ------------------------------------------------------------------------------------------
# Fixtures: one synthetic weights file, one compiled forward.
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def state_dict():
    return random_inception_state_dict()


@pytest.fixture(scope="module")
def weights_file(state_dict, tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / inception.FID_WEIGHTS_FILE
    write_zip(path, as_torch_state(state_dict))
    return path


@pytest.fixture(scope="module")
def variables(weights_file):
    return inception.load_weights(weights_file)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def forward(variables, images):
    """The only compiled full forward: a batch of 2 images of 32x32."""
    pool, logits = inception.features(variables, images[:2], logits_bias=False)
    return np.asarray(pool), np.asarray(logits)


# ------------------------------------------------------------------------------------------
# The key table
# ------------------------------------------------------------------------------------------


def test_expected_table_is_pytorch_fid_layout():
    table = inception.expected_state_dict_shapes()
    assert len(table) == 566
    assert table["fc.weight"] == (1008, 2048) and table["fc.bias"] == (1008,)
    assert table["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert table["Mixed_6b.branch7x7_2.conv.weight"] == (128, 128, 1, 7)  # 1x7 is (kh=1, kw=7).
    assert table["Mixed_7c.branch3x3dbl_3b.conv.weight"] == (384, 384, 3, 1)
    assert table["Mixed_7c.branch_pool.bn.num_batches_tracked"] == ()
    assert not any(k.startswith("AuxLogits") for k in table)  # aux_logits=False in pytorch-fid.
    params = sum(int(np.prod(s)) for k, s in table.items() if "num_batches" not in k)
    assert params == 23_885_392  # 95,541,568 bytes of float32 in the 95,628,359-byte file.


@pytest.mark.skipif(not SHARED_KEYS.exists(), reason="shared key table not beside the repo")
def test_expected_table_equals_shared_json():
    entries = json.loads(SHARED_KEYS.read_text())["entries"]
    expected = {k: tuple(v) for k, v in entries.items()}
    assert inception.expected_state_dict_shapes() == expected


# ------------------------------------------------------------------------------------------
# The .pth reader
# ------------------------------------------------------------------------------------------


def _small_arrays():
    return {
        "w": np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5,
        "h": np.array([1.5, -2.0], np.float16),
        "d": np.array([[np.pi]], np.float64),
        "n": np.array(7, np.int64),
        "b": np.array([True, False]),
        "u": np.array([0, 255], np.uint8),
        "bf": np.array([1.5, -3.0, 0.0078125], ml_dtypes.bfloat16),
        "i": np.array([[-(2**31), 2**31 - 1]], np.int32),
    }


@pytest.mark.parametrize("layout", ["zip", "zip-big-endian", "zip-no-byteorder", "legacy"])
def test_reader_round_trips_every_dtype(tmp_path, layout):
    arrays = _small_arrays()
    path = tmp_path / "small.pth"
    state = as_torch_state(arrays)
    if layout == "legacy":
        write_legacy(path, state)
    else:
        byteorder = {"zip": "little", "zip-big-endian": "big", "zip-no-byteorder": None}[layout]
        write_zip(path, state, byteorder=byteorder, prefix="small")
    loaded = torch_weights.load_state_dict(path)
    assert list(loaded) == list(arrays)
    for name, a in arrays.items():
        assert loaded[name].dtype == a.dtype and loaded[name].shape == a.shape, name
        np.testing.assert_array_equal(loaded[name], a)


@pytest.mark.parametrize("legacy", [False, True])
def test_reader_applies_offset_and_strides_of_shared_storage(tmp_path, legacy):
    flat = np.arange(12, dtype=np.float32)
    storage = _FakeStorage(flat, "0")
    state = collections.OrderedDict(
        # A transposed 3x4 view, and a slice starting at element 5: both share one storage.
        t=_FakeTensor(storage, 0, (4, 3), (1, 4)),
        s=_FakeTensor(storage, 5, (2,), (3,)),
    )
    path = tmp_path / "views.pth"
    (write_legacy if legacy else write_zip)(path, state)
    loaded = torch_weights.load_state_dict(path)
    np.testing.assert_array_equal(loaded["t"], flat.reshape(3, 4).T)
    np.testing.assert_array_equal(loaded["s"], [5.0, 8.0])
    assert loaded["t"].flags["C_CONTIGUOUS"]


def test_reader_refuses_a_view_outside_its_storage(tmp_path):
    state = {"x": _FakeTensor(_FakeStorage(np.zeros(4, np.float32), "0"), 1, (2, 2), (2, 1))}
    path = tmp_path / "oob.pth"
    write_zip(path, state)
    with pytest.raises(torch_weights.CheckpointFormatError, match="reaches element 4"):
        torch_weights.load_state_dict(path)


class _Exploit:
    """Unpickling this runs ``fn(arg)``: what a hostile checkpoint would contain."""

    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return (self.fn, (self.arg,))


@pytest.mark.parametrize("layout", ["zip", "legacy", "bare-pickle"])
@pytest.mark.parametrize("attack", ["os.system", "builtins.eval"])
def test_reader_refuses_code_execution(tmp_path, layout, attack):
    sentinel = tmp_path / "pwned"
    if attack == "os.system":
        exploit, name = _Exploit(os.system, f"touch {sentinel}"), "system"
    else:
        # Protocol 2 spells the module __builtin__ (its Python 2 name).
        exploit = _Exploit(eval, f"open({str(sentinel)!r}, 'w').close()")
        name = r"'(builtins|__builtin__)\.eval'"
    payload = collections.OrderedDict(weight=exploit)
    path = tmp_path / "evil.pth"
    if layout == "zip":
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("archive/data.pkl", pickle.dumps(payload, protocol=2))
    elif layout == "legacy":
        with open(path, "wb") as f:
            for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
                pickle.dump(header, f, protocol=2)
            pickle.dump(payload, f, protocol=2)
            pickle.dump([], f, protocol=2)
    else:
        path.write_bytes(pickle.dumps(exploit))
    with pytest.raises(torch_weights.UnsafeCheckpointError, match=name):
        torch_weights.load_state_dict(path)
    assert not sentinel.exists()


def test_reader_refuses_pickled_modules(tmp_path):
    # A whole nn.Module (torch.save(model)) references torch.nn classes: refused, not imported.
    data = b"\x80\x02ctorch.nn.modules.conv\nConv2d\nq\x00)\x81q\x01."
    path = tmp_path / "module.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", data)
    with pytest.raises(torch_weights.UnsafeCheckpointError, match="torch.nn.modules.conv.Conv2d"):
        torch_weights.load_state_dict(path)


def test_reader_refuses_non_checkpoints(tmp_path):
    path = tmp_path / "text.pth"
    path.write_bytes(b"hello, this is not a checkpoint")
    with pytest.raises(torch_weights.CheckpointFormatError, match="neither a zip nor a legacy"):
        torch_weights.load_state_dict(path)


# ------------------------------------------------------------------------------------------
# State dict -> Flax variables, and refusals
# ------------------------------------------------------------------------------------------


def test_load_weights_maps_layouts(variables, state_dict):
    params, stats = variables["params"], variables["batch_stats"]
    np.testing.assert_array_equal(
        params["Conv2d_1a_3x3"]["conv"]["kernel"],
        state_dict["Conv2d_1a_3x3.conv.weight"].transpose(2, 3, 1, 0),  # OIHW -> HWIO
    )
    assert params["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"].shape == (1, 7, 128, 128)
    np.testing.assert_array_equal(params["fc"]["kernel"], state_dict["fc.weight"].T)
    np.testing.assert_array_equal(params["fc"]["bias"], state_dict["fc.bias"])
    bn = "Mixed_7c.branch_pool.bn"
    np.testing.assert_array_equal(
        params["Mixed_7c"]["branch_pool"]["bn"]["scale"], state_dict[f"{bn}.weight"]
    )
    np.testing.assert_array_equal(
        stats["Mixed_7c"]["branch_pool"]["bn"]["var"], state_dict[f"{bn}.running_var"]
    )
    assert inception.num_parameters(variables) == 23_885_392


def test_state_dict_mismatches_name_the_first_offending_key(state_dict):
    missing = dict(state_dict)
    del missing["Mixed_6b.branch7x7_2.conv.weight"]
    with pytest.raises(ValueError, match=r"missing key 'Mixed_6b\.branch7x7_2\.conv\.weight'"):
        inception.state_dict_to_variables(missing)

    extra = dict(state_dict, **{"Mixed_6b.branch7x7_9.conv.weight": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match=r"unexpected key 'Mixed_6b\.branch7x7_9\.conv\.weight'"):
        inception.state_dict_to_variables(extra)

    swapped = dict(state_dict)
    swapped["Mixed_6b.branch7x7_2.conv.weight"] = np.zeros((128, 128, 7, 1), np.float32)
    with pytest.raises(ValueError, match=r"\(128, 128, 7, 1\), the model needs \(128, 128, 1, 7\)"):
        inception.state_dict_to_variables(swapped)


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"AuxLogits.fc.weight": np.zeros((1000, 768), np.float32)}, "unexpected key 'AuxLogits"),
        (
            {"Conv2d_1a_3x3.bn.bias": np.zeros(32, np.float32)},
            "missing key 'Conv2d_1a_3x3.bn.num_batches_tracked'",
        ),
        (
            {"Conv2d_1a_3x3.bn.bias": np.zeros(64, np.float32)},
            r"'Conv2d_1a_3x3.bn.bias' has shape \(64,\), the model needs \(32,\)",
        ),
    ],
)
def test_load_weights_refuses_other_files(tmp_path, arrays, message):
    path = tmp_path / "other.pth"
    write_zip(path, as_torch_state(arrays))
    with pytest.raises(ValueError, match=message) as info:
        inception.load_weights(path)
    assert str(path) in str(info.value)


# ------------------------------------------------------------------------------------------
# Weight acquisition (no network in tests)
# ------------------------------------------------------------------------------------------


def test_load_weights_without_network_explains_what_to_fetch(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(inception.WeightsUnavailableError) as info:
        inception.load_weights(cache_dir=tmp_path)
    message = str(info.value)
    for part in (
        inception.FID_WEIGHTS_FILE,
        "95,628,359",
        "6726825d",
        inception.FID_WEIGHTS_URL,
        str(tmp_path / inception.FID_WEIGHTS_FILE),
        "path=",
    ):
        assert part in message
    assert list(tmp_path.iterdir()) == []  # No partial download left behind.


def test_load_weights_with_missing_explicit_path(tmp_path):
    with pytest.raises(inception.WeightsUnavailableError, match="no such file"):
        inception.load_weights(tmp_path / "nope.pth")


def _serve(monkeypatch, payload: bytes):
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: io.BytesIO(payload))


def test_download_is_verified_then_cached(tmp_path, monkeypatch):
    import hashlib

    small = tmp_path / "small.pth"
    write_zip(small, as_torch_state({"Conv2d_1a_3x3.bn.bias": np.zeros(32, np.float32)}))
    payload = small.read_bytes()
    cache = tmp_path / "cache"
    _serve(monkeypatch, payload)

    # Wrong hash prefix: refused, nothing kept.
    monkeypatch.setattr(inception, "FID_WEIGHTS_SIZE", len(payload))
    monkeypatch.setattr(inception, "FID_WEIGHTS_SHA256_PREFIX", "00000000")
    with pytest.raises(inception.WeightsUnavailableError, match="corrupt"):
        inception.load_weights(cache_dir=cache)
    assert not (cache / inception.FID_WEIGHTS_FILE).exists()

    # Right size and hash: kept in the cache, then read (and refused for its keys).
    prefix = hashlib.sha256(payload).hexdigest()[:8]
    monkeypatch.setattr(inception, "FID_WEIGHTS_SHA256_PREFIX", prefix)
    with pytest.raises(ValueError, match="missing key"):
        inception.load_weights(cache_dir=cache)
    assert (cache / inception.FID_WEIGHTS_FILE).read_bytes() == payload

    # A cached file of the wrong size is reported, not used.
    monkeypatch.setattr(inception, "FID_WEIGHTS_SIZE", len(payload) + 1)
    with pytest.raises(inception.WeightsUnavailableError, match="not the right one"):
        inception.load_weights(cache_dir=cache)


# ------------------------------------------------------------------------------------------
# Network pieces vs a numpy reference written in PyTorch's NCHW/OIHW conventions
# ------------------------------------------------------------------------------------------


def _conv_bn_relu(x: np.ndarray, sd: dict, name: str, stride: int = 1) -> np.ndarray:
    """torchvision BasicConv2d on NCHW; padding k // 2 for stride 1 (as in all mixed blocks)."""
    w = sd[f"{name}.conv.weight"].astype(np.float64)
    kh, kw = w.shape[2:]
    ph, pw = (kh // 2, kw // 2) if stride == 1 else (0, 0)
    x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    win = sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::stride, ::stride]
    y = np.einsum("nchwij,ocij->nohw", win, w)
    g = lambda leaf: sd[f"{name}.bn.{leaf}"].astype(np.float64)[:, None, None]
    y = (y - g("running_mean")) / np.sqrt(g("running_var") + 1e-3) * g("weight") + g("bias")
    return np.maximum(y, 0)


def _pool(x: np.ndarray, kind: str, stride: int = 1, pad: int = 1) -> np.ndarray:
    fill = -np.inf if kind == "max" else 0.0
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=fill)
    win = sliding_window_view(xp, (3, 3), axis=(2, 3))[:, :, ::stride, ::stride]
    if kind == "max":
        return win.max(axis=(-2, -1))
    ones = np.pad(np.ones_like(x), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    count = sliding_window_view(ones, (3, 3), axis=(2, 3)).sum(axis=(-2, -1))
    return win.sum(axis=(-2, -1)) / count  # count_include_pad=False


def _chain(x, sd, prefix, names, last_stride=1):
    for i, n in enumerate(names):
        x = _conv_bn_relu(x, sd, f"{prefix}.{n}", last_stride if i == len(names) - 1 else 1)
    return x


def _reference_block(kind: str, x: np.ndarray, sd: dict, p: str) -> np.ndarray:
    """pytorch-fid's FIDInceptionA/B(=torchvision)/C/D/E_1/E_2 forward, in numpy."""
    cat = lambda parts: np.concatenate(parts, axis=1)
    if kind == "A":
        return cat(
            [
                _chain(x, sd, p, ["branch1x1"]),
                _chain(x, sd, p, ["branch5x5_1", "branch5x5_2"]),
                _chain(x, sd, p, ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"]),
                _chain(_pool(x, "avg"), sd, p, ["branch_pool"]),
            ]
        )
    if kind == "B":
        return cat(
            [
                _chain(x, sd, p, ["branch3x3"], 2),
                _chain(x, sd, p, ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"], 2),
                _pool(x, "max", stride=2, pad=0),
            ]
        )
    if kind == "C":
        return cat(
            [
                _chain(x, sd, p, ["branch1x1"]),
                _chain(x, sd, p, [f"branch7x7_{i}" for i in (1, 2, 3)]),
                _chain(x, sd, p, [f"branch7x7dbl_{i}" for i in (1, 2, 3, 4, 5)]),
                _chain(_pool(x, "avg"), sd, p, ["branch_pool"]),
            ]
        )
    if kind == "D":
        return cat(
            [
                _chain(x, sd, p, ["branch3x3_1", "branch3x3_2"], 2),
                _chain(x, sd, p, [f"branch7x7x3_{i}" for i in (1, 2, 3, 4)], 2),
                _pool(x, "max", stride=2, pad=0),
            ]
        )
    b3 = _chain(x, sd, p, ["branch3x3_1"])
    bd = _chain(x, sd, p, ["branch3x3dbl_1", "branch3x3dbl_2"])
    return cat(
        [
            _chain(x, sd, p, ["branch1x1"]),
            _chain(b3, sd, p, ["branch3x3_2a"]),
            _chain(b3, sd, p, ["branch3x3_2b"]),
            _chain(bd, sd, p, ["branch3x3dbl_3a"]),
            _chain(bd, sd, p, ["branch3x3dbl_3b"]),
            _chain(_pool(x, "avg" if kind == "E1" else "max"), sd, p, ["branch_pool"]),
        ]
    )


@pytest.mark.parametrize(
    "name, kind, module, channels",
    [
        ("Mixed_5b", "A", inception.InceptionA(32), 192),
        ("Mixed_6a", "B", inception.InceptionB(), 288),
        ("Mixed_6b", "C", inception.InceptionC(128), 768),
        ("Mixed_7a", "D", inception.InceptionD(), 768),
        ("Mixed_7b", "E1", inception.InceptionE("avg"), 1280),
        ("Mixed_7c", "E2", inception.InceptionE("max"), 2048),
    ],
)
def test_blocks_match_pytorch_semantics(variables, state_dict, name, kind, module, channels):
    # 5x5 inputs: every position is near the border, where the pooling quirks matter.
    x = np.random.default_rng(2).normal(size=(1, channels, 5, 5)).astype(np.float32)
    block_vars = {c: variables[c][name] for c in ("params", "batch_stats")}
    got = module.apply(block_vars, jnp.asarray(x.transpose(0, 2, 3, 1)))
    want = _reference_block(kind, x.astype(np.float64), state_dict, name).transpose(0, 2, 3, 1)
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-4)


def test_tf_style_pools_on_a_hand_example():
    x = (jnp.arange(9.0).reshape(1, 3, 3, 1)) - 100.0  # Negative: max-pool padding must not win.
    avg = inception._avg_pool_3x3_same(x)[0, :, :, 0] + 100.0
    np.testing.assert_allclose(avg, [[2.0, 2.5, 3.0], [3.5, 4.0, 4.5], [5.0, 5.5, 6.0]])
    mx = inception._max_pool_3x3_same(x)[0, :, :, 0] + 100.0
    np.testing.assert_allclose(mx, [[4.0, 5.0, 5.0], [7.0, 8.0, 8.0], [7.0, 8.0, 8.0]])


def test_logits_bias_is_optional():
    x = jnp.array([[1.0, 2.0]])
    params = {
        "params": {
            "kernel": jnp.array([[1.0, 0.0, 2.0], [0.0, 1.0, 1.0]]),
            "bias": jnp.array([10.0, 20.0, 30.0]),
        }
    }
    np.testing.assert_allclose(inception.Logits(3).apply(params, x), [[1.0, 2.0, 4.0]])
    np.testing.assert_allclose(
        inception.Logits(3, use_bias=True).apply(params, x), [[11.0, 22.0, 34.0]]
    )


def _torch_bilinear(x: np.ndarray, out: int) -> np.ndarray:
    """F.interpolate(mode='bilinear', align_corners=False) on NHWC, in float64."""

    def along(a, axis):
        n_in = a.shape[axis]
        src = np.maximum((np.arange(out) + 0.5) * (n_in / out) - 0.5, 0.0)
        i0 = np.floor(src).astype(int)
        i1 = np.minimum(i0 + 1, n_in - 1)
        w1 = src - i0
        shape = [1] * a.ndim
        shape[axis] = out
        w1 = w1.reshape(shape)
        return np.take(a, i0, axis) * (1 - w1) + np.take(a, i1, axis) * w1

    return along(along(x, 1), 2)


@pytest.mark.parametrize("shape", [(2, 5, 7, 3), (1, 32, 32, 3), (1, 400, 330, 3), (1, 8, 8, 1)])
def test_preprocess_matches_pytorch_fid(shape):
    images = np.random.default_rng(3).integers(0, 256, shape, dtype=np.uint8)
    got = np.asarray(inception.preprocess(jnp.asarray(images)))
    rgb = np.repeat(images, 3, axis=-1) if shape[-1] == 1 else images
    want = 2 * _torch_bilinear(rgb.astype(np.float64) / 255, 299) - 1
    assert got.shape == (shape[0], 299, 299, 3) and got.dtype == np.float32
    # Only float32 round-off of the sample positions differs (in float64 they agree to 1e-13);
    # a wrong convention (align_corners, antialiasing) would be off by > 1e-2.
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_preprocess_refuses_float_images():
    with pytest.raises(TypeError, match="uint8"):
        inception.preprocess(jnp.zeros((1, 32, 32, 3)))


# ------------------------------------------------------------------------------------------
# Full forward (one compile, shared)
# ------------------------------------------------------------------------------------------


def test_features_shapes_and_values(forward):
    pool, logits = forward
    assert pool.shape == (2, 2048) and logits.shape == (2, 1008)
    assert pool.dtype == np.float32 and logits.dtype == np.float32
    assert np.isfinite(pool).all() and np.isfinite(logits).all()
    assert (pool >= 0).all() and pool.std() > 0  # Mean of ReLU outputs.
    assert not np.allclose(pool[0], pool[1])  # Different images, different features.


def test_features_batched_pads_and_compiles_once(variables, images, forward):
    pool, logits = inception.features_batched(variables, images, batch_size=2)
    compiled = inception.features._cache_size()
    lone, _ = inception.features_batched(variables, images[2:], batch_size=2)  # Ragged again.
    assert inception.features._cache_size() == compiled  # Padded to the compiled shape.
    assert pool.shape == (3, 2048) and logits.shape == (3, 1008) and lone.shape == (1, 2048)
    np.testing.assert_allclose(pool[:2], forward[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(logits[:2], forward[1], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(lone[0], pool[2])
    # The logits are pool_3 @ fc.weight.T, without fc.bias (original Inception Score code).
    fc = variables["params"]["fc"]
    np.testing.assert_allclose(logits, pool @ np.asarray(fc["kernel"]), rtol=1e-4, atol=1e-4)
