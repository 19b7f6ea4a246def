"""Write-side flow control of HttpProtocol over a fake transport: a slow reader stalls only its own stream.

No sockets, no threads, no sleeps. A fake transport buffers what the protocol writes and, like asyncio's
socket transports, calls `pause_writing()` once its buffer passes a high-water mark and `resume_writing()`
when the peer has read it down to the low-water mark. A manual engine emits audio only when the test says
so, on the loop thread; encoding runs inline instead of on the thread pool. The loop's clock is fake, so
the connection's timers fire exactly when the test moves time.
"""
from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Coroutine
from typing import Any

import h11
import numpy as np
import pytest
from wsproto import WSConnection
from wsproto.connection import ConnectionType
from wsproto.events import AcceptConnection, Request, TextMessage

from scheduler.jobs import (
    AudioChunk,
    ChunkMetrics,
    EngineStats,
    Finished,
    PreparedJob,
    SpeechJob,
    VoicePrompt,
)
from server.config import ServerConfig
from server.connection import HttpProtocol
from server.flow_control import FlowControl
from server.state import ServerState
from tests.server_helpers import continue_task, finish_task, run_task

TOKEN = "flow-token"
CHUNK_SAMPLES = 2400  # 100 ms at 24 kHz: 4800 PCM bytes, ~6.5 kB as an SSE event (base64 + metrics)
HIGH, LOW = 16 * 1024, 4 * 1024  # asyncio's socket defaults (64 / 16 KiB) scaled to a few events

VOICE_ID = "00000000-0000-4000-8000-000000000001"  # any id of a voice id's shape (server/voice_ids.py)


class FakeClockLoop(asyncio.SelectorEventLoop):
    """`time()` is `now`, moved only by the test: timers fire when the test advances past them."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def time(self) -> float:
        return self.now


class FakeTransport(asyncio.Transport):
    """Buffers writes until the peer `read`s them; pause/resume_writing at the water marks, as asyncio's
    transports do (pause inside the write that crosses `high`, resume once drained to `low` or less)."""

    def __init__(self, protocol: HttpProtocol, high: int = HIGH, low: int = LOW) -> None:
        super().__init__()
        self.protocol, self.high, self.low = protocol, high, low
        self.buffer = bytearray()  # written, not yet read by the peer
        self.received = bytearray()  # what the peer has read
        self.paused = False
        self.pauses = 0
        self.writes_while_paused = 0
        self.max_buffered = 0
        self.largest_write = 0
        self.reading = True
        self.closing = False

    def write(self, data: bytes) -> None:
        if self.paused:
            self.writes_while_paused += 1
        self.buffer += data
        self.largest_write = max(self.largest_write, len(data))
        self.max_buffered = max(self.max_buffered, len(self.buffer))
        if not self.paused and len(self.buffer) > self.high:
            self.paused = True
            self.pauses += 1
            self.protocol.pause_writing()

    def read(self, limit: int | None = None) -> int:
        """The peer reads everything buffered (or `limit` bytes of it); returns how many bytes that was."""
        n = len(self.buffer) if limit is None else min(limit, len(self.buffer))
        self.received += self.buffer[:n]
        del self.buffer[:n]
        if self.paused and len(self.buffer) <= self.low:
            self.paused = False
            self.protocol.resume_writing()
        return n

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def can_write_eof(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return len(self.buffer)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class ManualJob:
    """JobControl of one job; `emit`/`finish` hand events to the server's sink the way the engine thread
    does (the sink never blocks: events hop onto the loop with call_soon_threadsafe)."""

    def __init__(self, job: SpeechJob, sink: Any) -> None:
        self.job, self.sink = job, sink
        self.pcms: list[np.ndarray] = []
        self.cancelled = False

    def emit(self, index: int) -> None:
        t = np.arange(CHUNK_SAMPLES) + index * CHUNK_SAMPLES
        pcm = (0.5 * np.sin(2 * np.pi * 220 * t / 24000)).astype(np.float32)
        self.pcms.append(pcm)
        self.sink(AudioChunk(self.job.request_id, pcm, ChunkMetrics(generate_time_s=0.01, llm_tokens=2)))

    def finish(self) -> None:
        n = sum(len(p) for p in self.pcms)
        self.sink(Finished(self.job.request_id, total_samples=n, llm_tokens=n // 960))

    def push_tokens(self, ids: Any) -> None:
        pass

    def finish_text(self) -> None:
        pass

    def cancel(self) -> None:
        self.cancelled = True


class ManualEngine:
    sample_rate = 24000

    def __init__(self) -> None:
        self.jobs: list[ManualJob] = []  # in submit order

    def prepare(self, job: SpeechJob) -> PreparedJob:
        return PreparedJob(job)

    def encode_text(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def submit(self, prepared: PreparedJob, sink: Any) -> ManualJob:
        self.jobs.append(ManualJob(prepared.job, sink))
        return self.jobs[-1]

    def warm_voice(self, voice) -> bool:  # nothing to precompute
        return False

    def can_admit(self) -> bool:
        return True

    def stats(self) -> EngineStats:
        return EngineStats(running=len(self.jobs), waiting=0, kv_used_tokens=0, kv_total_tokens=1,
                           last_decode_batch=0, last_flow_batch=0, last_vocoder_batch=0, steps=0)

    def shutdown(self, deadline_s: float) -> None:
        pass


class Voices:
    """Stands in for the VoiceCache: every id is a known voice."""

    def peek(self, voice_id: str) -> VoicePrompt:
        return VoicePrompt(speech_tokens=np.zeros(2, np.int32), embedding=np.zeros(192, np.float32),
                           mel=np.zeros((4, 80), np.float32), text="prompt")


class Harness:
    def __init__(self, **config: Any) -> None:
        self.engine = ManualEngine()
        self.app = ServerState(config=ServerConfig(tokens=(TOKEN,), **config), engine=self.engine, extract_prompt=None,
                       store=None, voices=Voices())  # type: ignore[arg-type]
        self.encoded: list[int] = []  # id() of every PCM array the server encoded, in order
        self.app.run_blocking = self._inline  # type: ignore[method-assign]

    async def _inline(self, fn: Any, *args: Any) -> Any:
        """Encoding on the loop, synchronously: how far each producer got is exact at every yield."""
        if args and isinstance(args[0], np.ndarray):
            self.encoded.append(id(args[0]))
        return fn(*args)

    def encoded_of(self, job: ManualJob) -> int:
        ids = {id(p) for p in job.pcms}
        return sum(i in ids for i in self.encoded)

    def connect(self) -> FakeTransport:
        proto = HttpProtocol(self.app)
        transport = FakeTransport(proto)
        proto.connection_made(transport)
        return transport


def speech_request(text: str = "hello world") -> bytes:
    body = json.dumps({"model": "CosyVoice2-0.5B", "stream": True,
                       "input": {"mode": "fast_replication", "text": text, "reference_audio_id": VOICE_ID,
                                 "output_format": "pcm"}}).encode()
    head = (f"POST /api/v1/audio/speech HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


def sse_events(raw: bytes) -> tuple[int, list[dict[str, Any]], bool]:
    """(status, the SSE events, whether the chunked body ended) of the bytes a client has read."""
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="POST", target="/", headers=[("host", "test"), ("content-length", "0")]))
    client.send(h11.EndOfMessage())
    client.receive_data(raw)
    status, body, ended = 0, b"", False
    while True:
        event = client.next_event()
        if event is h11.NEED_DATA or event is h11.PAUSED:
            break
        if isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            ended = True
            break
    events = [json.loads(block[len(b"data: "):]) for block in body.split(b"\n\n") if block.startswith(b"data: ")]
    return status, events, ended


def audio_of(events: list[dict[str, Any]]) -> bytes:
    return b"".join(base64.b64decode(e["output"]["audio"]["data"]) for e in events if "output" in e)


async def settle() -> None:
    """Let every ready callback run (the sink's hop, the producers, the writes): no time passes."""
    for _ in range(50):
        await asyncio.sleep(0)


async def _cancel_the_rest() -> None:
    pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


def run(coro: Coroutine[Any, Any, None]) -> None:
    loop = FakeClockLoop()
    try:
        loop.run_until_complete(coro)
    finally:  # as asyncio.run does: a failed test must not leave handlers running into a closed loop
        loop.run_until_complete(_cancel_the_rest())
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


# ---------------------------------------------------------------- FlowControl alone

def test_drain_waits_between_pause_and_resume_and_release_wakes_it() -> None:
    async def main() -> None:
        flow = FlowControl(FakeTransport(None))  # type: ignore[arg-type]
        await asyncio.wait_for(flow.drain(), 1)  # writable from the start: no wait
        flow.pause_writing()
        waiter = asyncio.ensure_future(flow.drain())
        await settle()
        assert not waiter.done()
        flow.resume_writing()
        await settle()
        assert waiter.done()
        flow.pause_writing()
        waiter = asyncio.ensure_future(flow.drain())
        flow.release()  # connection lost: the writer wakes to see it
        await settle()
        assert waiter.done()

    run(main())


def test_read_pause_is_forwarded_once() -> None:
    transport = FakeTransport(None)  # type: ignore[arg-type]
    flow = FlowControl(transport)
    flow.pause_reading()
    flow.pause_reading()
    assert flow.read_paused and not transport.reading
    flow.resume_reading()
    assert not flow.read_paused and transport.reading


# ---------------------------------------------------------------- two connections, one slow reader

def test_a_slow_reader_stalls_only_its_own_stream() -> None:
    async def main() -> None:
        h = Harness()
        slow, fast = h.connect(), h.connect()
        slow.protocol.data_received(speech_request())
        fast.protocol.data_received(speech_request())
        await settle()
        job_slow, job_fast = h.engine.jobs
        chunks = 12
        paused_at = None  # chunks the slow stream had encoded when its transport paused
        for i in range(chunks):
            job_slow.emit(i)  # the engine hands over audio for both at the same pace...
            job_fast.emit(i)
            await settle()
            assert fast.read() > 0  # ...and the fast reader gets each chunk as soon as it is made
            assert len(sse_events(bytes(fast.received))[1]) == i + 1
            assert not fast.paused and fast.pauses == 0
            if slow.paused and paused_at is None:
                paused_at = h.encoded_of(job_slow)
        # The slow stream went out until its buffer passed the high-water mark, then its producer stopped:
        # nothing more written, nothing more pulled from the engine stream or encoded. The engine was not
        # held up: all its chunks were accepted and wait, unencoded, in that request's queue.
        assert slow.paused and slow.pauses == 1 and paused_at is not None
        assert 0 < paused_at < chunks
        assert h.encoded_of(job_slow) == paused_at
        assert slow.writes_while_paused == 0
        assert slow.max_buffered <= HIGH + slow.largest_write  # bounded: the mark plus the write that crossed it
        assert h.encoded_of(job_fast) == chunks and len(job_slow.pcms) == chunks

        job_slow.finish()
        job_fast.finish()
        await settle()
        fast.read()
        status, fast_events, ended = sse_events(bytes(fast.received))
        assert status == 200 and ended and len(fast_events) == chunks + 1
        assert fast_events[-1]["output"]["finish_reason"] == "stop"
        assert not sse_events(bytes(slow.received) + bytes(slow.buffer))[2]  # still stalled mid-stream

        # The reader catches up: each drain resumes the producer, which refills to the mark and pauses.
        rounds = 0
        while slow.read():
            rounds += 1
            await settle()
        assert rounds >= 2 and slow.pauses >= 2 and slow.writes_while_paused == 0
        assert slow.max_buffered <= HIGH + slow.largest_write
        print(f"paused after {paused_at} of {chunks} chunks, caught up in {rounds} reads, "
              f"at most {slow.max_buffered} bytes buffered (largest write {slow.largest_write})")
        status, slow_events, ended = sse_events(bytes(slow.received))
        assert status == 200 and ended and len(slow_events) == chunks + 1
        assert audio_of(slow_events) == audio_of(fast_events)  # in order, nothing lost or repeated
        assert len(audio_of(slow_events)) == chunks * CHUNK_SAMPLES * 2
        assert not job_slow.cancelled and not job_fast.cancelled
        assert h.app.metrics.inflight == 0

    run(main())


def test_a_reader_that_stops_is_cut_after_the_stall_deadline() -> None:
    """idle_timeout_s / header_timeout_s guard connections with no request in flight; a response whose
    full write buffer drains nothing for stalled_write_timeout_s is cut: the engine job is cancelled, the
    audio still queued for it dropped unencoded, the connection aborted, and /metrics counts it."""

    async def main() -> None:
        h = Harness(idle_timeout_s=30.0, header_timeout_s=10.0, stalled_write_timeout_s=30.0)
        stalled, idle = h.connect(), h.connect()
        stalled.protocol.data_received(speech_request())
        await settle()
        (job,) = h.engine.jobs
        for i in range(6):
            job.emit(i)
        await settle()
        assert stalled.paused
        encoded = h.encoded_of(job)

        loop = asyncio.get_running_loop()
        loop.now += 29.9  # just short of the deadline: nothing happens
        await settle()
        assert not stalled.closing and not job.cancelled and stalled.protocol.task is not None
        assert h.app.metrics.inflight == 1

        loop.now += 0.2
        await settle()
        assert idle.closing, "the fake clock must fire the keep-alive reaper on the idle connection"
        assert stalled.closing and job.cancelled
        assert stalled.protocol.task is None and h.app.metrics.inflight == 0
        assert h.encoded_of(job) == encoded and stalled.writes_while_paused == 0  # the rest dropped unencoded
        assert h.app.metrics.cuts("stalled_write") == 1

    run(main())


def test_a_slow_reader_that_keeps_draining_is_not_cut() -> None:
    """Progress, not speed: each window in which the peer read anything starts another one."""

    async def main() -> None:
        h = Harness(stalled_write_timeout_s=30.0)
        conn = h.connect()
        conn.protocol.data_received(speech_request())
        await settle()
        (job,) = h.engine.jobs
        for i in range(8):
            job.emit(i)
        job.finish()
        await settle()
        assert conn.paused
        loop = asyncio.get_running_loop()
        for _ in range(6):  # three minutes of a reader taking a few bytes every 25 s
            loop.now += 25.0
            conn.read(100)
            await settle()
            assert conn.paused and not conn.closing and not job.cancelled
        while conn.read():
            await settle()
        status, events, ended = sse_events(bytes(conn.received))
        assert status == 200 and ended and len(events) == 9 and not conn.closing
        assert h.app.metrics.cuts("stalled_write") == 0

    run(main())


@pytest.mark.parametrize("resume_before_finish", [True, False])
def test_resume_after_the_engine_finished_delivers_the_whole_stream(resume_before_finish: bool) -> None:
    """The engine may be done long before a slow reader: its Finished waits behind the audio, in order."""

    async def main() -> None:
        h = Harness()
        conn = h.connect()
        conn.protocol.data_received(speech_request())
        await settle()
        (job,) = h.engine.jobs
        for i in range(8):
            job.emit(i)
        if not resume_before_finish:
            job.finish()
        await settle()
        assert conn.paused
        if resume_before_finish:
            conn.read()
            await settle()
            job.finish()
            await settle()
        while conn.read():
            await settle()
        status, events, ended = sse_events(bytes(conn.received))
        assert status == 200 and ended and len(events) == 9
        assert len(audio_of(events)) == 8 * CHUNK_SAMPLES * 2
        assert conn.writes_while_paused == 0 and conn.protocol.task is None and not conn.closing

    run(main())


def test_a_slow_websocket_reader_stalls_only_its_task() -> None:
    """The same over a WebSocket duplex task (server/ws.py awaits drain after each event), beside an SSE
    stream on another connection."""

    async def main() -> None:
        h = Harness()
        ws, sse = h.connect(), h.connect()
        client = WSConnection(ConnectionType.CLIENT)
        ws.protocol.data_received(client.send(Request(
            host="test", target="/api-ws/v1/audio/speech",
            extra_headers=[(b"authorization", f"Bearer {TOKEN}".encode())])))
        ws.read()
        client.receive_data(bytes(ws.received))
        assert isinstance(next(client.events()), AcceptConnection)
        handshake = len(ws.received)
        ws.protocol.data_received(client.send(TextMessage(run_task("t1", VOICE_ID, output_format="pcm"))))
        await settle()
        ws.protocol.data_received(client.send(TextMessage(continue_task("t1", "hello world"))))
        ws.protocol.data_received(client.send(TextMessage(finish_task("t1"))))
        sse.protocol.data_received(speech_request())
        await settle()
        job_ws, job_sse = h.engine.jobs
        assert job_ws.job.text is None and job_sse.job.text is not None  # duplex, then one-shot text
        chunks = 12
        for i in range(chunks):
            job_ws.emit(i)
            job_sse.emit(i)
            await settle()
            assert sse.read() > 0 and len(sse_events(bytes(sse.received))[1]) == i + 1
        assert ws.paused and ws.writes_while_paused == 0
        assert h.encoded_of(job_ws) < chunks == h.encoded_of(job_sse)
        assert ws.max_buffered <= HIGH + ws.largest_write

        job_ws.finish()
        job_sse.finish()
        await settle()
        while ws.read():
            await settle()
        client.receive_data(bytes(ws.received[handshake:]))
        messages = [json.loads(e.data) for e in client.events() if isinstance(e, TextMessage)]
        kinds = [m["header"]["event"] for m in messages]
        assert kinds == ["task-started"] + ["result-generated"] * chunks + ["task-finished"]
        assert ws.writes_while_paused == 0 and not job_ws.cancelled

    run(main())
