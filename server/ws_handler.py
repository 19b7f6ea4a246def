"""The socket side every WebSocket handler shares after the upgrade: frames in, close, shutdown, one end.

The public task connection (server.ws) and the backend's internal job socket (server.backend) differ only
in what a message means and what ending cancels; both subclass `WsHandler`.
"""
from __future__ import annotations

from typing import Protocol

from protocol.websocket import WebSocketSession, WsBinary, WsClosed, WsMessage, WsSend
from server.flow_control import FlowControl

CLOSE_GOING_AWAY = 1001


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

    def data_received(self, data: bytes) -> None:
        for event in self.session.receive_data(data):
            if isinstance(event, WsSend):
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
