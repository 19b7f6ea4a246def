"""One synthesis, shared by HTTP (SSE / one-shot) and WebSocket: engine events -> encoded bytes + metrics.

Encoding runs on the thread pool. In-flight accounting and the latency/RTF histograms
live here so both transports count the same way. Leaving the iterator early cancels
the engine job (EngineStream.close in the finally).
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from protocol.encoders import OutputPipeline
from protocol.errors import ApiError, InternalError, InvalidParameter, Overloaded
from protocol.schema import SpeechParams
from protocol.sse import chunk_metrics
from scheduler.jobs import AudioChunk, Failed, SpeechJob, VoicePrompt
from server.app import App
from server.bridge import EngineStream


@dataclass(frozen=True)
class EncodedChunk:
    data: bytes
    metrics: dict[str, Any]
    last: bool  # the encoder's tail after Finished (may be empty)


class EngineFailed(Exception):
    def __init__(self, failed: Failed) -> None:
        super().__init__(failed.message)
        self.code, self.message = failed.code, failed.message

    def as_api_error(self) -> ApiError:
        if self.code == "Overloaded":
            return Overloaded(self.message)
        if self.code == "InvalidParameter":
            return InvalidParameter(self.message)
        return InternalError(self.message) if self.code == "InternalError" else ApiError(
            self.message, status=500, code=self.code)


def make_job(request_id: str, params: SpeechParams, voice: VoicePrompt) -> SpeechJob:
    return SpeechJob(request_id=request_id, mode=params.mode, voice=voice, text=params.text,
                     instruct=params.instruct, speed=params.speed, stream=params.stream, debug=params.debug)


class Synthesis:
    """Submit on construction; iterate `chunks()` once."""

    def __init__(self, app: App, request_id: str, params: SpeechParams, voice: VoicePrompt,
                 arrived_s: float) -> None:
        app.admit()
        self._app = app
        self._loop = asyncio.get_running_loop()
        self._params = params
        self._pipeline = OutputPipeline(params.output_format, params.sample_rate, params.bit_rate_kbps,
                                        params.volume, params.stream, in_rate=app.engine.sample_rate)
        self._arrived_s = arrived_s
        self._last_s = arrived_s
        self._first = True
        self._speech_s = 0.0
        self.stream = EngineStream(app.engine, make_job(request_id, params, voice), self._loop)
        app.metrics.inflight += 1
        self._counted = True

    @property
    def content_type(self) -> str:
        return self._pipeline.content_type

    def restart_clock(self) -> None:
        """Duplex: count latency from the first text piece, not from run-task."""
        self._arrived_s = self._last_s = self._loop.time()

    def close(self) -> None:
        self.stream.close()
        if self._counted:
            self._counted = False
            self._app.metrics.inflight -= 1

    async def chunks(self) -> AsyncIterator[EncodedChunk]:
        try:
            async for event in self.stream.events():
                if isinstance(event, AudioChunk):
                    before = self._pipeline.samples_out
                    data = await self._app.run_blocking(self._pipeline.feed, event.pcm)
                    yield EncodedChunk(data, self._metrics(event, self._out_s(before, data)), last=False)
                elif isinstance(event, Failed):
                    raise EngineFailed(event)
                else:
                    before = self._pipeline.samples_out
                    tail = await self._app.run_blocking(self._pipeline.finish)
                    yield EncodedChunk(tail, self._tail_metrics(self._out_s(before, tail)), last=True)
                    self._observe_rtf()
        finally:
            self.close()

    def _out_s(self, samples_before: int, data: bytes) -> float:
        """Seconds of output audio this chunk added (at the asked rate, after the resampler's delay),
        so the chunks' speech_len sum to the file's duration. A chunk with bytes but no new samples
        (the resampler/MP3 encoder flushing earlier audio) reports 1 ms: clients divide by it."""
        seconds = (self._pipeline.samples_out - samples_before) / self._params.sample_rate
        return max(seconds, 1e-3) if data else seconds

    def _metrics(self, chunk: AudioChunk, speech_len: float) -> dict[str, Any]:
        now = self._loop.time()
        self._speech_s += speech_len
        first = now - self._arrived_s if self._first else None
        if first is not None:
            self._app.metrics.first_packet_s.observe(first)
        self._first = False
        detail = None
        if self._params.debug:
            m = chunk.metrics
            detail = {"llm_tokens": m.llm_tokens, "flow_batch": m.flow_batch, "vocoder_batch": m.vocoder_batch,
                      **m.detail}
        metrics = chunk_metrics(speech_len, now - self._last_s, chunk.metrics.generate_time_s, first, detail)
        self._last_s = now
        return metrics

    def _tail_metrics(self, speech_len: float) -> dict[str, Any]:
        now = self._loop.time()
        metrics = chunk_metrics(speech_len, now - self._last_s, 0.0)
        self._last_s = now
        return metrics

    def _observe_rtf(self) -> None:
        if self._speech_s > 0:
            self._app.metrics.rtf.observe((self._loop.time() - self._arrived_s) / self._speech_s)
