"""`--max-connections`: the listener's protocol factory, and the short life of a connection past the limit.

A connection past the limit gets a 503 JSON with Retry-After at once, before its request is read (its
bytes are never parsed), then a lingering close: our side is shut for writing and what the client still
sends is read and dropped until it closes or `LINGER_S` passes (as after any refusal). Closing with its request unread would
make the kernel send a reset, which can destroy the 503 before the client reads it. A refused connection
is not one of the server's connections (it never counts against the limit) and costs a second at most.
"""
from __future__ import annotations

import asyncio

from protocol.errors import Overloaded
from protocol.http import HttpConnection
from server.connection import LINGER_S, HttpProtocol
from server.context import new_request_id
from server.state import ServerState


def accept(state: ServerState) -> asyncio.Protocol:
    """The protocol for a new connection: served, or refused when `max_connections` are open."""
    if len(state.connections) >= state.config.max_connections:
        return RefusedConnection(state)
    return HttpProtocol(state)


class RefusedConnection(asyncio.Protocol):
    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        cfg = self.state.config
        err = Overloaded(f"too many connections (at most {cfg.max_connections})", status=503,
                         retry_after_s=cfg.retry_after_s)
        self.state.metrics.connection_cut("max_connections")
        self.state.metrics.request_done("unknown", err.status)
        self.state.metrics.error(err.code)
        http = HttpConnection(max_header_bytes=cfg.max_header_bytes, max_body_bytes=cfg.max_body_bytes)
        self.transport.write(http.send_error(err, new_request_id()))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._timer = asyncio.get_running_loop().call_later(LINGER_S, self.transport.close)

    def data_received(self, data: bytes) -> None:
        pass  # the request is not for us: read only so that the close is a FIN, not a reset

    def eof_received(self) -> bool | None:
        return None  # the client is done: close

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
