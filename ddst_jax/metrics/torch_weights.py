"""Reads PyTorch state-dict files (``torch.save``) without PyTorch and without running their code.

A ``.pth`` file is a pickle whose tensors point at raw storages kept outside the pickle. Two
layouts exist:

* zip (``torch.save`` since PyTorch 1.6): ``<prefix>/data.pkl`` plus one record
  ``<prefix>/data/<key>`` per storage, and optionally ``<prefix>/byteorder``;
* legacy (earlier releases): four consecutive pickles (magic number, protocol version, system
  info, the object), the list of storage keys, then per storage an int64 element count followed
  by the raw bytes.

Both are read by a restricted unpickler that, like ``torch.load(weights_only=True)``, resolves
only the globals a state dict needs (``collections.OrderedDict``, the tensor rebuild functions
and the typed storage classes) and refuses every other global with :class:`UnsafeCheckpointError`
before anything is called. The allowed names resolve to local stand-ins, so nothing from the file
reaches PyTorch (which need not be installed) or any other module.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import pickle
import struct
import zipfile
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

__all__ = [
    "CheckpointFormatError",
    "UnsafeCheckpointError",
    "load_state_dict",
]

# Constants of torch/serialization.py's legacy format.
_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL_VERSION = 1001

# Storage classes a state dict may reference, with the element type of their raw bytes
# (byte order is applied separately).
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype("f8"),
    "FloatStorage": np.dtype("f4"),
    "HalfStorage": np.dtype("f2"),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype("i8"),
    "IntStorage": np.dtype("i4"),
    "ShortStorage": np.dtype("i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The file's pickle references a global that a plain state dict never needs."""


class CheckpointFormatError(ValueError):
    """The file is not a well-formed PyTorch state-dict file."""


# ------------------------------------------------------------------------------------------
# Stand-ins for the allowed globals. They only record what the pickle asks for; tensors are
# materialised after every storage has been read (legacy files keep storages after the pickle).
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _StorageType:
    """Stand-in for ``torch.<Name>Storage``: names the element type of a storage."""

    name: str
    dtype: np.dtype


@dataclasses.dataclass(eq=False)
class _Storage:
    """A flat storage of ``numel`` elements; ``data`` is filled once its bytes are read."""

    dtype: np.dtype
    numel: int
    data: np.ndarray | None = None

    def array(self) -> np.ndarray:
        if self.data is None:
            raise CheckpointFormatError("a tensor refers to a storage whose bytes are missing.")
        return self.data


@dataclasses.dataclass(eq=False)
class _StorageView:
    """A legacy-format view ``base[offset : offset + numel]`` of another storage."""

    base: _Storage
    offset: int
    numel: int

    @property
    def dtype(self) -> np.dtype:
        return self.base.dtype

    def array(self) -> np.ndarray:
        return self.base.array()[self.offset : self.offset + self.numel]


@dataclasses.dataclass(frozen=True, eq=False)
class _TensorRef:
    """A strided view of a storage, as ``torch._utils._rebuild_tensor_v2`` describes it."""

    storage: _Storage | _StorageView
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def materialize(self) -> np.ndarray:
        data = self.storage.array()
        if any(s == 0 for s in self.size):
            return np.zeros(self.size, data.dtype)
        # Bounds check before as_strided: a crafted file must not read outside its storage.
        last = self.offset + sum((n - 1) * st for n, st in zip(self.size, self.stride, strict=True))
        if last >= data.shape[0]:
            raise CheckpointFormatError(
                f"a tensor of size {self.size}, stride {self.stride} and offset {self.offset} "
                f"reaches element {last} of a storage with {data.shape[0]} elements."
            )
        view = np.lib.stride_tricks.as_strided(
            data[self.offset :],
            shape=self.size,
            strides=tuple(st * data.itemsize for st in self.stride),
            writeable=False,
        )
        return np.array(view, order="C")  # A contiguous copy that owns its memory.


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple | list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise CheckpointFormatError(f"tensor {what} must be a tuple of ints >= 0: {value!r}")
    return tuple(value)


def _rebuild_tensor_v2(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> _TensorRef:
    """Stand-in for ``torch._utils._rebuild_tensor_v2``; gradients and hooks are dropped."""
    del requires_grad, backward_hooks, metadata
    if not isinstance(storage, _Storage | _StorageView):
        raise CheckpointFormatError(f"a tensor is built on a {type(storage).__name__}.")
    if not isinstance(storage_offset, int) or storage_offset < 0:
        raise CheckpointFormatError(f"tensor storage offset must be an int >= 0: {storage_offset}")
    size, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if len(size) != len(stride):
        raise CheckpointFormatError(f"tensor size {size} and stride {stride} differ in length.")
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> _TensorRef:
    """Stand-in for the pre-0.4 ``torch._utils._rebuild_tensor``."""
    return _rebuild_tensor_v2(storage, storage_offset, size, stride)


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None) -> Any:
    """Stand-in for ``torch._utils._rebuild_parameter``: a parameter is just its tensor here."""
    del requires_grad, backward_hooks
    return data


def _rebuild_parameter_with_state(
    data: Any, requires_grad: Any, backward_hooks: Any, state: Any
) -> Any:
    del state
    return _rebuild_parameter(data, requires_grad, backward_hooks)


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    **{("torch", name): _StorageType(name, dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only ``_ALLOWED_GLOBALS``; storages come from ``persistent_load_fn``."""

    def __init__(self, file: BinaryIO, persistent_load_fn: Callable[[Any], Any] | None = None):
        super().__init__(file)
        self._persistent_load_fn = persistent_load_fn

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"refusing to load global '{module}.{name}': a state-dict file only needs "
                "OrderedDict, torch._utils._rebuild_tensor*/_rebuild_parameter and torch.*Storage "
                "(nothing from the file was executed). If you trust the file, re-save it as a "
                "plain state dict of tensors with PyTorch: "
                "torch.save({k: v for k, v in torch.load(path).items()}, out)."
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent_load_fn is None:
            raise CheckpointFormatError("unexpected persistent id in a plain pickle.")
        return self._persistent_load_fn(pid)


def _ascii(value: Any) -> Any:
    # Files written by Python 2 hold byte strings.
    return value.decode("ascii") if isinstance(value, bytes) else value


def _storage_type(value: Any) -> _StorageType:
    if not isinstance(value, _StorageType):
        raise CheckpointFormatError(f"unsupported storage type {value!r} in a persistent id.")
    return value


def _check_numel(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise CheckpointFormatError(f"storage size must be an int >= 0: {value!r}")
    return value


def _to_native(raw: bytes, dtype: np.dtype, little_endian: bool) -> np.ndarray:
    """Raw storage bytes -> a native-order 1-D array of ``dtype``."""
    if dtype.itemsize == 1:
        return np.frombuffer(raw, dtype).copy()
    # Swap bytes as unsigned words, then reinterpret: works for bfloat16 too, whose numpy
    # dtype has no non-native byte order.
    order = "<" if little_endian else ">"
    words = np.frombuffer(raw, np.dtype(f"{order}u{dtype.itemsize}"))
    return words.astype(f"=u{dtype.itemsize}").view(dtype)


def _materialize(obj: Any) -> Any:
    """Replaces every tensor reference inside dicts/lists/tuples with a numpy array."""
    if isinstance(obj, _TensorRef):
        return obj.materialize()
    if isinstance(obj, Mapping):
        return type(obj)((k, _materialize(v)) for k, v in obj.items())
    if isinstance(obj, list | tuple):
        return type(obj)(_materialize(v) for v in obj)
    return obj


# ------------------------------------------------------------------------------------------
# The two file layouts.
# ------------------------------------------------------------------------------------------


def _load_zip(file: BinaryIO, name: str) -> Any:
    with zipfile.ZipFile(file) as zf:
        names = zf.namelist()
        # torch.save puts every record under one top-level folder (named after the file).
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise CheckpointFormatError(
                f"{name} is a zip file but not a torch.save archive (expected one "
                f"'<prefix>/data.pkl', found {pickles[:3] or 'none'})."
            )
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = "little"
        if prefix + "byteorder" in names:
            byteorder = zf.read(prefix + "byteorder").decode("ascii").strip()
            if byteorder not in ("little", "big"):
                raise CheckpointFormatError(f"{name}: unknown byteorder record {byteorder!r}.")
        storages: dict[str, _Storage] = {}

        def persistent_load(pid: Any) -> _Storage:
            if not isinstance(pid, tuple) or len(pid) != 5 or _ascii(pid[0]) != "storage":
                raise CheckpointFormatError(f"{name}: unsupported persistent id {pid!r}.")
            stype, key, numel = _storage_type(pid[1]), str(_ascii(pid[2])), _check_numel(pid[4])
            if key not in storages:
                record = f"{prefix}data/{key}"
                if record not in names:
                    raise CheckpointFormatError(f"{name}: storage record {record!r} is missing.")
                raw = zf.read(record)
                if len(raw) != numel * stype.dtype.itemsize:
                    raise CheckpointFormatError(
                        f"{name}: storage {key!r} has {len(raw)} bytes, expected "
                        f"{numel} x {stype.dtype.itemsize}."
                    )
                data = _to_native(raw, stype.dtype, byteorder == "little")
                storages[key] = _Storage(stype.dtype, numel, data)
            return storages[key]

        with zf.open(pickles[0]) as f:
            obj = _RestrictedUnpickler(f, persistent_load).load()
    return _materialize(obj)


def _load_legacy(file: BinaryIO, name: str) -> Any:
    def plain_load() -> Any:
        return _RestrictedUnpickler(file).load()

    try:
        magic = plain_load()
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # Whatever garbage makes the unpickler fail: not a checkpoint.
        raise CheckpointFormatError(
            f"{name} is neither a zip nor a legacy PyTorch file ({type(e).__name__}: {e})."
        ) from e
    if magic != _LEGACY_MAGIC_NUMBER:
        raise CheckpointFormatError(f"{name} is not a PyTorch file (wrong magic number).")
    if plain_load() != _LEGACY_PROTOCOL_VERSION:
        raise CheckpointFormatError(f"{name}: unsupported legacy protocol version.")
    sys_info = plain_load()
    little_endian = not isinstance(sys_info, dict) or bool(sys_info.get("little_endian", True))

    storages: dict[str, _Storage] = {}
    views: dict[str, _StorageView] = {}

    def persistent_load(pid: Any) -> _Storage | _StorageView:
        if not isinstance(pid, tuple) or not pid or _ascii(pid[0]) != "storage" or len(pid) != 6:
            raise CheckpointFormatError(
                f"{name}: unsupported persistent id {pid!r} (whole pickled modules are not "
                "supported; save the module's state_dict())."
            )
        stype, root_key = _storage_type(pid[1]), str(_ascii(pid[2]))
        numel, view_metadata = _check_numel(pid[4]), pid[5]
        root = storages.setdefault(root_key, _Storage(stype.dtype, numel))
        if root.dtype != stype.dtype or root.numel != numel:
            raise CheckpointFormatError(f"{name}: storage {root_key!r} is declared twice.")
        if view_metadata is None:
            return root
        view_key, offset, size = view_metadata
        view_key = str(_ascii(view_key))
        offset, size = _check_numel(offset), _check_numel(size)
        if offset + size > numel:
            raise CheckpointFormatError(f"{name}: storage view {view_key!r} is out of bounds.")
        return views.setdefault(view_key, _StorageView(root, offset, size))

    obj = _RestrictedUnpickler(file, persistent_load).load()
    keys = plain_load()
    if not isinstance(keys, list):
        raise CheckpointFormatError(f"{name}: the storage key list is missing.")
    order = "<" if little_endian else ">"
    for key in keys:
        key = str(_ascii(key))
        if key not in storages:
            raise CheckpointFormatError(f"{name}: bytes for unknown storage {key!r}.")
        storage = storages[key]
        header = file.read(8)
        if len(header) != 8:
            raise CheckpointFormatError(f"{name} is truncated (storage {key!r}).")
        (numel,) = struct.unpack(order + "q", header)
        if numel != storage.numel:
            raise CheckpointFormatError(
                f"{name}: storage {key!r} holds {numel} elements, expected {storage.numel}."
            )
        nbytes = numel * storage.dtype.itemsize
        raw = file.read(nbytes)
        if len(raw) != nbytes:
            raise CheckpointFormatError(f"{name} is truncated (storage {key!r}).")
        storage.data = _to_native(raw, storage.dtype, little_endian)
    return _materialize(obj)


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Reads a PyTorch state dict saved with ``torch.save`` into numpy arrays.

    Supports the zip format (PyTorch >= 1.6) and the earlier legacy format. Tensors come back
    contiguous in their stored dtype (bfloat16 as ``ml_dtypes.bfloat16``), in native byte order.

    Args:
      path: the ``.pth``/``.pt`` file.

    Returns:
      ``{name: array}`` in file order.

    Raises:
      UnsafeCheckpointError: the pickle references a global outside the state-dict allowlist
        (e.g. ``os.system``); nothing from the file is executed.
      CheckpointFormatError: the file is malformed, or holds something other than a flat
        mapping from names to tensors.
    """
    name = os.fspath(path)
    with open(name, "rb") as f:
        # Like torch.load, decide by the first local-file-header signature.
        is_zip = f.read(4) == b"PK\x03\x04"
        f.seek(0)
        obj = _load_zip(f, name) if is_zip else _load_legacy(f, name)
    if not isinstance(obj, Mapping):
        raise CheckpointFormatError(
            f"{name} holds a {type(obj).__name__}, not a state dict (a mapping name -> tensor)."
        )
    out = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, np.ndarray):
            raise CheckpointFormatError(
                f"{name}: entry {key!r} is a {type(value).__name__}; a state dict maps names to "
                "tensors (nested checkpoints: save checkpoint['state_dict'] on its own)."
            )
        out[key] = value
    return out
