"""Tensor state dicts from PyTorch `torch.save` files, read without torch and without running pickled code.

Both of torch's formats are read: the zip archive (torch >= 1.6) and the legacy one (a stream of
pickles followed by raw storages) in which lpips ships its "lin" weights. The unpickler knows
only the few globals a state dict is made of (OrderedDict, the tensor rebuild function, storage
types); any other global makes the file refused, so nothing in it is ever called.
"""
from __future__ import annotations

import io
import os
import pickle
import zipfile
from collections import OrderedDict

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
LEGACY_PROTOCOL = 1001
STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _Storage:
    """A storage named in the pickle; its bytes come later (legacy) or from the archive (zip)."""

    def __init__(self, key: str, dtype, numel: int):
        self.key, self.dtype, self.numel = key, np.dtype(dtype), numel
        self.data: np.ndarray | None = None


class _Tensor:
    """A tensor as the pickle describes it: a strided view of a storage, built once bytes are in."""

    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def array(self, path: str, key: str) -> np.ndarray:
        data = self.storage.data
        # as_strided trusts its arguments: a crafted negative or mismatched stride, size or offset
        # would read memory outside the storage, so anything but a plain forward view is refused.
        ints = (self.offset, *self.size, *self.stride)
        if (len(self.size) != len(self.stride) or not all(isinstance(v, int) for v in ints)
                or min(ints, default=0) < 0):
            raise ValueError(f"{path}: tensor {key!r} has an invalid layout (offset {self.offset}, "
                             f"shape {self.size}, strides {self.stride})")
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride) if n > 0)
        if data is None or (all(self.size) and last >= len(data)):
            raise ValueError(f"{path}: tensor {key!r} of shape {self.size} reads past its storage "
                             f"({0 if data is None else len(data)} elements); the file is truncated")
        item = data.itemsize
        view = np.lib.stride_tricks.as_strided(data[self.offset:], self.size,
                                               [s * item for s in self.stride])
        return np.array(view)


def _rebuild_tensor(storage, offset, size, stride, *_ignored):
    # torch._utils._rebuild_tensor[_v2](storage, offset, size, stride, requires_grad, hooks, ...)
    return _Tensor(storage, offset, size, stride)


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, path: str):
        super().__init__(file)
        self.path = path
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in STORAGE_DTYPES:
            return STORAGE_DTYPES[name]
        raise ValueError(f"{self.path} refused for safety: unpickling it would call {module}.{name}; "
                         "only plain tensor state dicts are read")

    def persistent_load(self, pid):
        # ('storage', storage type, key, location, numel[, view metadata])
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] in ("storage", b"storage")):
            raise ValueError(f"{self.path}: unexpected persistent id {pid!r}; not a torch tensor file")
        dtype, key, numel = pid[1], str(pid[2]), int(pid[4])
        if not (isinstance(dtype, type) and issubclass(dtype, np.generic)):
            raise ValueError(f"{self.path}: storage {key} has unsupported type {dtype!r}")
        return self.storages.setdefault(key, _Storage(key, dtype, numel))


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """name -> NumPy array for every tensor of a `torch.save(state_dict)` file (zip or legacy).

    Raises ValueError naming the file when it is not such a file, is truncated, or would need
    any code beyond rebuilding tensors.
    """
    path = os.fspath(path)
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path} is empty")
    try:
        if zipfile.is_zipfile(path):  # read member by member: torchvision's files are ~0.5 GB
            obj = _read_zip(path)
        else:
            with open(path, "rb") as f:
                obj = _read_legacy(f.read(), path)
    except (pickle.UnpicklingError, EOFError, KeyError, IndexError, TypeError, AttributeError,
            zipfile.BadZipFile) as e:
        raise ValueError(f"{path} is not a readable PyTorch file (truncated, corrupt or not written "
                         f"by torch.save): {type(e).__name__}: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, expected a state dict "
                         "(torch.save(model.state_dict(), path))")
    odd = sorted(str(k) for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, _Tensor)))
    if odd:
        raise ValueError(f"{path} is not a plain state dict: entries {odd} are not named tensors; "
                         "save model.state_dict() itself")
    return {k: v.array(path, k) for k, v in obj.items()}


def _read_legacy(raw: bytes, path: str):
    f = io.BytesIO(raw)
    unpickler = _Unpickler(f, path)  # one pickle per load(): header, state dict, storage keys
    if unpickler.load() != LEGACY_MAGIC:
        raise ValueError(f"{path} is not a readable PyTorch file (not a torch.save zip or legacy file)")
    if unpickler.load() != LEGACY_PROTOCOL:
        raise ValueError(f"{path}: unsupported legacy torch protocol version")
    sys_info = unpickler.load()
    if not sys_info.get("little_endian", False):
        raise ValueError(f"{path} was written on a big-endian machine; not supported")
    obj = unpickler.load()
    keys = unpickler.load()  # the storages' keys, in the order their bytes follow
    for key in keys:
        storage = unpickler.storages[str(key)]
        numel = int.from_bytes(f.read(8), "little")  # each storage: int64 element count, then data
        blob = f.read(numel * storage.dtype.itemsize)
        if len(blob) != numel * storage.dtype.itemsize:
            raise ValueError(f"{path} is truncated: storage {key} has {len(blob)} of "
                             f"{numel * storage.dtype.itemsize} bytes")
        storage.data = np.frombuffer(blob, storage.dtype)
    return obj


def _read_zip(path: str):
    with zipfile.ZipFile(path) as archive:
        pkl = next((n for n in archive.namelist() if n.endswith("/data.pkl")), None)
        if pkl is None:
            raise ValueError(f"{path} is a zip file but not a torch.save archive (no data.pkl)")
        prefix = pkl[:-len("data.pkl")]
        unpickler = _Unpickler(io.BytesIO(archive.read(pkl)), path)
        if f"{prefix}byteorder" in archive.namelist() and archive.read(f"{prefix}byteorder") != b"little":
            raise ValueError(f"{path} was written on a big-endian machine; not supported")
        obj = unpickler.load()
        for key, storage in unpickler.storages.items():
            storage.data = np.frombuffer(archive.read(f"{prefix}data/{key}"), storage.dtype)
    return obj

