"""The OpenAPI 3.1 description of the HTTP API: every route, its fields and limits, its answers and errors.

`openapi_document(max_text_chars, max_body_bytes, webui_files)` builds it; the server serves it with its own
settings at `GET /openapi.json` (token), so the limits a client (or schemathesis) sees are the ones it will meet.
`python -m protocol.openapi` prints it with the defaults. The schemas are in protocol/openapi_schemas.py;
tests/test_server_openapi.py checks both against the router and the parsers.

OpenAPI has no WebSocket: the duplex endpoint is a GET path (a plain request gets 426) plus the
`x-websocket` extension, which carries its messages' schemas.
"""
from __future__ import annotations

import json
from functools import cache
from typing import Any

from protocol import openapi_schemas as schemas
from protocol.openai_schema import MODEL_IDS
from protocol.openapi_schemas import AUDIO_CONTENT_TYPES, Schema, closed_object, ref
from protocol.schema import BIT_RATES_KBPS, DEFAULT_MAX_TEXT_CHARS, SAMPLE_RATES
from protocol.sse import SSE_CONTENT_TYPE

OPENAPI_VERSION = "3.1.0"
API_VERSION = "1"
WS_PATH = "/api-ws/v1/audio/speech"
# server/webui.py's content types (checked by the test): the static page's files.
WEBUI_CONTENT_TYPES = ("text/html; charset=utf-8", "text/javascript; charset=utf-8", "text/css; charset=utf-8",
                       "image/png", "image/svg+xml")
PUBLIC: list[dict[str, list[str]]] = []  # `security` of the routes that need no token

_ERRORS = {
    400: "bad parameter or malformed request (the message names the field)",
    401: "missing or wrong bearer token",
    404: "unknown id",
    413: "request body too large (--max-body-bytes)",
    415: "wrong Content-Type",
    426: "a plain HTTP request to the WebSocket endpoint",
    429: "--max-inflight reached; retry after Retry-After seconds",
    503: "engine queue full or the server is draining; retry after Retry-After seconds",
    507: "the voice store is out of space: nothing was stored (or deleted)",
}
_RETRY_AFTER = {"Retry-After": {"description": "seconds", "schema": {"type": "integer", "minimum": 0}}}


def _json(schema: Schema, description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": schema}}}
    if headers:
        out["headers"] = dict(headers)
    return out


def _errors(*statuses: int, openai: bool = False) -> dict[str, Any]:
    """Error answers: the PAI shape, or OpenAI's on the /v1 routes (413 is read before the path is: PAI's)."""
    out = {}
    for status in statuses:
        shape = "OpenAIError" if openai and status != 413 else "Error"
        out[str(status)] = _json(ref(shape), _ERRORS[status], _RETRY_AFTER if status in (429, 503) else None)
    return out


def _op(op_id: str, tag: str, summary: str, responses: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"operationId": op_id, "tags": [tag], "summary": summary, "responses": responses, **extra}


def _json_body(name: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": ref(name)}}}


def _event_stream(event: str) -> dict[str, Any]:
    """text/event-stream: the schema is one event's (as OpenAPI 3.2's itemSchema), its `data` a JSON `event`."""
    return {SSE_CONTENT_TYPE: {"schema": {
        "type": "object", "required": ["data"],
        "properties": {"data": {"type": "string", "contentMediaType": "application/json",
                                "contentSchema": ref(event)}}}}}


def _status(value: str) -> Schema:
    return closed_object({"status": {"const": value}})


# ---- paths ------------------------------------------------------------------------------------

def _service_paths() -> dict[str, Any]:
    health = {"200": _json(_status("ok"), "the server is up (says nothing else)")}
    ready = {"200": _json(_status("ready"), "accepting work"),
             "503": _json(_status("draining"), "draining after SIGTERM", _RETRY_AFTER)}
    return {
        "/health": {"get": _op("health", "service", "Liveness (no token)", health, security=PUBLIC),
                    "head": _op("healthHead", "service", "Liveness, head only", health, security=PUBLIC)},
        "/ready": {"get": _op("ready", "service", "Readiness (no token)", ready, security=PUBLIC),
                   "head": _op("readyHead", "service", "Readiness, head only", ready, security=PUBLIC)},
        "/metrics": {"get": _op("metrics", "service", "Prometheus metrics", {
            "200": {"description": "Prometheus text format",
                    "content": {"text/plain; version=0.0.4": {"schema": {"type": "string"}}}},
            **_errors(401)})},
        "/openapi.json": {"get": _op("openapi", "service", "This description, with this server's limits", {
            "200": _json({"type": "object"}, "the OpenAPI 3.1 document"), **_errors(401)})},
    }


def _reference_paths() -> dict[str, Any]:
    voice_id = [{"name": "id", "in": "path", "required": True, "schema": {"type": "string", "minLength": 1},
                 "description": "a voice's id, a lowercase UUID as the upload returned it (anything else: 404)"}]
    query = schemas.list_parameters()
    return {
        "/api/v1/audio/reference_audio": {
            "post": _op("uploadReferenceAudio", "reference audio", "Upload a voice (audio + transcript)", {
                "200": _json(ref("ReferenceAudio"), "stored; its prompt features are computed once, here"),
                **_errors(400, 401, 413, 415, 507)},
                requestBody={"required": True, "content": {
                    "multipart/form-data": {"schema": ref("ReferenceAudioUpload")}}}),
            "get": _op("listReferenceAudio", "reference audio", "List the voices", {
                "200": _json(ref("ReferenceAudioList"), "newest first unless order=asc"),
                **_errors(400, 401)}, parameters=[query["limit"], query["order"]]),
        },
        "/api/v1/audio/reference_audio/{id}": {
            "parameters": voice_id,
            "get": _op("getReferenceAudio", "reference audio", "One voice", {
                "200": _json(ref("ReferenceAudio"), "the voice"), **_errors(401, 404)}),
            "delete": _op("deleteReferenceAudio", "reference audio", "Delete a voice (running syntheses finish)", {
                "200": _json(ref("Deleted"), "deleted"), **_errors(401, 404, 507)}),
        },
    }


def _speech_paths() -> dict[str, Any]:
    return {
        "/api/v1/audio/speech": {"post": _op("synthesize", "speech", "Text to speech (one JSON body, or SSE)", {
            "200": {"description": '`"stream": false`: one JSON body; `"stream": true` (the default): '
                                   "`data: {json}` events (SpeechEvent), the last with finish_reason stop; an "
                                   "error after the first event is an event with `error` set",
                    "content": {"application/json": {"schema": ref("SpeechResponse")}, **_event_stream("SpeechEvent")}},
            **_errors(400, 401, 404, 413, 415, 429, 503)}, requestBody=_json_body("SpeechRequest"))},
        WS_PATH: {"get": _op("speechWebSocket", "speech", "Duplex speech over WebSocket (see x-websocket)", {
            "101": {"description": "switching to WebSocket (token in the Authorization header, or a "
                                   "bearer.<base64url(token)> Sec-WebSocket-Protocol entry)"},
            **_errors(400, 401, 426, 503)})},
    }


def _webui_paths(webui_files: tuple[str, ...]) -> dict[str, Any]:
    files = {ctype: {"schema": {"type": "string"}} for ctype in WEBUI_CONTENT_TYPES}
    name: Schema = {"type": "string", "minLength": 1}
    if webui_files:
        name["enum"] = list(webui_files)
    return {
        "/": {"get": _op("webuiIndex", "webui", "The WebUI page (no token: its API calls carry one)", {
            "200": {"description": "the page", "content": {WEBUI_CONTENT_TYPES[0]: {"schema": {"type": "string"}}}}},
            security=PUBLIC)},
        "/webui/{file}": {"get": _op("webuiFile", "webui", "A file of the WebUI (no token)", {
            "200": {"description": "the file", "content": files}, **_errors(404)},
            parameters=[{"name": "file", "in": "path", "required": True, "schema": name,
                         "description": "a file of the page (any other name: 404)"}], security=PUBLIC)},
        "/webui/encode/mp3": {"post": _op("webuiEncodeMp3", "webui", "MP3 of the PCM the page played", {
            "200": {"description": "the MP3", "content": {AUDIO_CONTENT_TYPES["mp3"]: {
                "schema": {"type": "string", "format": "binary"}}}},
            **_errors(400, 401, 413)},
            parameters=[
                {"name": "sample_rate", "in": "query", "required": True,
                 "schema": {"type": "integer", "enum": list(SAMPLE_RATES)}},
                {"name": "bit_rate", "in": "query", "required": False,
                 "schema": {"type": "string", "enum": list(BIT_RATES_KBPS), "default": "192k"}}],
            requestBody={"required": True, "content": {"application/octet-stream": {
                "schema": {"type": "string", "format": "binary", "minLength": 2,
                           "description": "raw s16le mono samples (an even number of bytes)"}}}})},
    }


def _openai_paths() -> dict[str, Any]:
    query = schemas.list_parameters()
    audio = {ctype: {"schema": {"type": "string", "format": "binary"}} for ctype in AUDIO_CONTENT_TYPES.values()}
    return {
        "/v1/audio/speech": {"post": _op("openaiSpeech", "openai", "Text to speech, OpenAI's API", {
            "200": {"description": "the whole file (Content-Length); `stream_format: audio`: chunked bytes as "
                                   "they are encoded; `sse`: events (OpenAISpeechEvent). Every format is mono "
                                   "24 kHz; pcm adds X-Sample-Rate",
                    "content": {**audio, **_event_stream("OpenAISpeechEvent")}},
            **_errors(400, 401, 413, 415, 429, 503, openai=True)}, requestBody=_json_body("OpenAISpeechRequest"))},
        "/v1/models": {"get": _op("listModels", "openai", "The accepted model names", {
            "200": _json(ref("ModelList"), "every accepted `model`"), **_errors(401, openai=True)})},
        "/v1/models/{model}": {"get": _op("getModel", "openai", "One model name", {
            "200": _json(ref("Model"), "the model"), **_errors(401, 404, openai=True)},
            parameters=[{"name": "model", "in": "path", "required": True, "description": "any other: 404",
                         "schema": {"type": "string", "enum": list(MODEL_IDS)}}])},
        "/v1/audio/voices": {"get": _op("listVoices", "openai", "The stored voices, as OpenAI voice objects", {
            "200": _json(ref("VoiceList"), "newest first unless order=asc; has_more when cut"),
            **_errors(400, 401, openai=True)}, parameters=[query["limit"], query["order"]])},
    }


# ---- the document -----------------------------------------------------------------------------

_DESCRIPTION = """\
A self-hosted CosyVoice2-0.5B speech server: the PAI-EAS CosyVoice2 API (reference audio, speech over HTTP
JSON/SSE and WebSocket) and an OpenAI-compatible speech API under /v1.

Every route needs `Authorization: Bearer <token>` except /health, /ready and the WebUI's static files.
Conventions of every JSON body: unknown keys are ignored, `null` counts as absent, numbers must be JSON
numbers (never strings) and integers integers. Errors are `{code, message, request_id}` (PAI routes) or
`{"error": {message, type, param, code}}` (/v1). Errors found before a request's path is read (malformed
HTTP 400, a body over --max-body-bytes 413, a head over --max-header-bytes 431, a request not received in
time 408, a connection past --max-connections 503) come in the PAI shape on any path. Every answer carries
X-Request-Id. The WebSocket endpoint is described in `x-websocket`.
"""


def _websocket(max_text_chars: int) -> dict[str, Any]:
    return {
        "path": WS_PATH,
        "description": "Text frames, JSON. The client sends run-task, waits for task-started, sends the text in "
                       "any number of continue-task messages (synthesis starts before the last), then "
                       "finish-task. The server answers task-started, one result-generated per audio chunk "
                       "(payload.output.audio.data: base64; payload.metrics as the SSE events'), then "
                       "task-finished (payload.usage.characters), or task-failed (header.error_code, "
                       "header.error_message) on any error. One connection runs tasks one after another.",
        "clientMessages": schemas.websocket_messages(max_text_chars),
        "serverEvents": ["task-started", "result-generated", "task-finished", "task-failed"],
    }


def _with_request_id(paths: dict[str, Any]) -> dict[str, Any]:
    """Every answer carries X-Request-Id (the id in the server's log lines for it)."""
    for item in paths.values():
        for op in item.values():
            for response in op.get("responses", {}).values() if isinstance(op, dict) else ():
                response.setdefault("headers", {})["X-Request-Id"] = {"$ref": "#/components/headers/RequestId"}
    return paths


@cache
def openapi_document(max_text_chars: int = DEFAULT_MAX_TEXT_CHARS, max_body_bytes: int | None = None,
                     webui_files: tuple[str, ...] = ()) -> dict[str, Any]:
    """The document for a server with these limits and WebUI files (cached: a server asks with the same ones
    every time). Treat it as read-only."""
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "cosyserve", "version": API_VERSION, "description": _DESCRIPTION},
        "tags": [{"name": name} for name in ("reference audio", "speech", "openai", "service", "webui")],
        "security": [{"bearer": []}],
        "paths": _with_request_id({**_service_paths(), **_reference_paths(), **_speech_paths(),
                                   **_openai_paths(), **_webui_paths(webui_files)}),
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "one of the server's --token values"}},
            "headers": {"RequestId": {"description": "this request's id, as in the server's log lines",
                                      "required": True, "schema": {"type": "string", "minLength": 1}}},
            "schemas": {
                **schemas.error_schemas(), **schemas.reference_audio_schemas(max_body_bytes, max_text_chars),
                **schemas.speech_schemas(max_text_chars), **schemas.openai_schemas(max_text_chars),
            },
        },
        "x-websocket": _websocket(max_text_chars),
    }


@cache
def document_bytes(max_text_chars: int = DEFAULT_MAX_TEXT_CHARS, max_body_bytes: int | None = None,
                   webui_files: tuple[str, ...] = ()) -> bytes:
    """The document as the server sends it (UTF-8 JSON)."""
    document = openapi_document(max_text_chars, max_body_bytes, webui_files)
    return json.dumps(document, ensure_ascii=False, indent=1).encode("utf-8")


if __name__ == "__main__":
    print(document_bytes().decode())
