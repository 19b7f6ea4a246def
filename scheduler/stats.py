"""Plain stats dataclasses: one per step and cumulative counters (formatted at the edge, /metrics)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepStats:
    step: int = 0
    prefills: int = 0
    prefill_tokens: int = 0
    decode_batch: int = 0
    chunk_batch: int = 0
    waiting: int = 0  # queue depth after admission
    running: int = 0  # requests holding a KV slot
    draining: int = 0  # LLM done, audio left
    kv_used_tokens: int = 0
    kv_total_tokens: int = 0


@dataclass
class Counters:
    """Monotonic totals since start (mutable; `snapshot()` hands out a frozen copy)."""

    steps: int = 0
    submitted: int = 0
    rejected: int = 0
    admitted: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    chunks: int = 0
    samples_emitted: int = 0
    finished: int = 0
    cancelled: int = 0
    failed: int = 0
    flow_advances: int = 0  # flow work done ahead of a chunk (ChunkItem.advance)

    def snapshot(self) -> CounterTotals:
        # all ints: a shallow copy (asdict's deep copy cost ~12 us, and the engine publishes every pass)
        return CounterTotals(**vars(self))


@dataclass(frozen=True)
class CounterTotals:
    steps: int
    submitted: int
    rejected: int
    admitted: int
    prefill_tokens: int
    decode_tokens: int
    chunks: int
    samples_emitted: int
    finished: int
    cancelled: int
    failed: int
    flow_advances: int


@dataclass(frozen=True)
class SchedulerStats:
    last_step: StepStats
    totals: CounterTotals
    flow_cache_bytes: int = 0  # flow-cache bytes reserved by requests now (FlowCacheBudget)
    flow_cache_pool_bytes: int = 0  # their shared limit (0: none, or nothing fits)
