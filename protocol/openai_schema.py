"""OpenAI's `POST /v1/audio/speech` body -> `OpenAISpeechRequest`, and OpenAI's error object.

Choices where OpenAI's reference is silent or does not fit (documented in the README):
- `model`: our names (`cosyvoice2`, `CosyVoice2-0.5B`) and OpenAI's TTS names as aliases of the same
  model, so stock clients work unchanged; anything else is a 400 naming the accepted ones;
- `voice`: a stored voice's id or name, as a string or as `{"id": ...}`; resolving it is the server's;
- `instructions` (non-blank) selects instruct mode; without it the request is zero-shot;
- `stream: true` is a synonym of `stream_format: "audio"`; an explicit `stream_format` wins; with
  neither the response is the whole file;
- `speed` 0.25-4.0 goes to the engine's mel time-stretch unchanged;
- like the PAI schema: unknown keys are ignored, `null` counts as absent, numbers must be numbers.
"""
from __future__ import annotations

import math
from collections.abc import Container, Mapping
from dataclasses import dataclass
from typing import Any

from protocol.errors import ApiError, ErrorCode, InvalidParameter
from protocol.schema import (
    HTTP_MODEL,
    SpeechParams,
    as_float,
    check_json_content_type,
    json_type,
    load_json_object,
)
from protocol.speech_mode import Mode

SERVED_MODELS = ("cosyvoice2", HTTP_MODEL)
MODEL_ALIASES = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts", "gpt-4o-mini-tts-2025-12-15")  # OpenAI's names
MODEL_IDS = SERVED_MODELS + MODEL_ALIASES
MAX_INPUT_CHARS = 4096  # OpenAI's limit; the server's --max-text-chars applies too when lower
RESPONSE_FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")
STREAM_FORMATS = ("audio", "sse")
SPEED_RANGE = (0.25, 4.0)
SAMPLE_RATE = 24000  # every format, as OpenAI's (raw pcm included)
MP3_BIT_RATE = "128k"  # a PAI bit_rate key; 24 kHz MP3 (MPEG-2) goes up to 160k


class InvalidField(InvalidParameter):
    """A 400 naming the request field (`param`) and, where OpenAI has one, its error `code`."""

    def __init__(self, param: str | None, message: str, openai_code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.openai_code = openai_code


@dataclass(frozen=True)
class OpenAISpeechRequest:
    model: str
    input: str
    voice: str  # an id or a name, still to be resolved
    instructions: str | None = None
    response_format: str = "mp3"
    speed: float = 1.0
    stream_format: str | None = None  # None: the whole file in one response

    def speech_params(self, voice_id: str) -> SpeechParams:
        """The engine-facing parameters, `voice_id` being the resolved voice."""
        mode = Mode.INSTRUCT if self.instructions is not None else Mode.ZERO_SHOT
        return SpeechParams(mode=mode, text=self.input, reference_audio_id=voice_id, instruct=self.instructions,
                            sample_rate=SAMPLE_RATE, bit_rate=MP3_BIT_RATE, speed=self.speed,
                            output_format=self.response_format, stream=self.stream_format is not None)


def _invalid(param: str, why: str, code: str | None = None) -> InvalidField:
    return InvalidField(param, f"'{param}' {why}", code)


def _string(req: Mapping[str, Any], key: str) -> str | None:
    value = req.get(key)
    if value is not None and not isinstance(value, str):
        raise _invalid(key, f"must be a string, got {json_type(value)}")
    return value


def _required(req: Mapping[str, Any], key: str) -> str:
    value = _string(req, key)
    if value is None:
        raise _invalid(key, "is required")
    if not value.strip():
        raise _invalid(key, "must not be empty")
    return value


def _model(req: Mapping[str, Any]) -> str:
    model = _required(req, "model")
    if model not in MODEL_IDS:
        raise _invalid("model", f"must be one of {', '.join(MODEL_IDS)}; got {model!r}", "model_not_found")
    return model


def _input(req: Mapping[str, Any], max_chars: int) -> str:
    text = _required(req, "input")
    if len(text) > max_chars:
        raise _invalid("input", f"is too long: {len(text)} characters, at most {max_chars}")
    return text


def _voice(req: Mapping[str, Any]) -> str:
    value = req.get("voice")
    if isinstance(value, dict):
        voice_id = value.get("id")
        if not isinstance(voice_id, str) or not voice_id.strip():
            raise _invalid("voice", "as an object needs a non-empty string 'id'")
        return voice_id
    if value is None:
        raise _invalid("voice", "is required")
    if not isinstance(value, str):
        raise _invalid("voice", f"must be a string or an object with an 'id', got {json_type(value)}")
    if not value.strip():
        raise _invalid("voice", "must not be empty")
    return value


def _response_format(req: Mapping[str, Any], encodable: Container[str]) -> str:
    fmt = (_string(req, "response_format") or "mp3").lower()
    if fmt not in RESPONSE_FORMATS:
        raise _invalid("response_format", f"must be one of {', '.join(RESPONSE_FORMATS)}; got {fmt!r}")
    if fmt not in encodable:
        raise _invalid("response_format", f"{fmt!r} cannot be encoded by this server", "unsupported_format")
    return fmt


def _speed(req: Mapping[str, Any]) -> float:
    value = req.get("speed")
    if value is None:
        return 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _invalid("speed", f"must be a number, got {json_type(value)}")
    low, high = SPEED_RANGE
    speed = as_float(value)
    if not math.isfinite(speed) or not low <= speed <= high:
        raise _invalid("speed", f"must be between {low} and {high}; got {speed:g}")
    return speed


def _stream_format(req: Mapping[str, Any]) -> str | None:
    stream = req.get("stream")  # checked even when stream_format decides: a wrong type is never let through
    if stream is not None and not isinstance(stream, bool):
        raise _invalid("stream", f"must be a boolean (true/false), got {json_type(stream)}")
    fmt = _string(req, "stream_format")
    if fmt is not None:
        if fmt not in STREAM_FORMATS:
            raise _invalid("stream_format", f"must be one of {', '.join(STREAM_FORMATS)}; got {fmt!r}")
        return fmt
    return "audio" if stream else None


def parse_openai_speech(body: bytes, content_type: str | None, encodable: Container[str],
                        max_input_chars: int = MAX_INPUT_CHARS) -> OpenAISpeechRequest:
    """The request body -> OpenAISpeechRequest (400/415 on any problem). `encodable`: the response
    formats this server can produce (see protocol.encoders_av.can_encode)."""
    check_json_content_type(content_type)
    req = load_json_object(body)
    instructions = _string(req, "instructions")
    return OpenAISpeechRequest(
        model=_model(req), input=_input(req, min(max_input_chars, MAX_INPUT_CHARS)), voice=_voice(req),
        instructions=instructions if instructions and instructions.strip() else None,
        response_format=_response_format(req, encodable), speed=_speed(req),
        stream_format=_stream_format(req))


# ---- OpenAI's error object --------------------------------------------------------------------

_CODES: dict[ErrorCode, str] = {  # OpenAI's code where it has one, else ours in snake case
    ErrorCode.UNAUTHORIZED: "invalid_api_key",
    ErrorCode.NOT_FOUND: "not_found",
    ErrorCode.INVALID_PARAMETER: "invalid_value",
    ErrorCode.OVERLOADED: "rate_limit_exceeded",
}


def error_type(status: int) -> str:
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"  # 400, 401 (as OpenAI's own 401), 404, 405, 413, 415


def _snake(code: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in code).lstrip("_")


def error_object(err: ApiError) -> dict[str, Any]:
    """`{"error": {message, type, param, code}}` for any ApiError (the PAI routes keep their own shape)."""
    field = err if isinstance(err, InvalidField) else None
    code = (field.openai_code if field else None) or _CODES.get(err.code) or _snake(str(err.code))
    if err.code is ErrorCode.OVERLOADED and err.status == 503:
        code = "overloaded"  # the server is full or draining, not this client's rate
    return {"error": {"message": err.message, "type": error_type(err.status),
                      "param": field.param if field else None, "code": code}}


def unknown_voice(voice: str) -> InvalidField:
    return InvalidField("voice", f"voice {voice!r} not found: give a stored voice's id or name "
                                 "(GET /v1/audio/voices lists them)", "voice_not_found")
