"""One synthesis, shared by HTTP (SSE / one-shot) and WebSocket: engine events -> encoded bytes + metrics.

Encoding runs on the thread pool. In-flight accounting and the latency/RTF histograms
live here so both transports count the same way. An engine `Failed` is raised as the
ApiError its code maps to. Leaving the iterator early cancels the engine job
(EngineStream.close in the finally).
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from protocol.encoders import OutputPipeline
from protocol.errors import engine_error
from protocol.schema import SpeechParams
from protocol.sse import chunk_metrics
from scheduler.jobs import AudioChunk, Failed, SpeechJob, VoicePrompt
from server.bridge import EngineStream
from server.state import ServerState


@dataclass(frozen=True)
class EncodedChunk:
    data: bytes
    metrics: dict[str, Any]
    last: bool  # the encoder's tail after Finished (may be empty)


def make_job(request_id: str, params: SpeechParams, voice: VoicePrompt) -> SpeechJob:
    return SpeechJob(request_id=request_id, mode=params.mode, voice=voice, text=params.text,
                     instruct=params.instruct, speed=params.speed, stream=params.stream, debug=params.debug)


class Synthesis:
    """Submit on construction; iterate `chunks()` once."""

    def __init__(self, state: ServerState, request_id: str, params: SpeechParams, voice: VoicePrompt,
                 arrived_s: float) -> None:
        state.admit()
        self._state = state
        self._loop = asyncio.get_running_loop()
        self._params = params
        self._pipeline = OutputPipeline(params.output_format, params.sample_rate, params.bit_rate_kbps,
                                        params.volume, params.stream, in_rate=state.engine.sample_rate)
        self._arrived_s = arrived_s
        # Emitted times are whole ms counted from arrival (and from the first sample), so the chunks'
        # server_cost_time and speech_len telescope to the totals instead of piling up rounding error.
        self._last_ms = 0
        self._speech_ms = 0
        self._first = True
        self._speech_s = 0.0
        self.output_tokens = 0  # speech tokens the engine made (set at Finished)
        self.stream = EngineStream(state.engine, make_job(request_id, params, voice), self._loop, state.run_blocking)
        state.metrics.job_started()
        self._counted = True

    @property
    def content_type(self) -> str:
        return self._pipeline.content_type

    @property
    def input_tokens(self) -> int:
        """The text's LLM token ids (duplex pieces pushed later are not counted)."""
        prepared = self.stream.prepared
        return sum(len(piece) for piece in prepared.pieces) if prepared is not None else 0

    def restart_clock(self) -> None:
        """Duplex: count latency from the first text piece, not from run-task."""
        self._arrived_s, self._last_ms = self._loop.time(), 0

    def close(self) -> None:
        self.stream.close()
        if self._counted:
            self._counted = False
            self._state.metrics.job_ended()

    async def chunks(self) -> AsyncIterator[EncodedChunk]:
        try:
            async for event in self.stream.events():
                if isinstance(event, AudioChunk):
                    self._state.metrics.pending_chunks(self.stream.pending)
                    data = await self._state.run_blocking(self._pipeline.feed, event.pcm)
                    yield EncodedChunk(data, self._metrics(event, self._out_s(data)), last=False)
                elif isinstance(event, Failed):
                    raise engine_error(event.code, event.message, event.status)
                else:  # Finished
                    self.output_tokens = event.llm_tokens
                    tail = await self._state.run_blocking(self._pipeline.finish)
                    yield EncodedChunk(tail, self._tail_metrics(self._out_s(tail)), last=True)
                    self._observe_rtf()
        finally:
            self.close()

    def _out_s(self, data: bytes) -> float:
        """Seconds of output audio this chunk added (at the asked rate, after the resampler's delay),
        so the chunks' speech_len sum to the file's duration. A chunk with bytes but no new samples
        (the resampler/MP3 encoder flushing earlier audio) reports 1 ms: clients divide by it."""
        total_ms = round(self._pipeline.samples_out * 1000 / self._params.sample_rate)
        added = total_ms - self._speech_ms
        added = max(added, 1) if data else added
        self._speech_ms += added
        return added / 1000

    def _cost_s(self) -> tuple[float, float]:
        """(seconds since arrival, seconds since the previous chunk), both whole ms."""
        now_ms = round((self._loop.time() - self._arrived_s) * 1000)
        cost_ms, self._last_ms = now_ms - self._last_ms, now_ms
        return now_ms / 1000, cost_ms / 1000

    def _metrics(self, chunk: AudioChunk, speech_len: float) -> dict[str, Any]:
        since_arrival, cost = self._cost_s()
        self._speech_s += speech_len
        first = since_arrival if self._first else None
        if first is not None:
            self._state.metrics.first_packet(first)
        self._first = False
        detail = None
        if self._params.debug:
            m = chunk.metrics
            detail = {"llm_tokens": m.llm_tokens, "flow_batch": m.flow_batch, "vocoder_batch": m.vocoder_batch,
                      **m.detail}
        return chunk_metrics(speech_len, cost, chunk.metrics.generate_time_s, first, detail)

    def _tail_metrics(self, speech_len: float) -> dict[str, Any]:
        return chunk_metrics(speech_len, self._cost_s()[1], 0.0)

    def _observe_rtf(self) -> None:
        if self._speech_s > 0:
            self._state.metrics.synthesis_done((self._loop.time() - self._arrived_s) / self._speech_s)
