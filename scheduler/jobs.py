"""Messages between the server (asyncio side) and the engine thread. Torch-free.

The server submits a `SpeechJob`; the engine answers through a sink callable, called on the
engine thread, with `AudioChunk`s then exactly one `Finished` or `Failed`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from protocol.errors import ErrorCode
from protocol.speech_mode import Mode

__all__ = ["AudioChunk", "ChunkMetrics", "EngineEvent", "EngineProtocol", "EngineStats", "ErrorCode", "EventSink",
           "Failed", "Finished", "JobControl", "Mode", "SpeechJob", "VoicePrompt"]  # Mode, ErrorCode re-exported


@dataclass(frozen=True)
class VoicePrompt:
    """Prompt features of one reference voice, computed once at upload and stored together."""

    speech_tokens: np.ndarray  # int32 [P], 25 Hz S3 tokens, aligned so mel has 2P frames
    embedding: np.ndarray  # float32 [192], campplus x-vector (not normalised)
    mel: np.ndarray  # float32 [2P, 80], 24 kHz log-mel of the prompt
    text: str  # transcript as uploaded
    # The transcript normalised as one piece and tokenised: the zero-shot LLM prompt text. None: not
    # computed yet (a voice stored before the ids were kept, a tool's voice); the preparer then derives it.
    text_ids: tuple[int, ...] | None = None


@dataclass(frozen=True)
class SpeechJob:
    request_id: str
    mode: Mode
    voice: VoicePrompt
    text: str | None  # whole text; None means it arrives piecewise (JobControl.push_text)
    instruct: str | None = None  # natural-language instruction (instruct mode only)
    speed: float = 1.0  # 0.25 .. 4.0 (the PAI API allows 0.5 .. 2.0), pitch kept (mel time-stretch in the engine)
    stream: bool = True  # False: one AudioChunk per sentence, each the whole sentence
    seed: int | None = None  # per-request sampling seed (deterministic when set)
    fixed_tokens: int | None = None  # bench only: ignore EOS, emit exactly this many tokens
    debug: bool = False


@dataclass(frozen=True)
class PreparedJob:
    """A job with its text already normalised, split and tokenised (`EngineProtocol.prepare`, on a
    worker thread): the engine thread only schedules token ids, it never runs the text frontend."""

    job: SpeechJob
    prompt_text_ids: tuple[int, ...] = ()  # LLM prompt: the voice's transcript, or the instruction
    prompt_speech_ids: tuple[int, ...] = ()
    pieces: tuple[tuple[int, ...], ...] = ()  # token ids of each sentence piece; () for duplex (text=None)
    refusal: str | None = None  # why the job cannot run (nothing to speak, no instruction): InvalidParameter

    @property
    def request_id(self) -> str:
        return self.job.request_id


@dataclass(frozen=True)
class ChunkMetrics:
    generate_time_s: float  # model time spent on this chunk (LLM share + flow + vocoder)
    llm_tokens: int  # speech tokens this chunk covers
    flow_batch: int = 1  # requests in the flow batch that produced it
    vocoder_batch: int = 1
    detail: dict[str, float] = field(default_factory=dict)  # debug: per-stage seconds


@dataclass(frozen=True)
class AudioChunk:
    request_id: str
    pcm: np.ndarray  # float32 mono at 24 kHz, in [-1, 1] (cross-fade may slightly exceed)
    metrics: ChunkMetrics


@dataclass(frozen=True)
class Finished:
    request_id: str
    total_samples: int
    llm_tokens: int


@dataclass(frozen=True)
class Failed:
    request_id: str
    code: ErrorCode  # e.g. INTERNAL_ERROR, OVERLOADED, CANCELLED, INVALID_PARAMETER
    message: str
    status: int | None = None  # the HTTP status, where not the code's own (502: a backend died mid-job)


EngineEvent = AudioChunk | Finished | Failed
EventSink = Callable[[EngineEvent], None]


class JobControl(Protocol):
    def push_tokens(self, ids: Sequence[int]) -> None: ...  # duplex: more text (token ids, `encode_text`)
    def finish_text(self) -> None: ...  # duplex: no more text
    def cancel(self) -> None: ...  # stop at the next step, free the KV slot, no more events


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    kv_used_tokens: int
    kv_total_tokens: int
    last_decode_batch: int
    last_flow_batch: int
    last_vocoder_batch: int
    steps: int
    flow_cache_bytes: int = 0  # streaming flow caches reserved by running requests
    flow_cache_pool_bytes: int = 0  # their shared limit (0: none / flow cache off)
    # voices' streaming-flow prefixes (kernels/runtime/voice_prefix.py): streams started from a kept one,
    # prefixes computed, bytes kept
    voice_prefix_hits: int = 0
    voice_prefix_misses: int = 0
    voice_prefix_bytes: int = 0
    flow_advances: int = 0  # flow calls done ahead of the chunk that emits their frames (chunk_policy.py)


class EngineProtocol(Protocol):
    """What the server needs from an engine (the real one lives in kernels/runtime/engine.py)."""

    sample_rate: int  # 24000

    def prepare(self, job: SpeechJob) -> PreparedJob: ...  # text -> ids; a worker thread, never the loop
    def encode_text(self, text: str) -> list[int]: ...  # a duplex piece's ids; a worker thread too
    def submit(self, job: PreparedJob, sink: EventSink) -> JobControl: ...
    def stats(self) -> EngineStats: ...
    def can_admit(self) -> bool: ...  # False when the waiting queue is full (server answers 429/503)
    def warm_voice(self, voice: VoicePrompt) -> bool: ...  # per-voice work ahead of use; a worker thread
    def shutdown(self, deadline_s: float) -> None: ...
