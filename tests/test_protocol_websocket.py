from __future__ import annotations

import h11
import pytest
from wsproto import WSConnection
from wsproto.connection import ConnectionType
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Message,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from protocol.errors import ApiError
from protocol.http import HttpConnection, Upgrade
from protocol.websocket import WebSocketSession, WsClosed, WsMessage, WsSend
from server.config import ServerConfig


def connection(**limits: int) -> HttpConnection:
    """A connection with the server's default limits (server/config.py holds the one default of each)."""
    defaults = ServerConfig()
    return HttpConnection(**{"max_header_bytes": defaults.max_header_bytes,
                             "max_body_bytes": defaults.max_body_bytes, **limits})


def handshake(extra: bytes = b"") -> tuple[WSConnection, WebSocketSession]:
    client = WSConnection(ConnectionType.CLIENT)
    raw = client.send(Request(host="x", target="/api-ws/v1/audio/speech",
                              extra_headers=[(b"authorization", b"Bearer t")]))
    conn = connection()
    conn.receive_data(raw + extra)
    up = conn.next_request()
    assert isinstance(up, Upgrade) and up.request.header("authorization") == "Bearer t"
    return client, WebSocketSession(up, max_message_bytes=100)


def accepted() -> tuple[WSConnection, WebSocketSession]:
    client, session = handshake()
    client.receive_data(session.accept_bytes())
    assert isinstance(next(client.events()), AcceptConnection)
    return client, session


def client_events(client: WSConnection, data: bytes) -> list[object]:
    client.receive_data(data)
    return list(client.events())


def test_upgrade_accepted_by_wsproto_client_and_text_roundtrip() -> None:
    client, session = accepted()
    assert session.receive_data(client.send(Message(data="你好"))) == [WsMessage("你好")]
    (ev,) = client_events(client, session.send_text('{"a":1}'))
    assert isinstance(ev, TextMessage) and ev.data == '{"a":1}'


def test_frames_sent_with_the_handshake_are_kept() -> None:
    client = WSConnection(ConnectionType.CLIENT)
    raw = client.send(Request(host="x", target="/ws"))
    # A client may pipeline its first frame; build it on a second client already "open".
    other, _ = accepted()
    frame = other.send(Message(data="early"))
    conn = connection()
    conn.receive_data(raw + frame)
    up = conn.next_request()
    assert isinstance(up, Upgrade)
    session = WebSocketSession(up)
    session.accept_bytes()
    assert session.receive_data(b"") == [WsMessage("early")]


def test_reject_with_plain_http_401() -> None:
    client, session = handshake()
    out = session.reject_bytes(401, b'{"code":"Unauthorized"}')
    events = client_events(client, out)
    assert isinstance(events[0], RejectConnection) and events[0].status_code == 401
    assert b"".join(e.data for e in events if isinstance(e, RejectData)) == b'{"code":"Unauthorized"}'


def test_invalid_handshake_raises() -> None:
    c = h11.Connection(h11.CLIENT)
    raw = c.send(h11.Request(method="GET", target="/ws", headers=[
        ("host", "x"), ("upgrade", "websocket"), ("connection", "upgrade"), ("sec-websocket-version", "8"),
        ("sec-websocket-key", "abc")])) + c.send(h11.EndOfMessage())
    conn = connection()
    conn.receive_data(raw)
    up = conn.next_request()
    assert isinstance(up, Upgrade)
    with pytest.raises(ApiError) as e:
        WebSocketSession(up).accept_bytes()
    assert e.value.status == 426


def test_fragmented_message_reassembled() -> None:
    client, session = accepted()
    data = client.send(Message(data="ab", message_finished=False)) + client.send(Message(data="cd"))
    assert session.receive_data(data) == [WsMessage("abcd")]


def test_ping_answered_with_pong() -> None:
    client, session = accepted()
    (send,) = session.receive_data(client.send(Ping(payload=b"hi")))
    assert isinstance(send, WsSend)
    (pong,) = client_events(client, send.data)
    assert isinstance(pong, Pong) and pong.payload == b"hi"


def test_too_big_message_closes_1009() -> None:
    client, session = accepted()
    events = session.receive_data(client.send(Message(data="x" * 101)))
    assert isinstance(events[0], WsSend) and events[-1] == WsClosed(1009, events[-1].reason)
    (close,) = client_events(client, events[0].data)
    assert isinstance(close, CloseConnection) and close.code == 1009
    assert session.send_text("late") == b""


def test_binary_message_closes_1003() -> None:
    client, session = accepted()
    events = session.receive_data(client.send(Message(data=b"\x00")))
    assert events[-1].code == 1003  # type: ignore[union-attr]


def test_client_close_is_echoed() -> None:
    client, session = accepted()
    events = session.receive_data(client.send(CloseConnection(code=1000, reason="bye")))
    assert isinstance(events[0], WsSend) and events[1] == WsClosed(1000, "bye")
    (echo,) = client_events(client, events[0].data)
    assert isinstance(echo, CloseConnection) and echo.code == 1000


def test_server_close_and_eof() -> None:
    client, session = accepted()
    (close,) = client_events(client, session.send_close(1000, "done"))
    assert isinstance(close, CloseConnection) and close.code == 1000
    assert session.receive_data(client.send(close.response())) == [WsClosed(1000, "done")]
    _, session2 = accepted()
    assert session2.receive_data(None) == [WsClosed(1006, "")]


def test_bad_frame_closes_with_protocol_error() -> None:
    _, session = accepted()
    events = session.receive_data(b"\x81\x05hello")  # unmasked client frame: RFC 6455 violation
    assert isinstance(events[0], WsSend) and isinstance(events[-1], WsClosed) and events[-1].code == 1002


def test_a_ping_after_our_close_is_ignored() -> None:
    """Found by tests/fuzz/fuzz_ws.py: the peer may ping before it reads our close (the backend closes after
    each job and waits); answering it made wsproto raise LocalProtocolError out of receive_data."""
    client, session = accepted()
    session.send_close(1000, "done")
    assert session.receive_data(client.send(Ping(payload=b"p"))) == []
    assert session.receive_data(client.send(CloseConnection(code=1000))) == [WsClosed(1000, "")]
