"""`HttpConnection` driven the way server/connection.py drives it, recording what a client would see.

Every request is answered (200: whole, or streamed for every other one) and the connection goes on while
`start_next_cycle` allows; an `ApiError` is answered with `send_error` and ends the connection, as the
server does; an upgrade gets the WebSocket handshake. The trace holds the parsed requests, the upgrade
(its handshake's answer, every byte after it), the peer's close and the error: what must not depend on
how the bytes were split. Anything but an `ApiError` escaping is a bug.
"""
from __future__ import annotations

import json

from protocol.errors import ApiError
from protocol.http import ConnectionClosed, HttpConnection, HttpRequest, NeedData, Upgrade
from protocol.websocket import WebSocketSession

# The header limit sits above any fuzz input: h11 bounds only an *incomplete* head, so a lower one makes
# a big head's answer depend on the split (server/connection.py measures heads that arrived whole).
LIMITS = {"max_header_bytes": 64 * 1024, "max_body_bytes": 256, "max_header_count": 20}
ERROR_STATUSES = (400, 413, 431)
CONTINUE = b"HTTP/1.1 100 \r\n\r\n"

Trace = list[tuple]


def _fields(req: HttpRequest) -> tuple:
    return (req.method, req.path, req.query, tuple(req.header_list), req.body, req.keep_alive, req.http_version)


def _split_response(out: bytes) -> tuple[int, dict[str, str], bytes]:
    head, sep, body = out.partition(b"\r\n\r\n")
    assert sep, f"response without an end of head: {out!r}"
    status_line, *lines = head.decode("latin-1").split("\r\n")
    version, status, *_ = status_line.split(" ", 2)
    assert version == "HTTP/1.1", status_line
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status), headers, body


def check_answer(out: bytes, status: int, head_only: bool) -> dict[str, str]:
    """A whole response with `status`, its body exactly Content-Length long (empty for HEAD)."""
    got, headers, body = _split_response(out)
    assert got == status, (got, status)
    assert len(body) == (0 if head_only else int(headers["content-length"])), (headers, body)
    return headers


def _answer_error(conn: HttpConnection, err: ApiError) -> None:
    assert err.status in ERROR_STATUSES, repr(err)
    out = conn.send_error(err, "rid")
    if out:  # b"" only when a response had already begun
        got, headers, body = _split_response(out)
        assert got == err.status and headers["content-type"] == "application/json", out
        if body:  # none when the failing request was a HEAD
            assert len(body) == int(headers["content-length"]) and json.loads(body)["code"] == err.code, out
    assert conn.must_close and not conn.start_next_cycle()
    conn.send_close()


def _stream(conn: HttpConnection, req: HttpRequest) -> None:
    """start_stream / send_chunk / end_stream: chunked on HTTP/1.1, delimited by the close before it."""
    out = conn.start_stream(200, [("content-type", "text/event-stream")])
    out += conn.send_chunk(b"ok") + conn.send_chunk(b"") + conn.end_stream()
    status, headers, body = _split_response(out)
    assert status == 200 and "content-length" not in headers, out
    if req.method == "HEAD":
        assert body == b"", out
    elif req.http_version >= "1.1":  # h11 reads any HTTP/d.d; 1.1 and later get chunked
        assert headers["transfer-encoding"] == "chunked" and body == b"2\r\nok\r\n0\r\n\r\n", out
    else:
        assert headers["connection"] == "close" and body == b"ok" and conn.must_close, out


def _handshake(upgrade: Upgrade) -> int:
    """The WebSocket handshake on whatever asked to switch: 101, or a 400/426 sent as a plain answer."""
    session = WebSocketSession(upgrade)
    try:
        out = session.accept_bytes()
    except ApiError as err:
        assert err.status in (400, 426), repr(err)
        check_answer(session.reject_bytes(err.status, b"{}"), err.status, upgrade.request.method == "HEAD")
        return err.status
    assert out.startswith(b"HTTP/1.1 101 ") and b"\r\nsec-websocket-accept: " in out, out
    return 101


def _pump(conn: HttpConnection, trace: Trace) -> bool:
    """`next_request` until it needs data; True when the connection is over (closed, errored, upgraded)."""
    while True:
        try:
            event = conn.next_request()
        except ApiError as err:
            _answer_error(conn, err)
            trace.append(("error", type(err).__name__, err.status, str(err.code)))
            return True
        if isinstance(event, NeedData):
            assert event.to_send in (b"", CONTINUE), event
            return False
        if isinstance(event, ConnectionClosed):
            trace.append(("closed",))
            return True
        if isinstance(event, Upgrade):
            trace.append(("upgrade", *_fields(event.request), _handshake(event), event.trailing_data))
            return True
        assert isinstance(event, HttpRequest), event
        trace.append(("request", *_fields(event)))
        if len(trace) % 2:
            out = conn.send_response(200, [("content-type", "text/plain")], b"ok")
            check_answer(out, 200, event.method == "HEAD")
        else:  # every other one streamed, as SSE and audio streams are
            _stream(conn, event)
        if not conn.start_next_cycle():
            trace.append(("end",))
            return True


def run_http(pieces: list[bytes], **limits: int) -> Trace:
    """Feed `pieces`, then EOF; the trace of what happened."""
    conn = HttpConnection(**{**LIMITS, **limits})
    trace: Trace = []
    stream = [*pieces, b""]  # b"": the peer closed
    for i, piece in enumerate(stream):
        conn.receive_data(piece)
        if _pump(conn, trace):
            if trace[-1][0] == "upgrade":  # what follows belongs to the WebSocket: all of it, in order
                *rest, trailing = trace[-1]
                trace[-1] = (*rest, trailing + b"".join(stream[i + 1:]))
            return trace
    raise AssertionError("EOF did not end the connection")
