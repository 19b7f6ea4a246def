"""One asyncio.Protocol per TCP connection: bytes <-> protocol.http, one handler task at a time.

Deadlines per phase of a request (loop.call_later, one timer at a time), each started once when its
phase begins, so bytes trickled in to look alive do not move them (slowloris):
- idle: nothing of a request yet -> close after `idle_timeout_s` (keep-alive reaper);
- head: its first byte starts `header_timeout_s` for the whole head;
- body: the parsed head starts `body_timeout_s` for the whole body;
  either one passing -> 408 JSON and close;
- busy: a handler runs or a WebSocket took over; no timer, but the write side has its own
  watchdog (server.flow_control: a response nobody reads is cut after `stalled_write_timeout_s`).
While a handler runs, reading continues (so a client that goes away is seen at once and
its task cancelled) until `max_header_bytes` of pipelined input piles up; then it pauses, and
resumes only once no complete request is left in the buffer: a pipelining flood is answered
in order while at most `max_header_bytes` plus one socket read of it sits in memory.
A WebSocket upgrade hands the socket to `server.ws.WsConnection`; while its writes back up,
its reading pauses too (a client that sends but never reads cannot grow our buffers).
"""
from __future__ import annotations

import asyncio
import logging

from protocol.errors import (
    ApiError,
    HeadersTooLarge,
    InternalError,
    NotFound,
    Overloaded,
    RequestTimeout,
    Unauthorized,
    http_error,
)
from protocol.http import ConnectionClosed, HttpConnection, HttpRequest, NeedData, Upgrade
from protocol.internal import JOBS_PATH
from protocol.websocket import WebSocketSession, offered_subprotocols
from server.auth import SUBPROTOCOL, ws_authorized
from server.backend import JobSocket, internal_authorized
from server.context import Ctx, new_request_id
from server.flow_control import FlowControl
from server.log_lines import log_request, request_id_var
from server.paths import WS_SPEECH, route_name
from server.rate_limit import TokenBucket
from server.routes import resolve
from server.state import ServerState
from server.ws import WsConnection

log = logging.getLogger("server.connection")
LINGER_S = 1.0  # after a refusal, how long what the client still sends is read and dropped before closing


class ClientGone(Exception):
    """The peer closed the connection: stop producing."""


class _Responder:
    def __init__(self, proto: HttpProtocol) -> None:
        self._proto = proto
        self.started = False
        self.status = 0

    async def _write(self, data: bytes) -> None:
        if self._proto.closed:
            raise ClientGone()
        self._proto.write(data)
        await self._proto.flow.drain()
        if self._proto.closed:
            raise ClientGone()

    async def respond(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.started, self.status = True, status
        await self._write(self._proto.conn.send_response(status, headers, body))

    async def error(self, err: ApiError, request_id: str) -> None:
        self.started, self.status = True, err.status
        await self._write(self._proto.conn.send_error(err, request_id))

    async def start_stream(self, status: int, headers: list[tuple[str, str]]) -> None:
        self.started, self.status = True, status
        await self._write(self._proto.conn.start_stream(status, headers))

    async def send_chunk(self, data: bytes) -> None:
        await self._write(self._proto.conn.send_chunk(data))

    async def end_stream(self) -> None:
        await self._write(self._proto.conn.end_stream())


class HttpProtocol(asyncio.Protocol):
    def __init__(self, state: ServerState) -> None:
        self.state = state
        cfg = state.config
        self.conn = HttpConnection(max_header_bytes=cfg.max_header_bytes, max_body_bytes=cfg.max_body_bytes)
        self.loop = asyncio.get_event_loop()
        self.transport: asyncio.Transport | None = None
        self.flow: FlowControl
        self.task: asyncio.Task[None] | None = None
        self.ws: WsConnection | JobSocket | None = None  # after an upgrade
        self.closed = False
        self._timer: asyncio.TimerHandle | None = None
        self._phase = "idle"  # idle | head | body | busy: which deadline runs (module docstring)
        self._lingering = False  # a refusal was sent: input is dropped until the client closes or LINGER_S

    # ---- asyncio.Protocol ----
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport subclass
        self.flow = FlowControl(self.transport, self.state.config.stalled_write_timeout_s, self._write_stalled)
        self.state.connections.add(self)
        self.state.metrics.connection_opened()
        self._enter("idle")

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        self._disarm()
        self.flow.release()
        self.state.connections.discard(self)
        self.state.metrics.connection_closed()
        if self.task is not None:
            self.task.cancel()  # frees the engine job at once (EngineStream.close)
        if self.ws is not None:
            self.ws.connection_lost()

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return
        if self.ws is not None:
            self.ws.data_received(data)
            return
        self.conn.receive_data(data)
        if self.task is None:
            self._pump()
            self._await_rest()
        self._bound_backlog()

    def eof_received(self) -> bool | None:
        return None  # close our side too: HTTP clients half-closing have gone away

    def pause_writing(self) -> None:
        self.flow.pause_writing()
        if self.ws is not None:  # its messages make writes (events, pongs): take no more until these drain
            self.flow.pause_reading()

    def resume_writing(self) -> None:
        self.flow.resume_writing()
        if self.ws is not None and not self.closed:
            self.ws.writable_again()
            self.flow.resume_reading()

    # ---- helpers used by responders / ws ----
    def write(self, data: bytes) -> None:
        if data and not self.closed and self.transport is not None:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if self.ws is not None:
            self.ws.shutdown()
        if self.transport is not None:
            self.transport.abort()

    def close_if_idle(self) -> None:
        if self.task is None and self.ws is None:
            self.close()

    # ---- deadlines ----
    def _enter(self, phase: str) -> None:
        """Start `phase` and its deadline (none while busy)."""
        self._phase = phase
        self._disarm()
        cfg = self.state.config
        delay = {"idle": cfg.idle_timeout_s, "head": cfg.header_timeout_s, "body": cfg.body_timeout_s}.get(phase)
        if delay is not None:
            self._timer = self.loop.call_later(delay, self._on_timeout)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _await_rest(self) -> None:
        """No complete request is buffered: the deadline of the part that is (a phase starts only once)."""
        if self.task is not None or self.ws is not None or self.closed or self._lingering:
            return
        phase = "body" if self.conn.reading_body else "head" if self.conn.buffered_bytes else "idle"
        if phase != self._phase and not (phase == "idle" and self._phase in ("head", "body")):
            self._enter(phase)

    def _on_timeout(self) -> None:
        self._timer = None
        if self.task is not None or self.ws is not None:
            return
        if self._phase in ("head", "body"):  # a request was coming: say why it is dropped
            head = self._phase == "head"
            limit = self.state.config.header_timeout_s if head else self.state.config.body_timeout_s
            err = RequestTimeout(f"request {self._phase} not received within {limit:g} s")
            self.state.metrics.connection_cut("header_timeout" if head else "body_timeout")
            self.state.metrics.request_done("unknown", err.status)
            self.state.metrics.error(err.code)
            self.write(self.conn.send_error(err, new_request_id()))
            self._close_after_answer()
            return
        self.close()

    def _write_stalled(self) -> None:
        """The watchdog: a full write buffer drained nothing for `stalled_write_timeout_s`. The peer stopped
        reading; aborting drops what it never read, and connection_lost cancels the work (engine job too)."""
        self.state.metrics.connection_cut("stalled_write")
        log.info("cut a connection whose client stopped reading for %.1f s",
                 self.state.config.stalled_write_timeout_s)
        if self.transport is not None:
            self.transport.abort()

    # ---- request loop ----
    def _pump(self) -> None:
        while self.task is None and self.ws is None and not self.closed:
            try:
                event = self.conn.next_request()
            except ApiError as err:
                self._refuse(err)
                return
            if isinstance(event, NeedData):
                self.write(event.to_send)
                return
            if isinstance(event, ConnectionClosed):
                self.close()
                return
            self._enter("busy")
            head = event.request if isinstance(event, Upgrade) else event
            if _head_bytes(head) > self.state.config.max_header_bytes:
                # h11 only bounds an *incomplete* head; one that arrived whole is measured here
                self._refuse(HeadersTooLarge("request headers too large"))
                return
            if isinstance(event, Upgrade):
                self._upgrade(event)
                return
            self.task = self.loop.create_task(self._handle(event))
            self.state.tasks.add(self.task)

    def _begin(self, rid: str) -> str:
        """A request starts: its id goes on every response to it (X-Request-Id) and on its log lines (in
        the handler's task; after an upgrade, in this connection's callbacks and the tasks they start)."""
        self.conn.request_id = rid
        request_id_var.set(rid)
        return rid

    def _refuse(self, err: ApiError) -> None:
        """Malformed / oversized input: answer once and close (the request cannot be trusted further)."""
        self.state.metrics.request_done("unknown", err.status)
        self.state.metrics.error(err.code)
        rid = new_request_id()
        self.conn.request_id = rid  # the refusal's X-Request-Id (no handler will run for it)
        status, headers, body = http_error(err, rid)
        # Say it closes: a head refused only after it arrived whole (431) would otherwise read as keep-alive.
        self.write(self.conn.send_response(status, [*headers, ("connection", "close")], body))
        log_request("-", "", err.status, 0.0, request_id=rid)
        self._close_after_answer()

    def _close_after_answer(self) -> None:
        """A refusal is out: shut our side for writing, then read and drop what the client still sends (the
        rest of an upload too large, a trickled head) until it closes or LINGER_S passes. Closing with its
        bytes unread would make the kernel reset the connection, which can destroy the answer unread."""
        self._lingering = True
        self._enter("busy")
        self.flow.resume_reading()
        assert self.transport is not None
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._timer = self.loop.call_later(LINGER_S, self.close)

    async def _handle(self, req: HttpRequest) -> None:
        rid = self._begin(new_request_id())
        out = _Responder(self)
        ctx = Ctx(self.state, req, rid, out, self.loop.time())
        try:
            await resolve(ctx)(ctx)
        except ApiError as err:
            await self._error(out, err, rid)
        except (ClientGone, asyncio.CancelledError):
            pass  # the client went away; its engine job was cancelled on the way out
        except Exception:
            log.exception("internal error in %s %s (request %s)", req.method, req.path, rid)
            await self._error(out, InternalError(), rid)
        finally:
            self.state.metrics.request_done(route_name(req.path), out.status or 499)
            log_request(req.method, req.path, out.status or 499, self.loop.time() - ctx.arrived_s)
            self.state.tasks.discard(self.task)  # type: ignore[arg-type]
            self.task = None
        self._next_cycle()

    async def _error(self, out: _Responder, err: ApiError, rid: str) -> None:
        self.state.metrics.error(err.code)
        if out.started:  # mid-stream failure without its own framing: all we can do is close
            self.close()
            return
        try:
            await out.error(err, rid)
        except ClientGone:
            pass

    def _next_cycle(self) -> None:
        if self.closed:
            return
        if self.state.draining or not self.conn.start_next_cycle():
            self.close()
            return
        self._enter("idle")
        self._pump()  # a pipelined request may already be buffered
        if self.task is None and not self.closed and not self._lingering:  # no whole request buffered: read
            if self.ws is None or self.flow.writable:
                self.flow.resume_reading()
            self._await_rest()
        self._bound_backlog()

    def _bound_backlog(self) -> None:
        """Input that piles up behind a running handler (pipelining) waits in the kernel past this bound."""
        if self.task is not None and self.conn.buffered_bytes > self.state.config.max_header_bytes:
            self.flow.pause_reading()

    # ---- WebSocket ----
    def _upgrade(self, upgrade: Upgrade) -> None:
        if self.state.config.role == "backend":
            self._upgrade_internal(upgrade)
            return
        session = WebSocketSession(upgrade, self.state.config.max_ws_message_bytes)
        req, rid = upgrade.request, self._begin(new_request_id())
        offered = offered_subprotocols(upgrade)
        err: ApiError | None = None
        if req.path.rstrip("/") != WS_SPEECH:
            err = NotFound(f"no WebSocket route for {req.path}")
        elif not ws_authorized(req.headers, offered, self.state.config.tokens):
            err = Unauthorized()
        elif self.state.draining:
            err = Overloaded("server is shutting down")
        if err is None:
            try:  # answer the name only, never the token entry (server/auth.py)
                accept = session.accept_bytes(SUBPROTOCOL if SUBPROTOCOL in offered else None)
            except ApiError as exc:
                err = exc
        self.state.metrics.request_done("ws_speech", err.status if err else 101)
        log_request(req.method, req.path, err.status if err else 101, 0.0)
        if err is not None:
            self.state.metrics.error(err.code)
            status, _json_headers, body = http_error(err, rid)  # reject_bytes sets its own (JSON, close)
            self.write(session.reject_bytes(status, body))
            self.close()
            return
        self.write(accept)
        self.ws = WsConnection(self.state, session, self)
        self._limit_pings(self.ws)
        self.ws.data_received(b"")  # frames that arrived with the upgrade request


    def _upgrade_internal(self, upgrade: Upgrade) -> None:
        """--role backend: one internal job per WebSocket (binary frames allowed, a voice can be large)."""
        session = WebSocketSession(upgrade, self.state.config.max_body_bytes, binary=True)
        req, rid = upgrade.request, self._begin(new_request_id())
        err: ApiError | None = None
        if req.path.rstrip("/") != JOBS_PATH:
            err = NotFound(f"no WebSocket route for {req.path}")
        elif not internal_authorized(self.state, req.header("authorization")):
            err = Unauthorized()
        elif self.state.draining:
            err = Overloaded("backend is draining", status=503, retry_after_s=self.state.config.retry_after_s)
        if err is None:
            try:
                accept = session.accept_bytes()
            except ApiError as exc:
                err = exc
        if err is not None:
            status, _json_headers, body = http_error(err, rid)
            self.write(session.reject_bytes(status, body))
            self.close()
            return
        self.write(accept)
        self.ws = JobSocket(self.state, session, self)
        self._limit_pings(self.ws)
        self.ws.data_received(b"")

    def _limit_pings(self, ws: WsConnection | JobSocket) -> None:
        rate = self.state.config.ws_max_pings_per_s
        ws.limit_pings(TokenBucket(rate, burst=max(rate, 1.0), clock=self.loop.time),
                       lambda: self.state.metrics.connection_cut("ws_ping_flood"))


def _head_bytes(req: HttpRequest) -> int:
    return len(req.path) + len(req.query) + sum(len(k) + len(v) + 4 for k, v in req.header_list)
