"""The JSON request schemas under any JSON (tests/fuzz/drive_schema.py): typed parameters the engine can use
(valid Unicode, finite numbers in range, known choices) or an InvalidParameter / UnsupportedMediaType that
renders; never TypeError, KeyError, OverflowError, RecursionError or UnicodeEncodeError."""
from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.drive_schema import run_list_query, run_openai, run_speech, run_ws_parameters
from tests.fuzz.strategies import examples

# Every JSON value, with the awkward ones likely: huge integers, non-finite floats (Python's json reads
# NaN/Infinity), lone UTF-16 surrogates (JSON can escape half a pair: "\ud800").
strings = st.one_of(st.text(max_size=12), st.text(st.characters(categories=["Cs"]), min_size=1, max_size=2),
                    st.sampled_from(["", " ", "fast_replication", "natural_language_replication", "wav", "MP3",
                                     "384k", "sse", "audio", "tts-1", "CosyVoice2-0.5B", "cosyvoice-v2"]))
numbers = st.one_of(st.integers(), st.integers(min_value=10 ** 300, max_value=10 ** 400).map(lambda n: n * 10),
                    st.floats(), st.sampled_from([0, 1, 0.5, 2, 4, 10, 16000, 24000, -1, 10 ** 400, -10 ** 400]))
scalars = st.one_of(st.none(), st.booleans(), numbers, strings)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(strings, inner, max_size=3), max_leaves=8)

PAI_INPUT = {"text": "hi", "mode": "fast_replication", "reference_audio_id": "r", "instruct": "calm",
             "sample_rate": 24000, "bit_rate": "192k", "volume": 1.0, "speed": 1.0, "output_format": "wav",
             "debug": False}
OPENAI = {"model": "tts-1", "input": "hi", "voice": "v", "instructions": "calm", "response_format": "mp3",
          "speed": 1.0, "stream_format": "sse", "stream": True}


def one_field_changed(base: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """A valid object with one field set to any JSON value (or dropped): every field's checks get hit."""
    def change(key: str, value: Any, drop: bool) -> dict[str, Any]:
        out = dict(base)
        if drop:
            out.pop(key, None)
        else:
            out[key] = value
        return out
    return st.builds(change, st.sampled_from([*base, "extra"]), json_values, st.booleans())


# The values most likely to slip past a check, tried in every field (a table, not a sample).
AWKWARD = [None, True, 0, -1, 2 ** 63, 10 ** 400, -10 ** 400, 1e308, float("nan"), float("inf"), "", " ",
           "\ud800", "a\udfffb", "\U0001f600", [], {}, [1], {"id": "v"}]


def dumps(value: Any) -> bytes:
    return json.dumps(value).encode()  # ensure_ascii: a lone surrogate travels as its \\u escape


@examples(150)
@given(one_field_changed(PAI_INPUT), st.one_of(st.just("CosyVoice2-0.5B"), json_values), json_values)
def test_pai_speech_body_is_parameters_or_a_400(inp: dict[str, Any], model: Any, stream: Any) -> None:
    run_speech(dumps({"model": model, "input": inp, "stream": stream}))
    run_speech(dumps({"model": "CosyVoice2-0.5B", "input": inp}))


@examples(100)
@given(one_field_changed(OPENAI))
def test_openai_speech_body_is_a_request_or_a_400(body: dict[str, Any]) -> None:
    run_openai(dumps(body))


@examples(100)
@given(one_field_changed({k: v for k, v in PAI_INPUT.items() if k != "text"}),
       st.one_of(st.sampled_from(["cosyvoice-v2", "CosyVoice2-0.5B"]), json_values))
def test_ws_run_task_parameters_are_parameters_or_a_400(parameters: dict[str, Any], model: Any) -> None:
    run_ws_parameters(parameters, model)


@examples(100)
@given(json_values, st.sampled_from(["application/json", "application/x+json", "text/plain", None]))
def test_any_json_value_or_content_type_is_handled(value: Any, content_type: str | None) -> None:
    for run in (run_speech, run_openai):
        run(dumps(value), content_type)
    run_ws_parameters(value, value)


@examples(60)
@given(st.one_of(st.binary(max_size=60), st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n),
                 st.integers(1, 3000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n)))
def test_any_bytes_are_handled(body: bytes) -> None:
    run_speech(body)
    run_openai(body)


@examples(60)
@given(st.text(st.characters(codec="latin-1"), max_size=30))
def test_any_list_query_is_handled(query: str) -> None:
    run_list_query(query)


@pytest.mark.parametrize("value", AWKWARD, ids=lambda v: repr(v)[:12])
@pytest.mark.parametrize("key", [*PAI_INPUT, "model", "input", "stream"])
def test_every_pai_field_with_every_awkward_value(key: str, value: Any) -> None:
    body: dict[str, Any] = {"model": "CosyVoice2-0.5B", "input": dict(PAI_INPUT), "stream": True}
    if key in PAI_INPUT:
        body["input"][key] = value
        run_ws_parameters({k: v for k, v in body["input"].items() if k != "text"}, "cosyvoice-v2")
    else:
        body[key] = value
        run_ws_parameters(PAI_INPUT, value)  # a key outside `input` stands in as the run-task's model
    run_speech(dumps(body))


@pytest.mark.parametrize("value", AWKWARD, ids=lambda v: repr(v)[:12])
@pytest.mark.parametrize("key", OPENAI)
def test_every_openai_field_with_every_awkward_value(key: str, value: Any) -> None:
    run_openai(dumps({**OPENAI, key: value}))
