"""Atomic writes: readers see the old file (or directory contents) or the complete new one, never a partial one."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import IO, Callable, Iterator, Union

PathLike = Union[str, "os.PathLike[str]"]


@contextlib.contextmanager
def atomic_file(path: PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Yields a temporary file next to ``path``; renames it over ``path`` when the block succeeds, deletes it
    when the block raises."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_dir_atomically(out_dir: PathLike, write: Callable[[str], None]) -> None:
    """Runs ``write(tmp)`` in a fresh sibling directory, then moves its entries into ``out_dir``.

    A failure leaves ``out_dir`` as it was (or absent); entries of ``out_dir`` that ``write`` did not produce are
    kept, entries it did produce replace the old ones.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise FileExistsError(f"output path exists and is not a directory: {out_dir}")
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        write(tmp)
        if not os.path.exists(out_dir):
            os.rename(tmp, out_dir)
            return
        for name in os.listdir(tmp):
            target = os.path.join(out_dir, name)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            os.replace(os.path.join(tmp, name), target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
