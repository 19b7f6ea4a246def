"""The socket side every WebSocket handler shares after the upgrade: frames in, close, shutdown, one end.

The public task connection (server.ws) and the backend's internal job socket (server.backend) differ only
in what a message means and what ending cancels; both subclass `WsHandler`.

Pings are answered within a rate (`limit_pings`: a flood beyond it closes with 1008), and while the
socket's writes back up only the latest ping's pong waits (RFC 6455 5.5.3): pongs never pile up.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from protocol.websocket import WebSocketSession, WsBinary, WsClosed, WsMessage, WsPong, WsSend
from server.flow_control import FlowControl
from server.rate_limit import TokenBucket

CLOSE_GOING_AWAY = 1001
CLOSE_POLICY_VIOLATION = 1008


class Socket(Protocol):
    """The connection underneath (server.connection.HttpProtocol after the upgrade)."""

    flow: FlowControl

    def write(self, data: bytes) -> None: ...
    def close(self) -> None: ...


class WsHandler:
    shutdown_reason = "server shutting down"  # the close frame's reason when the drain deadline passes

    def __init__(self, session: WebSocketSession, proto: Socket) -> None:
        self.session = session
        self.proto = proto
        self.closed = False
        self._pings: TokenBucket | None = None
        self._on_flood: Callable[[], None] = lambda: None
        self._late_pong = b""  # the latest ping's answer, held while writes back up

    def limit_pings(self, bucket: TokenBucket, on_flood: Callable[[], None]) -> None:
        """Pings beyond `bucket`'s rate close the socket with 1008 (`on_flood` counts it)."""
        self._pings, self._on_flood = bucket, on_flood

    def data_received(self, data: bytes) -> None:
        for event in self.session.receive_data(data):
            if isinstance(event, WsPong):
                if not self._pong(event.data):
                    return
            elif isinstance(event, WsSend):
                self.proto.write(event.data)
            elif isinstance(event, WsMessage):
                self._message(event.text)
            elif isinstance(event, WsBinary):
                self._message(event.data)
            elif isinstance(event, WsClosed):
                self._end()
                self.proto.close()

    def connection_lost(self) -> None:
        self._end()

    def writable_again(self) -> None:
        """The socket's writes drained below the low-water mark: the held pong goes out."""
        pong, self._late_pong = self._late_pong, b""
        self.proto.write(pong)

    def _pong(self, data: bytes) -> bool:
        """Answer a ping; False when it was one too many (the socket is closing)."""
        if self._pings is not None and not self._pings.take():
            self._on_flood()
            self._end()
            self.proto.write(self.session.send_close(CLOSE_POLICY_VIOLATION, "too many pings"))
            self.proto.close()
            return False
        if self.proto.flow.writable:
            self.proto.write(data)
        else:
            self._late_pong = data
        return True

    def shutdown(self) -> None:
        """Server drain deadline passed: close politely, cancelling any work."""
        self._end()
        self.proto.write(self.session.send_close(CLOSE_GOING_AWAY, self.shutdown_reason))

    def _end(self) -> None:
        """Once, however the socket ends: cancel what is still running."""
        if self.closed:
            return
        self.closed = True
        self._on_end()

    def _message(self, data: str | bytes) -> None:
        raise NotImplementedError

    def _on_end(self) -> None:
        raise NotImplementedError
