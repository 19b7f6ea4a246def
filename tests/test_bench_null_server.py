"""bench/null_server.py: the null engine turns token ids into the real amounts of silence, at once."""
from __future__ import annotations

import queue
import threading
from types import SimpleNamespace

import numpy as np

from bench.null_server import SAMPLE_RATE, SECONDS_PER_TEXT_TOKEN, NullEngine, null_prompt
from scheduler.jobs import AudioChunk, ErrorCode, Failed, Finished, Mode, PreparedJob, SpeechJob

PER_TOKEN = round(SECONDS_PER_TEXT_TOKEN * SAMPLE_RATE)


def _engine() -> NullEngine:
    return NullEngine(SimpleNamespace(prepare=None, encode=lambda text: [ord(c) for c in text]))  # type: ignore[arg-type]


def _job(text: str | None, pieces: tuple[tuple[int, ...], ...] = (), refusal: str | None = None) -> PreparedJob:
    voice = null_prompt(np.zeros(SAMPLE_RATE), SAMPLE_RATE, "hi")
    return PreparedJob(SpeechJob("r1", Mode.ZERO_SHOT, voice, text), pieces=pieces, refusal=refusal)


class _Events:
    def __init__(self) -> None:
        self.q: queue.SimpleQueue[object] = queue.SimpleQueue()

    def __call__(self, event: object) -> None:
        self.q.put(event)

    def next(self) -> object:
        return self.q.get(timeout=10)


def test_a_whole_text_job_gets_its_audio_in_one_second_chunks_then_finished() -> None:
    events = _Events()
    _engine().submit(_job("ten tokens", pieces=((1,) * 6, (2,) * 4)), events)
    sizes = []
    while isinstance(event := events.next(), AudioChunk):
        sizes.append(len(event.pcm))
    assert sizes == [SAMPLE_RATE, SAMPLE_RATE, 10 * PER_TOKEN - 2 * SAMPLE_RATE]
    assert isinstance(event, Finished) and event.total_samples == 10 * PER_TOKEN


def test_duplex_audio_follows_the_pushed_ids_and_ends_at_finish_text() -> None:
    events = _Events()
    control = _engine().submit(_job(None), events)
    control.push_tokens([7] * 5)  # 1.2 s: one whole chunk now, the rest waits for more text
    assert len(events.next().pcm) == SAMPLE_RATE  # type: ignore[attr-defined]
    control.finish_text()
    assert len(events.next().pcm) == 5 * PER_TOKEN - SAMPLE_RATE  # type: ignore[attr-defined]
    assert isinstance(events.next(), Finished)


def test_a_cancelled_job_says_nothing_more_and_a_refused_one_fails() -> None:
    events, engine = _Events(), _engine()
    control = engine.submit(_job(None), events)
    control.cancel()
    control.push_tokens([1] * 50)
    control.finish_text()
    done = threading.Event()
    engine.submit(_job("x", pieces=((1,),)), lambda e: done.set() if isinstance(e, Finished) else None)
    assert done.wait(10)  # the engine thread has passed the cancelled job's messages
    assert events.q.empty() and engine.stats().running == 0
    engine.submit(_job("", refusal="nothing to speak"), events)
    failed = events.next()
    assert isinstance(failed, Failed) and failed.code == ErrorCode.INVALID_PARAMETER
