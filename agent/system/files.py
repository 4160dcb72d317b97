"""Files the agent replaces whole: the one atomic replace every writer uses.

A reader (another process, the agent after a power cut) sees the old file or the new one, never half
of one: the bytes go to a temporary file beside the target (created exclusively, with its mode from
the start), are flushed to the disk, renamed over the target, and the folder is flushed so the
rename itself survives a power cut. ``durable=False`` skips the two flushes for files whose loss
costs little (a cache) on a card that wears with every write.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file (model files are hundreds of MiB: read in blocks, never whole)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename into it, a new file) to the disk."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(
    path: Path,
    *,
    mode: int = 0o644,
    durable: bool = True,
    before_replace: Callable[[Path], None] | None = None,
) -> Iterator[BinaryIO]:
    """Write ``path`` through the file this yields; it replaces ``path`` only when the block ends
    without an exception (the temporary file is removed otherwise). ``before_replace(tmp)`` runs
    on the complete temporary file just before the rename (an owner to set)."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        if before_replace is not None:
            before_replace(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def atomic_write(path: Path, data: bytes | str, *, mode: int = 0o644, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` (str is written as UTF-8) atomically; see the module docstring."""
    with atomic_file(path, mode=mode, durable=durable) as f:
        f.write(data.encode() if isinstance(data, str) else data)


__all__ = ["atomic_file", "atomic_write", "fsync_dir"]
