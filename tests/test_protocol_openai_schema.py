"""OpenAI's speech request -> OpenAISpeechRequest, OpenAI's error object, and the /v1 response shapes."""
from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.errors import (
    ApiError,
    InternalError,
    InvalidParameter,
    MethodNotAllowed,
    NotFound,
    Overloaded,
    Unauthorized,
    UnsupportedMediaType,
)
from protocol.openai_responses import (
    find_voice_by_name,
    models_list,
    speech_delta_event,
    speech_done_event,
    speech_error_event,
    voice_name,
    voices_list,
)
from protocol.openai_schema import (
    MAX_INPUT_CHARS,
    MODEL_IDS,
    RESPONSE_FORMATS,
    InvalidField,
    OpenAISpeechRequest,
    error_object,
    parse_openai_speech,
    unknown_voice,
)
from protocol.schema import SpeechParams
from scheduler.jobs import Mode

JSON = "application/json"
ALL_FORMATS = frozenset(RESPONSE_FORMATS)


def parse(encodable: frozenset[str] = ALL_FORMATS, max_chars: int = MAX_INPUT_CHARS, **fields: Any) -> OpenAISpeechRequest:
    req = {"model": "tts-1", "input": "Hello there.", "voice": "alice", **fields}
    return parse_openai_speech(json.dumps(req).encode(), JSON, encodable, max_chars)


def refused(**fields: Any) -> InvalidField:
    with pytest.raises(InvalidField) as info:
        parse(**fields)
    assert info.value.status == 400
    return info.value


def test_defaults_are_openais() -> None:
    req = parse()
    assert req == OpenAISpeechRequest(model="tts-1", input="Hello there.", voice="alice", instructions=None,
                                      response_format="mp3", speed=1.0, stream_format=None)


def test_zero_shot_speech_params_at_24k() -> None:
    params = parse(response_format="flac", speed=0.25).speech_params("voice-id")
    assert params == SpeechParams(mode=Mode.ZERO_SHOT, text="Hello there.", reference_audio_id="voice-id",
                                  instruct=None, sample_rate=24000, bit_rate="128k", speed=0.25,
                                  output_format="flac", stream=False)


def test_instructions_select_instruct_mode_and_blank_ones_do_not() -> None:
    params = parse(instructions="Speak cheerfully.").speech_params("v")
    assert (params.mode, params.instruct) == (Mode.INSTRUCT, "Speak cheerfully.")
    assert parse(instructions="  ").speech_params("v").mode is Mode.ZERO_SHOT


@pytest.mark.parametrize("model", MODEL_IDS)
def test_our_names_and_openais_are_accepted(model: str) -> None:
    assert parse(model=model).model == model


def test_unknown_model_is_a_400_naming_the_accepted_ones() -> None:
    err = refused(model="whisper-1")
    assert (err.param, err.openai_code) == ("model", "model_not_found")
    assert "whisper-1" in err.message and "cosyvoice2" in err.message and "tts-1" in err.message


@pytest.mark.parametrize("fields,param", [
    ({"model": None}, "model"),
    ({"input": None}, "input"),
    ({"input": ""}, "input"),
    ({"input": " \n"}, "input"),
    ({"input": ["hi"]}, "input"),
    ({"voice": None}, "voice"),
    ({"voice": ""}, "voice"),
    ({"voice": 7}, "voice"),
    ({"voice": {}}, "voice"),
    ({"voice": {"id": ""}}, "voice"),
    ({"voice": {"name": "alice"}}, "voice"),
    ({"instructions": 1}, "instructions"),
    ({"response_format": "ogg"}, "response_format"),
    ({"response_format": 3}, "response_format"),
    ({"speed": "1.0"}, "speed"),
    ({"speed": True}, "speed"),
    ({"speed": 10 ** 400}, "speed"),  # beyond a float: was an OverflowError (tests/fuzz)
    ({"stream_format": "chunks"}, "stream_format"),
    ({"stream": "yes"}, "stream"),
])
def test_bad_fields_name_their_param(fields: dict[str, Any], param: str) -> None:
    err = refused(**fields)
    assert err.param == param and f"'{param}'" in err.message


def test_input_limit_is_4096_or_the_servers_lower_one() -> None:
    assert len(parse(input="x" * MAX_INPUT_CHARS).input) == MAX_INPUT_CHARS
    assert "at most 4096" in refused(input="x" * (MAX_INPUT_CHARS + 1)).message
    assert "at most 4096" in refused(max_chars=10_000, input="x" * (MAX_INPUT_CHARS + 1)).message
    with pytest.raises(InvalidField, match="at most 10"):
        parse(max_chars=10, input="x" * 11)


@given(st.floats(min_value=0.25, max_value=4.0))
def test_speed_inside_the_range_passes_unchanged(speed: float) -> None:
    assert parse(speed=speed).speed == speed


@given(st.one_of(st.floats(max_value=0.2499), st.floats(min_value=4.0001)))
def test_speed_outside_the_range_is_refused(speed: float) -> None:
    assert refused(speed=speed).param == "speed"


@pytest.mark.parametrize("speed", [float("nan"), float("inf")])
def test_speed_must_be_finite(speed: float) -> None:
    assert refused(speed=speed).param == "speed"  # json.loads reads NaN and Infinity


def test_speed_integers_are_numbers() -> None:
    assert parse(speed=2).speed == 2.0


@pytest.mark.parametrize("fmt", RESPONSE_FORMATS)
def test_every_format_parses_and_case_does_not_matter(fmt: str) -> None:
    assert parse(response_format=fmt.upper()).response_format == fmt


def test_a_format_this_server_cannot_encode_is_a_400() -> None:
    err = refused(encodable=ALL_FORMATS - {"opus"}, response_format="opus")
    assert (err.param, err.openai_code) == ("response_format", "unsupported_format")
    assert "'opus' cannot be encoded" in err.message


def test_voice_as_string_or_object() -> None:
    assert parse(voice="Alice Smith").voice == "Alice Smith"
    assert parse(voice={"id": "0b7c"}).voice == "0b7c"


@pytest.mark.parametrize("fields,expected", [
    ({}, None),
    ({"stream": False}, None),
    ({"stream": True}, "audio"),
    ({"stream_format": "audio"}, "audio"),
    ({"stream_format": "sse"}, "sse"),
    ({"stream": True, "stream_format": "sse"}, "sse"),  # an explicit stream_format wins
    ({"stream": False, "stream_format": "audio"}, "audio"),
    ({"stream_format": None, "stream": True}, "audio"),  # null counts as absent
])
def test_stream_and_stream_format(fields: dict[str, Any], expected: str | None) -> None:
    req = parse(**fields)
    assert req.stream_format == expected
    assert req.speech_params("v").stream is (expected is not None)


def test_unknown_keys_are_ignored() -> None:
    assert parse(user="someone", seed=3).input == "Hello there."


def test_body_must_be_a_json_object_with_a_json_content_type() -> None:
    with pytest.raises(UnsupportedMediaType):
        parse_openai_speech(b"{}", "text/plain", ALL_FORMATS)
    with pytest.raises(InvalidParameter):
        parse_openai_speech(b"[1]", JSON, ALL_FORMATS)
    with pytest.raises(InvalidParameter):
        parse_openai_speech(b"{nope", JSON, ALL_FORMATS)


# ---- the error object --------------------------------------------------------------------------

@pytest.mark.parametrize("err,status,type_,code", [
    (unknown_voice("bob"), 400, "invalid_request_error", "voice_not_found"),
    (InvalidParameter("bad"), 400, "invalid_request_error", "invalid_value"),
    (Unauthorized(), 401, "invalid_request_error", "invalid_api_key"),
    (NotFound("nope"), 404, "invalid_request_error", "not_found"),
    (MethodNotAllowed("no", allowed=("GET",)), 405, "invalid_request_error", "method_not_allowed"),
    (UnsupportedMediaType("json please"), 415, "invalid_request_error", "unsupported_media_type"),
    (Overloaded("slow down", status=429), 429, "rate_limit_error", "rate_limit_exceeded"),
    (Overloaded("full", status=503), 503, "server_error", "overloaded"),
    (InternalError(), 500, "server_error", "internal_error"),
])
def test_error_object_has_openais_four_fields(err: ApiError, status: int, type_: str, code: str) -> None:
    obj = error_object(err)
    assert err.status == status
    assert obj == {"error": {"message": err.message, "type": type_,
                             "param": "voice" if isinstance(err, InvalidField) else None, "code": code}}


def test_unknown_voice_message_names_the_voice() -> None:
    assert "'bob'" in unknown_voice("bob").message


# ---- response shapes ---------------------------------------------------------------------------

def _data(event: bytes) -> dict[str, Any]:
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    return json.loads(event[len(b"data: "):])


def test_sse_events() -> None:
    assert _data(speech_delta_event("AAEC")) == {"type": "speech.audio.delta", "audio": "AAEC"}
    assert _data(speech_done_event(11, 30)) == {
        "type": "speech.audio.done", "usage": {"input_tokens": 11, "output_tokens": 30, "total_tokens": 41}}
    assert _data(speech_error_event(InternalError("engine died"))) == {
        "type": "error", "error": {"message": "engine died", "type": "server_error", "param": None,
                                   "code": "internal_error"}}


def test_models_list_shape() -> None:
    listing = models_list()
    assert listing["object"] == "list"
    assert [m["id"] for m in listing["data"]] == list(MODEL_IDS)
    assert all(set(m) == {"id", "object", "created", "owned_by"} and m["object"] == "model"
               for m in listing["data"])


@pytest.mark.parametrize("filename,name", [("alice.wav", "alice"), ("Bob Smith.mp3", "Bob Smith"),
                                           ("a.b.pcm", "a.b"), ("noext", "noext"), ("dir/x.wav", "x"),
                                           ("C:\\voices\\y.wav", "y"), (".wav", ".wav")])
def test_voice_name_is_the_file_name_without_extension(filename: str, name: str) -> None:
    assert voice_name(filename) == name


def _voice(id_: str, filename: str) -> SimpleNamespace:
    return SimpleNamespace(id=id_, filename=filename, created_at=1_700_000_000)


def test_find_voice_by_name_takes_the_first_listed_and_matches_the_file_name_too() -> None:
    newest_first = [_voice("new", "alice.wav"), _voice("old", "alice.mp3"), _voice("b", "bob.wav")]
    assert find_voice_by_name(newest_first, "alice") == "new"
    assert find_voice_by_name(newest_first, "alice.mp3") == "old"
    assert find_voice_by_name(newest_first, "Alice") is None
    assert find_voice_by_name([], "alice") is None


def test_voices_list_shape() -> None:
    listing = voices_list([_voice("v1", "alice.wav")], has_more=True)
    assert listing == {"object": "list", "has_more": True, "data": [
        {"id": "v1", "name": "alice", "object": "audio.voice", "created_at": 1_700_000_000,
         "type": "audio_sample"}]}


def test_a_lone_surrogate_escape_is_a_400() -> None:
    """JSON may escape half a UTF-16 pair; the tokenizer cannot take it (tests/test_protocol_fuzz_schema.py)."""
    for fields in ({"input": "a\ud800"}, {"voice": "\udfff"}, {"instructions": "\ud800"}):
        with pytest.raises(ApiError, match="not valid Unicode") as info:
            parse(**fields)
        assert info.value.status == 400
