"""Engine thread -> asyncio: the sink hops each event onto the loop; an async iterator reads them.

The engine calls the sink on its own thread; `call_soon_threadsafe` puts the event into
an asyncio.Queue owned by the loop. Leaving the `async for` early (client gone, error)
cancels the engine job at once via `close()`.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from scheduler.jobs import AudioChunk, EngineEvent, EngineProtocol, Failed, Finished, JobControl, SpeechJob


class EngineStream:
    def __init__(self, engine: EngineProtocol, job: SpeechJob, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[EngineEvent] = asyncio.Queue()
        self._done = False
        self.control: JobControl = engine.submit(job, self._sink)

    def _sink(self, event: EngineEvent) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # loop closed during shutdown: nobody is listening any more
            pass

    def push_text(self, text: str) -> None:
        self.control.push_text(text)

    def finish_text(self) -> None:
        self.control.finish_text()

    def close(self) -> None:
        """Cancel the engine job unless it already ended; idempotent."""
        if not self._done:
            self._done = True
            self.control.cancel()

    async def events(self) -> AsyncIterator[AudioChunk | Finished | Failed]:
        """Yields AudioChunks, then exactly one Finished or Failed; cancels the job if abandoned."""
        try:
            while True:
                event = await self._queue.get()
                if isinstance(event, (Finished, Failed)):
                    self._done = True
                    yield event
                    return
                yield event
        finally:
            self.close()
