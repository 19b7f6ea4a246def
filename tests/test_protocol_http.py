from __future__ import annotations

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import ApiError, InvalidParameter
from protocol.http import ConnectionClosed, HttpConnection, HttpRequest, NeedData, Upgrade
from server.config import ServerConfig


def connection(**limits: int) -> HttpConnection:
    """A connection with the server's default limits (server/config.py holds the one default of each)."""
    defaults = ServerConfig()
    return HttpConnection(**{"max_header_bytes": defaults.max_header_bytes,
                             "max_body_bytes": defaults.max_body_bytes, **limits})


def client_bytes(method: str, target: str, body: bytes = b"", headers: list[tuple[str, str]] | None = None) -> bytes:
    """Serialize one request with a real h11 client."""
    c = h11.Connection(h11.CLIENT)
    hs = [("host", "x")] + (headers or [])
    if body and not any(k.lower() in ("content-length", "transfer-encoding") for k, _ in hs):
        hs.append(("content-length", str(len(body))))
    out = c.send(h11.Request(method=method, target=target, headers=hs)) or b""
    if body:
        out += c.send(h11.Data(data=body)) or b""
    return out + (c.send(h11.EndOfMessage()) or b"")


def client_events(data: bytes, method: str = "GET") -> list[object]:
    """Parse a server's bytes with a real h11 client (after it sent `method`)."""
    c = h11.Connection(h11.CLIENT)
    c.send(h11.Request(method=method, target="/", headers=[("host", "x")]))
    c.send(h11.EndOfMessage())
    c.receive_data(data)
    events = []
    while True:
        ev = c.next_event()
        if ev is h11.NEED_DATA or ev is h11.PAUSED:
            break
        events.append(ev)
        if isinstance(ev, h11.EndOfMessage):
            break
    return events


def test_simple_request_and_response() -> None:
    conn = connection()
    conn.receive_data(client_bytes("POST", "/api/v1/audio/speech?a=1", b'{"x":1}',
                                   [("Content-Type", "application/json"), ("X-A", "1"), ("x-a", "2")]))
    req = conn.next_request()
    assert isinstance(req, HttpRequest)
    assert (req.method, req.path, req.query, req.body, req.keep_alive) == \
        ("POST", "/api/v1/audio/speech", "a=1", b'{"x":1}', True)
    assert req.header("content-type") == "application/json" and req.headers["x-a"] == "1, 2"
    assert ("x-a", "2") in req.header_list
    assert isinstance(conn.next_request(), NeedData)
    out = conn.send_response(200, {"content-type": "application/json"}, b"{}")
    events = client_events(out)
    assert events[0].status_code == 200 and (b"content-length", b"2") in events[0].headers
    assert events[1].data == b"{}"
    assert conn.start_next_cycle() is True


def test_keep_alive_pipelined_requests_answered_in_order() -> None:
    conn = connection()
    conn.receive_data(client_bytes("GET", "/a") + client_bytes("GET", "/b") + client_bytes("GET", "/c"))
    paths = []
    while True:
        req = conn.next_request()
        if isinstance(req, NeedData):
            break
        assert isinstance(req, HttpRequest)
        paths.append(req.path)
        waiting = conn.next_request()  # the next request is not parsed before this one is answered
        assert isinstance(waiting, NeedData) and waiting.paused == (req.path != "/c")
        conn.send_response(200, [], req.path.encode())
        assert conn.start_next_cycle()
    assert paths == ["/a", "/b", "/c"]


def test_chunked_stream_framing_parsed_by_h11_client() -> None:
    conn = connection()
    conn.receive_data(client_bytes("POST", "/s", b"{}"))
    assert isinstance(conn.next_request(), HttpRequest)
    out = conn.start_stream(200, [("content-type", "text/event-stream")])
    out += conn.send_chunk(b"data: 1\n\n") + conn.send_chunk(b"") + conn.send_chunk(b"data: 2\n\n")
    out += conn.end_stream()
    assert b"transfer-encoding: chunked" in out.lower()
    events = client_events(out, "POST")
    assert b"".join(e.data for e in events if isinstance(e, h11.Data)) == b"data: 1\n\ndata: 2\n\n"
    assert isinstance(events[-1], h11.EndOfMessage)
    assert conn.start_next_cycle()


def test_content_length_over_limit_is_413_at_once() -> None:
    conn = connection(max_body_bytes=10)
    conn.receive_data(b"POST /x HTTP/1.1\r\nhost: x\r\ncontent-length: 11\r\n\r\n")  # no body yet
    with pytest.raises(ApiError) as e:
        conn.next_request()
    assert e.value.status == 413
    out = conn.send_error(e.value, "rid")
    assert b"413" in out.split(b"\r\n")[0] and b"connection: close" in out.lower()
    assert conn.must_close and not conn.start_next_cycle()


def test_chunked_body_over_limit_is_413() -> None:
    conn = connection(max_body_bytes=10)
    conn.receive_data(client_bytes("POST", "/x", b"x" * 11, [("transfer-encoding", "chunked")]))
    with pytest.raises(ApiError) as e:
        conn.next_request()
    assert e.value.status == 413


def test_a_head_response_has_the_get_head_and_no_body_and_the_connection_goes_on() -> None:
    conn = connection()
    conn.receive_data(client_bytes("HEAD", "/health") + client_bytes("GET", "/health"))
    assert isinstance(conn.next_request(), HttpRequest)
    out = conn.send_response(200, {"content-type": "application/json"}, b'{"status": "ok"}')
    events = client_events(out, method="HEAD")
    assert isinstance(events[0], h11.Response) and (b"content-length", b"16") in events[0].headers
    assert not any(isinstance(ev, h11.Data) for ev in events) and isinstance(events[-1], h11.EndOfMessage)
    conn.start_next_cycle()
    assert isinstance(req := conn.next_request(), HttpRequest) and req.method == "GET"
    get = client_events(conn.send_response(200, {}, b"body"))
    assert [ev.data for ev in get if isinstance(ev, h11.Data)] == [b"body"]  # a GET still gets its body


@pytest.mark.parametrize("bad", [b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: nope\r\n\r\n", b"GARBAGE\r\n\r\n"])
def test_an_error_after_a_head_request_is_a_whole_response(bad: bytes) -> None:
    """Found by tests/fuzz/fuzz_http.py: the HEAD's no-body framing stuck to the connection, so the next
    request's 400 went out without its body and h11 raised LocalProtocolError instead."""
    conn = connection()
    conn.receive_data(client_bytes("HEAD", "/ready") + bad)
    assert isinstance(conn.next_request(), HttpRequest)
    conn.send_response(200, [], b"ok")
    assert conn.start_next_cycle()
    with pytest.raises(ApiError) as e:
        conn.next_request()
    out = conn.send_error(e.value, "rid")
    head, _, body = out.partition(b"\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400") and b"content-length: %d" % len(body) in head and b'"BadRequest"' in body


def test_a_streamed_answer_to_a_head_request_is_its_head_only() -> None:
    """Found by tests/fuzz/drive_http.py: send_chunk wrote the body of a HEAD response, which h11 refuses
    (LocalProtocolError, 'Too much data for declared Content-Length'); send_response already left it out."""
    conn = connection()
    conn.receive_data(client_bytes("HEAD", "/stream") + client_bytes("GET", "/next"))
    assert isinstance(conn.next_request(), HttpRequest)
    out = conn.start_stream(200, [("content-type", "text/event-stream")]) + conn.send_chunk(b"data: x\n\n")
    out += conn.end_stream()
    assert out.startswith(b"HTTP/1.1 200") and out.endswith(b"\r\n\r\n") and b"data: x" not in out
    assert conn.start_next_cycle() and conn.next_request().path == "/next"  # type: ignore[union-attr]


def test_headers_too_big_is_431() -> None:
    conn = connection(max_header_bytes=1024)
    conn.receive_data(b"GET / HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 2000)
    with pytest.raises(ApiError) as e:
        conn.next_request()
    assert e.value.status == 431


def test_too_many_headers_is_431() -> None:
    conn = connection(max_header_count=5)
    conn.receive_data(client_bytes("GET", "/", headers=[(f"x-{i}", "v") for i in range(10)]))
    with pytest.raises(ApiError) as e:
        conn.next_request()
    assert e.value.status == 431


@pytest.mark.parametrize("raw", [b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\n\r\n",  # no Host in 1.1
                                 b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: nope\r\n\r\n"])
def test_malformed_is_400_and_error_can_still_be_sent(raw: bytes) -> None:
    conn = connection()
    conn.receive_data(raw)
    with pytest.raises(ApiError) as e:
        conn.next_request()
    assert e.value.status == 400
    out = conn.send_error(e.value, "rid")
    assert out.startswith(b"HTTP/1.1 400") and b'"request_id":"rid"' in out.replace(b" ", b"")


@pytest.mark.parametrize("line", [b"Authorization: Bearer sec\x00ret-token", b"Authori zation: Bearer secret-token",
                                  b"Authorization : Bearer secret-token", b"x-api-key\x01: secret-token"])
def test_a_malformed_header_line_is_never_quoted_back(line: bytes) -> None:
    # h11 quotes the offending line ("illegal header line: bytearray(b'Authorization: Bearer ...')"): a token
    # in it came back in the 400's body
    conn = connection()
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n" + line + b"\r\n\r\n")
    with pytest.raises(ApiError) as e:
        conn.next_request()
    out = conn.send_error(e.value, "rid")
    assert e.value.status == 400 and b"secret" not in out and b"sec\\x00ret" not in out
    assert "malformed HTTP request: " in e.value.message


def test_error_after_whole_request_keeps_connection() -> None:
    conn = connection()
    conn.receive_data(client_bytes("GET", "/nope"))
    assert isinstance(conn.next_request(), HttpRequest)
    out = conn.send_error(InvalidParameter("bad"), "r")
    assert b"connection: close" not in out.lower() and conn.start_next_cycle()


def test_http10_and_connection_close_are_not_kept_alive() -> None:
    conn = connection()
    conn.receive_data(b"GET / HTTP/1.0\r\n\r\n")
    req = conn.next_request()
    assert isinstance(req, HttpRequest) and not req.keep_alive
    conn.send_response(200, [], b"x")
    assert not conn.start_next_cycle()
    conn = connection()
    conn.receive_data(client_bytes("GET", "/", headers=[("connection", "close")]))
    assert not conn.next_request().keep_alive  # type: ignore[union-attr]
    assert b"connection: close" in conn.send_response(200, [], b"").lower()


def test_peer_close() -> None:
    conn = connection()
    conn.receive_data(b"")
    assert isinstance(conn.next_request(), ConnectionClosed)
    conn = connection()
    conn.receive_data(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nab")
    assert isinstance(conn.next_request(), NeedData)
    conn.receive_data(b"")
    assert isinstance(conn.next_request(), ConnectionClosed)


def test_expect_100_continue() -> None:
    conn = connection()
    conn.receive_data(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\nexpect: 100-continue\r\n\r\n")
    ev = conn.next_request()
    assert isinstance(ev, NeedData) and ev.to_send.startswith(b"HTTP/1.1 100 ")
    conn.receive_data(b"abc")
    req = conn.next_request()
    assert isinstance(req, HttpRequest) and req.body == b"abc"


def test_upgrade_carries_trailing_data() -> None:
    conn = connection()
    conn.receive_data(client_bytes("GET", "/ws", headers=[("upgrade", "websocket"), ("connection", "Upgrade")])
                      + b"\x81\x85first-frame")
    up = conn.next_request()
    assert isinstance(up, Upgrade) and up.request.path == "/ws"
    assert up.trailing_data == b"\x81\x85first-frame"
    assert isinstance(conn.next_request(), NeedData)


def test_upgrade_refused_with_plain_response_goes_on_as_http() -> None:
    conn = connection()
    conn.receive_data(client_bytes("GET", "/a", headers=[("upgrade", "h2c"), ("connection", "Upgrade")])
                      + client_bytes("GET", "/b"))
    up = conn.next_request()
    assert isinstance(up, Upgrade)
    conn.send_response(404, [], b"")
    assert conn.start_next_cycle()
    req = conn.next_request()
    assert isinstance(req, HttpRequest) and req.path == "/b"


def _drain(conn: HttpConnection, data: bytes) -> list[HttpRequest]:
    """Feed byte by byte; answer every request."""
    got: list[HttpRequest] = []
    for i in range(len(data)):
        conn.receive_data(data[i:i + 1])
        while True:
            ev = conn.next_request()
            if not isinstance(ev, HttpRequest):
                break
            got.append(ev)
            conn.send_response(200, [], b"")
            conn.start_next_cycle()
    return got


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["GET", "POST", "DELETE"]),
                          st.text("abcxyz/_-", min_size=0, max_size=12),
                          st.binary(max_size=40), st.booleans()), min_size=1, max_size=3))
def test_property_byte_by_byte_equals_whole(reqs: list[tuple[str, str, bytes, bool]]) -> None:
    data = b"".join(client_bytes(m, "/" + p, b, [("transfer-encoding", "chunked")] if chunked and b else None)
                    for m, p, b, chunked in reqs)
    got = _drain(connection(), data)
    assert [(r.method, r.path, r.body) for r in got] == [(m, "/" + p, b) for m, p, b, _ in reqs]


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=200))
def test_property_garbage_never_crashes(data: bytes) -> None:
    conn = connection(max_body_bytes=50)
    try:
        _drain(conn, data)
    except ApiError as e:
        assert e.status in (400, 413, 431)
