"""One synthesis request as the scheduler sees it: status, prompt sizes, per-stage counters."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from scheduler.bistream import BistreamFeeder
from scheduler.jobs import VoicePrompt


@dataclass
class Playback:
    """Audio handed to one listener: when its first sample went out, and how much has gone out since."""

    start_s: float | None = None
    samples: int = 0


class RequestStatus(enum.IntEnum):
    """Ordered lifecycle: `status >= FINISHED_STOPPED` means finished."""

    WAITING = 0  # queued, no KV slot
    RUNNING = 1  # holds a KV slot, LLM decoding (or waiting for bistream text)
    DRAINING = 2  # LLM done, slot freed, audio chunks left
    FINISHED_STOPPED = 3
    FINISHED_CANCELLED = 4
    FINISHED_FAILED = 5

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED


# min/max length of the generated speech relative to the text to speak (spec §2.2)
MIN_TOKEN_TEXT_RATIO = 2
MAX_TOKEN_TEXT_RATIO = 20


@dataclass(eq=False)
class Request:
    """Inputs are given at construction; the rest is state owned by the scheduler.

    Unistream LLM prompt: [sos, prompt_text_ids + text_ids, task, prompt_speech_ids].
    Bistream (`bistream=True`): `text_ids` start empty and grow through `push_text`.
    """

    request_id: str
    text_ids: list[int]  # tokens to speak (prompt/instruct text excluded)
    prompt_text_ids: tuple[int, ...] = ()  # prompt transcript (zero-shot) or instruct tokens
    prompt_speech_ids: tuple[int, ...] = ()  # LLM prompt speech tokens (zero-shot only)
    flow_prompt_len: int = 0  # P: flow prompt speech tokens (chunk grid alignment)
    stream: bool = True
    bistream: bool = False
    min_len: int | None = None  # None: int(2 x len(text_ids))
    max_len: int | None = None  # None: int(20 x len(text_ids)); clipped to the KV slot at admission
    fixed_tokens: int | None = None  # bench: ignore every stop id, generate exactly this many
    seed: int | None = None
    arrival_s: float = 0.0
    # handed to the runner (`StepPlan.admitted`) with the request's first prefill
    voice: VoicePrompt | None = None  # flow prompt tokens / mel, speaker embedding
    speed: float = 1.0  # mel time-stretch before the vocoder

    status: RequestStatus = RequestStatus.WAITING
    slot: int | None = None
    num_computed: int = 0  # LLM positions written into the KV slot
    sampled_ids: list[int] = field(default_factory=list)  # all sampled ids, bistream fills included
    speech_ids: list[int] = field(default_factory=list)  # speech tokens for flow (no fills, no stop)
    llm_done: bool = False
    token_offset: int = 0  # speech tokens already handed to flow and vocoded
    chunks_done: int = 0  # chunks vocoded (picks the next hop)
    lead_hop: int = 0  # its first chunk's shorter hop (0: none), set as it starts (ChunkPolicy.lead_for)
    mel_frames_vocoded: int = 0
    samples_emitted: int = 0
    first_chunk_s: float | None = None
    # The listener's timeline this request's audio joins: its own, or (a later sentence piece of a job)
    # the one shared with the job's earlier pieces, whose audio plays first. Urgency is measured on it.
    playback: Playback = field(default_factory=Playback)
    # A later sentence piece: its audio plays only after the earlier pieces', so its chunks are never a
    # listener's first audio (nor urgent before that audio has started).
    follows: bool = False
    fail_reason: str | None = None
    text_finished: bool = False  # bistream: finish_text() was called
    feeder: BistreamFeeder | None = None  # bistream: attached by the scheduler at add_request

    def __post_init__(self) -> None:
        self.text_ids = list(self.text_ids)
        if self.first_chunk_s is not None and self.playback.start_s is None:  # restored/constructed mid-way
            self.playback.start_s, self.playback.samples = self.first_chunk_s, self.samples_emitted
        n = len(self.text_ids)
        if self.fixed_tokens is not None:
            if self.fixed_tokens < 1:
                raise ValueError("fixed_tokens must be >= 1")
            self.min_len, self.max_len = self.fixed_tokens, self.fixed_tokens
        if self.min_len is None:
            self.min_len = int(n * MIN_TOKEN_TEXT_RATIO)
        if self.max_len is None:
            self.max_len = int(n * MAX_TOKEN_TEXT_RATIO)
        if self.flow_prompt_len < 0:
            raise ValueError("flow_prompt_len must be >= 0")

    # ------------------------------------------------------------------ sizes
    @property
    def prompt_len(self) -> int:
        """LLM prompt positions of a unistream request (1 + Nt_p + Nt + 1 + P_llm)."""
        return 2 + len(self.prompt_text_ids) + len(self.text_ids) + len(self.prompt_speech_ids)

    @property
    def num_text_tokens(self) -> int:
        return len(self.text_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    # ------------------------------------------------------------------ bistream text input
    def push_text(self, ids: list[int] | tuple[int, ...]) -> None:
        """More text (bistream). Text pushed before admission is handed to the feeder later."""
        self._require_bistream()
        if self.text_finished:
            raise ValueError(f"request {self.request_id}: push_text after finish_text")
        self.text_ids.extend(ids)
        if self.feeder is not None:
            self.feeder.push_text(ids)

    def finish_text(self) -> None:
        self._require_bistream()
        self.text_finished = True
        if self.feeder is not None:
            self.feeder.finish_text()

    def attach_feeder(self, eos_token: int, fill_token: int, mix_ratio: tuple[int, int]) -> None:
        self._require_bistream()
        feeder = BistreamFeeder(
            self.prompt_text_ids, self.prompt_speech_ids,
            eos_token=eos_token, fill_token=fill_token, mix_ratio=mix_ratio,
        )
        feeder.push_text(self.text_ids)
        if self.text_finished:
            feeder.finish_text()
        self.feeder = feeder

    def _require_bistream(self) -> None:
        if not self.bistream:
            raise ValueError(f"request {self.request_id} is not a bistream request")
