"""`python -m bench.null_server <the server's flags>`: the real server, any `--role`, with the engine (and
the prompt extractor) replaced by one that computes nothing, so `bench.load --null-engine` measures the
serving path alone: HTTP/SSE/WebSocket, text preparation, encoding and, split, the frontend -> backend
hop. On a CPU the model's own time varies by more than the hop costs; without it, the hop shows.

The null engine keeps the real text path (the model directory's tokenizer, as the real engine and a
frontend use it) and the real amounts of audio: `SECONDS_PER_TEXT_TOKEN` of silence per text token,
streamed in chunks of `CHUNK_S` (the real engine's first chunk is 25 speech tokens, 1 s), all at once.
A frontend (`--role frontend`) is the real one: its backends are null servers.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence

import numpy as np

from frontend.prepare import TextPreparer
from scheduler.jobs import (
    AudioChunk,
    ChunkMetrics,
    EngineStats,
    ErrorCode,
    EventSink,
    Failed,
    Finished,
    PreparedJob,
    SpeechJob,
    VoicePrompt,
)
from server.__main__ import main as server_main
from server.config import ServerConfig
from server.state import ServerState
from server.wiring import create_app, text_preparer

SAMPLE_RATE = 24000
SECONDS_PER_TEXT_TOKEN = 0.24  # ~6 speech tokens (25 Hz) per text token, as in English speech
CHUNK_S = 1.0
SAMPLES_PER_SPEECH_TOKEN = SAMPLE_RATE // 25


class _NullJob:
    """One job's state on the engine thread: token ids still to speak, and whether more may come."""

    def __init__(self, prepared: PreparedJob, sink: EventSink) -> None:
        self.request_id = prepared.request_id
        self.sink = sink
        self.tokens = sum(len(piece) for piece in prepared.pieces)
        self.text_done = prepared.job.text is not None  # duplex: pieces arrive by push_tokens
        self.samples_sent = 0


class NullEngine:
    """EngineProtocol without a model: one thread turns each job's token ids into chunks of silence."""

    sample_rate = SAMPLE_RATE

    def __init__(self, text: TextPreparer) -> None:
        self.text = text
        self._inbox: queue.SimpleQueue[tuple[str, _NullJob, int]] = queue.SimpleQueue()
        self._running: set[_NullJob] = set()
        self._steps = 0
        threading.Thread(target=self._loop, name="null-engine", daemon=True).start()

    # ---- EngineProtocol
    def prepare(self, job: SpeechJob) -> PreparedJob:
        return self.text.prepare(job)

    def encode_text(self, text: str) -> list[int]:
        return self.text.encode(text)

    def submit(self, prepared: PreparedJob, sink: EventSink) -> _NullControl:
        job = _NullJob(prepared, sink)
        if prepared.refusal is not None:  # as the real engine refuses it; the job never runs
            sink(Failed(prepared.request_id, ErrorCode.INVALID_PARAMETER, prepared.refusal))
        else:
            self._inbox.put(("submit", job, 0))
        return _NullControl(self._inbox, job)

    def stats(self) -> EngineStats:
        n = len(self._running)
        return EngineStats(running=n, waiting=0, kv_used_tokens=0, kv_total_tokens=1, last_decode_batch=n,
                           last_flow_batch=n, last_vocoder_batch=n, steps=self._steps)  # fmt: skip

    def warm_voice(self, voice) -> bool:  # nothing to precompute
        return False

    def can_admit(self) -> bool:
        return True

    def shutdown(self, deadline_s: float) -> None:
        pass  # every job ends as soon as its text does

    # ---- the engine thread
    def _loop(self) -> None:
        while True:
            what, job, ids = self._inbox.get()
            if what == "submit":
                self._running.add(job)
            elif what == "push":
                job.tokens += ids
            elif what == "finish":
                job.text_done = True
            elif what == "cancel":
                self._running.discard(job)
                continue
            if job in self._running:
                self._speak(job)

    def _speak(self, job: _NullJob) -> None:
        due = round(job.tokens * SECONDS_PER_TEXT_TOKEN * SAMPLE_RATE)
        chunk = round(CHUNK_S * SAMPLE_RATE)
        while due - job.samples_sent >= chunk or (job.text_done and due > job.samples_sent):
            n = min(chunk, due - job.samples_sent)
            metrics = ChunkMetrics(generate_time_s=0.0, llm_tokens=n // SAMPLES_PER_SPEECH_TOKEN)
            job.sink(AudioChunk(job.request_id, np.zeros(n, np.float32), metrics))
            job.samples_sent += n
        if job.text_done:
            tokens = job.samples_sent // SAMPLES_PER_SPEECH_TOKEN
            job.sink(Finished(job.request_id, total_samples=job.samples_sent, llm_tokens=tokens))
            self._running.discard(job)
            self._steps += 1


class _NullControl:
    """JobControl: every call becomes a message to the engine thread."""

    def __init__(self, inbox: queue.SimpleQueue[tuple[str, _NullJob, int]], job: _NullJob) -> None:
        self._inbox, self._job = inbox, job

    def push_tokens(self, ids: Sequence[int]) -> None:
        self._inbox.put(("push", self._job, len(ids)))

    def finish_text(self) -> None:
        self._inbox.put(("finish", self._job, 0))

    def cancel(self) -> None:
        self._inbox.put(("cancel", self._job, 0))


def null_prompt(wav: np.ndarray, sample_rate: int, text: str) -> VoicePrompt:
    """Prompt features of the real shapes (25 speech tokens and 50 mel frames a second), all zeros."""
    tokens = max(1, int(len(wav) / sample_rate * 25))
    return VoicePrompt(speech_tokens=np.zeros(tokens, np.int32), embedding=np.zeros(192, np.float32),
                       mel=np.zeros((2 * tokens, 80), np.float32), text=text)  # fmt: skip


def build(config: ServerConfig) -> ServerState:
    if config.role == "frontend":
        return create_app(config)  # the real frontend; its backends are null servers
    if config.model_dir is None:
        raise SystemExit("bench.null_server needs --model-dir (its tokenizer files)")
    return create_app(config, engine=NullEngine(text_preparer(config, config.model_dir)),
                      extract_prompt=null_prompt)  # fmt: skip


if __name__ == "__main__":
    server_main(build=build)
