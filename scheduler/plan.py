"""The contract between the scheduler (decides) and the model runner (executes). Torch-free.

One engine step: `Scheduler.schedule() -> StepPlan`, the runner executes it and answers a
`StepResult`, then `Scheduler.update(plan, result)`. The runner takes no decisions: every
position, input token, sampling flag, forced token, chunk boundary and flow-cache use is spelled
out here, and so is every new request's data (voice, speed, seed) when its first prefill runs.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import numpy as np

from scheduler.jobs import VoicePrompt

SegmentKind = Literal["sos", "text", "task", "speech"]


class Segment(NamedTuple):
    """A run of LLM input positions; the runner turns it into embeddings.

    sos / task: one row of `llm_embedding` (row 0 / row 1), `ids` empty.
    text: Qwen `embed_tokens(ids)`.  speech: `speech_embedding(ids)`.
    """

    kind: SegmentKind
    ids: tuple[int, ...] = ()

    @property
    def length(self) -> int:
        return len(self.ids) if self.kind in ("text", "speech") else 1


SOS = Segment("sos")
TASK = Segment("task")


def text_segment(ids: tuple[int, ...] | list[int]) -> Segment:
    return Segment("text", tuple(ids))


def speech_segment(ids: tuple[int, ...] | list[int]) -> Segment:
    return Segment("speech", tuple(ids))


def segments_length(segments: tuple[Segment, ...]) -> int:
    return sum(s.length for s in segments)


@dataclass(frozen=True)
class SampleSpec:
    """How the runner picks the one token sampled after a prefill or a decode (spec §5.2)."""

    ignore_eos: bool  # mask eos (6561) only, as upstream does during min_len / bistream text phase
    recent_ids: tuple[int, ...]  # last `win_size` generated ids (fills included) for the RAS check
    forced_token: int | None = None  # bistream: run the forward (KV write) but output this id
    seed: int | None = None  # per-request RNG; None: the runner's global generator
    step: int = 0  # index of the token being sampled (RNG counter for seeded requests)
    ignore_all_stops: bool = False  # bench `fixed_tokens`: mask every stop id, never end early
    # ids this draw may not produce (bistream: the special ids upstream raises on); drawn, they are drawn
    # again without them, so any draw upstream accepts stays exactly upstream's
    redraw_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class PrefillItem:
    """Feed `segments` at positions [start_pos, start_pos + length) of `slot`, sample from the last."""

    request_id: str
    slot: int
    start_pos: int
    segments: tuple[Segment, ...]
    sample: SampleSpec

    @property
    def num_tokens(self) -> int:
        return segments_length(self.segments)


@dataclass(frozen=True)
class DecodeItem:
    """Feed speech token `token_id` at `position` of `slot`, sample the next token."""

    request_id: str
    slot: int
    position: int
    token_id: int
    sample: SampleSpec


@dataclass(frozen=True)
class ChunkItem:
    """Run flow + vocoder for speech tokens [0, token_end) keeping the audio of [token_offset, ...).

    Non-final: token_end includes the look-ahead tokens (audio up to token_end - lookahead).
    Final: finalize=True, streaming=False (upstream runs the last chunk with full attention).
    incremental: run the flow against the request's flow cache, starting one if it has none (the
    scheduler's `FlowCacheBudget` decided it fits); False: recompute, and drop any cache of the request.
    advance: flow work ahead of the request's next chunk, no audio (`ChunkPolicy.next_advance`): the
    runner computes the frames up to token_end - lookahead (a chunk-grid point) against the flow cache and
    keeps those from token_offset on for that chunk, which then computes only the rest. Always incremental.
    """

    request_id: str
    token_ids: tuple[int, ...]  # speech tokens [0, token_end), prompt tokens not included
    token_offset: int
    token_end: int
    finalize: bool
    streaming: bool
    is_first: bool
    is_last: bool
    incremental: bool = False
    advance: bool = False


@dataclass(frozen=True)
class NewRequest:
    """A request whose first prefill is in this plan: the runner creates its state from this first
    (prompt tensors, speaker embedding, vocoder state, RNGs, speed)."""

    request_id: str
    voice: VoicePrompt | None  # None only for scheduler-only tests (a runner fails such a request)
    speed: float = 1.0
    seed: int | None = None


@dataclass(frozen=True)
class StepPlan:
    step: int
    prefills: tuple[PrefillItem, ...] = ()
    decodes: tuple[DecodeItem, ...] = ()
    chunks: tuple[ChunkItem, ...] = ()
    released: tuple[str, ...] = ()  # requests that ended since the last plan: drop runner-side state
    admitted: tuple[NewRequest, ...] = ()  # requests whose first prefill is in this plan

    @property
    def is_empty(self) -> bool:
        return not (self.prefills or self.decodes or self.chunks)


@dataclass(frozen=True)
class StepResult:
    """What the runner did. Missing entries for planned items fail those requests (only)."""

    sampled: Mapping[str, int] = field(default_factory=dict)  # one token per prefill and per decode
    chunk_samples: Mapping[str, int] = field(default_factory=dict)  # samples emitted per chunk
    failed: Mapping[str, str] = field(default_factory=dict)  # request id -> reason
    # incremental chunks the runner recomputed instead (it had no flow cache to run them): the
    # scheduler's budget forgets those requests' caches, so both sides agree again
    flow_recomputed: frozenset[str] = frozenset()


@dataclass(frozen=True)
class ChunkOutput:
    """One chunk's audio, as the runner answers it beside the `StepResult`."""

    request_id: str
    pcm: np.ndarray  # float32 at 24 kHz
    tokens: int  # speech tokens this chunk newly covers
    generate_time_s: float
    flow_batch: int
    vocoder_batch: int
    detail: dict[str, float] = field(default_factory=dict)
