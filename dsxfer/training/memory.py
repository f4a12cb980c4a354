"""Keeping a long CPU run's resident memory flat.

What grew (measured, docs/PERF.md): not a cache and not a kept graph but glibc's allocator. Activation
tensors above the mmap threshold are mmapped and returned on free, but glibc raises that threshold to
the size of every mmapped block it frees (up to 32 MiB), so after the first steps a step's activations
come from the heap instead; batches of varying shapes (dynamic padding) then leave free holes in it
that are never handed back, and RSS climbs with the number of distinct shapes seen. `release_free_memory`,
called once per optimizer step, gives those free pages back (malloc_trim); a no-op where the C library
is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.lru_cache(maxsize=1)
def _glibc_trim():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Return the allocator's free heap pages to the OS; False where that is not possible."""
    trim = _glibc_trim()
    if trim is None:
        return False
    trim(0)
    return True
