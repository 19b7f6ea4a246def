"""Large, long-lived CPU tensors in mappings of their own, outside the malloc heap.

The streaming flow caches (kernels/runtime/flow_cache.py) live as long as their request, grow by copy
(x1.5) and add up to hundreds of MiB per batch. From the heap -- which keeps what is freed, on purpose
(kernels/runtime/host_memory.py) -- their churn among the per-step activations fragments it, and the
process's RSS climbs to new high-water marks for many minutes under a varied load (bench.soak). A mapping of
its own goes back to the kernel the moment its tensor dies, so the heap holds only what a step allocates
and frees. The cost: its pages are faulted in once, as they are first written, which is small beside the
flow steps that fill them. Small buffers stay on the heap (a mapping each would be many kernel objects).
"""
from __future__ import annotations

import math
import mmap

import torch
from torch import Tensor

MIN_MAPPED_BYTES = 256 << 10  # below this, the heap: its reuse is cheap and the churn small


def empty_outside_heap(shape: tuple[int, ...], like: Tensor) -> Tensor:
    """An uninitialised tensor of `shape` with `like`'s dtype and device: on the CPU and at least
    MIN_MAPPED_BYTES, backed by its own anonymous private mapping (freed with the tensor)."""
    nbytes = math.prod(shape) * like.element_size()
    if like.device.type != "cpu" or nbytes < MIN_MAPPED_BYTES:
        return like.new_empty(shape)
    block = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)  # anonymous (fd -1); zero pages until written
    if hasattr(block, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
        block.madvise(mmap.MADV_HUGEPAGE)  # where THP is on for madvise: one fault per 2 MiB, not per 4 KiB
    # frombuffer holds a reference to `block` for as long as any view of the tensor lives; then it unmaps
    return torch.frombuffer(block, dtype=like.dtype, count=math.prod(shape)).view(shape)
