"""The JSON request schemas: any body -> typed parameters or the documented 400/415, never another exception.

An accepted request holds only what the engine can use: valid Unicode (a lone UTF-16 surrogate, which
JSON can escape, breaks the tokenizer and every UTF-8 encoder), finite numbers in their ranges, known
choices. A refusal renders on its transport (the PAI JSON error, OpenAI's error object).
"""
from __future__ import annotations

import json
import math
from typing import Any

from protocol.errors import ApiError, InvalidParameter, UnsupportedMediaType, http_error
from protocol.openai_schema import RESPONSE_FORMATS, OpenAISpeechRequest, error_object, parse_openai_speech
from protocol.openai_schema import SPEED_RANGE as OPENAI_SPEED_RANGE
from protocol.schema import (
    API_MODES,
    BIT_RATES_KBPS,
    MAX_VOLUME,
    OUTPUT_FORMATS,
    SAMPLE_RATES,
    SPEED_RANGE,
    SpeechParams,
    has_lone_surrogate,
    parse_list_query,
    parse_speech_request,
    parse_ws_run_task,
)
from protocol.speech_mode import Mode

MAX_TEXT_CHARS = 50
JSON = "application/json"


def _valid_text(value: str | None) -> None:
    if value is not None:
        assert isinstance(value, str) and value.encode("utf-8"), value  # UnicodeEncodeError on a lone surrogate


def check_params(p: SpeechParams, speed_range: tuple[float, float] = SPEED_RANGE,
                 formats: tuple[str, ...] = OUTPUT_FORMATS) -> None:
    assert isinstance(p.mode, Mode) and p.api_mode in API_MODES
    for text in (p.text, p.reference_audio_id, p.instruct):
        _valid_text(text)
    assert p.reference_audio_id.strip()
    if p.text is not None:
        assert p.text.strip() and len(p.text) <= MAX_TEXT_CHARS, p.text
    assert (p.instruct is not None and bool(p.instruct.strip())) == (p.mode is Mode.INSTRUCT), p
    assert p.sample_rate in SAMPLE_RATES and p.bit_rate in BIT_RATES_KBPS and p.output_format in formats
    assert math.isfinite(p.volume) and 0 < p.volume <= MAX_VOLUME, p.volume
    assert math.isfinite(p.speed) and speed_range[0] <= p.speed <= speed_range[1], p.speed
    assert isinstance(p.debug, bool) and isinstance(p.stream, bool)


def check_openai(r: OpenAISpeechRequest) -> None:
    for text in (r.model, r.input, r.voice, r.instructions):
        _valid_text(text)
    assert r.input.strip() and len(r.input) <= MAX_TEXT_CHARS and r.voice.strip()
    assert r.response_format in RESPONSE_FORMATS and r.stream_format in (None, "audio", "sse")
    check_params(r.speech_params("voice-id"), OPENAI_SPEED_RANGE, RESPONSE_FORMATS)  # speed goes on unchanged


def _refusal(err: ApiError, allowed: tuple[type[ApiError], ...]) -> tuple:
    assert isinstance(err, allowed) and err.status in (400, 415), repr(err)
    status, _, body = http_error(err, "rid")  # the PAI error body: UTF-8 JSON
    assert status == err.status and json.loads(body)["message"] == err.message
    json.dumps(error_object(err), ensure_ascii=False).encode("utf-8")  # OpenAI's error object
    return ("error", type(err).__name__, err.status)


def run_speech(body: bytes, content_type: str | None = JSON) -> tuple:
    """POST /api/v1/audio/speech."""
    try:
        params = parse_speech_request(body, content_type, MAX_TEXT_CHARS)
    except ApiError as err:
        return _refusal(err, (InvalidParameter, UnsupportedMediaType))
    check_params(params)
    return ("ok", params)


def run_openai(body: bytes, content_type: str | None = JSON) -> tuple:
    """POST /v1/audio/speech."""
    try:
        req = parse_openai_speech(body, content_type, RESPONSE_FORMATS, MAX_TEXT_CHARS)
    except ApiError as err:
        return _refusal(err, (InvalidParameter, UnsupportedMediaType))
    check_openai(req)
    return ("ok", req)


def run_ws_parameters(parameters: Any, model: Any) -> tuple:
    """A run-task's payload.parameters and payload.model (any JSON values)."""
    if has_lone_surrogate([parameters, model]):
        return ("refused by the task machine",)  # it reads the message (protocol.ws_tasks._load)
    try:
        params = parse_ws_run_task(parameters, model)
    except ApiError as err:
        return _refusal(err, (InvalidParameter,))
    check_params(params)
    assert params.text is None and params.stream
    return ("ok", params)


def run_list_query(query: str) -> tuple:
    """GET /api/v1/audio/reference_audio?limit=&order=."""
    try:
        limit, order = parse_list_query(query, max_limit=100)
    except ApiError as err:
        return _refusal(err, (InvalidParameter,))
    assert 1 <= limit <= 100 and order in ("asc", "desc")
    return ("ok", limit, order)
