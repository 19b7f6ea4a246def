"""Large, long-lived CPU tensors in mappings of their own, outside the malloc heap, recycled through a pool.

The streaming flow caches (kernels/runtime/flow_cache.py) live as long as their request, grow by copy
(x1.5) and add up to hundreds of MiB per batch. From the heap -- which keeps what is freed, on purpose
(kernels/runtime/host_memory.py) -- their churn among the per-step activations fragments it, and the
process's RSS climbs to new high-water marks for many minutes under a varied load (bench.soak). A mapping of
its own leaves the heap alone. Small buffers stay on the heap (a mapping each would be many kernel objects).

A fresh mapping's pages are faulted in as they are first written: restoring a voice prefix (~117 MB of
estimator keys and values) into fresh mappings took 60 ms against 13 ms into pages already faulted in
(one Zen 4 core), on the path to a stream's first audio. So a mapping whose tensor (every view of it) has
died goes to `POOL` instead of back to the kernel, by size class, and a later buffer of that class reuses
it. The pool holds at most `limit_bytes` (beyond: unmapped at once, as before) and is emptied when the
engine falls idle (kernels/runtime/heap_trim.py), so an idle server gives its memory back.
"""
from __future__ import annotations

import math
import mmap
import threading
import weakref

import torch
from torch import Tensor

MIN_MAPPED_BYTES = 256 << 10  # below this, the heap: its reuse is cheap and the churn small
PAGE = 4096
CLASSES_PER_DOUBLING = 4  # size classes 2^(1/4) apart: a buffer wastes at most ~19 % of its mapping
DEFAULT_POOL_BYTES = 1 << 30


def size_class(nbytes: int) -> int:
    """The mapping size for a buffer of `nbytes`: the next of the classes 2^(1/4) apart, in whole pages."""
    pages = max(1, math.ceil(nbytes / PAGE))
    k = max(0, math.floor(CLASSES_PER_DOUBLING * math.log2(pages)) - 1)
    while math.ceil(2 ** (k / CLASSES_PER_DOUBLING)) < pages:  # class k: ceil(2^(k/4)) pages
        k += 1
    return math.ceil(2 ** (k / CLASSES_PER_DOUBLING)) * PAGE


class MappingPool:
    """Freed anonymous mappings by size class, for reuse (thread-safe: tensors die on any thread)."""

    def __init__(self, limit_bytes: int = DEFAULT_POOL_BYTES) -> None:
        self.limit_bytes = limit_bytes
        self._free: dict[int, list[mmap.mmap]] = {}
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def take(self, size: int) -> mmap.mmap:
        """A mapping of exactly `size` bytes (a size class): a pooled one (old contents) or a new one."""
        with self._lock:
            blocks = self._free.get(size)
            if blocks:
                self._bytes -= size
                self.hits += 1
                return blocks.pop()
            self.misses += 1
        block = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)  # anonymous (fd -1); zero pages until written
        if hasattr(block, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
            block.madvise(mmap.MADV_HUGEPAGE)  # where THP is on for madvise: one fault per 2 MiB, not per 4 KiB
        return block

    def give(self, block: mmap.mmap) -> None:
        """Keep a mapping nothing views any more, within the limit; else unmap it."""
        size = len(block)
        with self._lock:
            if self._bytes + size <= self.limit_bytes:
                self._free.setdefault(size, []).append(block)
                self._bytes += size
                return
        block.close()

    def clear(self) -> int:
        """Unmap every pooled mapping; returns the bytes given back."""
        with self._lock:
            blocks = [b for group in self._free.values() for b in group]
            self._free, freed, self._bytes = {}, self._bytes, 0
        for block in blocks:
            block.close()
        return freed


POOL = MappingPool()


def empty_outside_heap(shape: tuple[int, ...], like: Tensor, pool: MappingPool | None = None) -> Tensor:
    """An uninitialised tensor of `shape` with `like`'s dtype and device: on the CPU and at least
    MIN_MAPPED_BYTES, backed by a mapping of its own from `pool` (default `POOL`), which gets the mapping back
    once the tensor and every view of it have died."""
    count = math.prod(shape)
    nbytes = count * like.element_size()
    if like.device.type != "cpu" or nbytes < MIN_MAPPED_BYTES:
        return like.new_empty(shape)
    pool = POOL if pool is None else pool
    block = pool.take(size_class(nbytes))
    # frombuffer holds a reference to `block` for as long as the storage lives; the storage's Python object
    # lives exactly as long (torch preserves it), so its finalizer runs once nothing views the memory
    tensor = torch.frombuffer(block, dtype=like.dtype, count=count).view(shape)
    if pool.limit_bytes > 0:
        weakref.finalize(tensor.untyped_storage(), pool.give, block)
    return tensor
