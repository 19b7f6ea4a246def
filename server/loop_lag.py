"""Event-loop lag: how late a callback scheduled on the loop actually runs.

A handler that blocks the loop (CPU work that should have gone to the pool, a sync call) delays every
connection at once; this probe makes that visible in /metrics (`cosyserve_loop_lag_seconds`) without
a profiler. It costs one timer callback per interval.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable


class LoopLagProbe:
    """Every `interval_s`, reports how late its timer fired (seconds, >= 0) to `report`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, report: Callable[[float], None],
                 interval_s: float = 0.1) -> None:
        self._loop = loop
        self._report = report
        self._interval_s = interval_s
        self._due = 0.0
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._schedule()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _schedule(self) -> None:
        self._due = self._loop.time() + self._interval_s
        self._handle = self._loop.call_at(self._due, self._tick)

    def _tick(self) -> None:
        self._report(max(0.0, self._loop.time() - self._due))
        self._schedule()
