"""Meshes and sharding rules: one code path from one device to many (data parallel + FSDP).

The mesh has axes ``data`` and ``fsdp``. The batch is split over both; each parameter (and each optimizer-state
leaf of the same shape) is split along its largest axis that ``fsdp`` divides, so memory per device shrinks with
the number of devices; small or indivisible leaves are replicated.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA, FSDP = "data", "fsdp"
MIN_SHARD_SIZE = 2 ** 12  # leaves smaller than this stay replicated: splitting them saves nothing


def make_mesh(data: int = -1, fsdp: int = 1, devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A ``data`` x ``fsdp`` mesh over all (or the given) devices; ``-1`` takes what is left."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if data == -1:
        if n % fsdp:
            raise ValueError(f"fsdp={fsdp} does not divide the {n} devices")
        data = n // fsdp
    if data * fsdp != n:
        raise ValueError(f"mesh {data} x {fsdp} does not match the {n} devices")
    return Mesh(np.array(devices).reshape(data, fsdp), (DATA, FSDP))


def leaf_spec(shape: tuple[int, ...], mesh: Mesh, min_size: int = MIN_SHARD_SIZE) -> P:
    """FSDP rule for one array: its largest axis that the fsdp size divides, else replicated."""
    k = mesh.shape[FSDP]
    if k == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % k == 0:
            spec = [None] * len(shape)
            spec[axis] = FSDP
            return P(*spec)
    return P()


def tree_shardings(tree: Any, mesh: Mesh, min_size: int = MIN_SHARD_SIZE) -> Any:
    """NamedShardings for every leaf of ``tree`` (arrays or ShapeDtypeStructs) by the FSDP rule."""
    return jax.tree_util.tree_map(lambda x: NamedSharding(mesh, leaf_spec(tuple(x.shape), mesh, min_size)), tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The batch axis split over every device (data and fsdp)."""
    return NamedSharding(mesh, P((DATA, FSDP)))
