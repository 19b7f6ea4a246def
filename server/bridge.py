"""Server <-> engine thread: text is prepared on the worker pool, events hop back onto the loop.

Going in, one task per stream takes the job and then each duplex text piece in order: the job's text is
normalised, split and tokenised (`engine.prepare`), and each piece tokenised (`engine.encode_text`), on
the pool, so neither the loop nor the engine's decode thread ever runs the text frontend; then the ids
go to the engine (a duplex piece sentence by sentence). Coming out, the engine calls the sink on its own thread; `call_soon_threadsafe` puts
the event into an asyncio.Queue owned by the loop. Leaving the `async for` early (client gone, error)
cancels the engine job at once via `close()`.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from frontend.split import sentence_parts
from protocol.errors import ErrorCode
from scheduler.jobs import (
    AudioChunk,
    EngineEvent,
    EngineProtocol,
    Failed,
    Finished,
    JobControl,
    PreparedJob,
    SpeechJob,
)

log = logging.getLogger(__name__)
_FINISH = object()  # "no more text" in the text queue
RunBlocking = Callable[..., Awaitable[Any]]  # fn, *args -> awaitable result, off the loop


class EngineStream:
    def __init__(self, engine: EngineProtocol, job: SpeechJob, loop: asyncio.AbstractEventLoop,
                 run_blocking: RunBlocking) -> None:
        self._engine = engine
        self._loop = loop
        self._run_blocking = run_blocking  # the server's worker pool
        self._request_id = job.request_id
        self._queue: asyncio.Queue[EngineEvent] = asyncio.Queue()
        self._text: asyncio.Queue[str | object] = asyncio.Queue()  # duplex pieces, then _FINISH
        self._done = False  # the job ended or was given up: nothing more goes to the engine
        self._closed = False
        self.control: JobControl | None = None
        self.prepared: PreparedJob | None = None  # the job's token ids, once prepared
        self._feeder = loop.create_task(self._feed(job))

    def _sink(self, event: EngineEvent) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # loop closed during shutdown: nobody is listening any more
            pass

    async def _feed(self, job: SpeechJob) -> None:
        """Prepare and submit the job, then pass on its text pieces in order (duplex)."""
        try:
            prepared = self.prepared = await self._run_blocking(self._engine.prepare, job)
            if self._done:  # closed while preparing: nothing was submitted
                return
            self.control = self._engine.submit(prepared, self._sink)
            while job.text is None:
                piece = await self._text.get()
                if self._done:
                    return
                if piece is _FINISH:
                    self.control.finish_text()
                    return
                for ids in await self._run_blocking(_encode_sentences, self._engine, piece):
                    if self._done:
                        return
                    self.control.push_tokens(ids)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a text-frontend or engine bug fails this request, not the server
            submitting = self.prepared is not None and self.control is None  # else the text (whole or a piece)
            stage = "start the request" if submitting else "prepare the text"
            log.exception("request %s: could not %s", self._request_id, stage)
            failed = Failed(self._request_id, ErrorCode.INTERNAL_ERROR, f"could not {stage}: {exc}")
            self._queue.put_nowait(failed)

    @property
    def pending(self) -> int:
        """Engine events received and not yet taken by the writer (a slow reader's audio waits here)."""
        return self._queue.qsize()

    def push_text(self, text: str) -> None:
        self._text.put_nowait(text)

    def finish_text(self) -> None:
        self._text.put_nowait(_FINISH)

    def close(self) -> None:
        """Cancel the engine job unless it already ended, and stop the feeder; idempotent."""
        if self._closed:
            return
        self._closed = True
        if not self._done and self.control is not None:
            self.control.cancel()
        self._done = True
        self._text.put_nowait(_FINISH)  # wake the feeder so it sees _done

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


def _encode_sentences(engine: EngineProtocol, text: str) -> list[list[int]]:
    """A duplex piece's ids sentence by sentence: where a long text needs a new KV slot (scheduler/
    duplex_text.py), the engine cuts it between these pushes, so between sentences."""
    return [ids for ids in map(engine.encode_text, sentence_parts(text)) if ids]
