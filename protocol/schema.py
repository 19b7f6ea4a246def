"""The API's request schema: JSON -> frozen `SpeechParams`, or `InvalidParameter` naming the field.

Choices where the original document is silent (documented for the server README):
- unknown keys are ignored (forward compatible); a key set to `null` counts as absent;
- numbers must be JSON numbers (never strings), booleans JSON booleans; integers may not be
  floats (`24000.0` is refused for sample_rate);
- `instruct` is required (non-empty) for natural_language_replication and ignored otherwise
  (the WebSocket example client sends `"instruct": ""` in the other modes);
- `volume` is a gain factor in (0, 10]; `speed` in [0.5, 2.0];
- `bit_rate` "384k" is accepted and encoded at 320 kb/s (MP3 has no 384 kb/s rate).
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from protocol.errors import InvalidParameter, UnsupportedMediaType
from protocol.speech_mode import Mode

HTTP_MODEL = "CosyVoice2-0.5B"
WS_MODELS = ("cosyvoice-v2", HTTP_MODEL)
DEFAULT_MAX_TEXT_CHARS = 5000  # about 20 minutes of speech; a guard, the server may pass its own

API_MODES: dict[str, Mode] = {
    "fast_replication": Mode.ZERO_SHOT,
    "cross_lingual_replication": Mode.CROSS_LINGUAL,
    "natural_language_replication": Mode.INSTRUCT,
}
SAMPLE_RATES = (8000, 16000, 22050, 24000, 32000, 44100, 48000)
BIT_RATES_KBPS: dict[str, int] = {
    "16k": 16, "32k": 32, "48k": 48, "64k": 64, "128k": 128,
    "192k": 192, "256k": 256, "320k": 320, "384k": 320,  # MP3 tops out at 320 kb/s
}
OUTPUT_FORMATS = ("wav", "mp3", "pcm")
SPEED_RANGE = (0.5, 2.0)
MAX_VOLUME = 10.0  # beyond this almost every sample clips; refuse rather than distort
LIST_ORDERS = ("asc", "desc")
DEFAULT_LIST_LIMIT = 100
MAX_LIST_LIMIT = 100_000  # a larger limit is served as this: the stores' integers stay in range


@dataclass(frozen=True)
class SpeechParams:
    mode: Mode
    text: str | None  # None: arrives piecewise (WebSocket continue-task)
    reference_audio_id: str
    instruct: str | None = None  # only for Mode.INSTRUCT
    sample_rate: int = 24000
    bit_rate: str = "192k"
    volume: float = 1.0
    speed: float = 1.0
    output_format: str = "wav"
    debug: bool = False
    stream: bool = True

    @property
    def bit_rate_kbps(self) -> int:
        """The MP3 encoder's rate ("384k" -> 320)."""
        return BIT_RATES_KBPS[self.bit_rate]

    @property
    def api_mode(self) -> str:
        return next(name for name, mode in API_MODES.items() if mode is self.mode)


# ---- typed field readers: each raises InvalidParameter naming the field ----

def _bad(field: str, why: str) -> InvalidParameter:
    return InvalidParameter(f"'{field}' {why}")


def _get(obj: Mapping[str, Any], key: str) -> Any:
    return obj.get(key)  # null == absent


def _string(obj: Mapping[str, Any], key: str, field: str, default: str | None = None) -> str | None:
    value = _get(obj, key)
    if value is None:
        return default
    if not isinstance(value, str):
        raise _bad(field, f"must be a string, got {json_type(value)}")
    return value


def _required_string(obj: Mapping[str, Any], key: str, field: str) -> str:
    value = _string(obj, key, field)
    if value is None:
        raise _bad(field, "is required")
    if not value.strip():
        raise _bad(field, "must not be empty")
    return value


def _bool(obj: Mapping[str, Any], key: str, field: str, default: bool) -> bool:
    value = _get(obj, key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(field, f"must be a boolean (true/false), got {json_type(value)}")
    return value


def _int(obj: Mapping[str, Any], key: str, field: str, default: int) -> int:
    value = _get(obj, key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(field, f"must be an integer, got {json_type(value)}")
    return value


def _number(obj: Mapping[str, Any], key: str, field: str, default: float) -> float:
    value = _get(obj, key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(field, f"must be a number, got {json_type(value)}")
    number = as_float(value)
    if not math.isfinite(number):
        raise _bad(field, "must be a finite number")
    return number


def as_float(value: float) -> float:
    """`float(value)`, or infinity for an integer beyond a float's range (JSON integers have no limit)."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _choice(value: str, choices: Mapping[str, Any] | tuple[str, ...], field: str) -> str:
    if value not in choices:
        raise _bad(field, f"must be one of {', '.join(choices)}; got {value!r}")
    return value


def json_type(value: Any) -> str:
    names = {bool: "boolean", int: "number", float: "number", str: "string", list: "array",
             dict: "object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


# ---- the shared parameter object (HTTP `input` / WS `parameters`) ----

def _parse_params(obj: Mapping[str, Any], prefix: str, text: str | None, stream: bool) -> SpeechParams:
    def f(name: str) -> str:
        return f"{prefix}{name}"

    mode_name = _choice(_required_string(obj, "mode", f("mode")), API_MODES, f("mode"))
    mode = API_MODES[mode_name]
    instruct = _string(obj, "instruct", f("instruct"))
    if mode is Mode.INSTRUCT:
        if instruct is None or not instruct.strip():
            raise _bad(f("instruct"), "is required for natural_language_replication")
    else:
        instruct = None  # documented as ignored outside natural_language_replication
    sample_rate = _int(obj, "sample_rate", f("sample_rate"), 24000)
    if sample_rate not in SAMPLE_RATES:
        raise _bad(f("sample_rate"), f"must be one of {', '.join(map(str, SAMPLE_RATES))}; got {sample_rate}")
    bit_rate = _string(obj, "bit_rate", f("bit_rate"), "192k")
    assert bit_rate is not None
    bit_rate = _choice(bit_rate.lower(), BIT_RATES_KBPS, f("bit_rate"))
    volume = _number(obj, "volume", f("volume"), 1.0)
    if not 0.0 < volume <= MAX_VOLUME:
        raise _bad(f("volume"), f"must be > 0 and <= {MAX_VOLUME:g}; got {volume:g}")
    speed = _number(obj, "speed", f("speed"), 1.0)
    if not SPEED_RANGE[0] <= speed <= SPEED_RANGE[1]:
        raise _bad(f("speed"), f"must be between {SPEED_RANGE[0]} and {SPEED_RANGE[1]}; got {speed:g}")
    output_format = _string(obj, "output_format", f("output_format"), "wav")
    assert output_format is not None
    output_format = _choice(output_format.lower(), OUTPUT_FORMATS, f("output_format"))
    return SpeechParams(
        mode=mode, text=text, reference_audio_id=_required_string(obj, "reference_audio_id", f("reference_audio_id")),
        instruct=instruct, sample_rate=sample_rate, bit_rate=bit_rate, volume=volume, speed=speed,
        output_format=output_format, debug=_bool(obj, "debug", f("debug"), False), stream=stream,
    )


def _check_text(text: str, field: str, max_text_chars: int) -> str:
    if not text.strip():
        raise _bad(field, "must not be empty")
    if len(text) > max_text_chars:
        raise _bad(field, f"is too long: {len(text)} characters, at most {max_text_chars}")
    return text


def _object(value: Any, field: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise _bad(field, f"must be an object, got {json_type(value)}")
    return value


def load_json_object(body: bytes, what: str = "request body") -> Mapping[str, Any]:
    try:
        value = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: nested too deep
        raise InvalidParameter(f"{what} is not valid JSON: {exc}") from None
    if has_lone_surrogate(value):
        raise InvalidParameter(f"{what} is not valid Unicode: {LONE_SURROGATE}")
    if not isinstance(value, dict):
        raise InvalidParameter(f"{what} must be a JSON object")
    return value


LONE_SURROGATE = "a \\u escape names half of a UTF-16 surrogate pair"
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def has_lone_surrogate(value: Any) -> bool:
    """Whether parsed JSON holds half of a UTF-16 surrogate pair (JSON can escape one: "\\ud800"): Python
    reads it into a str no UTF-8 encoder takes (the tokenizer, a WebSocket frame, an SSE event, the logs)."""
    stack = [value]
    while stack:  # not recursive: json.loads allows nesting deeper than a Python walk would
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            stack += item
            stack += item.values()
        elif isinstance(item, list):
            stack += item
    return False


def check_json_content_type(content_type: str | None) -> None:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        raise UnsupportedMediaType(
            f"Content-Type must be application/json, got {content_type or 'none'}")


# ---- entry points ----

def parse_speech_request(body: bytes, content_type: str | None,
                         max_text_chars: int = DEFAULT_MAX_TEXT_CHARS) -> SpeechParams:
    """POST /api/v1/audio/speech body -> SpeechParams (400/415 on any problem)."""
    check_json_content_type(content_type)
    req = load_json_object(body)
    model = _required_string(req, "model", "model")
    if model != HTTP_MODEL:
        raise _bad("model", f"must be {HTTP_MODEL!r}; got {model!r}")
    if _get(req, "input") is None:
        raise _bad("input", "is required")
    inp = _object(req["input"], "input")
    text = _check_text(_required_string(inp, "text", "input.text"), "input.text", max_text_chars)
    return _parse_params(inp, "input.", text, stream=_bool(req, "stream", "stream", True))


def parse_ws_run_task(params: Mapping[str, Any], model: str) -> SpeechParams:
    """The run-task `payload.parameters` object -> SpeechParams (text=None, stream=True)."""
    if model not in WS_MODELS:
        raise _bad("payload.model", f"must be one of {', '.join(WS_MODELS)}; got {model!r}")
    return _parse_params(_object(params, "payload.parameters"), "parameters.", None, stream=True)


def check_ws_text(text: Any, max_text_chars: int = DEFAULT_MAX_TEXT_CHARS) -> str:
    """One continue-task text piece: a non-empty string."""
    if not isinstance(text, str):
        raise _bad("payload.input.text", f"must be a string, got {json_type(text)}")
    return _check_text(text, "payload.input.text", max_text_chars)


def parse_list_query(query: str, max_limit: int = MAX_LIST_LIMIT) -> tuple[int, str]:
    """`limit=N&order=asc|desc` -> (limit, order); defaults 100 / desc; a limit above `max_limit` is served
    as `max_limit` (SQLite's LIMIT takes 64 bits, and int() refuses 4300+ digits: either was a 500)."""
    try:
        pairs = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=False))
    except ValueError as exc:
        raise InvalidParameter(f"bad query string: {exc}") from None
    limit = DEFAULT_LIST_LIMIT
    raw_limit = pairs.get("limit")
    if raw_limit is not None:
        digits = raw_limit.lstrip("0")
        if not raw_limit.isascii() or not raw_limit.isdigit() or not digits:
            raise _bad("limit", f"must be a positive integer; got {raw_limit!r}")
        limit = max_limit if len(digits) > len(str(max_limit)) else min(int(digits), max_limit)
    order = pairs.get("order", "desc")
    if order not in LIST_ORDERS:
        raise _bad("order", f"must be asc or desc; got {order!r}")
    return limit, order
