"""The JSON Schemas of the OpenAPI description (protocol/openapi.py): request bodies, answers, errors.

Every enum, default and limit comes from the parsers' own constants (protocol.schema, protocol.openai_schema,
protocol.audio_in, protocol.errors), so the description cannot drift from what the server enforces;
tests/test_server_openapi.py proves it field by field. Conventions the parsers share:
- an optional field may be `null`, which counts as absent (so `null` is part of its schema);
- unknown keys are ignored (request objects leave `additionalProperties` open);
- an answer's objects are closed (`additionalProperties: false`): schemathesis then catches a stray field.
"""
from __future__ import annotations

from dataclasses import fields
from functools import partial
from typing import Any

from protocol.audio_in import (
    DEFAULT_PCM_SAMPLE_RATE,
    MAX_DURATION_S,
    MIN_DURATION_S,
    MIN_SAMPLE_RATE,
    PCM_EXTENSIONS,
    PCM_RATE_RANGE,
)
from protocol.errors import ErrorCode
from protocol.openai_schema import (
    MAX_INPUT_CHARS,
    MODEL_IDS,
    RESPONSE_FORMATS,
    STREAM_FORMATS,
    OpenAISpeechRequest,
)
from protocol.openai_schema import SPEED_RANGE as OPENAI_SPEED_RANGE
from protocol.schema import (
    API_MODES,
    BIT_RATES_KBPS,
    DEFAULT_LIST_LIMIT,
    HTTP_MODEL,
    LIST_ORDERS,
    MAX_LIST_LIMIT,
    MAX_VOLUME,
    OUTPUT_FORMATS,
    SAMPLE_RATES,
    SPEED_RANGE,
    WS_MODELS,
    SpeechParams,
)
from protocol.speech_mode import Mode

Schema = dict[str, Any]
INSTRUCT_MODE = next(name for name, mode in API_MODES.items() if mode is Mode.INSTRUCT)
# What each output format is sent as (protocol/encoders*.py; the test checks the encoders agree).
AUDIO_CONTENT_TYPES = {"mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac", "flac": "audio/flac",
                       "wav": "audio/wav", "pcm": "audio/pcm"}


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: Schema) -> Schema:
    """An optional field: the parsers read `null` as absent, so null is valid too."""
    out = dict(schema)
    kind = out.get("type")
    if kind is not None:
        out["type"] = [kind, "null"] if isinstance(kind, str) else [*kind, "null"]
    if "enum" in out:
        out["enum"] = [*out["enum"], None]
    return out


def _default(cls: type, name: str) -> Any:
    """A request dataclass's default for `name`: the value the parser falls back to."""
    return next(f.default for f in fields(cls) if f.name == name)


def closed_object(properties: dict[str, Schema], required: list[str] | None = None, **extra: Any) -> Schema:
    """An answer's object: these keys, no others."""
    return {"type": "object", "properties": properties, "required": required or list(properties),
            "additionalProperties": False, **extra}


# ---- errors ------------------------------------------------------------------------------------

# The task protocol's own codes only ever come in a WebSocket task-failed event.
WS_ONLY_CODES = (ErrorCode.INVALID_MESSAGE, ErrorCode.UNKNOWN_ACTION, ErrorCode.TASK_NOT_STARTED,
                 ErrorCode.TASK_ID_MISMATCH, ErrorCode.TASK_ALREADY_RUNNING, ErrorCode.INVALID_STATE)
HTTP_ERROR_CODES = [str(code) for code in ErrorCode if code not in WS_ONLY_CODES]


def error_schemas() -> dict[str, Schema]:
    return {
        "Error": closed_object({
            "code": {"type": "string", "enum": HTTP_ERROR_CODES, "description": "PascalCase error code"},
            "message": {"type": "string", "description": "what went wrong, for a person"},
            "request_id": {"type": "string", "description": "this request's id (also in the server's log)"},
        }, description="Every error of the PAI routes (and of the connection itself, whatever the path)."),
        "OpenAIErrorObject": closed_object({
            "message": {"type": "string"},
            "type": {"type": "string", "enum": ["invalid_request_error", "rate_limit_error", "server_error"]},
            "param": {"type": ["string", "null"], "description": "the offending request field, if one"},
            "code": {"type": ["string", "null"], "description": "e.g. invalid_api_key, model_not_found, "
                                                                "voice_not_found, invalid_value"},
        }),
        "OpenAIError": closed_object({"error": ref("OpenAIErrorObject")},
                               description="Every error of the /v1 routes, the 401 included (OpenAI's shape)."),
    }


# ---- PAI: reference audio --------------------------------------------------------------------

def reference_audio_schemas(max_body_bytes: int | None, max_text_chars: int) -> dict[str, Schema]:
    size = f"; the whole request at most {max_body_bytes} bytes (413 beyond)" if max_body_bytes else ""
    low, high = PCM_RATE_RANGE
    return {
        "ReferenceAudioUpload": {
            "type": "object", "required": ["file", "text"],
            "properties": {
                "file": {"type": "string", "format": "binary", "contentMediaType": "application/octet-stream",
                         "description": f"WAV or MP3 (recognised by content, at least {MIN_SAMPLE_RATE} Hz) "
                                        f"or raw PCM s16le mono (a name ending in {' / '.join(PCM_EXTENSIONS)}, "
                                        f"or any headerless file when `sample_rate` is given); "
                                        f"{MIN_DURATION_S:g}-{MAX_DURATION_S:g} s long{size}. Undecodable, "
                                        "too short/long or too low a rate: 400."},
                "text": {"type": "string", "minLength": 1, "maxLength": max_text_chars,
                         "description": "the transcript of the audio; must not be blank"},
                "sample_rate": {"anyOf": [{"type": "integer", "minimum": low, "maximum": high},
                                          {"type": "string", "maxLength": 0}],
                                "description": f"raw PCM only: its rate in Hz (default {DEFAULT_PCM_SAMPLE_RATE}; "
                                               "empty: the default); PCM below "
                                               f"{MIN_SAMPLE_RATE} Hz is still refused (400)"},
            },
        },
        "ReferenceAudio": closed_object({
            "id": {"type": "string", "description": "generated id (UUID4)"},
            "filename": {"type": "string", "description": "the uploaded file's name, as sent"},
            "bytes": {"type": "integer", "minimum": 0, "description": "size of the uploaded file"},
            "created_at": {"type": "integer", "description": "Unix time, seconds"},
            "text": {"type": "string", "description": "the transcript, as sent"},
        }),
        "ReferenceAudioList": {"type": "array", "items": ref("ReferenceAudio"),
                               "description": "sorted by upload time, then id"},
        "Deleted": closed_object({
            "code": {"const": "OK"},
            "message": {"type": "string", "description": "reference audio: <id> deleted."},
            "data": {"type": "object", "maxProperties": 0},
        }),
    }


# ---- PAI: speech -------------------------------------------------------------------------------

def speech_parameter_properties() -> dict[str, Schema]:
    """The synthesis parameters: the HTTP body's `input` and the WebSocket run-task's `parameters`."""
    d = partial(_default, SpeechParams)
    return {
        "mode": {"type": "string", "enum": list(API_MODES),
                 "description": "fast_replication: zero-shot cloning; cross_lingual_replication: the voice "
                                f"speaks another language; {INSTRUCT_MODE}: spoken as `instruct` says"},
        "reference_audio_id": {"type": "string", "minLength": 1,
                               "description": "a stored voice's id (404 when unknown)"},
        "instruct": nullable({"type": "string", "description": f"required (not blank) for {INSTRUCT_MODE}, "
                              "ignored otherwise; e.g. 用四川话说. Its tokens must fit the model's "
                              "context with the voice's (400 otherwise)"}),
        "sample_rate": nullable({"type": "integer", "enum": list(SAMPLE_RATES), "default": d("sample_rate"),
                                 "description": "Hz; a JSON integer (24000.0 is refused)"}),
        "bit_rate": nullable({"type": "string", "enum": list(BIT_RATES_KBPS), "default": d("bit_rate"),
                              "description": "mp3 only, case-insensitive; 384k is encoded at 320 kb/s"}),
        "volume": nullable({"type": "number", "exclusiveMinimum": 0, "maximum": MAX_VOLUME,
                            "default": d("volume"), "description": "gain; samples clip, never wrap"}),
        "speed": nullable({"type": "number", "minimum": SPEED_RANGE[0], "maximum": SPEED_RANGE[1],
                           "default": d("speed"), "description": "tempo, pitch kept; in streaming too"}),
        "output_format": nullable({"type": "string", "enum": list(OUTPUT_FORMATS), "default": d("output_format"),
                                   "description": "case-insensitive; pcm is raw s16le mono"}),
        "debug": nullable({"type": "boolean", "default": d("debug"),
                           "description": "SSE/WebSocket metrics carry per-stage `detail`"}),
    }


def _instruct_rule() -> Schema:
    """natural_language_replication needs a non-blank instruct."""
    return {"if": {"properties": {"mode": {"const": INSTRUCT_MODE}}, "required": ["mode"]},
            "then": {"required": ["instruct"], "properties": {"instruct": {"type": "string", "minLength": 1}}}}


def _audio(description: str) -> Schema:
    return closed_object({"id": {"type": "string"}, "data": {"type": "string", "contentEncoding": "base64",
                                                        "description": description}})


def _metrics() -> Schema:
    seconds = {"type": "number", "minimum": 0}
    return {"type": "object", "required": ["speech_len", "server_cost_time", "generate_time", "rtf"],
            "properties": {
                "speech_len": {**seconds, "description": "audio length of the chunk, s"},
                "server_cost_time": {**seconds, "description": "server time since the previous chunk (or "
                                                               "since the request arrived), s"},
                "generate_time": {**seconds, "description": "model time spent on the chunk, s"},
                "rtf": {**seconds, "description": "server_cost_time / speech_len"},
                "first_package_time": {**seconds, "description": "first chunk only, s"},
                "detail": {"type": "object", "description": "`debug: true`: per-stage times and batch sizes"},
            }, "additionalProperties": False}


def speech_schemas(max_text_chars: int) -> dict[str, Schema]:
    return {
        "SpeechInput": {
            "type": "object", "required": ["mode", "text", "reference_audio_id"],
            "properties": {
                "text": {"type": "string", "minLength": 1, "maxLength": max_text_chars,
                         "description": "what to say; must not be blank, nor empty once normalised (400)"},
                **speech_parameter_properties(),
            },
            "allOf": [_instruct_rule()],
        },
        "SpeechRequest": {
            "type": "object", "required": ["model", "input"],
            "properties": {
                "model": {"type": "string", "enum": [HTTP_MODEL]},
                "input": ref("SpeechInput"),
                "stream": nullable({"type": "boolean", "default": _default(SpeechParams, "stream"),
                                    "description": "true: SSE events; false: one JSON body"}),
            },
        },
        "SpeechResponse": closed_object({
            "request_id": {"type": "string"},
            "output": closed_object({"finish_reason": {"type": "null"},
                               "audio": _audio("base64 of the whole file")}),
            "usage": {"type": "integer", "minimum": 0, "description": "the audio file's size, bytes"},
        }, description='`"stream": false`'),
        "SpeechEvent": closed_object({
            "request_id": {"type": "string"},
            "output": closed_object({"finish_reason": {"enum": [None, "stop", "error"]},
                               "audio": _audio("base64 of this chunk; the chunks in order form one file")}),
            "error": {"oneOf": [{"type": "null"}, closed_object({"code": {"type": "string"},
                                                            "message": {"type": "string"}})]},
            "metrics": {"anyOf": [_metrics(), {"type": "object", "maxProperties": 0}]},
        }, description="the JSON of one `data:` line of the speech event stream"),
    }


# ---- OpenAI-compatible -------------------------------------------------------------------------

def openai_schemas(max_text_chars: int) -> dict[str, Schema]:
    d = partial(_default, OpenAISpeechRequest)
    low, high = OPENAI_SPEED_RANGE
    voice_id = {"type": "string", "minLength": 1}
    return {
        "OpenAISpeechRequest": {
            "type": "object", "required": ["model", "input", "voice"],
            "properties": {
                "model": {"type": "string", "enum": list(MODEL_IDS),
                          "description": "our names and OpenAI's TTS names: aliases of the one model"},
                "input": {"type": "string", "minLength": 1, "maxLength": min(max_text_chars, MAX_INPUT_CHARS),
                          "description": "the text; must not be blank"},
                "voice": {"anyOf": [{**voice_id, "description": "a stored voice's id or name"},
                                    {"type": "object", "required": ["id"], "properties": {"id": voice_id}}],
                          "description": "unknown: 400 with code voice_not_found"},
                "instructions": nullable({"type": "string", "description": "speak as instructed (instruct "
                                          "mode); blank or absent: the voice cloned as is"}),
                "response_format": nullable({"type": "string", "enum": list(RESPONSE_FORMATS),
                                             "default": d("response_format"),
                                             "description": "case-insensitive; one the server cannot encode "
                                                            "is a 400 (code unsupported_format)"}),
                "speed": nullable({"type": "number", "minimum": low, "maximum": high, "default": d("speed")}),
                "stream_format": nullable({"type": "string", "enum": list(STREAM_FORMATS),
                                           "description": "audio: chunked bytes; sse: events; absent: the "
                                                          "whole file"}),
                "stream": nullable({"type": "boolean", "description": "true means stream_format audio "
                                                                     "(an explicit stream_format wins)"}),
            },
        },
        "OpenAISpeechEvent": {"oneOf": [
            closed_object({"type": {"const": "speech.audio.delta"},
                     "audio": {"type": "string", "contentEncoding": "base64"}}),
            closed_object({"type": {"const": "speech.audio.done"}, "usage": closed_object({
                "input_tokens": {"type": "integer", "minimum": 0},
                "output_tokens": {"type": "integer", "minimum": 0},
                "total_tokens": {"type": "integer", "minimum": 0}})}),
            closed_object({"type": {"const": "error"}, "error": ref("OpenAIErrorObject")}),
        ], "description": "the JSON of one `data:` line of `stream_format: sse`"},
        "Model": closed_object({"id": {"type": "string", "enum": list(MODEL_IDS)}, "object": {"const": "model"},
                          "created": {"type": "integer"}, "owned_by": {"type": "string"}}),
        "ModelList": closed_object({"object": {"const": "list"}, "data": {"type": "array", "items": ref("Model")}}),
        "Voice": closed_object({"id": {"type": "string"}, "name": {"type": "string"}, "object": {"const": "audio.voice"},
                          "created_at": {"type": "integer"}, "type": {"const": "audio_sample"}}),
        "VoiceList": closed_object({"object": {"const": "list"}, "has_more": {"type": "boolean"},
                              "data": {"type": "array", "items": ref("Voice")}}),
    }


# ---- the list query, the WebSocket messages --------------------------------------------------

def list_parameters() -> dict[str, Schema]:
    return {
        "limit": {"name": "limit", "in": "query", "required": False,
                  "description": f"at most this many (a larger limit is served as {MAX_LIST_LIMIT})",
                  "schema": {"type": "integer", "minimum": 1, "default": DEFAULT_LIST_LIMIT}},
        "order": {"name": "order", "in": "query", "required": False, "description": "by upload time",
                  "schema": {"type": "string", "enum": list(LIST_ORDERS), "default": "desc"}},
    }


def websocket_messages(max_text_chars: int) -> dict[str, Schema]:
    """The duplex task protocol's client messages (OpenAPI has no WebSocket: `x-websocket` carries these)."""
    def message(action: str, payload: Schema) -> Schema:
        return {"type": "object", "required": ["header", "payload"], "properties": {
            "header": {"type": "object", "required": ["action", "task_id"], "properties": {
                "action": {"const": action}, "task_id": {"type": "string", "minLength": 1},
                "streaming": {"const": "duplex"}}},
            "payload": payload}}
    text = {"type": "string", "minLength": 1, "maxLength": max_text_chars,
            "description": f"a piece of the text; all pieces of a task together at most {max_text_chars} characters"}
    return {
        "run-task": message("run-task", {"type": "object", "required": ["model", "parameters"], "properties": {
            "model": {"type": "string", "enum": list(WS_MODELS)},
            "parameters": {"type": "object", "required": ["mode", "reference_audio_id"],
                           "properties": speech_parameter_properties(), "allOf": [_instruct_rule()]},
            "input": {"type": "object", "properties": {"text": text}}}}),
        "continue-task": message("continue-task", {"type": "object", "required": ["input"], "properties": {
            "input": {"type": "object", "required": ["text"], "properties": {"text": text}}}}),
        "finish-task": message("finish-task", {"type": "object"}),
    }
