"""Request-parallel shards (kernels/runtime/shards.py) and host facts (kernels/runtime/host_memory.py, flow-cache pool)."""
from __future__ import annotations

import threading

import pytest
import torch

from kernels.runtime.host_memory import heap_stats, tune_allocator
from kernels.runtime.shards import ShardPool, balanced_shards


def test_balanced_shards_cover_every_index_once_in_order() -> None:
    costs = [5.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    groups = balanced_shards(costs, 2)
    assert sorted(i for g in groups for i in g) == list(range(6))
    assert all(g == sorted(g) for g in groups)
    loads = sorted(sum(costs[i] for i in g) for g in groups)
    assert loads == [5.0, 5.0]  # longest first: the big item alone, the five small ones together


def test_balanced_shards_never_more_groups_than_items() -> None:
    assert balanced_shards([1.0], 4) == [[0]]
    assert len(balanced_shards([1.0, 1.0, 1.0], 8)) == 3
    assert balanced_shards([3.0, 2.0], 1) == [[0, 1]]


def test_pool_returns_results_in_batch_order_from_several_threads() -> None:
    pool = ShardPool(2)
    seen: set[str] = set()
    both = threading.Barrier(2, timeout=10)  # the two shards must be in flight at the same time

    def work(part: list[int]) -> list[int]:
        seen.add(threading.current_thread().name)
        both.wait()
        return [10 * x for x in part]

    try:
        items = list(range(7))
        assert pool.map(work, items, [1.0] * 7) == [10 * x for x in items]
        assert len(seen) == 2 and all(name.startswith("cosyserve-shard") for name in seen)
    finally:
        pool.close()


def test_pool_workers_run_single_threaded_and_leave_the_default_alone() -> None:
    before = torch.get_num_threads()
    pool = ShardPool(2)
    try:
        counts = pool.map(lambda part: [torch.get_num_threads() for _ in part], [0, 1], [1.0, 1.0])
        assert counts == [1, 1]
        assert torch.get_num_threads() == before
        holder: list[int] = []
        later = threading.Thread(target=lambda: holder.append(torch.get_num_threads()))
        later.start()
        later.join()
        assert holder == [before]  # threads started afterwards get the process default back
    finally:
        pool.close()


def test_lone_item_runs_inline_on_the_caller() -> None:
    pool = ShardPool(2)
    try:
        names = pool.map(lambda part: [threading.current_thread().name for _ in part], ["x"], [1.0])
        assert names == [threading.current_thread().name]
    finally:
        pool.close()


def test_a_lone_item_beside_other_work_runs_on_a_single_threaded_worker() -> None:
    pool = ShardPool(2)
    try:
        seen = pool.map(lambda part: [(threading.current_thread().name, torch.get_num_threads()) for _ in part],
                        ["x"], [1.0], lone_inline=False)
        assert seen[0][0].startswith("cosyserve-shard") and seen[0][1] == 1
        assert ShardPool(1).map(lambda part: [threading.current_thread().name for _ in part], ["x"], [1.0],
                                lone_inline=False) == [threading.current_thread().name]  # no workers: inline
    finally:
        pool.close()


def test_shard_errors_propagate_after_every_shard_finished() -> None:
    pool = ShardPool(2)
    finished = []

    def work(part: list[int]) -> list[int]:
        if 0 in part:
            raise ValueError("bad shard")
        finished.extend(part)
        return part

    try:
        with pytest.raises(ValueError, match="bad shard"):
            pool.map(work, [0, 1], [1.0, 1.0])
        assert finished == [1]
    finally:
        pool.close()


def test_shard_function_must_return_one_result_per_item() -> None:
    pool = ShardPool(2)
    try:
        with pytest.raises(RuntimeError, match="2 items"):
            pool.map(lambda part: [], [0, 1, 2, 3], [1.0] * 4)
    finally:
        pool.close()


def test_single_worker_pool_is_inline() -> None:
    pool = ShardPool(1)
    assert pool.map(lambda part: [x + 1 for x in part], [1, 2, 3], [1.0] * 3) == [2, 3, 4]


def test_tune_allocator_respects_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    applied = tune_allocator()
    assert "MALLOC_ARENA_MAX" not in applied
    if applied:  # glibc: the other two are set
        assert applied["MALLOC_MMAP_THRESHOLD_"] == 32 << 20
        assert applied["MALLOC_TRIM_THRESHOLD_"] == 1 << 30


def test_heap_stats_see_a_block_malloc_hands_out_and_takes_back() -> None:
    import ctypes
    import ctypes.util

    before = heap_stats()
    if before is None:
        pytest.skip("not glibc (or glibc < 2.33): no mallinfo2")
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    size = 8 << 20
    block = libc.malloc(size)
    try:
        ctypes.memset(block, 1, size)
        held = heap_stats()
    finally:
        libc.free(block)
    after = heap_stats()
    assert held is not None and after is not None
    live = lambda h: h["in_use"] + h["mmapped"]
    slack = 64 << 10  # the interpreter allocates a little meanwhile
    assert live(held) - live(before) >= size - slack and live(held) - live(after) >= size - slack
    assert all(value >= 0 for value in after.values())


def test_flow_pool_setting_and_cpu_default() -> None:
    from kernels.runtime.engine import flow_pool_bytes
    from kernels.runtime.host_memory import host_ram_bytes

    assert flow_pool_bytes(0, "cpu") == 0  # off: every streaming chunk recomputes
    assert flow_pool_bytes(123, "cpu") == 123
    assert flow_pool_bytes(-1, "cpu") == host_ram_bytes() // 2
    assert 0 < host_ram_bytes()
