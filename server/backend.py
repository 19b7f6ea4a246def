"""`--role backend`: the engine behind the internal API (protocol/internal.py), on the same HTTP/WS layer.

Routes: `GET /health` (liveness: the loop answers), `GET /internal/v1/health` and its alias `GET /ready`
(readiness: the engine is loaded -- it is, once the server listens -- and not draining; 503 + Retry-After
while draining), `GET /metrics` (Prometheus text, internal token), `POST
/internal/v1/features` (prompt features of an uploaded voice, for a frontend without torch), and the
WebSocket `/internal/v1/jobs`, one job per socket. Everything but the health checks needs
`Authorization: Bearer <--internal-token>`; the public tokens are never involved.

A job socket turns messages into `engine.submit(PreparedJob, sink)` / `push_tokens` / `finish_text` /
`cancel`. The sink is called on the engine thread; `call_soon_threadsafe` puts each event in a queue
that one sender task drains into frames, awaiting the socket's write flow control after each (a slow
frontend stalls only its own job's frames, never the engine). Text that arrives before the job is
submitted (while the voice is being fetched) is kept and replayed in order. A socket that closes or
breaks cancels its job at once.
"""
from __future__ import annotations

import asyncio
import logging

from frontend.prompt import PromptAudioError
from protocol import internal as wire
from protocol.errors import ErrorCode, InvalidParameter, MethodNotAllowed, NotFound, Unauthorized
from protocol.websocket import CLOSE_NORMAL, WebSocketSession
from scheduler.jobs import EngineEvent, Failed, Finished, JobControl, VoicePrompt
from server.auth import token_ok
from server.context import Ctx, Handler
from server.internal_jobs import features_of, message_of, prepared_of, prompt_of, status_of
from server.paths import READY, normalise
from server.state import ServerState
from server.ws_handler import Socket, WsHandler

log = logging.getLogger("server.backend")
CLOSE_POLICY = 1008


def internal_authorized(state: ServerState, authorization: str | None) -> bool:
    return bool(state.config.internal_token) and token_ok(authorization, (state.config.internal_token,))


def resolve(ctx: Ctx) -> Handler:
    """The backend's HTTP routes (the public API is not served here)."""
    path, method = normalise(ctx.req.path), ctx.req.method
    if path in ("/health", wire.HEALTH_PATH, READY):
        if method not in ("GET", "HEAD"):
            raise MethodNotAllowed(f"method {method} not allowed", allowed=("GET", "HEAD"))
        return liveness if path == "/health" else readiness
    if not internal_authorized(ctx.state, ctx.req.header("authorization")):
        raise Unauthorized()
    if path == "/metrics":
        if method != "GET":
            raise MethodNotAllowed(f"method {method} not allowed", allowed=("GET",))
        return metrics
    if path == wire.FEATURES_PATH:
        if method != "POST":
            raise MethodNotAllowed(f"method {method} not allowed", allowed=("POST",))
        return features
    raise NotFound(f"no route for {path}")


async def liveness(ctx: Ctx) -> None:
    await ctx.json({"status": "ok"})


async def readiness(ctx: Ctx) -> None:
    state = ctx.state
    if state.draining:
        await ctx.out.respond(503, [("content-type", "application/json"),
                                    ("retry-after", str(state.config.retry_after_s))], b'{"status": "draining"}')
        return
    stats = state.engine.stats()
    await ctx.json({"status": "ready", "running": stats.running, "waiting": stats.waiting,
                    "can_admit": state.engine.can_admit()})


async def metrics(ctx: Ctx) -> None:
    """Prometheus text: the engine's gauges and this backend's queue, occupancy, tokens and job outcomes."""
    state = ctx.state
    body = state.metrics.render_backend(state.engine.stats(), state.config.max_batch).encode("utf-8")
    await ctx.out.respond(200, [("content-type", "text/plain; version=0.0.4")], body)


async def features(ctx: Ctx) -> None:
    state = ctx.state
    try:
        wav, sr, text = wire.decode_features_request(ctx.req.body)
    except wire.InternalProtocolError as exc:
        raise InvalidParameter(str(exc)) from None
    try:
        prompt: VoicePrompt = await state.run_blocking(state.extract_prompt, wav, sr, text)
    except PromptAudioError as exc:  # the frontend turns this 400 back into its own 400
        raise InvalidParameter(f"reference audio cannot be used: {exc}") from None
    body = await state.run_blocking(wire.encode_voice, features_of(prompt))
    await ctx.out.respond(200, [("content-type", "application/octet-stream")], body)


class JobSocket(WsHandler):
    """One internal job over one WebSocket (after the upgrade, in place of the public WsConnection)."""

    shutdown_reason = "backend shutting down"

    def __init__(self, state: ServerState, session: WebSocketSession, proto: Socket) -> None:
        super().__init__(session, proto)
        self.state = state
        self.loop = asyncio.get_running_loop()
        self.reader = wire.Reader(to_backend=True)
        self.waiting_voice: wire.Submit | None = None  # submitted, voice asked for
        self.early: list[wire.PushTokens | wire.FinishText] = []  # text before the job exists
        self.control: JobControl | None = None
        self.events: asyncio.Queue[EngineEvent] = asyncio.Queue()
        self.sender: asyncio.Task[None] | None = None
        self.ended = False  # the final event went out, or the job was cancelled
        self.counted = False  # its outcome is in the metrics

    # ---- socket side ----
    def _on_end(self) -> None:
        """Cancel the job unless it already ended."""
        if self.control is not None and not self.ended:
            self.control.cancel()
            self._count("cancelled")
        self.ended = True
        if self.sender is not None and not self.sender.done():
            self.sender.cancel()

    # ---- messages ----
    def _message(self, frame: str | bytes) -> None:
        if self.closed:
            return
        try:
            msg = self.reader.feed(frame)
            if msg is not None:
                self._handle(msg)
        except wire.InternalProtocolError as exc:
            log.warning("internal job socket: %s", exc)
            self._refuse(ErrorCode.BAD_REQUEST, str(exc))

    def _handle(self, msg: wire.Message) -> None:
        if isinstance(msg, wire.Submit):
            self._submit(msg)
        elif isinstance(msg, wire.Voice):
            pending = self.waiting_voice
            if pending is None:
                raise wire.InternalProtocolError("voice: no submit is waiting for one")
            if msg.voice.sha256() != pending.voice_sha256:
                raise wire.InternalProtocolError("voice: does not match the submit's voice_sha256")
            self.waiting_voice = None
            self._start(pending, self._remember(pending.voice_sha256, msg.voice))
        elif isinstance(msg, (wire.PushTokens, wire.FinishText)):
            if self.control is None and self.waiting_voice is None:
                raise wire.InternalProtocolError(f"{type(msg).__name__}: no job on this socket")
            if self.control is None:
                self.early.append(msg)
            else:
                self._text(msg)
        elif isinstance(msg, wire.Cancel):
            self._end()
            self.proto.write(self.session.send_close(CLOSE_NORMAL, "cancelled"))
        else:  # the Reader lets nothing else through for a backend
            raise wire.InternalProtocolError(f"unexpected {type(msg).__name__}")

    def _submit(self, msg: wire.Submit) -> None:
        if self.control is not None or self.waiting_voice is not None:
            raise wire.InternalProtocolError("submit: one job per socket")
        if self.state.draining:
            self._refuse(ErrorCode.OVERLOADED, "backend is draining")
            return
        if not self.state.engine.can_admit():
            self._refuse(ErrorCode.OVERLOADED, "engine queue is full")
            return
        if msg.voice is not None:
            self._start(msg, self._remember(msg.voice_sha256, msg.voice))
            return
        assert self.state.features is not None
        voice = self.state.features.get(msg.voice_sha256)
        if voice is None:
            self.waiting_voice = msg
            self._write(wire.NeedVoice())
            return
        self._start(msg, voice)

    def _remember(self, sha256: str, features: wire.VoiceFeatures) -> VoicePrompt:
        voice = prompt_of(features)
        assert self.state.features is not None
        self.state.features.put(sha256, voice)
        return voice

    def _start(self, msg: wire.Submit, voice: VoicePrompt) -> None:
        self.control = self.state.engine.submit(prepared_of(msg, voice), self._sink)
        for early in self.early:
            self._text(early)
        self.early = []
        self.sender = self.loop.create_task(self._send_events())
        self.state.tasks.add(self.sender)
        self.sender.add_done_callback(self.state.tasks.discard)

    def _count(self, outcome: str) -> None:
        if not self.counted:
            self.counted = True
            self.state.metrics.backend_job_done(outcome)

    def _text(self, msg: wire.PushTokens | wire.FinishText) -> None:
        assert self.control is not None
        if isinstance(msg, wire.PushTokens):
            self.control.push_tokens(list(msg.ids))
        else:
            self.control.finish_text()

    # ---- events out ----
    def _sink(self, event: EngineEvent) -> None:  # the engine thread
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # loop closed during shutdown
            pass

    def _status(self) -> wire.Status:
        engine = self.state.engine
        return status_of(engine.stats(), engine.can_admit())

    def _write(self, msg: wire.ToFrontend) -> None:
        for frame in wire.encode(msg):
            self.proto.write(self.session.send_text(frame) if isinstance(frame, str) else self.session.send_bytes(frame))

    async def _send_events(self) -> None:
        while not self.closed:
            event = await self.events.get()
            if self.closed:
                return
            final = isinstance(event, (Finished, Failed))
            if final:
                self.ended = True
                self._count("finished" if isinstance(event, Finished) else "failed")
            else:
                self.state.metrics.llm_tokens(event.metrics.llm_tokens)
            self._write(message_of(event, self._status()))
            await self.proto.flow.drain()
            if final:
                self.proto.write(self.session.send_close(CLOSE_NORMAL, ""))
                return

    def _refuse(self, code: ErrorCode, message: str) -> None:
        """A failed message, then close: the job (if any) is cancelled."""
        self._count("refused" if code is ErrorCode.OVERLOADED else "failed")
        self._write(wire.Failed(code, message, self._status()))
        self._end()
        self.proto.write(self.session.send_close(CLOSE_NORMAL if code is ErrorCode.OVERLOADED else CLOSE_POLICY,
                                                 message.encode()[:100].decode(errors="ignore")))
