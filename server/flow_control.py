"""Write-side back-pressure for one connection: a slow reader stalls only its own stream, a stopped one is cut.

The transport calls pause_writing()/resume_writing() around its high/low water marks;
producers `await drain()` after each write, so what one connection holds in memory is the
mark plus one write. Reading pauses behind a running handler once pipelined input piles up
(server.connection), so the next requests wait in the kernel buffer, not in our memory.

The stall watchdog: from pause_writing() on, every `stall_timeout_s` the transport's buffer
must have shrunk (the peer read *something*); a window without progress calls `on_stall`
(the connection cancels its work and aborts). A slow reader that keeps draining lives; a
client that stopped reading cannot pin an engine job, its queued audio or a socket for ever.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable


class FlowControl:
    def __init__(self, transport: asyncio.Transport, stall_timeout_s: float | None = None,
                 on_stall: Callable[[], None] | None = None) -> None:
        self._transport = transport
        self._writable = asyncio.Event()
        self._writable.set()
        self.read_paused = False
        self._stall_timeout_s = stall_timeout_s
        self._on_stall = on_stall
        self._watchdog: asyncio.TimerHandle | None = None

    @property
    def writable(self) -> bool:
        return self._writable.is_set()

    async def drain(self) -> None:
        await self._writable.wait()

    def pause_reading(self) -> None:
        if not self.read_paused:
            self.read_paused = True
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused:
            self.read_paused = False
            self._transport.resume_reading()

    def pause_writing(self) -> None:
        self._writable.clear()
        self._watch(self._transport.get_write_buffer_size())

    def resume_writing(self) -> None:
        self._unwatch()
        self._writable.set()

    def release(self) -> None:
        """Connection lost: wake any writer so it sees the closed state instead of hanging."""
        self._unwatch()
        self._writable.set()

    # ---- the stall watchdog ----
    def _watch(self, buffered: int) -> None:
        self._unwatch()
        if self._stall_timeout_s is None or self._on_stall is None:
            return
        loop = asyncio.get_running_loop()
        self._watchdog = loop.call_later(self._stall_timeout_s, self._check, buffered)

    def _unwatch(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def _check(self, buffered_before: int) -> None:
        self._watchdog = None
        if self._writable.is_set():
            return
        buffered = self._transport.get_write_buffer_size()
        if buffered < buffered_before:
            self._watch(buffered)  # the peer reads, slowly: another window
            return
        assert self._on_stall is not None
        self._on_stall()
