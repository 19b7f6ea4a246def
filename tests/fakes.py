"""Small fakes for server tests: an engine that speaks sine waves, a prompt extractor.

FakeEngine: each job runs on its own thread; every text character becomes
`SAMPLES_PER_CHAR / speed` samples of a 220 Hz sine at amplitude 0.5 (so duration is
exact and RMS is known), emitted in chunks of at most `chunk_chars` characters, with
`delay_s` of "model time" per chunk. Honours cancel (no event after it), push_text /
finish_text for duplex jobs, stream=False (one chunk), and a `fail_after_chunks` hook; `cancelled`
lists the request ids the server cancelled. BatchFakeEngine adds a fixed batch capacity.
descending_ids: ids for the stores that sort against upload order.
"""
from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from frontend.prompt import PromptAudioError
from scheduler.jobs import (
    AudioChunk,
    ChunkMetrics,
    EngineStats,
    ErrorCode,
    EventSink,
    Failed,
    Finished,
    Mode,
    PreparedJob,
    SpeechJob,
    VoicePrompt,
)

SAMPLE_RATE = 24000
SAMPLES_PER_CHAR = 1200  # 50 ms of audio per character at speed 1.0
AMPLITUDE = 0.5


class _FakeJob:
    def __init__(self, engine: FakeEngine, job: SpeechJob, sink: EventSink) -> None:
        self.engine, self.job, self.sink = engine, job, sink
        self._cond = threading.Condition()
        self._pending = job.text or ""
        self._text_done = job.text is not None
        self.cancelled = threading.Event()
        self._phase = 0.0
        self.thread = threading.Thread(target=self._run, daemon=True)

    # JobControl
    def push_tokens(self, ids: Sequence[int]) -> None:
        with self._cond:
            self._pending += "".join(map(chr, ids))
            self._cond.notify()

    def finish_text(self) -> None:
        with self._cond:
            self._text_done = True
            self._cond.notify()

    def cancel(self) -> None:
        self.cancelled.set()
        self.engine._cancelled(self)
        with self._cond:
            self._cond.notify()

    def _take(self) -> str | None:
        """Next piece of text, '' when finished, None when cancelled."""
        with self._cond:
            while not self._pending and not self._text_done and not self.cancelled.is_set():
                self._cond.wait(0.05)
            if self.cancelled.is_set():
                return None
            n = len(self._pending) if not self.job.stream else self.engine.chunk_chars
            piece, self._pending = self._pending[:n], self._pending[n:]
            return piece

    def _sine(self, chars: int) -> np.ndarray:
        n = round(chars * SAMPLES_PER_CHAR / self.job.speed)
        t = self._phase + np.arange(n) * (2 * np.pi * 220.0 / SAMPLE_RATE)
        self._phase = float(t[-1] + 2 * np.pi * 220.0 / SAMPLE_RATE) if n else self._phase
        return (AMPLITUDE * np.sin(t)).astype(np.float32)

    def _run(self) -> None:
        total, chunks = 0, 0
        try:
            if not self.engine._join_batch(self):
                return  # cancelled while waiting for a slot
            while True:
                piece = self._take()
                if piece is None:
                    return
                if not piece:
                    break
                time.sleep(self.engine.delay_s)
                if self.cancelled.is_set():
                    return
                if self.engine.fail_after_chunks is not None and chunks >= self.engine.fail_after_chunks:
                    self.sink(Failed(self.job.request_id, ErrorCode.INTERNAL_ERROR, "fake engine failure"))
                    return
                pcm = self._sine(len(piece))
                total += len(pcm)
                chunks += 1
                self.sink(AudioChunk(self.job.request_id, pcm, ChunkMetrics(
                    generate_time_s=self.engine.delay_s, llm_tokens=len(piece),
                    detail={"llm_s": self.engine.delay_s / 2} if self.job.debug else {})))
            self.sink(Finished(self.job.request_id, total_samples=total, llm_tokens=total // 960))
        finally:
            self.engine._job_ended(self)


class FakeEngine:
    sample_rate = SAMPLE_RATE

    def __init__(self, delay_s: float = 0.0, chunk_chars: int = 8, admit: bool = True,
                 fail_after_chunks: int | None = None) -> None:
        self.delay_s = delay_s
        self.chunk_chars = chunk_chars
        self.admit = admit
        self.fail_after_chunks = fail_after_chunks
        self.jobs: list[SpeechJob] = []
        self.warmed: list[VoicePrompt] = []  # voices the server asked to precompute (upload)
        self._running: set[_FakeJob] = set()
        self._lock = threading.Lock()
        self.steps = 0
        self.prepare_threads: list[str] = []  # where prepare / encode_text ran
        self.transcripts_encoded: list[str] = []  # voice transcripts prepare had to encode (no kept ids)
        self.cancelled: list[str] = []  # request ids of the jobs the server cancelled, in order

    def prepare(self, job: SpeechJob) -> PreparedJob:
        """One token per character (so audio length stays exact); the thread is recorded for tests.
        Zero-shot: the voice's kept transcript ids, else its transcript encoded now (recorded)."""
        self.prepare_threads.append(threading.current_thread().name)
        prompt: tuple[int, ...] = ()
        if job.mode == Mode.ZERO_SHOT:
            prompt = job.voice.text_ids if job.voice.text_ids is not None else self._transcript(job.voice.text)
        return PreparedJob(job, prompt_text_ids=prompt,
                           pieces=() if job.text is None else (tuple(map(ord, job.text)),))

    def _transcript(self, text: str) -> tuple[int, ...]:
        with self._lock:
            self.transcripts_encoded.append(text)
        return tuple(map(ord, text))

    def encode_text(self, text: str) -> list[int]:
        self.prepare_threads.append(threading.current_thread().name)
        return [ord(c) for c in text]

    def submit(self, prepared: PreparedJob, sink: EventSink) -> _FakeJob:
        job = prepared.job
        fake = _FakeJob(self, job, sink)
        with self._lock:
            self.jobs.append(job)
            self._running.add(fake)
        fake.thread.start()
        return fake

    def _job_ended(self, fake: _FakeJob) -> None:
        with self._lock:
            self._running.discard(fake)
            self.steps += 1
        self._leave_batch(fake)

    def _cancelled(self, fake: _FakeJob) -> None:
        with self._lock:
            self.cancelled.append(fake.job.request_id)

    def _join_batch(self, fake: _FakeJob) -> bool:
        """Before a job's first chunk (the batch engine waits for a slot); False if cancelled meanwhile."""
        return True

    def _leave_batch(self, fake: _FakeJob) -> None:
        pass

    @property
    def running(self) -> int:
        with self._lock:
            return len(self._running)

    def stats(self) -> EngineStats:
        n = self.running
        return EngineStats(running=n, waiting=0, kv_used_tokens=n * 100, kv_total_tokens=10000,
                           last_decode_batch=n, last_flow_batch=1, last_vocoder_batch=1, steps=self.steps)

    def warm_voice(self, voice: VoicePrompt) -> bool:
        self.warmed.append(voice)
        return True

    def can_admit(self) -> bool:
        return self.admit

    def shutdown(self, deadline_s: float) -> None:
        with self._lock:
            jobs = list(self._running)
        for fake in jobs:
            fake.cancel()


@dataclass
class FakeExtractor:
    """extract(wav, sr, text) -> VoicePrompt derived deterministically from the audio length;
    with `refuse` set, raises PromptAudioError(refuse) as the real one does on unusable audio."""

    calls: int = 0
    refuse: str = ""

    def __call__(self, wav: np.ndarray, sample_rate: int, text: str) -> VoicePrompt:
        self.calls += 1
        if self.refuse:
            raise PromptAudioError(self.refuse)
        tokens = max(1, int(len(wav) / sample_rate * 25))
        return VoicePrompt(speech_tokens=np.arange(tokens, dtype=np.int32) % 6561,
                           embedding=np.full(192, 0.1, np.float32),
                           mel=np.zeros((2 * tokens, 80), np.float32), text=text)


def descending_ids() -> SimpleNamespace:
    """Stands in for a store module's `uuid`: each new id sorts before the previous one."""
    ids = (uuid.UUID(int=n) for n in range(1000, 0, -1))
    return SimpleNamespace(uuid4=lambda: next(ids), UUID=uuid.UUID)


class FakeBackendEngine(FakeEngine):
    """FakeEngine behind `--role backend`: a job arrives as token ids only (its text is "" or, duplex,
    None), so the text the fake speaks is rebuilt from the pieces (one id per character)."""

    def submit(self, prepared: PreparedJob, sink: EventSink) -> _FakeJob:
        job = prepared.job
        if job.text is not None:
            text = "".join(chr(i) for piece in prepared.pieces for i in piece)
            prepared = dataclasses.replace(prepared, job=dataclasses.replace(job, text=text))
        return super().submit(prepared, sink)


def fake_text_preparer(engine: FakeEngine) -> SimpleNamespace:
    """What RemoteEngine needs of a TextPreparer (prepare, encode, close), from a FakeEngine's text rules."""
    return SimpleNamespace(prepare=engine.prepare, encode=engine.encode_text, close=lambda: None)


class BatchFakeEngine(FakeEngine):
    """A fixed batch capacity: at most `batch` jobs make audio at once, each chunk taking `delay_s` however
    many share the batch (one batched step costs the same for 1 or `batch` streams), so a job's unloaded
    time to first audio is `delay_s`. Later jobs wait for a slot; `can_admit()` is False once `max_waiting`
    wait (the server's 503). `peak_batch` / `peak_waiting`: the most ever seen at once."""

    def __init__(self, delay_s: float, batch: int, max_waiting: int = 0, chunk_chars: int = 8) -> None:
        super().__init__(delay_s=delay_s, chunk_chars=chunk_chars)
        self.batch, self.max_waiting = batch, max_waiting
        self._slot = threading.Condition(self._lock)
        self._in_batch: set[_FakeJob] = set()
        self.waiting = 0
        self.peak_batch = 0
        self.peak_waiting = 0

    def _join_batch(self, fake: _FakeJob) -> bool:
        with self._slot:
            if len(self._in_batch) >= self.batch:  # full: wait for a slot
                self.waiting += 1
                self.peak_waiting = max(self.peak_waiting, self.waiting)
                while len(self._in_batch) >= self.batch and not fake.cancelled.is_set():
                    self._slot.wait(0.05)
                self.waiting -= 1
            if fake.cancelled.is_set():
                return False
            self._in_batch.add(fake)
            self.peak_batch = max(self.peak_batch, len(self._in_batch))
            return True

    def _leave_batch(self, fake: _FakeJob) -> None:
        with self._slot:
            self._in_batch.discard(fake)
            self._slot.notify_all()

    def can_admit(self) -> bool:
        with self._lock:
            return self.admit and len(self._running) < self.batch + self.max_waiting
