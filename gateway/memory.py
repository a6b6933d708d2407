"""Giving memory back after start-up (the idle footprint on a small board).

Start-up allocates and frees a lot (imports, certificate checks, loading the registry and the
twins); glibc keeps freed heap pages resident until ``malloc_trim`` returns them to the kernel
(malloc_trim(3): since glibc 2.8 it also releases free pages inside the heap, with
``madvise``). Called once, after readiness; a no-op where there is no glibc (musl, macOS).
"""

from __future__ import annotations

import ctypes
import gc


def trim() -> bool:
    """Collect garbage, then hand free heap pages back to the kernel. True if glibc did."""
    gc.collect()
    try:
        malloc_trim = ctypes.CDLL(None).malloc_trim  # the process's own symbols: libc's
    except (OSError, AttributeError):
        return False
    malloc_trim.argtypes = [ctypes.c_size_t]
    malloc_trim.restype = ctypes.c_int
    return bool(malloc_trim(0))
