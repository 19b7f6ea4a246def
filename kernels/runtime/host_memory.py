"""Host (CPU-side) facts and settings for a long-running CPU engine: glibc malloc, usable cores.

CPU inference allocates and frees megabyte-sized activations thousands of times a second. glibc's
defaults hand such blocks back to the kernel (mmap'd chunks are unmapped on free, thread arenas
shrink their heaps), so the next allocation page-faults its memory in again: on the 2-core VM
that was up to 5x the cost of a GELU over a 2.4 MB tensor, and more for batched flow steps whose
activations are larger. Keeping freed memory in the process (high mmap and trim thresholds) and
one arena (the engine and shard threads share it; their allocations are per op, not per element)
removes that. The environment variables (MALLOC_ARENA_MAX etc.) win when the user has set them.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform
import threading
import time
from dataclasses import dataclass

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 1 << 30

_SETTINGS = (
    ("MALLOC_MMAP_THRESHOLD_", M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX),
    ("MALLOC_TRIM_THRESHOLD_", M_TRIM_THRESHOLD, TRIM_THRESHOLD),
    ("MALLOC_ARENA_MAX", M_ARENA_MAX, 1),
)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (found once: find_library may run `ldconfig -p`), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    path = ctypes.util.find_library("c")
    if not path:
        return None
    libc = ctypes.CDLL(path)
    libc.mallopt.argtypes, libc.mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    libc.malloc_trim.argtypes, libc.malloc_trim.restype = (ctypes.c_size_t,), ctypes.c_int
    if hasattr(libc, "mallinfo2"):
        libc.mallinfo2.restype = _MallInfo2
    return libc


def tune_allocator() -> dict[str, int]:
    """Apply the settings the environment does not already choose; returns what was set (empty off glibc)."""
    libc = _glibc()
    if libc is None:
        return {}
    applied = {}
    for env, param, value in _SETTINGS:
        if env in os.environ:
            continue
        if libc.mallopt(param, value) == 1:
            applied[env] = value
    return applied


def heap_stats() -> dict[str, int] | None:
    """glibc's own account of the heap (mallinfo2, glibc >= 2.33), bytes: `in_use` (live allocations),
    `free` (freed but kept by malloc: what the settings above retain, and fragmentation), `mmapped`
    (large blocks mapped on their own). None off glibc. RSS minus these is code, weights' file pages, etc."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    info = libc.mallinfo2()
    return {"in_use": info.uordblks, "free": info.fordblks, "mmapped": info.hblkhd}


@dataclass
class TrimCounts:
    """The process's malloc_trim calls (the heap is process-wide, so are these): for /metrics."""

    trims: int = 0
    seconds: float = 0.0


TRIM_COUNTS = TrimCounts()
_trim_lock = threading.Lock()


def trim_heap() -> bool:
    """Give the heap's free pages back to the kernel (glibc malloc_trim(0): whole free pages anywhere in
    the heap, not only at its top). Holds malloc's lock while it runs (tens of ms for ~0.5 GiB free).
    False off glibc."""
    libc = _glibc()
    if libc is None:
        return False
    start = time.perf_counter()
    libc.malloc_trim(0)
    with _trim_lock:
        TRIM_COUNTS.trims += 1
        TRIM_COUNTS.seconds += time.perf_counter() - start
    return True


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a container's cpuset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def host_ram_bytes() -> int:
    """Memory this process may use: physical RAM, capped by a cgroup v2 limit (containers); 8 GiB if unknown."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 8 << 30
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit.isdigit():
            ram = min(ram, int(limit))
    except OSError:
        pass
    return ram
