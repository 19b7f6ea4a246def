"""WebSocket session over wsproto, taking over from h11 at the upgrade (no HTTP re-parsing).

The handshake is checked on the already parsed `HttpRequest`; the 101 goes out through the same
h11 connection; then a wsproto framing `Connection` starts with h11's `trailing_data`.
`receive_data` returns what happened: whole text messages (fragments reassembled), bytes the
server must write (pong, close replies) and the close.
"""
from __future__ import annotations

from dataclasses import dataclass

from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage
from wsproto.utilities import generate_accept_token

from protocol.errors import BadRequest, UpgradeRequired
from protocol.http import Upgrade

DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024  # a continue-task text piece is small; 1 MiB is generous
CLOSE_NORMAL = 1000
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_MESSAGE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011


@dataclass(frozen=True)
class WsMessage:
    text: str


@dataclass(frozen=True)
class WsBinary:
    data: bytes  # a whole binary message (sessions made with binary=True only)


@dataclass(frozen=True)
class WsSend:
    data: bytes  # write this to the socket (pong, close reply)


@dataclass(frozen=True)
class WsPong(WsSend):
    """The answer to a ping: a server may rate-limit pings, and while its writes back up it may keep only
    the latest answer (RFC 6455 5.5.3)."""


@dataclass(frozen=True)
class WsClosed:
    code: int
    reason: str = ""


WsEvent = WsMessage | WsBinary | WsSend | WsPong | WsClosed


class HandshakeError(BadRequest):
    pass


def _tokens(value: str | None) -> set[str]:
    return {t.strip().lower() for t in (value or "").split(",") if t.strip()}


def offered_subprotocols(upgrade: Upgrade) -> list[str]:
    """The Sec-WebSocket-Protocol offer, in order; names are case-sensitive (RFC 6455 4.1), so kept as sent."""
    value = upgrade.request.header("sec-websocket-protocol") or ""
    return [p.strip() for p in value.split(",") if p.strip()]


def check_handshake(upgrade: Upgrade) -> str:
    """Validate a WebSocket opening handshake (RFC 6455 4.2.1); returns the Sec-WebSocket-Key."""
    req = upgrade.request
    if req.method != "GET":
        raise HandshakeError("WebSocket upgrade must use GET")
    if "websocket" not in _tokens(req.header("upgrade")):
        raise HandshakeError("Upgrade header must be 'websocket'")
    if "upgrade" not in _tokens(req.header("connection")):
        raise HandshakeError("Connection header must contain 'Upgrade'")
    if req.header("sec-websocket-version") != "13":
        raise UpgradeRequired("unsupported WebSocket version; use 13")
    key = req.header("sec-websocket-key")
    if not key:
        raise HandshakeError("missing Sec-WebSocket-Key")
    return key


class WebSocketSession:
    def __init__(self, upgrade: Upgrade, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 binary: bool = False) -> None:
        """`binary`: binary messages are events (`WsBinary`) instead of a 1003 close (the internal API)."""
        self.upgrade = upgrade
        self._binary = binary
        self._bin_parts: list[bytes] = []
        self._max_message_bytes = max_message_bytes
        self._ws: Connection | None = None
        self._parts: list[str] = []
        self._size = 0
        self._closed = False

    @property
    def request(self):  # the upgrade's HttpRequest (path, headers for auth)
        return self.upgrade.request

    # ---- handshake ----
    def accept_bytes(self, subprotocol: str | None = None) -> bytes:
        """The 101 response (raises HandshakeError/ApiError if the handshake is invalid: answer it
        with `reject_bytes`). Then call `receive_data(b"")` for frames that came with the request.
        `subprotocol`: the one offered name the server picked (a browser fails the connection when it
        offered some and the answer names none)."""
        key = check_handshake(self.upgrade)
        headers = [
            ("upgrade", "websocket"),
            ("connection", "Upgrade"),
            ("sec-websocket-accept", generate_accept_token(key.encode("latin-1")).decode("ascii")),
        ]
        if subprotocol is not None:
            headers.append(("sec-websocket-protocol", subprotocol))
        out = self.upgrade.connection.accept_switch(headers)
        self._ws = Connection(ConnectionType.SERVER, extensions=[], trailing_data=self.upgrade.trailing_data)
        return out

    def reject_bytes(self, status: int, body: bytes, content_type: str = "application/json") -> bytes:
        """A plain HTTP answer instead of the upgrade (e.g. 401 JSON); close the socket after it."""
        self._closed = True
        return self.upgrade.connection.send_response(
            status, [("content-type", content_type), ("connection", "close")], body)

    # ---- frames ----
    @property
    def is_open(self) -> bool:
        return self._ws is not None and self._ws.state is ConnectionState.OPEN

    def receive_data(self, data: bytes | None) -> list[WsEvent]:
        """Bytes from the socket (None = EOF) -> events, in order."""
        ws = self._require()
        if ws.state is ConnectionState.CLOSED:
            return []
        ws.receive_data(data)
        out: list[WsEvent] = []
        for event in ws.events():
            events = self._on_event(ws, event)
            out.extend(events)
            if any(isinstance(e, WsClosed) for e in events):
                break  # nothing after a close matters
        return out

    def _on_event(self, ws: Connection, event: object) -> list[WsEvent]:
        if isinstance(event, TextMessage):
            return self._on_text(event)
        if isinstance(event, Ping):
            if ws.state is not ConnectionState.OPEN:
                return []  # our close is on its way: nothing follows it (wsproto would raise on the pong)
            return [WsPong(ws.send(event.response()))]
        if isinstance(event, BytesMessage):
            if not self._binary:
                return self._fail(CLOSE_UNSUPPORTED_DATA, "binary messages are not supported")
            return self._on_bytes(event)
        if isinstance(event, CloseConnection):
            return self._on_close(ws, event)
        return []  # Pong

    def _on_text(self, event: TextMessage) -> list[WsEvent]:
        self._parts.append(event.data)
        self._size += len(event.data.encode("utf-8"))
        if self._size > self._max_message_bytes:
            return self._fail(CLOSE_MESSAGE_TOO_BIG, f"message larger than {self._max_message_bytes} bytes")
        if not event.message_finished:
            return []
        text = "".join(self._parts)
        self._parts, self._size = [], 0
        return [WsMessage(text)]

    def _on_bytes(self, event: BytesMessage) -> list[WsEvent]:
        self._bin_parts.append(bytes(event.data))
        self._size += len(event.data)
        if self._size > self._max_message_bytes:
            return self._fail(CLOSE_MESSAGE_TOO_BIG, f"message larger than {self._max_message_bytes} bytes")
        if not event.message_finished:
            return []
        data = b"".join(self._bin_parts)
        self._bin_parts, self._size = [], 0
        return [WsBinary(data)]

    def _on_close(self, ws: Connection, event: CloseConnection) -> list[WsEvent]:
        self._closed = True
        out: list[WsEvent] = []
        if ws.state is ConnectionState.REMOTE_CLOSING:  # the peer's close frame: echo it
            out.append(WsSend(ws.send(event.response())))
        elif ws.state is ConnectionState.OPEN:  # a framing error found by wsproto: we close
            out.append(WsSend(ws.send(CloseConnection(code=event.code, reason=event.reason or ""))))
        out.append(WsClosed(int(event.code), event.reason or ""))
        return out

    def _fail(self, code: int, reason: str) -> list[WsEvent]:
        return [WsSend(self.send_close(code, reason)), WsClosed(code, reason)]

    # ---- output ----
    def send_text(self, text: str) -> bytes:
        ws = self._require()
        if ws.state is not ConnectionState.OPEN:
            return b""  # closing: late messages are dropped
        return ws.send(TextMessage(data=text))

    def send_bytes(self, data: bytes) -> bytes:
        ws = self._require()
        if ws.state is not ConnectionState.OPEN:
            return b""
        return ws.send(BytesMessage(data=data))

    def send_close(self, code: int = CLOSE_NORMAL, reason: str = "") -> bytes:
        ws = self._require()
        self._closed = True
        if ws.state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
            return ws.send(CloseConnection(code=code, reason=reason))
        return b""

    def _require(self) -> Connection:
        if self._ws is None:
            raise RuntimeError("WebSocket not accepted yet")
        return self._ws
