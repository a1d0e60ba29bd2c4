"""Reading and writing weight files: safetensors, ``pytorch_model.bin`` (torch only here), sharded indexes.

Weights travel as flat ``{torch_key: numpy array}`` dicts; ``convert.py`` maps them to Flax trees. The
safetensors reader and writer are ours (the format is a JSON header and raw little-endian bytes) so that every
dtype, bfloat16 included, round-trips bit for bit, and a truncated or corrupt file gives an error naming it.
"""
from __future__ import annotations

import json
import mmap
import os
import pickle
import struct
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Union

import ml_dtypes
import numpy as np

from .fileio import atomic_file

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"

_SAFE_DTYPES = {
    "F64": np.dtype("float64"), "F32": np.dtype("float32"), "F16": np.dtype("float16"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype("int64"), "I32": np.dtype("int32"),
    "I16": np.dtype("int16"), "I8": np.dtype("int8"), "U8": np.dtype("uint8"), "BOOL": np.dtype("bool"),
}
_SAFE_NAMES = {v: k for k, v in _SAFE_DTYPES.items()}


class CheckpointError(ValueError):
    """A weight file or directory that cannot be read as a checkpoint."""


def read_safetensors(path: str, mapped: bool = False) -> dict[str, np.ndarray]:
    """All tensors of one ``.safetensors`` file as numpy arrays.

    Each tensor is read straight into its own array, so reading holds one copy of the weights (a whole-file buffer
    sliced into copies would need two). With ``mapped`` the arrays are read-only views of one map of the file
    instead (one file descriptor however many tensors): nothing is read until used, and the pages of an array are
    handed back once it is dropped, so a loader that converts and drops them one by one never holds them all. Copy
    what you keep: a view follows the file."""
    size = os.path.getsize(path)
    out: dict[str, np.ndarray] = {}
    whole = None  # the file's one map, when mapped
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path} is not a safetensors file (only {size} bytes)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > size - 8 or header_len > 100_000_000:
            raise CheckpointError(f"{path} is truncated or not a safetensors file (header of {header_len} bytes "
                                  f"in a file of {size})")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path} has a corrupt safetensors header: {e}") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path} has a corrupt safetensors header: not a JSON object")
        data_len = size - 8 - header_len
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype = _SAFE_DTYPES[info["dtype"]]
                start, end = (int(x) for x in info["data_offsets"])
                shape = tuple(int(n) for n in info["shape"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry {info!r}") from None
            nbytes = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
            if not 0 <= start <= end <= data_len or end - start != nbytes:
                raise CheckpointError(f"{path} is truncated or corrupt: tensor {name!r} needs bytes {start}..{end} "
                                      f"of {data_len}")
            if mapped and nbytes:
                whole = whole or mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                arr = _mapped_view(whole, 8 + header_len + start, dtype.newbyteorder("<"), shape)
            else:
                arr = np.empty(shape, dtype.newbyteorder("<"))
                f.seek(8 + header_len + start)
                if f.readinto(arr.reshape(-1).view(np.uint8)) != nbytes:
                    raise CheckpointError(f"{path} is truncated: tensor {name!r} ends past the end of the file")
            out[name] = arr.astype(dtype, copy=False)  # the native byte order (a no-op on little-endian hosts)
    return out


def _mapped_view(whole: mmap.mmap, offset: int, dtype: np.dtype, shape: tuple) -> np.ndarray:
    """A read-only array over ``whole`` at ``offset``; when it is dropped its pages leave this process's memory
    (``MADV_DONTNEED``: on a read-only file map that is always safe, a later access reads the file again)."""
    count = int(np.prod(shape, dtype=np.int64))
    flat = np.frombuffer(whole, dtype, count, offset)
    first = offset - offset % mmap.PAGESIZE
    # on ``flat``, the base numpy gives every view of it (reshaped, transposed): it goes when the last view goes
    weakref.finalize(flat, _drop_pages, whole, first, offset + count * dtype.itemsize - first)
    return flat.reshape(shape)


def _drop_pages(whole: mmap.mmap, start: int, length: int) -> None:
    if not whole.closed and hasattr(whole, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        try:
            whole.madvise(mmap.MADV_DONTNEED, start, length)
        except (OSError, ValueError):
            pass  # only memory is at stake, never the values


@dataclass(frozen=True)
class LazyTensor:
    """A tensor made only when it is written: its shape and dtype are known up front (the file's header needs
    them first), its values come from ``make()`` when its turn comes. A writer given these holds one tensor at a
    time, not the whole state."""
    shape: tuple[int, ...]
    dtype: np.dtype
    make: Callable[[], np.ndarray]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        arr = np.asarray(self.make())
        if arr.shape != tuple(self.shape) or arr.dtype != self.dtype:
            raise CheckpointError(f"a lazy tensor promised {self.dtype}{list(self.shape)} and made "
                                  f"{arr.dtype}{list(arr.shape)}")
        return arr if dtype is None else arr.astype(dtype)


Tensor = Union[np.ndarray, LazyTensor]


def write_safetensors(path: str, tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None
                      ) -> None:
    """Writes ``tensors`` to ``path`` atomically (temporary file, then rename), one tensor at a time: no copy of
    the whole file is built in memory, and a ``LazyTensor`` is made only when its bytes are written."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name in sorted(tensors):
        value = tensors[name]
        if not isinstance(value, LazyTensor):
            value = np.asarray(value)
        dtype, shape = np.dtype(value.dtype), tuple(int(n) for n in value.shape)
        if dtype not in _SAFE_NAMES:
            raise CheckpointError(f"cannot write tensor {name!r} of dtype {dtype} to safetensors")
        nbytes = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
        header[name] = {"dtype": _SAFE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # keep the data 8-byte aligned
    with atomic_file(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for name in sorted(tensors):
            arr = np.asarray(tensors[name])
            if list(arr.shape) != header[name]["shape"] or _SAFE_NAMES.get(arr.dtype) != header[name]["dtype"]:
                raise CheckpointError(f"tensor {name!r} changed while it was written")  # header and data must agree
            arr = np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<"), copy=False))
            f.write(arr.reshape(-1).view(np.uint8))
            del arr


# torch's storage classes, as its zip files name them, and the numpy dtype of their elements
_TORCH_STORAGES = {
    "FloatStorage": np.dtype("float32"), "DoubleStorage": np.dtype("float64"), "HalfStorage": np.dtype("float16"),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16), "LongStorage": np.dtype("int64"),
    "IntStorage": np.dtype("int32"), "ShortStorage": np.dtype("int16"), "CharStorage": np.dtype("int8"),
    "ByteStorage": np.dtype("uint8"), "BoolStorage": np.dtype("bool"), "UntypedStorage": np.dtype("uint8"),
}


class _PickledDict(dict):
    """What an ``OrderedDict`` unpickles to here: a dict that takes the attributes (``_metadata``) a state dict
    carries."""


class _NotPlainStateDict(Exception):
    """A ``.bin`` our reader does not take (an old or unusual layout, or a global it does not know); torch may."""


def read_torch_bin(path: str, mapped: bool = False) -> dict[str, np.ndarray]:
    """A ``pytorch_model.bin`` state dict as numpy arrays.

    torch's zip layout (every file torch has written since 1.6) is read here without torch: a pickle that may
    name only tensors, their storages and ordered dicts (nothing in it can run code), and one uncompressed entry
    per storage, which is read, or with ``mapped`` mapped, like a safetensors file (``read_safetensors``). Other
    layouts (pre-1.6 pickles, tensor subclasses) go to ``torch.load(weights_only=True)``, which also refuses any
    pickle that would run code."""
    try:
        state = _read_torch_zip(path)
    except _NotPlainStateDict as e:
        state = _read_torch_bin_with_torch(path, why=str(e))
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path} does not hold a state dict (found {type(state).__name__})")
    state, out = dict(state), {}
    for name in list(state):
        arr = state.pop(name)  # each array goes once it is converted: one copy of the weights at a time
        if not isinstance(arr, np.ndarray):
            raise CheckpointError(f"{path}: entry {name!r} is not a tensor")
        # a read-only array is a view of the file's map (torch's fallback made copies already)
        out[name] = arr if mapped or arr.flags.writeable else np.array(arr)
    return out


def _read_torch_zip(path: str) -> object:
    """The unpickled state of one torch zip file, tensors as read-only numpy views of one map of the file."""
    import zipfile

    if not zipfile.is_zipfile(path):
        raise _NotPlainStateDict
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"cannot read {path} as a PyTorch checkpoint: {e}") from None
    with archive, open(path, "rb") as f:
        infos = {i.filename: i for i in archive.infolist()}
        pickles = [n for n in infos if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise _NotPlainStateDict
        root = pickles[0][:-len("data.pkl")]
        order = infos.get(root + "byteorder")
        if order is not None and archive.read(order).strip() != b"little":
            raise _NotPlainStateDict  # a big-endian writer: rare enough to leave to torch
        whole = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        storages: dict[str, np.ndarray] = {}

        def storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
            if key not in storages:
                info = infos.get(f"{root}data/{key}")
                if info is None or info.compress_type != zipfile.ZIP_STORED:
                    raise CheckpointError(f"{path} is corrupt: storage {key!r} is missing or compressed")
                local = whole[info.header_offset:info.header_offset + 30]
                if len(local) < 30 or local[:4] != b"PK\x03\x04":
                    raise CheckpointError(f"{path} is corrupt: no local header for storage {key!r}")
                name_len, extra_len = struct.unpack("<HH", local[26:30])
                start = info.header_offset + 30 + name_len + extra_len
                if info.file_size != numel * dtype.itemsize or start + info.file_size > len(whole):
                    raise CheckpointError(f"{path} is truncated or corrupt: storage {key!r} holds {info.file_size} "
                                          f"bytes where {numel} x {dtype} were announced")
                storages[key] = (_mapped_view(whole, start, dtype, (numel,)) if numel
                                 else np.empty(0, dtype))
            return storages[key]

        def rebuild(store: np.ndarray, offset: int, size: tuple, stride: tuple, *_: object) -> np.ndarray:
            size, stride = tuple(int(n) for n in size), tuple(int(n) for n in stride)
            last = offset + sum((n - 1) * st for n, st in zip(size, stride)) if all(size) else offset - 1
            if offset < 0 or last >= store.size or min(stride, default=0) < 0:
                raise CheckpointError(f"{path} is corrupt: a tensor of shape {list(size)} reaches past its storage")
            if not all(size):
                return np.empty(size, store.dtype)
            return np.lib.stride_tricks.as_strided(store[offset:], size, [n * store.itemsize for n in stride],
                                                   writeable=False)

        def parameter(data: np.ndarray, *_: object) -> np.ndarray:
            return data

        allowed = {("torch._utils", "_rebuild_tensor_v2"): rebuild, ("torch._utils", "_rebuild_parameter"): parameter,
                   ("torch._utils", "_rebuild_parameter_with_state"): parameter,
                   ("collections", "OrderedDict"): _PickledDict}
        try:
            return _TorchUnpickler(archive.open(pickles[0]), allowed, storage).load()
        except (_NotPlainStateDict, CheckpointError):
            raise
        except Exception as e:  # a corrupt pickle raises many kinds
            raise CheckpointError(f"cannot read {path} as a PyTorch checkpoint: {type(e).__name__}: {e}") from None


class _TorchUnpickler(pickle.Unpickler):
    """Unpickles a torch zip file's ``data.pkl`` calling only the functions in ``allowed`` and making storages
    with ``storage(key, dtype, numel)``. At module level on purpose: a class made inside the reader would sit in a
    reference cycle, and whatever it reached (every storage, the map's file descriptor) would stay until the
    cyclic garbage collector ran."""

    def __init__(self, file: Any, allowed: dict, storage: Callable[[str, np.dtype, int], np.ndarray]) -> None:
        super().__init__(file)
        self._allowed, self._storage = allowed, storage

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._allowed:
            return self._allowed[module, name]
        if module == "torch" and name in _TORCH_STORAGES:
            return _TORCH_STORAGES[name]
        raise _NotPlainStateDict(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], np.dtype)):
            raise _NotPlainStateDict(f"persistent id {pid!r}")
        return self._storage(str(pid[2]), pid[1], int(pid[4]))


def _read_torch_bin_with_torch(path: str, why: str) -> object:
    """``torch.load(weights_only=True)``, tensors turned into numpy arrays one by one; ``why`` our reader
    passed it on."""
    try:
        import torch
    except ImportError:
        why = why or "not the zip layout of torch 1.6 and later"
        raise CheckpointError(f"{path} is a PyTorch pickle that needs torch to read ({why}): pip install "
                              "'bertgen-flax[torch]', or convert the checkpoint to safetensors") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for corrupt or unsafe files
        raise CheckpointError(f"cannot read {path} as a PyTorch checkpoint: {type(e).__name__}: {e}") from None
    if not isinstance(state, Mapping):
        return state
    state, out = dict(state), {}
    for name in list(state):
        tensor = state.pop(name)
        if isinstance(tensor, torch.Tensor):
            tensor = tensor.detach().cpu().contiguous()
            if tensor.dtype == torch.bfloat16:
                tensor = tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
            else:
                tensor = tensor.numpy()
            tensor = tensor.copy()
        out[name] = tensor
    return out


def _read_file(path: str, mapped: bool) -> dict[str, np.ndarray]:
    if not os.path.isfile(path):
        raise CheckpointError(f"weight file not found: {path}")
    return read_safetensors(path, mapped) if path.endswith(".safetensors") else read_torch_bin(path, mapped)


def find_weights(directory: str) -> list[str]:
    """The weight files of an HF directory, safetensors preferred; a clear error when there are none."""
    if not os.path.isdir(directory):
        raise CheckpointError(f"checkpoint directory not found: {directory}")
    for single, index in ((SAFE_WEIGHTS, SAFE_INDEX), (TORCH_WEIGHTS, TORCH_INDEX)):
        if os.path.isfile(os.path.join(directory, single)):
            return [os.path.join(directory, single)]
        index_path = os.path.join(directory, index)
        if os.path.isfile(index_path):
            try:
                with open(index_path, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
                files = sorted(set(weight_map.values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{index_path} is not a valid shard index: {e!r}") from None
            return [os.path.join(directory, name) for name in files]
    raise CheckpointError(f"no weights in {directory}: expected {SAFE_WEIGHTS}, {TORCH_WEIGHTS} or a sharded index "
                          f"({SAFE_INDEX} / {TORCH_INDEX})")


def load_state_dict(directory: str, mapped: bool = False) -> dict[str, np.ndarray]:
    """Every tensor of an HF checkpoint directory (single file or shards) in one flat dict; ``mapped``: safetensors
    files are mapped, not read (``read_safetensors``)."""
    state: dict[str, np.ndarray] = {}
    for path in find_weights(directory):
        for name, arr in _read_file(path, mapped).items():
            if name in state:
                raise CheckpointError(f"tensor {name!r} appears in more than one shard ({path})")
            state[name] = arr
    return state
