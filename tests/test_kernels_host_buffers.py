"""Large CPU tensors outside the malloc heap (kernels/runtime/host_buffers.py)."""
from __future__ import annotations

import gc

import torch

import pytest

from kernels.runtime.host_buffers import MIN_MAPPED_BYTES, PAGE, MappingPool, empty_outside_heap, size_class
from kernels.runtime.host_memory import heap_stats


def _mappings_of(t: torch.Tensor) -> int:
    """/proc/self/maps lines whose range holds the tensor's first byte."""
    ptr = t.data_ptr()
    count = 0
    with open("/proc/self/maps") as maps:
        for line in maps:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            count += lo <= ptr < hi and lo == ptr  # a mapping that starts at the tensor: its own
    return count


def test_a_large_buffer_is_its_own_mapping_and_goes_when_its_last_view_does() -> None:
    like = torch.zeros(1)
    shape = (2, 4, 4096, 32)  # 4 MiB of float32
    before = heap_stats()
    t = empty_outside_heap(shape, like, pool=MappingPool(limit_bytes=0))  # no pool: unmapped when it dies
    assert t.shape == shape and t.dtype == like.dtype and t.is_contiguous()
    assert t.data_ptr() % 4096 == 0 and _mappings_of(t) == 1
    if before is not None:  # malloc did not hand it out: its books do not grow by 4 MiB
        after = heap_stats()
        assert after is not None
        live = lambda h: h["in_use"] + h["mmapped"]
        assert live(after) - live(before) < 1 << 20
    t.fill_(2.0)
    view = t[:, :, :10]
    ptr = t.data_ptr()
    del t
    gc.collect()
    assert float(view.sum()) == 2.0 * view.numel()  # the view keeps the mapping alive
    del view
    gc.collect()
    with open("/proc/self/maps") as maps:  # unmapped with its last view
        assert not any(int(line.split("-")[0], 16) == ptr for line in maps)


def test_small_buffers_and_other_devices_use_the_ordinary_allocator() -> None:
    small = empty_outside_heap((MIN_MAPPED_BYTES // 4 - 1,), torch.zeros(1))
    assert small.shape == (MIN_MAPPED_BYTES // 4 - 1,) and _mappings_of(small) == 0
    meta = empty_outside_heap((1 << 20,), torch.zeros(1, device="meta", dtype=torch.float16))
    assert meta.device.type == "meta" and meta.dtype == torch.float16 and meta.shape == (1 << 20,)


def _pooled(pool: MappingPool) -> list:
    return [block for group in pool._free.values() for block in group]


@pytest.mark.parametrize("nbytes", [1, PAGE, MIN_MAPPED_BYTES, 300_000, 1 << 20, (1 << 20) + 1, 117_000_000])
def test_size_classes_are_whole_pages_at_most_a_fifth_larger(nbytes: int) -> None:
    size = size_class(nbytes)
    assert size % PAGE == 0 and size >= nbytes
    assert size <= max(PAGE, 1.19 * nbytes + PAGE)
    assert size_class(size) == size  # a class is its own class


def test_a_dead_buffers_mapping_serves_the_next_buffer_of_its_class() -> None:
    pool = MappingPool()
    like = torch.zeros(1)
    t = empty_outside_heap((300_000,), like, pool=pool)
    ptr = t.data_ptr()
    view = t[10:]
    del t
    gc.collect()
    assert pool.nbytes == 0  # a view still reads it: not reusable yet
    other = empty_outside_heap((300_000,), like, pool=pool)
    assert other.data_ptr() != ptr
    del view
    gc.collect()
    (kept,) = _pooled(pool)
    assert pool.nbytes == size_class(1_200_000) and not kept.closed  # kept, not unmapped
    again = empty_outside_heap((299_000,), like, pool=pool)  # another size of the same class
    assert again.data_ptr() == ptr and pool.nbytes == 0 and pool.hits == 1
    del again, other
    gc.collect()
    blocks = _pooled(pool)
    assert pool.clear() == 2 * size_class(1_200_000) and pool.nbytes == 0
    assert len(blocks) == 2 and all(block.closed for block in blocks)


def test_the_pool_unmaps_what_is_beyond_its_limit() -> None:
    size = size_class(1 << 20)
    pool = MappingPool(limit_bytes=size)
    first, second = (empty_outside_heap((1 << 18,), torch.zeros(1), pool=pool) for _ in range(2))
    del first, second
    gc.collect()
    assert pool.nbytes == size and len(_pooled(pool)) == 1  # the other one was unmapped
