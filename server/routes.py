"""Routing: auth first (every route but /health), then method + path -> handler.

Handlers raise ApiError; the connection turns it into the JSON error response in one place.
"""
from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from protocol.errors import BadRequest, MethodNotAllowed, NotFound, Unauthorized
from server.app import App
from server.auth import authorized

REFERENCE = "/api/v1/audio/reference_audio"
SPEECH = "/api/v1/audio/speech"
WS_SPEECH = "/api-ws/v1/audio/speech"


class Responder(Protocol):
    started: bool  # a response head went out (errors can no longer be a plain response)

    async def respond(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None: ...
    async def start_stream(self, status: int, headers: list[tuple[str, str]]) -> None: ...
    async def send_chunk(self, data: bytes) -> None: ...
    async def end_stream(self) -> None: ...


class Request(Protocol):
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Ctx:
    app: App
    req: Request
    request_id: str
    out: Responder
    arrived_s: float  # loop.time() when the request was complete (metrics baseline)

    async def json(self, obj: Any, status: int = 200) -> None:
        body = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        await self.out.respond(status, [("content-type", "application/json")], body)


Handler = Callable[[Ctx], Awaitable[None]]


def route_name(path: str) -> str:
    """Metrics label: the route template, never the raw path (ids would explode cardinality)."""
    path = _norm(path)
    if path.startswith(REFERENCE + "/"):
        return "reference_audio_id"
    return {REFERENCE: "reference_audio", SPEECH: "speech", WS_SPEECH: "ws_speech", "/health": "health",
            "/metrics": "metrics"}.get(path, "unknown")


def _norm(path: str) -> str:
    return path.rstrip("/") or "/"


def resolve(ctx: Ctx) -> Handler:
    """Auth, then the handler for method + path (404/405 otherwise)."""
    from server import reference_audio, speech  # handlers import Ctx from here
    path, method = _norm(ctx.req.path), ctx.req.method
    if path == "/health":
        return _only(method, ("GET", "HEAD"), health)
    if not authorized(ctx.req.headers, ctx.app.config.tokens):
        raise Unauthorized()
    if path == "/metrics":
        return _only(method, ("GET",), metrics)
    if path == REFERENCE:
        return _pick(method, {"POST": reference_audio.upload, "GET": reference_audio.list_voices})
    if path.startswith(REFERENCE + "/") and path.count("/") == REFERENCE.count("/") + 1:
        return _pick(method, {"GET": reference_audio.get_voice, "DELETE": reference_audio.delete_voice})
    if path == SPEECH:
        return _only(method, ("POST",), speech.synthesize)
    if path == WS_SPEECH:
        raise BadRequest("this endpoint needs a WebSocket upgrade", status=426, code="UpgradeRequired")
    raise NotFound(f"no route for {path}")


def _only(method: str, allowed: tuple[str, ...], handler: Handler) -> Handler:
    if method not in allowed:
        raise MethodNotAllowed(f"method {method} not allowed", allowed=allowed)
    return handler


def _pick(method: str, table: dict[str, Handler]) -> Handler:
    if method not in table:
        raise MethodNotAllowed(f"method {method} not allowed", allowed=tuple(table))
    return table[method]


async def health(ctx: Ctx) -> None:
    await ctx.json({"status": "ok"})  # reveals nothing: no version, model, or load


async def metrics(ctx: Ctx) -> None:
    try:
        stats = ctx.app.engine.stats()
    except Exception:  # noqa: BLE001 - a broken engine must not take /metrics down with it
        stats = None
    body = ctx.app.metrics.render(stats).encode("utf-8")
    await ctx.out.respond(200, [("content-type", "text/plain; version=0.0.4")], body)
