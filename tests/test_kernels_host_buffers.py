"""Large CPU tensors outside the malloc heap (kernels/runtime/host_buffers.py)."""
from __future__ import annotations

import gc

import torch

from kernels.runtime.host_buffers import MIN_MAPPED_BYTES, empty_outside_heap
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
    t = empty_outside_heap(shape, like)
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
