"""Keep freed CPU memory inside the process instead of handing it back to the kernel after every tensor.

PyTorch allocates CPU tensors with the C library's ``malloc``. With glibc's defaults, a block above the (dynamic)
mmap threshold is mapped fresh and unmapped when freed, and the top of the heap is trimmed back to the kernel, so a
training step that frees and re-allocates its activations pays one page fault per 4 KiB page on every step. On
the 2-vCPU virtual machines of ``benchmarks/README.md`` (AMD EPYC, AVX2) that was 15-22 s of system time in 200
iterations of the README main job (2.9 s with the memory kept), and those 200 iterations took 61-71 s instead of
68-79 s (same outputs: only where memory comes from changes).

:func:`keep_freed_memory` sets glibc's ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` (``mallopt(3)``) for the
running process, which is what the environment variables ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``
do at start-up; unlike them it can be switched on from a bundle config (``keep_freed_memory``) after the process
has started. The price: the process's resident memory stays at its high-water mark until it exits.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

__all__ = ["keep_freed_memory"]

logger = logging.getLogger(__name__)

#: ``mallopt`` parameter numbers from glibc's ``malloc.h``
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

#: the largest value ``mallopt`` takes (an ``int``): blocks up to 2 GiB come from the heap, which is never trimmed
LARGEST_THRESHOLD = 2**31 - 1


def _glibc_mallopt():
    """glibc's ``mallopt`` or ``None`` (another C library: musl, macOS, Windows)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # an AttributeError outside glibc
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt


def keep_freed_memory(enabled: bool = True) -> bool:
    """Keep freed memory in this process (``enabled=True``); returns whether the setting was applied.

    ``enabled=False`` changes nothing (the C library's defaults stay) and returns ``False``, so a config can pass its
    flag straight through. Without glibc nothing is changed either, with one log line saying so.
    """
    if not enabled:
        return False
    mallopt = _glibc_mallopt()
    if mallopt is None:
        logger.info("keep_freed_memory: not a glibc process; the C library's allocator settings are unchanged")
        return False
    applied = mallopt(M_MMAP_THRESHOLD, LARGEST_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, LARGEST_THRESHOLD) == 1
    if not applied:
        logger.warning("keep_freed_memory: glibc refused mallopt; the allocator settings are unchanged")
    return applied
