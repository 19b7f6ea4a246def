"""Slow and abusive clients: real sockets on loopback against running_server (FakeEngine), deadlines made small
through the config; the exact timing and buffer bounds on the fake transport and clock of
tests/test_server_flow_control.py.

Each case says what the client gets, what the server keeps serving meanwhile, and what is counted
(`cosyserve_connections_cut_total{reason}`). docs/faults.md ("Slow and abusive clients") maps the cases to these tests.
"""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Self

import h11
import pytest
import requests
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Ping, Pong, Request, TextMessage

from server.connection import LINGER_S
from server.rate_limit import TokenBucket
from tests.fakes import FakeEngine
from tests.server_helpers import (
    AUTH,
    TOKEN,
    continue_task,
    finish_task,
    run_task,
    running_server,
    speech_body,
    upload,
)
from tests.test_server_flow_control import Harness, run, settle

WS_PATH = "/api-ws/v1/audio/speech"
SPEECH = "/api/v1/audio/speech"
BEARER = f"Bearer {TOKEN}".encode()


# ---------------------------------------------------------------- helpers


def responses(raw: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Every whole response in `raw`, in order: (status, headers, body)."""
    client = h11.Connection(h11.CLIENT)
    out: list[tuple[int, dict[str, str], bytes]] = []
    client.receive_data(raw)
    while True:
        client.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
        client.send(h11.EndOfMessage())
        status, headers, body = 0, {}, b""
        while True:
            event = client.next_event()
            if isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                out.append((status, headers, body))
                break
            else:
                return out
        if client.our_state is not h11.DONE or client.their_state is not h11.DONE:
            return out
        client.start_next_cycle()


def trickle(port: int, prefix: bytes, every_s: float = 0.1, budget_s: float = 8.0) -> tuple[bytes, float]:
    """Send `prefix`, then one byte every `every_s` (each one would keep an idle timer alive) until the server
    answers and closes; (what it sent, seconds from the first byte to its close)."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(every_s)
        start = time.monotonic()
        sock.sendall(prefix)
        out = b""
        while time.monotonic() - start < budget_s:
            try:
                data = sock.recv(65536)
                if not data:
                    break
                out += data
                continue
            except TimeoutError:
                pass
            except ConnectionResetError:
                break
            try:
                sock.sendall(b"a")
            except OSError:
                pass
        return out, time.monotonic() - start


def read_all(sock: socket.socket, budget_s: float = 5.0) -> bytes:
    sock.settimeout(budget_s)
    out = b""
    try:
        while data := sock.recv(65536):
            out += data
    except (TimeoutError, ConnectionResetError):
        pass
    return out


class Prober:
    """Another client, meanwhile: GET /health in a loop on its own connections; every latency kept."""

    def __init__(self, url: str) -> None:
        self.url, self.latencies, self.statuses = url, [], []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.monotonic()
            r = requests.get(f"{self.url}/health", timeout=5)
            self.latencies.append(time.monotonic() - start)
            self.statuses.append(r.status_code)
            self._stop.wait(0.05)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def wait_for(cond: Callable[[], bool], budget_s: float = 10.0) -> bool:
    deadline = time.monotonic() + budget_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def cut_count(srv: Any, reason: str) -> int:
    return srv.call(lambda: srv.app.metrics.cuts(reason))


def speech_request(voice: str, text: str, stream: bool = True, close: bool = False) -> bytes:
    body = json.dumps(speech_body(voice, text=text, stream=stream, output_format="pcm")).encode()
    return (f"POST {SPEECH} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            + ("Connection: close\r\n" if close else "") + "\r\n").encode() + body


class RawWs:
    """A WebSocket client on a plain socket (wsproto): every frame is the test's to choose."""

    def __init__(self, port: int, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket()
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect(("127.0.0.1", port))
        self.conn = WSConnection(ConnectionType.CLIENT)
        self.send(Request(host="x", target=WS_PATH, extra_headers=[(b"authorization", BEARER)]))
        assert any(isinstance(e, AcceptConnection) for e in self.events(until=AcceptConnection))

    def send(self, *events: Any) -> None:
        self.sock.sendall(b"".join(self.conn.send(e) for e in events))

    def events(self, until: type | None = None, budget_s: float = 5.0) -> list[Any]:
        """Events until one of type `until` (or the close, or the budget)."""
        got: list[Any] = []
        self.sock.settimeout(0.2)
        deadline = time.monotonic() + budget_s
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                break
            self.conn.receive_data(data or None)
            got += list(self.conn.events())
            if not data or any(isinstance(e, CloseConnection) or (until and isinstance(e, until)) for e in got):
                break
        return got

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Any]:
    with running_server(tmp_path, FakeEngine(chunk_chars=8), header_timeout_s=0.5, body_timeout_s=1.0,
                        idle_timeout_s=3.0, max_header_bytes=4096, max_body_bytes=64 * 1024,
                        max_ws_message_bytes=4096, ws_max_pings_per_s=10.0) as srv:
        yield srv


# ---------------------------------------------------------------- slowloris: a deadline per phase


def test_a_head_trickled_byte_by_byte_gets_408_at_the_header_deadline(server) -> None:
    with Prober(server.url) as prober:
        raw, took = trickle(server.port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    [(status, headers, body)] = responses(raw)
    assert status == 408 and headers["connection"] == "close"
    assert json.loads(body)["code"] == "RequestTimeout" and "head" in json.loads(body)["message"]
    assert 0.45 < took < 3.0, took  # 0.5 s from the first byte, though a byte came every 0.1 s (idle: 3 s)
    assert prober.statuses and set(prober.statuses) == {200} and max(prober.latencies) < 1.0
    assert cut_count(server, "header_timeout") == 1


def test_a_body_trickled_byte_by_byte_gets_408_at_the_body_deadline(server) -> None:
    head = (f"POST {SPEECH} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Type: application/json\r\nContent-Length: 500\r\n\r\n{").encode()
    with Prober(server.url) as prober:
        raw, took = trickle(server.port, head)
    [(status, _, body)] = responses(raw)
    assert status == 408 and json.loads(body)["code"] == "RequestTimeout"
    assert "body not received within 1 s" in json.loads(body)["message"]
    assert 0.95 < took < 3.5, took  # the body's own deadline, from its head: not the head's 0.5 s
    assert set(prober.statuses) == {200} and max(prober.latencies) < 1.0
    assert cut_count(server, "body_timeout") == 1 and cut_count(server, "header_timeout") == 0


def test_a_slow_upload_within_the_deadlines_is_served(server) -> None:
    voice = upload(requests, server.url).json()["id"]
    data = speech_request(voice, "slow but steady", stream=False, close=True)
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        for i in range(0, len(data), len(data) // 8 + 1):  # head and body over ~0.4 s
            sock.sendall(data[i:i + len(data) // 8 + 1])
            time.sleep(0.05)
        [(status, _, body)] = responses(read_all(sock))
    assert status == 200 and json.loads(body)["output"]["audio"]["data"]


def test_phase_deadlines_on_a_fake_clock() -> None:
    """Exactly: the head's deadline runs from its first byte, the body's from the end of its head, and
    neither moves when more bytes trickle in; a connection with nothing sent meets only the idle reaper."""

    async def main() -> None:
        h = Harness(idle_timeout_s=30.0, header_timeout_s=10.0, body_timeout_s=60.0)
        loop = asyncio.get_running_loop()
        head, body, idle = h.connect(), h.connect(), h.connect()
        head.protocol.data_received(b"GET /health HTTP/1.1\r\n")
        body.protocol.data_received(b"POST /api/v1/audio/speech HTTP/1.1\r\nHost: t\r\nContent-Length: 9\r\n\r\n")
        for _ in range(9):  # a byte every second, head and body
            loop.now += 1.0
            head.protocol.data_received(b"X")
            if loop.now < 8:
                body.protocol.data_received(b"x")  # 7 of its 9 bytes
            await settle()
        loop.now += 0.9  # 9.9 s
        await settle()
        assert not head.closing
        loop.now += 0.2  # 10.1 s: the head's deadline
        await settle()
        assert head.read() and b"HTTP/1.1 408" in bytes(head.received)
        loop.now += LINGER_S  # what the client still sends is read and dropped a moment, then the close
        await settle()
        assert head.closing and not body.closing and not idle.closing
        loop.now += 28.0  # 39.1 s: only the idle reaper closes the silent one (no 408: no request came)
        await settle()
        assert idle.closing and not idle.received and not idle.buffer
        assert not body.closing and not body.buffer
        loop.now += 21.0  # 60.1 s after the body's head
        await settle()
        assert b"body not received within 60 s" in bytes(body.buffer)
        loop.now += LINGER_S
        await settle()
        assert body.closing
        assert h.app.metrics.cuts("header_timeout") == 1 and h.app.metrics.cuts("body_timeout") == 1

    run(main())


# ---------------------------------------------------------------- a client that never reads


def _stalling_server(tmp_path: Path, engine: FakeEngine) -> Any:
    return running_server(tmp_path, engine, stalled_write_timeout_s=0.5, max_text_chars=5000)


def _speech_latency(url: str, voice: str) -> float:
    start = time.monotonic()
    r = requests.post(f"{url}{SPEECH}", headers=AUTH, json=speech_body(voice, text="short one"), timeout=10)
    assert r.status_code == 200, r.text
    return time.monotonic() - start


def _stalled_cut(srv: Any, engine: FakeEngine, voice: str, start_stall: Callable[[], Any]) -> None:
    """Start a stream nobody reads (the engine's one long job); while it fills its buffers and stalls, another
    client's requests keep their latency; then the stall deadline cuts it and its engine job is cancelled."""
    before = [_speech_latency(srv.url, voice) for _ in range(3)]
    stalled = start_stall()
    assert wait_for(lambda: any(j.text != "short one" for j in engine.jobs))
    job = next(j for j in engine.jobs if j.text != "short one")
    during = [_speech_latency(srv.url, voice) for _ in range(3)]
    assert wait_for(lambda: cut_count(srv, "stalled_write") == 1, budget_s=15.0)
    assert wait_for(lambda: job.request_id in engine.cancelled)
    assert wait_for(lambda: srv.call(lambda: srv.app.metrics.inflight) == 0)
    assert wait_for(lambda: srv.call(lambda: srv.app.metrics.connections) == 0)
    print(f"other client: {max(before) * 1e3:.0f} ms before, {max(during) * 1e3:.0f} ms during the stall")
    assert max(during) < max(before) + 0.5
    stalled.close()


def test_an_sse_stream_nobody_reads_is_cut_and_its_job_cancelled(tmp_path: Path) -> None:
    engine = FakeEngine(delay_s=0.01, chunk_chars=8)  # 4000 chars: 500 chunks, ~5 s of engine work, ~13 MB SSE
    with _stalling_server(tmp_path, engine) as srv:
        voice = upload(requests, srv.url).json()["id"]
        text = "a" * 4000

        def start() -> socket.socket:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fill quickly; never read
            sock.connect(("127.0.0.1", srv.port))
            sock.sendall(speech_request(voice, text))
            return sock

        _stalled_cut(srv, engine, voice, start)


def test_a_websocket_task_nobody_reads_is_cut_and_its_job_cancelled(tmp_path: Path) -> None:
    engine = FakeEngine(delay_s=0.01, chunk_chars=8)
    with _stalling_server(tmp_path, engine) as srv:
        voice = upload(requests, srv.url).json()["id"]
        text = "b" * 4000

        def start() -> RawWs:
            ws = RawWs(srv.port, rcvbuf=4096)
            ws.send(TextMessage(run_task("t1", voice, output_format="pcm")), TextMessage(continue_task("t1", text)),
                    TextMessage(finish_task("t1")))
            return ws

        _stalled_cut(srv, engine, voice, start)


def test_a_slow_sse_reader_that_keeps_reading_is_not_cut(tmp_path: Path) -> None:
    """Progress, not speed, on a real socket: the write buffer stays full (the server's kernel buffer made
    small, so the transport pauses early), yet each stall window sees some draining, so the stream lives."""
    engine = FakeEngine(delay_s=0.001, chunk_chars=8)
    with _stalling_server(tmp_path, engine) as srv:
        voice = upload(requests, srv.url).json()["id"]
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", srv.port))
            assert wait_for(lambda: srv.call(lambda: len(srv.app.connections)) == 1)

            def small_send_buffer() -> None:
                for conn in srv.app.connections:
                    conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)

            srv.call(small_send_buffer)
            sock.sendall(speech_request(voice, "c" * 96, close=True))  # 12 chunks, ~310 kB of SSE
            sock.settimeout(5)
            raw, paused_seen = b"", False
            while data := sock.recv(8192):  # ~160 kB/s: far slower than the server writes
                raw += data
                paused_seen |= srv.call(lambda: any(not c.flow.writable for c in srv.app.connections))
                time.sleep(0.05)
        [(status, _, body)] = responses(raw)
        assert status == 200 and body.count(b"data: ") == 13 and b'"finish_reason":"stop"' in body
        assert paused_seen  # the watchdog was running: the stream lived through windows of a full buffer
        assert cut_count(srv, "stalled_write") == 0 and not engine.cancelled


# ---------------------------------------------------------------- size limits: 431 and 413


def test_a_head_over_the_limit_is_431_whether_it_ends_or_not(server) -> None:
    big = b"X-Big: " + b"a" * 5000 + b"\r\n"
    unfinished = read_all_after(server.port, b"GET /health HTTP/1.1\r\nHost: x\r\n" + big)  # h11's bound
    whole = read_all_after(server.port, b"GET /health HTTP/1.1\r\nHost: x\r\n" + big + b"\r\n")  # measured
    many = read_all_after(server.port, b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(150))
                          + b"\r\n")
    for raw in (unfinished, whole, many):
        [(status, headers, body)] = responses(raw)
        assert status == 431 and headers["connection"] == "close"
        assert json.loads(body)["code"] == "RequestHeaderFieldsTooLarge"


@pytest.mark.parametrize("pieces", [1, 100], ids=["one-chunk", "many-chunks"])
def test_a_chunked_body_over_the_limit_is_413(server, pieces: int) -> None:
    """No Content-Length to refuse up front: counted as it arrives, refused once past the limit."""
    size = 64 * 1024 + 1
    chunks = b"".join(b"%x\r\n" % len(p) + p + b"\r\n" for p in _split(b"{" + b" " * (size - 1), pieces))
    head = (f"POST {SPEECH} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    [(status, headers, body)] = responses(read_all_after(server.port, head + chunks + b"0\r\n\r\n"))
    assert status == 413 and headers["connection"] == "close"
    assert json.loads(body)["code"] == "PayloadTooLarge"
    assert requests.get(f"{server.url}/health", timeout=5).status_code == 200


def test_a_content_length_over_the_limit_is_413_before_the_body_is_sent(server) -> None:
    """The refusal comes at once; the client still sending its upload is read and dropped for a moment, so it
    gets the 413 instead of a reset."""
    head = (f"POST {SPEECH} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {1 << 20}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head)
        time.sleep(0.1)
        try:
            sock.sendall(b"x" * 200_000)  # what an eager client keeps sending
        except OSError:
            pass
        [(status, _, body)] = responses(read_all(sock))
    assert status == 413 and json.loads(body)["code"] == "PayloadTooLarge"


def read_all_after(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(data)
        return read_all(sock)


def _split(data: bytes, n: int) -> list[bytes]:
    step = -(-len(data) // n)
    return [data[i:i + step] for i in range(0, len(data), step)]


# ---------------------------------------------------------------- pipelining floods


def _flood(n: int, auth: bytes = BEARER) -> bytes:
    return b"".join(b"GET /api/v1/r%d HTTP/1.1\r\nHost: x\r\nAuthorization: %s\r\n\r\n" % (i, auth) for i in range(n))


def test_a_pipelining_flood_is_answered_in_order(server) -> None:
    n = 3000  # ~200 kB in one write: read while it is still being sent, as a client must
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        raw: list[bytes] = []
        reader = threading.Thread(target=lambda: raw.append(read_all(sock, budget_s=3.0)), daemon=True)
        reader.start()
        sock.sendall(_flood(n) + b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        reader.join(30)
    got = responses(raw[0])
    assert len(got) == n + 1
    assert [json.loads(b)["message"] for _, _, b in got[:n]] == [f"no route for /api/v1/r{i}" for i in range(n)]
    assert {s for s, _, _ in got[:n]} == {404} and got[-1][0] == 200


def test_a_pipelining_flood_never_buffers_more_than_the_head_limit_plus_one_read() -> None:
    """Reading pauses once `max_header_bytes` piled up behind a running handler and resumes only when no whole
    request is left, so the unparsed backlog stays bounded however much a client pipelines."""

    async def main() -> None:
        h = Harness(max_header_bytes=4096)
        conn = h.connect()
        n, piece = 8000, 64 * 1024
        flood = _flood(n, f"Bearer {h.app.config.tokens[0]}".encode())
        sent, peak, reads, answered = 0, 0, 0, 0
        while answered < n:
            if conn.reading and sent < len(flood):  # the kernel hands over one read's worth when reading
                conn.protocol.data_received(flood[sent:sent + piece])
                sent += piece
                reads += 1
            peak = max(peak, conn.protocol.conn.buffered_bytes)
            await settle()
            new = conn.read()  # whole responses only: each goes out in one write
            answered += bytes(conn.received[len(conn.received) - new:]).count(b"HTTP/1.1 ")
        got = responses(bytes(conn.received))
        assert [json.loads(b)["message"] for _, _, b in got] == [f"no route for /api/v1/r{i}" for i in range(n)]
        assert peak <= 4096 + piece, peak
        print(f"{len(flood)} bytes pipelined in {reads} reads; at most {peak} bytes unparsed")

    run(main())


# ---------------------------------------------------------------- too many connections


def test_past_max_connections_a_new_one_gets_503_and_the_others_are_served(tmp_path: Path) -> None:
    with running_server(tmp_path, max_connections=3, idle_timeout_s=10.0, retry_after_s=2) as srv:
        held = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(3)]
        health = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
        for sock in held:  # each one served, and kept open
            sock.sendall(health)
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        start = time.monotonic()
        r = requests.get(f"{srv.url}/health", timeout=5)
        assert time.monotonic() - start < 1.0
        assert r.status_code == 503 and r.headers["retry-after"] == "2" and r.headers["connection"] == "close"
        assert r.json()["code"] == "Overloaded" and "too many connections" in r.json()["message"]
        held[0].sendall(health)  # the open ones go on
        assert held[0].recv(65536).startswith(b"HTTP/1.1 200")
        held.pop().close()
        assert wait_for(lambda: srv.call(lambda: srv.app.metrics.connections) == 2)
        assert requests.get(f"{srv.url}/health", timeout=5).status_code == 200  # room again
        assert cut_count(srv, "max_connections") == 1
        assert srv.call(lambda: len(srv.app.connections)) <= 3
        for sock in held:
            sock.close()


# ---------------------------------------------------------------- WebSocket pings and fragments


def test_pings_within_the_rate_are_answered(server) -> None:
    ws = RawWs(server.port)
    ws.send(*(Ping(b"p%d" % i) for i in range(10)))  # a burst of one second's worth
    got = ws.events(budget_s=1.0)
    assert [e.payload for e in got if isinstance(e, Pong)] == [b"p%d" % i for i in range(10)]
    assert not any(isinstance(e, CloseConnection) for e in got)
    ws.close()


def test_a_ping_flood_closes_with_1008(server) -> None:
    ws = RawWs(server.port)
    ws.send(*(Ping(b"f%d" % i) for i in range(200)))
    got = ws.events(until=CloseConnection)
    closes = [e for e in got if isinstance(e, CloseConnection)]
    assert [c.code for c in closes] == [1008] and "ping" in closes[0].reason
    assert sum(isinstance(e, Pong) for e in got) <= 10  # the burst, then the close: no pong backlog
    assert cut_count(server, "ws_ping_flood") == 1
    assert requests.get(f"{server.url}/health", timeout=5).status_code == 200
    ws.close()


def test_while_writes_back_up_only_the_latest_pong_waits() -> None:
    async def main() -> None:
        h = Harness()
        transport = h.connect()
        client = WSConnection(ConnectionType.CLIENT)
        transport.protocol.data_received(client.send(Request(host="t", target=WS_PATH, extra_headers=[
            (b"authorization", f"Bearer {h.app.config.tokens[0]}".encode())])))
        transport.read()
        client.receive_data(bytes(transport.received))
        assert isinstance(next(client.events()), AcceptConnection)
        transport.protocol.pause_writing()  # as the transport does past its high-water mark
        assert not transport.reading  # and the socket takes no more of the client's frames meanwhile
        transport.protocol.data_received(b"".join(client.send(Ping(b"%d" % i)) for i in range(5)))
        before = len(transport.received) + len(transport.buffer)
        transport.protocol.resume_writing()
        assert transport.reading
        transport.read()
        client.receive_data(bytes(transport.received[before:]))
        assert [e.payload for e in client.events()] == [b"4"]

    run(main())


def test_token_bucket() -> None:
    now = [0.0]
    bucket = TokenBucket(rate=2.0, burst=4.0, clock=lambda: now[0])
    assert [bucket.take() for _ in range(5)] == [True] * 4 + [False]
    now[0] += 0.5  # one token back
    assert bucket.take() and not bucket.take()
    now[0] += 100.0  # never more than the burst
    assert sum(bucket.take() for _ in range(10)) == 4


def _fragments(text: str, size: int) -> list[TextMessage]:
    parts = [text[i:i + size] for i in range(0, len(text), size)]
    return [TextMessage(p, message_finished=i == len(parts) - 1) for i, p in enumerate(parts)]


@pytest.mark.parametrize("size", [1, 50], ids=["one-byte-fragments", "50-byte-fragments"])
def test_a_fragmented_message_is_reassembled(server, size: int) -> None:
    voice = upload(requests, server.url).json()["id"]
    ws = RawWs(server.port)
    ws.send(*_fragments(run_task("t1", voice), size))  # ~400 continuation frames at one byte each
    got = ws.events(until=TextMessage)
    started = [json.loads(e.data) for e in got if isinstance(e, TextMessage)]
    assert started and started[0]["header"]["event"] == "task-started"
    ws.close()


def test_a_fragmented_message_over_the_limit_closes_1009(server) -> None:
    ws = RawWs(server.port)
    ws.send(*_fragments("x" * 5000, 100)[:-1])  # never finished: counted as it arrives
    got = ws.events(until=CloseConnection)
    assert [e.code for e in got if isinstance(e, CloseConnection)] == [1009]
    ws.close()
