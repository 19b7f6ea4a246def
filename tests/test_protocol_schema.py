from __future__ import annotations

import json

import pytest

from protocol.errors import ApiError, Overloaded, Unauthorized, error_body, error_headers
from protocol.schema import SpeechParams, parse_list_query, parse_speech_request, parse_ws_run_task
from scheduler.jobs import Mode

JSON = "application/json"


def body(input_: dict | None = None, **top: object) -> bytes:
    inp = {"mode": "fast_replication", "text": "你好", "reference_audio_id": "ref-1"}
    inp.update(input_ or {})
    req: dict = {"model": "CosyVoice2-0.5B", "input": inp}
    req.update(top)
    return json.dumps(req).encode()


def test_defaults() -> None:
    p = parse_speech_request(body(), JSON)
    assert p == SpeechParams(mode=Mode.ZERO_SHOT, text="你好", reference_audio_id="ref-1", instruct=None,
                             sample_rate=24000, bit_rate="192k", volume=1.0, speed=1.0,
                             output_format="wav", debug=False, stream=True)


def test_document_example() -> None:
    p = parse_speech_request(body({"mode": "natural_language_replication", "speed": 1.0, "output_format": "mp3",
                                   "sample_rate": 32000, "bit_rate": "48k", "volume": 2.0,
                                   "instruct": "用四川話說"}, stream=False), "application/json; charset=utf-8")
    assert (p.mode, p.instruct, p.sample_rate, p.bit_rate_kbps, p.volume, p.output_format, p.stream) == \
        (Mode.INSTRUCT, "用四川話說", 32000, 48, 2.0, "mp3", False)
    assert p.api_mode == "natural_language_replication"


def test_384k_encodes_at_320() -> None:
    assert parse_speech_request(body({"bit_rate": "384k"}), JSON).bit_rate_kbps == 320


def test_instruct_ignored_outside_instruct_mode_and_null_is_absent() -> None:
    p = parse_speech_request(body({"mode": "cross_lingual_replication", "instruct": "", "speed": None}), JSON)
    assert p.mode is Mode.CROSS_LINGUAL and p.instruct is None and p.speed == 1.0


BAD_INPUTS = [
    ({"mode": "fast"}, "input.mode"),
    ({"mode": None}, "input.mode"),
    ({"text": ""}, "input.text"),
    ({"text": "   "}, "input.text"),
    ({"text": 5}, "input.text"),
    ({"text": "x" * 101}, "input.text"),
    ({"reference_audio_id": ""}, "input.reference_audio_id"),
    ({"reference_audio_id": None}, "input.reference_audio_id"),
    ({"mode": "natural_language_replication"}, "input.instruct"),
    ({"mode": "natural_language_replication", "instruct": " "}, "input.instruct"),
    ({"sample_rate": 12345}, "input.sample_rate"),
    ({"sample_rate": "24000"}, "input.sample_rate"),
    ({"sample_rate": 24000.0}, "input.sample_rate"),
    ({"sample_rate": True}, "input.sample_rate"),
    ({"bit_rate": "100k"}, "input.bit_rate"),
    ({"bit_rate": 192}, "input.bit_rate"),
    ({"volume": 0}, "input.volume"),
    ({"volume": -1.0}, "input.volume"),
    ({"volume": 10.5}, "input.volume"),
    ({"volume": "2"}, "input.volume"),
    ({"volume": 10 ** 400}, "input.volume"),  # beyond a float: was an OverflowError (tests/fuzz)
    ({"speed": -10 ** 400}, "input.speed"),
    ({"speed": 0.4}, "input.speed"),
    ({"speed": 2.01}, "input.speed"),
    ({"speed": False}, "input.speed"),
    ({"output_format": "ogg"}, "input.output_format"),
    ({"debug": "true"}, "input.debug"),
    ({"debug": 1}, "input.debug"),
]


@pytest.mark.parametrize("inp,field", BAD_INPUTS)
def test_bad_input_names_the_field(inp: dict, field: str) -> None:
    with pytest.raises(ApiError) as e:
        parse_speech_request(body(inp), JSON, max_text_chars=100)
    assert e.value.status == 400 and e.value.code == "InvalidParameter"
    assert f"'{field}'" in e.value.message


@pytest.mark.parametrize("raw,field", [
    (body(model="CosyVoice2"), "model"),
    (body(stream="false"), "stream"),
    (json.dumps({"model": "CosyVoice2-0.5B"}).encode(), "input"),
    (json.dumps({"model": "CosyVoice2-0.5B", "input": []}).encode(), "input"),
    (json.dumps({"input": {}}).encode(), "model"),
])
def test_bad_top_level(raw: bytes, field: str) -> None:
    with pytest.raises(ApiError) as e:
        parse_speech_request(raw, JSON)
    assert e.value.status == 400 and f"'{field}'" in e.value.message


@pytest.mark.parametrize("raw", [b"", b"{", b"[1]", b"\xff\xfe", b"null",
                                 b"[" * 100_000, b'{"a":' * 100_000])  # too deep: was a RecursionError (tests/fuzz)
def test_not_a_json_object(raw: bytes) -> None:
    with pytest.raises(ApiError) as e:
        parse_speech_request(raw, JSON)
    assert e.value.status == 400


@pytest.mark.parametrize("ctype", [None, "text/plain", "multipart/form-data; boundary=x"])
def test_wrong_content_type_is_415(ctype: str | None) -> None:
    with pytest.raises(ApiError) as e:
        parse_speech_request(body(), ctype)
    assert e.value.status == 415 and e.value.code == "UnsupportedMediaType"


def test_ws_parameters_of_the_example_client() -> None:
    params = {"mode": "fast_replication", "reference_audio_id": "r", "output_format": "mp3",
              "sample_rate": 24000, "bit_rate": "48k", "volume": 2.0, "instruct": "", "speed": 1.0,
              "debug": True}
    for model in ("cosyvoice-v2", "CosyVoice2-0.5B"):
        p = parse_ws_run_task(params, model)
        assert p.text is None and p.stream and p.debug and p.instruct is None
    with pytest.raises(ApiError, match="payload.model"):
        parse_ws_run_task(params, "qwen")
    with pytest.raises(ApiError, match="parameters.speed"):
        parse_ws_run_task({**params, "speed": 3}, "cosyvoice-v2")


@pytest.mark.parametrize("query,expected", [
    ("", (100, "desc")), ("limit=10&order=desc", (10, "desc")), ("order=asc", (100, "asc")),
    ("limit=5&foo=bar", (5, "desc")), ("limit=007", (7, "desc")), ("limit=100000", (100_000, "desc")),
    ("limit=100001", (100_000, "desc")), ("limit=29193144716635516422348776221349773312", (100_000, "desc")),
    ("limit=" + "9" * 5000, (100_000, "desc")),  # past int()'s 4300 digits
])
def test_list_query(query: str, expected: tuple[int, str]) -> None:
    assert parse_list_query(query) == expected


@pytest.mark.parametrize("query", ["limit=0", "limit=-1", "limit=abc", "limit=", "limit=1.5", "order=up",
                                   "limit=%EF%BC%91", "limit=000", "limit=" + "0" * 5000])
def test_list_query_bad(query: str) -> None:
    with pytest.raises(ApiError) as e:
        parse_list_query(query)
    assert e.value.status == 400


def test_error_bodies() -> None:
    assert json.loads(error_body(Unauthorized("token abc wrong"), "rid")) == {
        "code": "Unauthorized", "message": "invalid or missing token", "request_id": "rid"}
    err = Overloaded(status=429, retry_after_s=3)
    assert err.status == 429 and ("retry-after", "3") in error_headers(err)
    with pytest.raises(ValueError):
        Overloaded(status=500)


@pytest.mark.parametrize("inp", [{"text": "a\ud800"}, {"reference_audio_id": "\udfff"}, {"extra": ["\ud800"]}])
def test_a_lone_surrogate_escape_is_a_400(inp: dict) -> None:
    """Found by tests/test_protocol_fuzz_schema.py: JSON may escape half a UTF-16 pair ("\\ud800"); it was
    accepted and the tokenizer raised TypeError on the text (a 500). Refused wherever it is."""
    with pytest.raises(ApiError) as e:
        parse_speech_request(body(inp), JSON)
    assert e.value.status == 400 and "not valid Unicode" in e.value.message
