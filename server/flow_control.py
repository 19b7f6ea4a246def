"""Write-side back-pressure for one connection: a slow reader stalls only its own stream.

The transport calls pause_writing()/resume_writing() around its high/low water marks;
producers `await drain()` after each write. Reading is paused while a request is being
handled (the next pipelined request waits in the kernel buffer, not in our memory).
"""
from __future__ import annotations

import asyncio


class FlowControl:
    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._writable = asyncio.Event()
        self._writable.set()
        self.read_paused = False

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

    def resume_writing(self) -> None:
        self._writable.set()

    def release(self) -> None:
        """Connection lost: wake any writer so it sees the closed state instead of hanging."""
        self._writable.set()
