"""`WebSocketSession` after an accepted handshake, fed any bytes: messages, pongs and one close, never an
exception. What it writes must parse cleanly on a real (wsproto) client; the trace holds what it means."""
from __future__ import annotations

from wsproto import WSConnection
from wsproto.connection import ConnectionType
from wsproto.events import AcceptConnection, CloseConnection, Pong, Request
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from protocol.http import HttpConnection, Upgrade
from protocol.websocket import WebSocketSession, WsBinary, WsClosed, WsMessage, WsSend

MAX_MESSAGE_BYTES = 64
# A close the session reports: the peer's own (any code RFC 6455 lets it send) or ours.
VALID_CLOSE_CODES = {*range(1000, 1004), *range(1005, 1014), *range(3000, 5000)}  # RFC 6455 7.4 + IANA


def open_session(binary: bool = False, max_message_bytes: int = MAX_MESSAGE_BYTES,
                 ) -> tuple[WSConnection, WebSocketSession]:
    """A real client's handshake through HttpConnection, accepted: (client, session)."""
    client = WSConnection(ConnectionType.CLIENT)
    conn = HttpConnection(max_header_bytes=8192, max_body_bytes=1024)
    conn.receive_data(client.send(Request(host="x", target="/ws")))
    upgrade = conn.next_request()
    assert isinstance(upgrade, Upgrade), upgrade
    session = WebSocketSession(upgrade, max_message_bytes, binary=binary)
    client.receive_data(session.accept_bytes())
    assert isinstance(next(client.events()), AcceptConnection)
    return client, session


def _close_code(code: int) -> int | str:
    """A message both too big and not UTF-8 is refused with whichever the cut shows first: 1009 when a
    valid prefix already passes the limit, 1007 when wsproto decodes the whole frame at once."""
    return "1007|1009" if code in (1007, 1009) else code


def _sent(client: WSConnection, data: bytes) -> list[tuple]:
    """What the session wrote, as a real client reads it (a close's free-text reason left out)."""
    try:
        client.receive_data(data)
        events = list(client.events())
    except (LocalProtocolError, RemoteProtocolError) as exc:  # pragma: no cover - a finding
        raise AssertionError(f"the session wrote bytes a client cannot read: {data!r}") from exc
    out: list[tuple] = []
    for event in events:
        if isinstance(event, Pong):
            out.append(("pong", event.payload))
        else:
            assert isinstance(event, CloseConnection), event
            out.append(("close-sent", _close_code(event.code)))
    return out


def _record(client: WSConnection, event: object) -> list[tuple]:
    if isinstance(event, WsMessage):
        return [("text", event.text)]
    if isinstance(event, WsBinary):
        return [("binary", event.data)]
    if isinstance(event, WsSend):
        return _sent(client, event.data)
    assert isinstance(event, WsClosed), event
    assert event.code in VALID_CLOSE_CODES, event
    return [("closed", _close_code(event.code))]


def run_ws(pieces: list[bytes], binary: bool = False, server_closes_first: bool = False,
           max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple]:
    """Feed `pieces`, then EOF; the events until the first close (a server stops reading there).
    `server_closes_first`: the server has sent its close and waits for the peer's (server/backend.py)."""
    client, session = open_session(binary, max_message_bytes)
    trace: list[tuple] = []
    if server_closes_first:
        trace += _sent(client, session.send_close(1000, "done"))
    stream: list[bytes | None] = [*pieces, None]  # None: EOF
    for i, piece in enumerate(stream):
        events = session.receive_data(piece)
        for event in events:
            trace += _record(client, event)
        if any(isinstance(e, WsClosed) for e in events):
            assert isinstance(events[-1], WsClosed), events  # nothing after the close
            for late in stream[i + 1:]:  # bytes that still arrive must not raise
                session.receive_data(late)
            break
    assert [kind for kind, *_ in trace].count("closed") == 1 and trace[-1][0] == "closed", trace
    assert not session.is_open and session.send_text("late") == b""
    return trace
