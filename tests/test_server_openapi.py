"""The OpenAPI description (protocol/openapi.py, GET /openapi.json) against the server it describes.

(a) it is a valid OpenAPI 3.1 document; (b) the router and the document agree on every path and method, both
ways; (c) every field the parsers read is documented, with the parsers' own enums, defaults and limits, and
a field the document lacks is ignored, as documented. The live checks use the fake engine.
"""
from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
import requests
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from protocol import openai_schema, schema
from protocol.audio_in import PCM_RATE_RANGE
from protocol.encoders import make_encoder
from protocol.errors import ErrorCode, InvalidParameter, UnsupportedMediaType
from protocol.openai_schema import RESPONSE_FORMATS, parse_openai_speech
from protocol.openapi import WEBUI_CONTENT_TYPES, WS_PATH, openapi_document
from protocol.openapi_schemas import AUDIO_CONTENT_TYPES, HTTP_ERROR_CODES, WS_ONLY_CODES
from protocol.schema import parse_list_query, parse_speech_request
from server import paths, webui, webui_mp3
from server.openai_routes import _ROUTES as OPENAI_ROUTES
from tests.server_helpers import AUTH, MODEL, TOKEN, pcm_bytes, running_server, upload

MAX_TEXT = 40
METHODS = ("get", "head", "post", "put", "delete", "patch", "options")
DOC = openapi_document()
SCHEMAS = DOC["components"]["schemas"]
ALL_FORMATS = tuple(RESPONSE_FORMATS)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with running_server(tmp_path_factory.mktemp("data"), max_text_chars=MAX_TEXT) as srv:
        yield srv


@pytest.fixture(scope="module")
def voice(server) -> str:
    r = upload(requests, server.url)
    assert r.status_code == 200, r.text
    return r.json()["id"]


def _served(server) -> dict[str, Any]:
    r = requests.get(f"{server.url}/openapi.json", headers=AUTH, timeout=5)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json", r.text
    return r.json()


def _operations(doc: Mapping[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in doc["paths"].items():
        for method in METHODS:
            if method in item:
                yield path, method, item[method]


# ---- (a) a valid OpenAPI 3.1 document, served with the server's own limits ---------------------

def test_document_is_valid_openapi_3_1() -> None:
    assert DOC["openapi"].startswith("3.1")
    validate(DOC)
    validate(openapi_document(7, 1024, ("index.html",)))


def test_served_document_is_valid_and_carries_the_servers_limits(server) -> None:
    doc = _served(server)
    validate(doc)
    cfg = server.app.config
    assert doc == json.loads(json.dumps(openapi_document(cfg.max_text_chars, cfg.max_body_bytes,
                                                         tuple(sorted(webui.files())))))
    schemas = doc["components"]["schemas"]
    assert schemas["SpeechInput"]["properties"]["text"]["maxLength"] == MAX_TEXT
    assert schemas["OpenAISpeechRequest"]["properties"]["input"]["maxLength"] == MAX_TEXT
    assert str(cfg.max_body_bytes) in schemas["ReferenceAudioUpload"]["properties"]["file"]["description"]
    assert set(doc["paths"]["/webui/{file}"]["get"]["parameters"][0]["schema"]["enum"]) == set(webui.files())


def test_document_needs_the_token_like_every_api_route(server) -> None:
    r = requests.get(f"{server.url}/openapi.json", timeout=5)
    assert r.status_code == 401 and r.json()["code"] == "Unauthorized"
    r = requests.post(f"{server.url}/openapi.json", headers=AUTH, timeout=5)
    assert r.status_code == 405 and r.headers["allow"] == "GET"


def test_security_is_global_and_only_the_probes_and_page_are_public() -> None:
    assert DOC["security"] == [{"bearer": []}]
    assert DOC["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer", "description": "one of the server's --token values"}
    public = {(path, method) for path, method, op in _operations(DOC) if op.get("security") == []}
    assert public == {("/health", "get"), ("/health", "head"), ("/ready", "get"), ("/ready", "head"),
                      ("/", "get"), ("/webui/{file}", "get")}


# ---- (b) the router and the document agree ----------------------------------------------------

def _concrete(path: str, voice: str) -> str:
    return (path.replace("{id}", voice).replace("{model}", openai_schema.MODEL_IDS[0])
            .replace("{file}", webui.INDEX))


def test_every_documented_operation_is_routed(server) -> None:
    """A request to each documented path and method never meets the router's 404/405 (an unknown id's 404
    is the handler's: the path params here are real). Deleting comes last: it removes the voice."""
    voice = upload(requests, server.url).json()["id"]
    for path, method, op in sorted(_operations(DOC), key=lambda op: op[1] == "delete"):
        r = requests.request(method, server.url + _concrete(path, voice), headers=AUTH, timeout=10)
        assert r.status_code not in (404, 405), (path, method, r.status_code, r.text)
        assert str(r.status_code) in op["responses"], (path, method, r.status_code, r.text)
        assert r.headers["x-request-id"], (path, method)  # documented on every answer


def test_every_undocumented_method_is_refused_with_405(server, voice: str) -> None:
    for path, item in DOC["paths"].items():
        for method in METHODS:
            if method in item:
                continue
            r = requests.request(method, server.url + _concrete(path, voice), headers=AUTH, timeout=10)
            assert r.status_code == 405, (path, method, r.status_code, r.text)
            documented = {m.upper() for m in METHODS if m in item}
            assert set(r.headers["allow"].replace(" ", "").split(",")) == documented, (path, method)


def test_the_routers_own_paths_are_all_documented() -> None:
    routed = {value for name, value in vars(paths).items()
              if name.isupper() and isinstance(value, str) and value.startswith("/")}
    routed -= {paths.OPENAI_ROOT}  # a prefix, not a route (404 there)
    routed |= {"/health", "/metrics", webui_mp3.PATH, "/", *OPENAI_ROUTES}
    documented = set(DOC["paths"])
    assert routed <= documented, routed - documented
    assert paths.REFERENCE + "/{id}" in documented and paths.OPENAI_MODELS + "/{model}" in documented
    assert webui.PREFIX + "{file}" in documented and WS_PATH == paths.WS_SPEECH
    for path in documented:
        concrete = _concrete(path, "x")
        assert paths.route_name(concrete) != "unknown", path


def test_websocket_endpoint_is_described() -> None:
    ws = DOC["x-websocket"]
    assert ws["path"] == paths.WS_SPEECH and set(ws["clientMessages"]) == {"run-task", "continue-task", "finish-task"}
    params = ws["clientMessages"]["run-task"]["properties"]["payload"]["properties"]["parameters"]["properties"]
    assert set(params) == set(SCHEMAS["SpeechInput"]["properties"]) - {"text"}
    assert "101" in DOC["paths"][WS_PATH]["get"]["responses"]


# ---- (c) every field the parsers read, with their limits --------------------------------------

class Recording(dict):
    """A request object that notes every key a parser reads (nested objects too)."""

    def __init__(self, value: Mapping[str, Any], seen: set[str], prefix: str = "") -> None:
        super().__init__({k: Recording(v, seen, f"{prefix}{k}.") if isinstance(v, dict) else v
                          for k, v in value.items()})
        self._seen, self._prefix = seen, prefix

    def get(self, key: str, default: Any = None) -> Any:
        self._seen.add(self._prefix + key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> Any:
        self._seen.add(self._prefix + key)
        return super().__getitem__(key)


def _documented_keys(name: str) -> set[str]:
    keys = set()
    for key, prop in SCHEMAS[name]["properties"].items():
        keys.add(key)
        target = prop.get("$ref", "").rpartition("/")[2]
        if target:
            keys |= {f"{key}.{inner}" for inner in _documented_keys(target)}
    return keys


def _pai(**inp: Any) -> dict[str, Any]:
    return {"model": MODEL, "stream": False, "input": {"mode": "fast_replication", "text": "hi",
                                                      "reference_audio_id": "v", **inp}}


def _openai(**fields: Any) -> dict[str, Any]:
    return {"model": "tts-1", "input": "hi", "voice": "v", **fields}


def _parse_pai(body: Mapping[str, Any]) -> schema.SpeechParams:
    return parse_speech_request(json.dumps(body).encode(), "application/json", MAX_TEXT)


def _parse_openai(body: Mapping[str, Any]) -> openai_schema.OpenAISpeechRequest:
    return parse_openai_speech(json.dumps(body).encode(), "application/json", ALL_FORMATS, MAX_TEXT)


def test_the_parsers_read_only_documented_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: set[str] = set()
    every = {"mode": "natural_language_replication", "instruct": "x", "debug": True}
    monkeypatch.setattr(schema, "load_json_object", lambda body: Recording(json.loads(body), seen))
    _parse_pai(_pai(**every))
    assert seen == _documented_keys("SpeechRequest"), seen ^ _documented_keys("SpeechRequest")
    seen.clear()
    monkeypatch.setattr(openai_schema, "load_json_object", lambda body: Recording(json.loads(body), seen))
    _parse_openai(_openai(instructions="x", stream_format="sse"))
    _parse_openai(_openai(stream=True))  # read only when stream_format is absent
    assert seen == _documented_keys("OpenAISpeechRequest"), seen ^ _documented_keys("OpenAISpeechRequest")


def test_an_undocumented_field_is_ignored_as_documented() -> None:
    assert _parse_pai({**_pai(), "extra": 1}) == _parse_pai(_pai())
    assert _parse_pai(_pai(colour="blue")) == _parse_pai(_pai())
    assert _parse_openai(_openai(extra=[1])) == _parse_openai(_openai())


def test_defaults_are_what_the_parsers_use() -> None:
    params = _parse_pai({"model": MODEL, "input": {"mode": "fast_replication", "text": "hi",
                                                   "reference_audio_id": "v"}})
    for name, prop in SCHEMAS["SpeechInput"]["properties"].items():
        if "default" in prop:
            assert getattr(params, name) == prop["default"], name
            assert _parse_pai(_pai(**{name: None})) == _parse_pai(_pai(**{name: prop["default"]})), name
    assert params.stream is SCHEMAS["SpeechRequest"]["properties"]["stream"]["default"]
    req = _parse_openai(_openai())
    for name, prop in SCHEMAS["OpenAISpeechRequest"]["properties"].items():
        if "default" in prop:
            assert getattr(req, name) == prop["default"], name


def _enum(prop: Mapping[str, Any]) -> list[Any]:
    return [v for v in prop["enum"] if v is not None]


@pytest.mark.parametrize("name", ["mode", "sample_rate", "bit_rate", "output_format"])
def test_pai_enums_are_exactly_what_the_parser_accepts(name: str) -> None:
    prop = SCHEMAS["SpeechInput"]["properties"][name]
    extra = {"instruct": "x"}
    for value in _enum(prop):
        _parse_pai(_pai(**{name: value}, **extra))
    outside = {"mode": "sing", "sample_rate": 12345, "bit_rate": "100k", "output_format": "ogg"}[name]
    assert outside not in prop["enum"]
    with pytest.raises(InvalidParameter, match=name):
        _parse_pai(_pai(**{name: outside}))


@pytest.mark.parametrize("doc_name,name,parse,body", [
    ("SpeechInput", "volume", _parse_pai, _pai),
    ("SpeechInput", "speed", _parse_pai, _pai),
    ("OpenAISpeechRequest", "speed", _parse_openai, _openai),
])
def test_number_limits_are_the_parsers(doc_name: str, name: str, parse, body) -> None:
    prop = SCHEMAS[doc_name]["properties"][name]
    high = prop["maximum"]
    parse(body(**{name: high}))
    with pytest.raises(InvalidParameter, match=name):
        parse(body(**{name: high + 1e-9}))
    if "minimum" in prop:
        parse(body(**{name: prop["minimum"]}))
        with pytest.raises(InvalidParameter, match=name):
            parse(body(**{name: prop["minimum"] - 1e-9}))
    else:
        with pytest.raises(InvalidParameter, match=name):
            parse(body(**{name: prop["exclusiveMinimum"]}))
        parse(body(**{name: prop["exclusiveMinimum"] + 1e-9}))
    with pytest.raises(InvalidParameter, match=name):
        parse(body(**{name: "1"}))  # numbers are JSON numbers


def test_text_length_limits_and_required_fields_are_the_parsers() -> None:
    doc = openapi_document(MAX_TEXT)["components"]["schemas"]
    assert doc["SpeechInput"]["properties"]["text"]["maxLength"] == MAX_TEXT
    assert SCHEMAS["SpeechInput"]["properties"]["text"]["maxLength"] == schema.DEFAULT_MAX_TEXT_CHARS
    _parse_pai(_pai(text="x" * MAX_TEXT))
    with pytest.raises(InvalidParameter, match="text"):
        _parse_pai(_pai(text="x" * (MAX_TEXT + 1)))
    _parse_openai(_openai(input="x" * doc["OpenAISpeechRequest"]["properties"]["input"]["maxLength"]))
    with pytest.raises(InvalidParameter, match="input"):
        _parse_openai(_openai(input="x" * (MAX_TEXT + 1)))
    assert openapi_document(10**6)["components"]["schemas"]["OpenAISpeechRequest"]["properties"]["input"][
        "maxLength"] == openai_schema.MAX_INPUT_CHARS
    for field in SCHEMAS["SpeechInput"]["required"]:
        body = _pai()
        del body["input"][field]
        with pytest.raises(InvalidParameter, match=field):
            _parse_pai(body)
    for field in SCHEMAS["SpeechRequest"]["required"]:
        with pytest.raises(InvalidParameter, match=field):
            _parse_pai({k: v for k, v in _pai().items() if k != field})
    for field in SCHEMAS["OpenAISpeechRequest"]["required"]:
        with pytest.raises(InvalidParameter, match=field):
            _parse_openai({k: v for k, v in _openai().items() if k != field})
    with pytest.raises(InvalidParameter, match="instruct"):  # the if/then rule
        _parse_pai(_pai(mode="natural_language_replication"))
    with pytest.raises(UnsupportedMediaType):  # the documented request media type only
        parse_speech_request(json.dumps(_pai()).encode(), "text/plain")


def test_openai_enums_are_exactly_what_the_parser_accepts() -> None:
    props = SCHEMAS["OpenAISpeechRequest"]["properties"]
    assert _enum(props["model"]) == list(openai_schema.MODEL_IDS)
    for name in ("model", "response_format", "stream_format"):
        for value in _enum(props[name]):
            _parse_openai(_openai(**{name: value}))
        with pytest.raises(InvalidParameter, match=name):
            _parse_openai(_openai(**{name: "nope"}))
    _parse_openai(_openai(voice={"id": "v"}))
    with pytest.raises(InvalidParameter, match="voice"):
        _parse_openai(_openai(voice={"name": "v"}))


def test_list_query_limits_are_the_parsers() -> None:
    params = {p["name"]: p["schema"] for p in DOC["paths"][paths.REFERENCE]["get"]["parameters"]}
    assert parse_list_query("") == (params["limit"]["default"], params["order"]["default"])
    assert parse_list_query(f"limit={params['limit']['minimum']}")[0] == params["limit"]["minimum"]
    assert str(schema.MAX_LIST_LIMIT) in DOC["paths"][paths.REFERENCE]["get"]["parameters"][0]["description"]
    assert parse_list_query(f"limit={schema.MAX_LIST_LIMIT * 10}")[0] == schema.MAX_LIST_LIMIT
    with pytest.raises(InvalidParameter, match="limit"):
        parse_list_query(f"limit={params['limit']['minimum'] - 1}")
    for order in params["order"]["enum"]:
        assert parse_list_query(f"order={order}")[1] == order
    with pytest.raises(InvalidParameter, match="order"):
        parse_list_query("order=up")
    assert DOC["paths"][paths.OPENAI_VOICES]["get"]["parameters"] == DOC["paths"][paths.REFERENCE]["get"]["parameters"]


def test_encode_query_limits_are_the_parsers() -> None:
    params = {p["name"]: p for p in DOC["paths"][webui_mp3.PATH]["post"]["parameters"]}
    assert params["sample_rate"]["required"] and not params["bit_rate"]["required"]
    for rate in params["sample_rate"]["schema"]["enum"]:
        for bit_rate in params["bit_rate"]["schema"]["enum"]:
            webui_mp3.parse_query(f"sample_rate={rate}&bit_rate={bit_rate}")
    assert webui_mp3.parse_query("sample_rate=24000")[1] == schema.BIT_RATES_KBPS[params["bit_rate"]["schema"]["default"]]
    for bad in ("", "sample_rate=12345", "sample_rate=24000&bit_rate=100k"):
        with pytest.raises(InvalidParameter):
            webui_mp3.parse_query(bad)


def test_upload_form_fields_and_limits_are_the_servers(server) -> None:
    form = SCHEMAS["ReferenceAudioUpload"]
    assert set(form["properties"]) == {"file", "text", "sample_rate"} and form["required"] == ["file", "text"]
    rate, empty = form["properties"]["sample_rate"]["anyOf"]
    low, high = rate["minimum"], rate["maximum"]
    assert (low, high) == PCM_RATE_RANGE and empty == {"type": "string", "maxLength": 0}
    ok = upload(requests, server.url, pcm_bytes(1.0, high), "a.pcm", extra={"sample_rate": str(high)})
    assert ok.status_code == 200, ok.text
    for rate in (low - 1, high + 1):
        r = upload(requests, server.url, pcm_bytes(1.0, 16000), "a.pcm", extra={"sample_rate": str(rate)})
        assert r.status_code == 400 and "'sample_rate' must be" in r.json()["message"], r.text
    assert upload(requests, server.url, pcm_bytes(1.0, 16000), "a.pcm", extra={"sample_rate": ""}).status_code == 200
    r = upload(requests, server.url, text="x" * (MAX_TEXT + 1))
    assert r.status_code == 400 and "'text'" in r.json()["message"]
    assert _served(server)["components"]["schemas"]["ReferenceAudioUpload"]["properties"]["text"]["maxLength"] == MAX_TEXT


def test_answer_shapes_match_the_encoders_and_the_page() -> None:
    for fmt in RESPONSE_FORMATS:
        assert make_encoder(fmt, 24000, 128, True).content_type == AUDIO_CONTENT_TYPES[fmt], fmt
    assert set(WEBUI_CONTENT_TYPES) == set(webui.CONTENT_TYPES.values())
    assert set(HTTP_ERROR_CODES) | {str(c) for c in WS_ONLY_CODES} == {str(c) for c in ErrorCode}


def test_live_answers_match_their_documented_schemas(server, voice: str) -> None:
    """The shapes a client parses, checked with a JSON Schema validator against live answers."""
    doc = _served(server)
    registry = Registry().with_resource("urn:doc", DRAFT202012.create_resource(doc))

    def check(name: str, value: Any) -> None:
        Draft202012Validator({"$ref": f"urn:doc#/components/schemas/{name}"}, registry=registry).validate(value)

    get = lambda path: requests.get(server.url + path, headers=AUTH, timeout=10).json()
    check("ReferenceAudioList", get(paths.REFERENCE))
    check("ReferenceAudio", get(f"{paths.REFERENCE}/{voice}"))
    check("ModelList", get(paths.OPENAI_MODELS))
    check("VoiceList", get(paths.OPENAI_VOICES))
    check("Error", get(f"{paths.REFERENCE}/nope"))
    check("OpenAIError", requests.get(server.url + paths.OPENAI_VOICES, timeout=5).json())
    r = requests.post(server.url + paths.SPEECH, headers=AUTH, json={**_pai(), "input": {
        **_pai()["input"], "reference_audio_id": voice}}, timeout=10)
    check("SpeechResponse", r.json())
    r = requests.post(server.url + paths.SPEECH, headers=AUTH, stream=True, timeout=10, json={
        **_pai(debug=True), "stream": True, "input": {**_pai(debug=True)["input"], "reference_audio_id": voice}})
    events = [json.loads(line[len(b"data: "):]) for line in r.iter_lines() if line.startswith(b"data: ")]
    assert events
    for event in events:
        check("SpeechEvent", event)
    r = requests.post(server.url + paths.OPENAI_SPEECH, headers=AUTH, stream=True, timeout=10,
                      json=_openai(voice=voice, stream_format="sse"))
    events = [json.loads(line[len(b"data: "):]) for line in r.iter_lines() if line.startswith(b"data: ")]
    assert [e["type"] for e in events][-1] == "speech.audio.done"
    for event in events:
        check("OpenAISpeechEvent", event)
    check("Deleted", requests.delete(f"{server.url}{paths.REFERENCE}/{voice}", headers=AUTH, timeout=5).json())
    assert TOKEN not in json.dumps(doc)  # the document never carries a secret
