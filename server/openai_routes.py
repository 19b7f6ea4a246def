"""The OpenAI-compatible API under /v1: auth, dispatch, the model and voice lists, and every error
of these routes (the 401 included) in OpenAI's shape `{"error": {message, type, param, code}}`.

server.routes hands every /v1 path here; the PAI routes keep their own error shape.
"""
from __future__ import annotations

import json
import logging

from protocol.errors import ApiError, InternalError, MethodNotAllowed, NotFound, Unauthorized, error_headers
from protocol.openai_responses import model_object, models_list, voices_list
from protocol.openai_schema import MODEL_IDS, error_object
from protocol.schema import parse_list_query
from server import openai_speech
from server.auth import authorized
from server.context import Ctx, Handler
from server.paths import OPENAI_MODELS, OPENAI_SPEECH, OPENAI_VOICES, normalise

log = logging.getLogger(__name__)


async def handle(ctx: Ctx) -> None:
    """Every /v1 request (server.routes sends them here before its own token check)."""
    try:
        await _route(ctx)(ctx)
    except ApiError as err:
        if ctx.out.started:  # mid-stream: the connection closes it (server.connection)
            raise
        await _error(ctx, err)
    except Exception:
        if ctx.out.started:
            raise
        log.exception("internal error in %s %s (request %s)", ctx.req.method, ctx.req.path, ctx.request_id)
        await _error(ctx, InternalError())


async def _error(ctx: Ctx, err: ApiError) -> None:
    ctx.state.metrics.error(err.code)
    body = json.dumps(error_object(err), ensure_ascii=False).encode("utf-8")
    await ctx.out.respond(err.status, error_headers(err), body)  # X-Request-Id: protocol.http adds it


def _route(ctx: Ctx) -> Handler:
    if not authorized(ctx.req.headers, ctx.state.config.tokens):
        raise Unauthorized()
    path, method = normalise(ctx.req.path), ctx.req.method
    table = _ROUTES.get(path)
    if table is None and path.startswith(OPENAI_MODELS + "/") and path.count("/") == OPENAI_MODELS.count("/") + 1:
        table = {"GET": get_model}
    if table is None:
        raise NotFound(f"no route for {method} {path}")
    if method not in table:
        raise MethodNotAllowed(f"method {method} not allowed", allowed=tuple(table))
    return table[method]


async def list_models(ctx: Ctx) -> None:
    await ctx.json(models_list())


async def get_model(ctx: Ctx) -> None:
    model_id = normalise(ctx.req.path)[len(OPENAI_MODELS) + 1:]
    if model_id not in MODEL_IDS:
        raise NotFound(f"model {model_id!r} not found; GET /v1/models lists them")
    await ctx.json(model_object(model_id))


async def list_voices(ctx: Ctx) -> None:
    """Newest first; `limit` (default 100) and `order` as the PAI voice list; `has_more` when cut."""
    limit, order = parse_list_query(ctx.req.query)
    records = await ctx.state.run_blocking(ctx.state.store.list, limit + 1, order)
    await ctx.json(voices_list(records[:limit], has_more=len(records) > limit))


_ROUTES: dict[str, dict[str, Handler]] = {
    OPENAI_SPEECH: {"POST": openai_speech.synthesize},
    OPENAI_MODELS: {"GET": list_models},
    OPENAI_VOICES: {"GET": list_voices},
}
