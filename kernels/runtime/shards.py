"""Request-parallel flow/vocoder on CPU: a batch split into shards that run on their own cores.

On a CPU the flow is compute-bound and its per-request work does not shrink with batching, while
one request's ops are too small to keep several cores busy through intra-op threads (2 threads make
a lone request slower here). A batch of requests, though, splits into independent shards — each
request's caches are its own — so W single-threaded workers run W shards at once. A lone request
runs inline on the caller's thread with the caller's intra-op threads (the one-at-a-time path), unless
the caller says it runs beside other work (`lone_inline=False`): then on one worker, one thread.

Workers are started eagerly and pinned to one intra-op thread each; `torch.set_num_threads` also
sets the process default for threads created later, so the constructor puts that default back.
"""
from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


def balanced_shards(costs: Sequence[float], shards: int) -> list[list[int]]:
    """Split indices into at most `shards` non-empty groups of similar total cost (longest first).

    Each group keeps its indices in ascending order, so a shard is a sub-batch in the original order.
    """
    shards = max(1, min(shards, len(costs)))
    groups: list[list[int]] = [[] for _ in range(shards)]
    loads = [0.0] * shards
    for idx in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        target = min(range(shards), key=lambda s: (loads[s], s))
        groups[target].append(idx)
        loads[target] += costs[idx]
    return [sorted(g) for g in groups if g]


class ShardPool:
    """Runs `fn(sub_batch)` for the shards of a batch on `workers` threads; results in batch order."""

    def __init__(self, workers: int) -> None:
        self.workers = max(1, int(workers))
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        if self.workers > 1:
            self._start()

    def _start(self) -> None:
        default = torch.get_num_threads()
        ready = threading.Barrier(self.workers + 1)

        def pin() -> None:
            torch.get_num_threads()  # torch's once-per-thread lazy init first, or it would undo the 1 later
            torch.set_num_threads(1)
            ready.wait()  # hold this thread so every worker gets its own task

        self._pool = concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="cosyserve-shard")
        for _ in range(self.workers):
            self._pool.submit(pin)
        ready.wait()
        torch.set_num_threads(default)  # the process default for later threads; workers keep 1

    def map(self, fn: Callable[[list[T]], list[R]], items: Sequence[T], costs: Sequence[float],
            lone_inline: bool = True) -> list[R]:
        """`fn` takes a sub-batch and returns one result per item; the outputs are re-assembled in order.
        `lone_inline=False`: a single item goes to a worker too (see the module docstring)."""
        items = list(items)
        if not items:
            return []
        if self._pool is None or (len(items) < 2 and lone_inline):
            return list(fn(items))
        groups = balanced_shards(costs, self.workers)
        futures = [self._pool.submit(_run, fn, [items[i] for i in g]) for g in groups]
        out: list[R | None] = [None] * len(items)
        error: BaseException | None = None
        for g, fut in zip(groups, futures):
            try:  # wait for every shard before raising: none may still touch shared state
                for i, r in zip(g, fut.result()):
                    out[i] = r
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                error = error or exc
        if error is not None:
            raise error
        return out  # type: ignore[return-value]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _run(fn: Callable[[list[T]], list[R]], shard: list[T]) -> list[R]:
    with torch.inference_mode():
        result = list(fn(shard))
    if len(result) != len(shard):
        raise RuntimeError(f"shard function returned {len(result)} results for {len(shard)} items")
    return result
