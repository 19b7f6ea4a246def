"""Start-up warm-up: one short streaming and one non-streaming synthesis through the real engine.

The first request after start pays one-time costs (allocator growth, oneDNN primitive creation,
wetext's first call, CUDA kernels' first launch); paying them before the server listens keeps the
first user's time to first audio at the steady value. The prompt is synthetic (no voice exists yet):
its features only need the right shapes and ranges.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import IO

import numpy as np

from kernels.weights.progress import progress
from scheduler.jobs import AudioChunk, EngineEvent, Failed, Mode, SpeechJob, VoicePrompt

log = logging.getLogger(__name__)

PROMPT_TOKENS = 50  # 2 s of prompt at 25 tokens/s
SPEECH_TOKENS = 100  # 4 s of audio: the first chunk, a middle one and the last (streaming)
TEXT = "Warm-up sentence for the engine."
PROMPT_TEXT = "A prompt transcript."


def synthetic_voice(speech_token_size: int = 6561, mel_bins: int = 80) -> VoicePrompt:
    rng = np.random.default_rng(0)
    return VoicePrompt(
        speech_tokens=rng.integers(0, speech_token_size, PROMPT_TOKENS).astype(np.int32),
        embedding=rng.standard_normal(192).astype(np.float32),
        mel=np.full((2 * PROMPT_TOKENS, mel_bins), -6.0, np.float32),  # a quiet log-mel
        text=PROMPT_TEXT,
    )


def warm_up(engine: object, timeout_s: float = 300.0, progress_file: IO[str] | None = None) -> float:
    """Run the two jobs to the end; returns the seconds taken. A failure is logged, not raised:
    the server still starts (the first request then pays the one-time costs)."""
    voice = synthetic_voice()
    jobs = [SpeechJob(f"warmup-{stream}", Mode.ZERO_SHOT, voice, TEXT, stream=stream, seed=0,
                      fixed_tokens=SPEECH_TOKENS) for stream in (True, False)]
    rate = engine.sample_rate  # type: ignore[attr-defined]
    done = threading.Semaphore(0)
    failures: list[str] = []
    t0 = time.perf_counter()
    with progress(len(jobs) * SPEECH_TOKENS / 25, "warm-up", unit="audio s", file=progress_file) as bar:
        def sink(event: EngineEvent) -> None:  # engine thread
            if isinstance(event, AudioChunk):
                bar.update(round(event.pcm.size / rate, 2))
                return
            if isinstance(event, Failed):
                failures.append(event.message)
            done.release()

        for job in jobs:
            engine.submit(engine.prepare(job), sink)  # type: ignore[attr-defined]
        finished = all(done.acquire(timeout=max(0.0, t0 + timeout_s - time.perf_counter())) for _ in jobs)
    seconds = time.perf_counter() - t0
    if not finished or failures:
        log.error("warm-up did not complete (%s); serving anyway", "; ".join(failures) or "timed out")
    else:
        log.info("warm-up: 2 requests in %.1f s", seconds)
    return seconds
