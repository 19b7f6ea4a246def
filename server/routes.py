"""Routing: auth first (every route but /health, /ready and the WebUI's page), then method + path -> handler.

Handlers raise ApiError; the connection turns it into the error response in one place (the /v1
routes, server.openai_routes, answer theirs in OpenAI's shape).
"""
from __future__ import annotations

from protocol.errors import MethodNotAllowed, NotFound, Unauthorized, UpgradeRequired
from protocol.openapi import document_bytes
from server import backend, openai_routes, reference_audio, speech, webui, webui_mp3
from server.auth import authorized
from server.context import Ctx, Handler
from server.paths import OPENAPI, READY, REFERENCE, SPEECH, WS_SPEECH, is_openai, normalise


def resolve(ctx: Ctx) -> Handler:
    """Auth, then the handler for method + path (404/405 otherwise)."""
    if ctx.state.config.role == "backend":
        return backend.resolve(ctx)  # the internal API only
    path, method = normalise(ctx.req.path), ctx.req.method
    if path == "/health":
        return _only(method, ("GET", "HEAD"), health)
    if path == READY:
        return _only(method, ("GET", "HEAD"), ready)
    if is_openai(path):
        return openai_routes.handle  # checks the token itself: its errors, 401 too, are in OpenAI's shape
    if webui.serves(path):  # the page itself needs no token; its API calls do (server/webui.py)
        return _only(method, ("GET",), webui.serve)
    if not authorized(ctx.req.headers, ctx.state.config.tokens):
        raise Unauthorized()
    if path == "/metrics":
        return _only(method, ("GET",), metrics)
    if path == OPENAPI:
        return _only(method, ("GET",), openapi)
    if path == REFERENCE:
        return _pick(method, {"POST": reference_audio.upload, "GET": reference_audio.list_voices})
    if path.startswith(REFERENCE + "/") and path.count("/") == REFERENCE.count("/") + 1:
        return _pick(method, {"GET": reference_audio.get_voice, "DELETE": reference_audio.delete_voice})
    if path == SPEECH:
        return _only(method, ("POST",), speech.synthesize)
    if path == webui_mp3.PATH:
        return _only(method, ("POST",), webui_mp3.encode)
    if path == WS_SPEECH:  # an upgrade is a GET: any other method is a 405, like every route's
        return _only(method, ("GET",), upgrade_required)
    raise NotFound(f"no route for {path}")


def _only(method: str, allowed: tuple[str, ...], handler: Handler) -> Handler:
    if method not in allowed:
        raise MethodNotAllowed(f"method {method} not allowed", allowed=allowed)
    return handler


def _pick(method: str, table: dict[str, Handler]) -> Handler:
    if method not in table:
        raise MethodNotAllowed(f"method {method} not allowed", allowed=tuple(table))
    return table[method]


async def upgrade_required(ctx: Ctx) -> None:
    """A plain GET of the WebSocket endpoint (the upgrade itself never reaches the router)."""
    raise UpgradeRequired("this endpoint needs a WebSocket upgrade")


async def health(ctx: Ctx) -> None:
    await ctx.json({"status": "ok"})  # reveals nothing: no version, model, or load


async def ready(ctx: Ctx) -> None:
    """Readiness (no token): 503 + Retry-After from the moment SIGTERM starts the drain; the listener stays
    open meanwhile, so the probe sees it. `/health` stays the liveness check (200 while the loop answers)."""
    if ctx.state.draining:
        await draining(ctx)
        return
    await ctx.json({"status": "ready"})


async def draining(ctx: Ctx) -> None:
    retry = str(ctx.state.config.retry_after_s)
    await ctx.out.respond(503, [("content-type", "application/json"), ("retry-after", retry)],
                          b'{"status": "draining"}')


async def openapi(ctx: Ctx) -> None:
    """The OpenAPI description, with this server's own limits (what a client will meet)."""
    cfg = ctx.state.config
    await ctx.out.respond(200, [("content-type", "application/json")],
                          document_bytes(cfg.max_text_chars, cfg.max_body_bytes, tuple(sorted(webui.files()))))


async def metrics(ctx: Ctx) -> None:
    try:
        stats = ctx.state.engine.stats()
    except Exception:  # noqa: BLE001 - a broken engine must not take /metrics down with it
        stats = None
    pool = getattr(ctx.state.engine, "pool", None)  # a frontend's RemoteEngine: its backend table
    body = ctx.state.metrics.render(stats, pool.backends() if pool is not None else ()).encode("utf-8")
    await ctx.out.respond(200, [("content-type", "text/plain; version=0.0.4")], body)
