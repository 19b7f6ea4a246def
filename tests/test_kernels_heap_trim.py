"""The heap trim: its policy (pure, a fake clock) and what a trim does to a fragmented heap (real glibc)."""
from __future__ import annotations

import ctypes
import ctypes.util
import os

import pytest

from kernels.runtime.heap_trim import HeapTrimmer, TrimPolicy
from kernels.runtime.host_memory import TRIM_COUNTS, heap_stats, trim_heap

MIB = 1 << 20


def test_under_load_it_trims_at_most_once_an_interval() -> None:
    policy = TrimPolicy(interval_s=60, floor_bytes=100 * MIB)
    assert policy.due(now=0, free_bytes=500 * MIB, idle=False)
    policy.trimmed(0, idle=False)
    assert not policy.due(now=59.9, free_bytes=900 * MIB, idle=False)
    assert policy.due(now=60, free_bytes=500 * MIB, idle=False)


def test_a_small_free_heap_is_left_alone() -> None:
    policy = TrimPolicy(interval_s=60, floor_bytes=100 * MIB)
    assert not policy.due(now=0, free_bytes=99 * MIB, idle=False)
    assert not policy.due(now=0, free_bytes=99 * MIB, idle=True)


def test_falling_idle_trims_once_until_the_load_returns() -> None:
    policy = TrimPolicy(interval_s=60, floor_bytes=100 * MIB)
    policy.trimmed(0, idle=False)
    assert policy.due(now=5, free_bytes=500 * MIB, idle=True)  # idle: no need to wait for the interval
    policy.trimmed(5, idle=True)
    assert not policy.due(now=6, free_bytes=500 * MIB, idle=True)
    assert not policy.due(now=600, free_bytes=500 * MIB, idle=True)  # an idle heap does not fragment
    policy = TrimPolicy(interval_s=60, floor_bytes=100 * MIB)
    policy.trimmed(5, idle=True)
    assert not policy.due(now=30, free_bytes=500 * MIB, idle=False)  # load again: the interval counts
    assert policy.due(now=31, free_bytes=500 * MIB, idle=True)  # ...and idling again trims again


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    return libc


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_trim_gives_back_free_pages_in_the_middle_of_the_heap() -> None:
    """Every other block freed: the free memory is in holes between live blocks, never at the heap's top,
    which is what fragmentation leaves and what only malloc_trim (not the automatic top trim) returns."""
    if heap_stats() is None:
        pytest.skip("not glibc: no heap to trim")
    libc, block, count = _libc(), 64 << 10, 2048  # 64 KiB: below any mmap threshold, on the heap
    blocks = [libc.malloc(block) for _ in range(count)]
    try:
        for b in blocks:
            ctypes.memset(b, 1, block)
        for b in blocks[::2]:
            libc.free(b)
        holes = block * count // 2
        before, trims = _rss_bytes(), TRIM_COUNTS.trims
        assert trim_heap()
        released = before - _rss_bytes()
        assert released >= holes * 0.9, (released, holes)
        assert TRIM_COUNTS.trims == trims + 1 and TRIM_COUNTS.seconds > 0
    finally:
        for b in blocks[1::2]:
            libc.free(b)


def test_the_trimmer_asks_its_policy_with_the_heap_and_the_engine_state() -> None:
    if heap_stats() is None:
        pytest.skip("not glibc: the trimmer never starts")
    now, idle = [0.0], [False]
    trimmer = HeapTrimmer(TrimPolicy(interval_s=10, floor_bytes=0), idle=lambda: idle[0], clock=lambda: now[0])
    assert trimmer.check()
    now[0] = 5
    assert not trimmer.check()
    idle[0] = True
    assert trimmer.check() and not trimmer.check()
    idle[0], now[0] = False, 16
    assert trimmer.check()
