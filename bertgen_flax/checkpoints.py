"""Reading and writing weight files: safetensors, ``pytorch_model.bin`` (torch only here), sharded indexes.

Weights travel as flat ``{torch_key: numpy array}`` dicts; ``convert.py`` maps them to Flax trees. The
safetensors reader and writer are ours (the format is a JSON header and raw little-endian bytes) so that every
dtype, bfloat16 included, round-trips bit for bit, and a truncated or corrupt file gives an error naming it.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
import weakref
from typing import Mapping

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


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
                      ) -> None:
    """Writes ``tensors`` to ``path`` atomically (temporary file, then rename), one tensor at a time: no copy of
    the whole file is built in memory."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name in sorted(tensors):
        arr = np.asarray(tensors[name])
        dtype = arr.dtype
        if dtype not in _SAFE_NAMES:
            raise CheckpointError(f"cannot write tensor {name!r} of dtype {dtype} to safetensors")
        header[name] = {"dtype": _SAFE_NAMES[dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # keep the data 8-byte aligned
    with atomic_file(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for name in sorted(tensors):
            arr = np.ascontiguousarray(tensors[name])
            f.write(arr.astype(arr.dtype.newbyteorder("<"), copy=False).reshape(-1).view(np.uint8))


def read_torch_bin(path: str) -> dict[str, np.ndarray]:
    """A ``pytorch_model.bin`` state dict, loaded with ``weights_only=True`` so the pickle can never run code."""
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{path} is a PyTorch pickle; reading it needs torch "
                              "(pip install 'bertgen-flax[torch]'), or convert the checkpoint to safetensors") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for corrupt or unsafe files
        raise CheckpointError(f"cannot read {path} as a PyTorch checkpoint: {type(e).__name__}: {e}") from None
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path} does not hold a state dict (found {type(state).__name__})")
    state, out = dict(state), {}
    for name in list(state):
        tensor = state.pop(name)  # each tensor's storage goes once it is converted: one copy of the weights at a time
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{path}: entry {name!r} is not a tensor")
        tensor = tensor.detach().cpu().contiguous()
        if tensor.dtype == torch.bfloat16:
            out[name] = tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
        else:
            out[name] = tensor.numpy().copy()
    return out


def _read_file(path: str, mapped: bool) -> dict[str, np.ndarray]:
    if not os.path.isfile(path):
        raise CheckpointError(f"weight file not found: {path}")
    return read_safetensors(path, mapped) if path.endswith(".safetensors") else read_torch_bin(path)


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
