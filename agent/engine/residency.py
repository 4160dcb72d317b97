"""Which parts of a model file are in RAM, and reading them in on purpose.

Owns ``layer_residency`` (mincore(2) over a private read-only mapping of the file) and
``warm_up`` (read every page of every layer, in file order). Page-cache residency belongs to the
file, not to a mapping, so a second mapping of the same file sees exactly the pages llama.cpp's
own mapping would find; that is what makes this cheap and safe to call while a generation runs.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.system.libc import LIBC
from agent.system.progress import progress as progress_of

PAGE = mmap.PAGESIZE


@dataclass(frozen=True)
class LayerResidency:
    """Fraction of layer ``index``'s bytes (its pages) that are resident in RAM, 0.0-1.0."""

    index: int
    fraction: float
    resident_bytes: int
    nbytes: int


def _page_span(offset: int, nbytes: int) -> tuple[int, int]:
    """Pages [first, last) that hold bytes [offset, offset + nbytes)."""
    return offset // PAGE, (offset + max(nbytes, 1) - 1) // PAGE + 1


def _mincore(mm: mmap.mmap, size: int) -> np.ndarray:
    if LIBC.lib is None or not hasattr(LIBC.lib, "mincore"):
        raise OSError("mincore(2) is not available in this C library")
    fn = LIBC.lib.mincore
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    n_pages = -(-size // PAGE)
    vec = np.zeros(n_pages, dtype=np.uint8)
    # The mapping's address, through a read-only numpy view (ctypes.from_buffer wants it writable).
    view = np.frombuffer(mm, dtype=np.uint8)
    try:
        if fn(view.ctypes.data, size, vec.ctypes.data) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mincore failed: {os.strerror(err)}")
    finally:
        del view  # the mmap cannot close while a view holds its buffer
    return vec & 1


def layer_residency(path: Path | str, layers: Any) -> list[LayerResidency]:
    """Per layer (``LayerRange``s from the GGUF header): the resident share of its pages."""
    size = os.path.getsize(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) as mm:
        resident = _mincore(mm, size)
    cum = np.concatenate(([0], np.cumsum(resident, dtype=np.int64)))
    out = []
    for r in layers:
        first, last = _page_span(r.offset, r.nbytes)
        last = min(last, len(resident))
        pages = max(0, last - first)
        got = int(cum[last] - cum[first]) if pages else 0
        out.append(
            LayerResidency(
                index=r.index,
                fraction=(got / pages) if pages else 0.0,
                resident_bytes=min(r.nbytes, got * PAGE),
                nbytes=r.nbytes,
            )
        )
    return out


def warm_up(path: Path | str, ranges: list[tuple[str, int, int]], *, progress: bool = False) -> int:
    """Read one byte of every page of each (name, offset, nbytes) range, in the given order, with
    MADV_WILLNEED first so the kernel reads ahead in large requests. Returns bytes covered.

    Reading through our own mapping fills the shared page cache, so llama.cpp's mapping then finds
    the pages there (a minor fault instead of a disk read in the middle of a generation).
    """

    size = os.path.getsize(path)
    total = sum(n for _, _, n in ranges)
    with (
        open(path, "rb") as f,
        mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) as mm,
        progress_of(total, "warm-up", enabled=progress) as bar,
    ):
        view = np.frombuffer(mm, dtype=np.uint8)
        try:
            for name, offset, nbytes in ranges:
                first, last = _page_span(offset, nbytes)
                start, end = first * PAGE, min(last * PAGE, size)
                if hasattr(mm, "madvise"):
                    mm.madvise(mmap.MADV_WILLNEED, start, end - start)
                # A strided sum reads one byte per page in C; the value itself is irrelevant.
                int(view[start:end:PAGE].sum())
                bar.set_postfix_str(name, refresh=False)
                bar.update(nbytes)
        finally:
            del view
    return total
