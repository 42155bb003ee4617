"""Hand freed heap memory back to the operating system (glibc's `malloc_trim`).

CPython frees objects into the C allocator, which keeps the pages for reuse: after the
start-up's burst (lists of thousands of objects parsed, thousands of writes sent and their
answers read) the process kept its peak as resident memory although it no longer used it.
`malloc_trim(0)` returns the free pages at the top of the heap and in its free lists.
Elsewhere than glibc (musl, macOS) there is nothing to call, and nothing happens.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Callable

logger = logging.getLogger(__name__)


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        function = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    trim: Callable[[int], int] = function
    return trim


_TRIM = _malloc_trim()


def release_free_memory() -> bool:
    """Return free heap pages to the OS; False where the C library cannot."""
    if _TRIM is None:
        return False
    return bool(_TRIM(0))
