"""The C library, through ctypes: ``malloc_trim`` and ``mincore``. No llama.cpp here, so residency
readings and heap trimming work in processes that never load the engine."""

from __future__ import annotations

import ctypes
import ctypes.util


class _Libc:
    def __init__(self) -> None:
        name = ctypes.util.find_library("c") or "libc.so.6"
        try:
            self.lib: ctypes.CDLL | None = ctypes.CDLL(name, use_errno=True)
        except OSError:
            self.lib = None

    def malloc_trim(self) -> bool:
        """Return freed heap memory to the OS (glibc only; musl has no malloc_trim and returns it anyway).

        Without it, the freed vocabulary tables and sampler arrays of an unloaded model stay in
        the heap and RssAnon does not fall (llama-cpp-python #2003)."""
        fn = getattr(self.lib, "malloc_trim", None)
        if fn is None:
            return False
        fn.argtypes = [ctypes.c_size_t]
        fn.restype = ctypes.c_int
        return bool(fn(0))


LIBC = _Libc()
