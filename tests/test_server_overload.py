"""Overload: ten times the admitted concurrency at once. The excess is refused at once (429 + Retry-After, in
milliseconds, not after a queue wait), the admitted requests keep their time to first audio within 2x of
the unloaded figure, and nothing grows without bound.

The engine is a BatchFakeEngine: a fixed batch of C slots, each chunk taking DELAY_S however many share it,
so the unloaded time to first audio is DELAY_S plus the serving path, well defined. The server admits C
(`--max-inflight`). The clients are one asyncio loop of raw sockets in the test's thread: light enough
that 10xC of them measure the server, not the client.
"""
from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import requests
from wsproto.events import TextMessage

from tests.fakes import BatchFakeEngine
from tests.server_helpers import run_task, running_server, upload
from tests.test_server_abuse import RawWs, speech_request, wait_for

C = 4  # the admitted concurrency: the engine's batch and the server's --max-inflight
DELAY_S = 0.3  # per chunk
TEXT = "a" * 32  # 4 chunks of 8 characters: a job holds its slot ~1.2 s, longer than the burst takes to arrive


@dataclass(frozen=True)
class Outcome:
    status: int
    answered_s: float  # request start (connect included) -> response head
    ttfp_s: float | None  # -> first SSE event (its audio), admitted requests only
    retry_after: str | None
    code: str | None  # the error's code, refused requests only


async def one_request(port: int, voice: str) -> Outcome:
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(speech_request(voice, TEXT, close=True))
        head = await reader.readuntil(b"\r\n\r\n")
        answered = time.perf_counter() - start
        status = int(head.split(b" ", 2)[1])
        headers = dict(line.decode().lower().split(": ", 1) for line in head.split(b"\r\n")[1:] if b": " in line)
        if status != 200:
            body = await reader.read()  # the refusal closes the connection
            return Outcome(status, answered, None, headers.get("retry-after"), json.loads(body)["code"])
        data, first = b"", None
        while chunk := await reader.read(65536):
            data += chunk
            if first is None and b"data: " in data:
                first = time.perf_counter() - start
        assert b'"finish_reason":"stop"' in data
        return Outcome(status, answered, first, None, None)
    finally:
        writer.close()


async def burst(port: int, voice: str, n: int) -> list[Outcome]:
    return list(await asyncio.gather(*(one_request(port, voice) for _ in range(n))))


def p99(values: list[float]) -> float:
    return sorted(values)[max(0, round(0.99 * (len(values) - 1)))]


@contextlib.contextmanager
def no_collector_pause() -> Iterator[None]:
    """Server and clients share the test process, which late in the suite holds the whole session's
    objects: a full (gen-2) collection of them took 330-390 ms inside this test (gc.callbacks, whole
    suite), and once made every refusal and first audio of a burst late by the same 424 ms. A server
    process holds only its own objects; measure it without that pause."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def test_ten_times_the_admitted_concurrency(tmp_path: Path) -> None:
    engine = BatchFakeEngine(delay_s=DELAY_S, batch=C, max_waiting=100)
    with running_server(tmp_path, engine, max_inflight=C, retry_after_s=1) as srv:
        voice = upload(requests, srv.url).json()["id"]
        with no_collector_pause():
            unloaded = asyncio.run(burst(srv.port, voice, C))
        assert [o.status for o in unloaded] == [200] * C
        unloaded_ttfp = statistics.median(o.ttfp_s for o in unloaded)  # type: ignore[misc]

        with no_collector_pause():
            loaded = asyncio.run(burst(srv.port, voice, 10 * C))
        admitted = [o for o in loaded if o.status == 200]
        refused = [o for o in loaded if o.status != 200]
        refusal_ms = [o.answered_s * 1e3 for o in refused]
        admitted_ttfp = statistics.median(o.ttfp_s for o in admitted)  # type: ignore[misc]
        print(f"unloaded TTFP p50 {unloaded_ttfp * 1e3:.0f} ms; at {10 * C}: {len(admitted)} admitted, TTFP p50 "
              f"{admitted_ttfp * 1e3:.0f} ms; {len(refused)} refused in p50 {statistics.median(refusal_ms):.1f} "
              f"/ p99 {p99(refusal_ms):.1f} / max {max(refusal_ms):.1f} ms")

        # The excess is refused, each with a Retry-After, and at once: well before any audio could exist.
        assert len(admitted) >= C and len(refused) >= 8 * C
        assert {(o.status, o.retry_after, o.code) for o in refused} == {(429, "1", "Overloaded")}
        assert p99(refusal_ms) < DELAY_S * 1e3 / 2
        # The admitted keep their latency: they never waited behind the excess.
        assert admitted_ttfp <= 2 * unloaded_ttfp
        assert engine.peak_batch <= C and engine.peak_waiting == 0
        # Nothing left behind or grown: jobs, streams, connections; each stream's queue stayed short.
        assert wait_for(lambda: srv.call(lambda: srv.app.metrics.inflight) == 0)
        assert wait_for(lambda: srv.call(lambda: srv.app.metrics.connections) == 0)
        assert srv.call(lambda: srv.app.metrics.pending_peak) <= 2
        assert engine.running == 0


def test_a_websocket_task_past_the_limit_fails_at_once(tmp_path: Path) -> None:
    """The duplex route's refusal is its task-failed (no HTTP status after the upgrade), as prompt."""
    engine = BatchFakeEngine(delay_s=DELAY_S, batch=1, max_waiting=100)
    with running_server(tmp_path, engine, max_inflight=1) as srv:
        voice = upload(requests, srv.url).json()["id"]

        async def hold_and_ask() -> tuple[float, list[dict]]:
            holder = asyncio.ensure_future(one_request(srv.port, voice))
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: wait_for(lambda: srv.call(lambda: srv.app.metrics.inflight) == 1))
            ws = RawWs(srv.port)
            start = time.perf_counter()
            ws.send(TextMessage(run_task("t1", voice)))
            events = await asyncio.get_running_loop().run_in_executor(None, lambda: ws.events(until=TextMessage))
            took = time.perf_counter() - start
            ws.close()
            assert (await holder).status == 200
            return took, [json.loads(e.data) for e in events if isinstance(e, TextMessage)]

        took, messages = asyncio.run(hold_and_ask())
        header = messages[0]["header"]
        assert header["event"] == "task-failed" and header["error_code"] == "Overloaded"
        assert took < DELAY_S
