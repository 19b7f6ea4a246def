"""Bad inputs get the documented status + code and change nothing; raw-socket edge cases (h11 client)."""
from __future__ import annotations

import json
import socket
import time
from typing import Any

import h11
import pytest
import requests

from tests.fakes import FakeExtractor
from tests.server_helpers import AUTH, MODEL, pcm_bytes, running_server, speech_body, upload, wav_bytes

MAX_BODY = 3 * 1024 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    data_dir = tmp_path_factory.mktemp("data")
    with running_server(data_dir, max_body_bytes=MAX_BODY, max_text_chars=100, header_timeout_s=0.5,
                        idle_timeout_s=1.0) as srv:
        srv.data_dir = data_dir
        yield srv


@pytest.fixture(scope="module")
def voice(server) -> str:
    return upload(requests, server.url).json()["id"]


def _snapshot(server) -> tuple[Any, list[str]]:
    listing = requests.get(f"{server.url}/api/v1/audio/reference_audio", headers=AUTH, timeout=5).json()
    return listing, sorted(p.name for p in (server.data_dir / "voices").iterdir())


def _speech(voice_id: str | None = None, drop: str | None = None, **inp: Any) -> dict[str, Any]:
    body = speech_body(voice_id or "VOICE")
    body["input"].update(inp)
    if drop:
        body["input"].pop(drop, None) if drop in body["input"] else body.pop(drop)
    return body


BAD = "Bearer wrong"
SPEECH = "/api/v1/audio/speech"
REF = "/api/v1/audio/reference_audio"

# (id, method, path, kwargs for requests, expected status, expected code)
CASES: list[tuple[str, str, str, dict[str, Any], int, str]] = [
    ("no-token-list", "GET", REF, {"headers": {}}, 401, "Unauthorized"),
    ("wrong-token-list", "GET", REF, {"headers": {"Authorization": BAD}}, 401, "Unauthorized"),
    ("basic-scheme", "GET", REF, {"headers": {"Authorization": "Basic dGVzdC10b2tlbg=="}}, 401, "Unauthorized"),
    ("no-token-speech", "POST", SPEECH, {"headers": {}, "json": _speech()}, 401, "Unauthorized"),
    ("no-token-upload", "POST", REF, {"headers": {}, "files": {"file": ("a.wav", wav_bytes())},
                                      "data": {"text": "t"}}, 401, "Unauthorized"),
    ("no-token-delete", "DELETE", REF + "/VOICE", {"headers": {}}, 401, "Unauthorized"),
    ("no-token-metrics", "GET", "/metrics", {"headers": {}}, 401, "Unauthorized"),
    ("no-token-unknown-route", "GET", "/nope", {"headers": {}}, 401, "Unauthorized"),
    ("malformed-json", "POST", SPEECH, {"data": b"{not json", "headers": {"Content-Type": "application/json"}},
     400, "InvalidParameter"),
    ("json-array", "POST", SPEECH, {"json": [1, 2]}, 400, "InvalidParameter"),
    ("json-nested-too-deep", "POST", SPEECH, {"data": b"[" * 100_000, "headers": {"Content-Type": "application/json"}},
     400, "InvalidParameter"),  # json's decoder recursed into a RecursionError: a 500
    ("text-plain", "POST", SPEECH, {"data": b"{}", "headers": {"Content-Type": "text/plain"}}, 415,
     "UnsupportedMediaType"),
    ("missing-model", "POST", SPEECH, {"json": _speech(drop="model")}, 400, "InvalidParameter"),
    ("unknown-model", "POST", SPEECH, {"json": {**_speech(), "model": "gpt"}}, 400, "InvalidParameter"),
    ("missing-input", "POST", SPEECH, {"json": {"model": MODEL}}, 400, "InvalidParameter"),
    ("input-not-object", "POST", SPEECH, {"json": {"model": MODEL, "input": "hi"}}, 400, "InvalidParameter"),
    ("unknown-mode", "POST", SPEECH, {"json": _speech(mode="sing")}, 400, "InvalidParameter"),
    ("empty-text", "POST", SPEECH, {"json": _speech(text="   ")}, 400, "InvalidParameter"),
    ("text-number", "POST", SPEECH, {"json": _speech(text=12)}, 400, "InvalidParameter"),
    ("text-too-long", "POST", SPEECH, {"json": _speech(text="a" * 101)}, 400, "InvalidParameter"),
    ("unknown-reference", "POST", SPEECH, {"json": _speech("00000000-0000-4000-8000-000000000000")}, 404,
     "NotFound"),
    ("missing-reference", "POST", SPEECH, {"json": _speech(drop="reference_audio_id")}, 400, "InvalidParameter"),
    ("instruct-missing", "POST", SPEECH, {"json": _speech(mode="natural_language_replication")}, 400,
     "InvalidParameter"),
    ("unknown-format", "POST", SPEECH, {"json": _speech(output_format="ogg")}, 400, "InvalidParameter"),
    ("unknown-sample-rate", "POST", SPEECH, {"json": _speech(sample_rate=12345)}, 400, "InvalidParameter"),
    ("sample-rate-string", "POST", SPEECH, {"json": _speech(sample_rate="24000")}, 400, "InvalidParameter"),
    ("unknown-bit-rate", "POST", SPEECH, {"json": _speech(output_format="mp3", bit_rate="100k")}, 400,
     "InvalidParameter"),
    ("speed-too-high", "POST", SPEECH, {"json": _speech(speed=3.0)}, 400, "InvalidParameter"),
    ("speed-too-low", "POST", SPEECH, {"json": _speech(speed=0.1)}, 400, "InvalidParameter"),
    ("volume-zero", "POST", SPEECH, {"json": _speech(volume=0)}, 400, "InvalidParameter"),
    ("stream-string", "POST", SPEECH, {"json": {**_speech(), "stream": "yes"}}, 400, "InvalidParameter"),
    ("upload-non-audio", "POST", REF, {"files": {"file": ("a.wav", b"this is not audio at all" * 100)},
                                       "data": {"text": "t"}}, 400, "InvalidParameter"),
    ("upload-missing-text", "POST", REF, {"files": {"file": ("a.wav", wav_bytes())}}, 400, "InvalidParameter"),
    ("upload-empty-text", "POST", REF, {"files": {"file": ("a.wav", wav_bytes())}, "data": {"text": " "}}, 400,
     "InvalidParameter"),
    ("upload-missing-file", "POST", REF, {"files": {"other": ("a.wav", wav_bytes())}, "data": {"text": "t"}},
     400, "InvalidParameter"),
    ("upload-truncated-multipart", "POST", REF,
     {"data": b"--XYZ\r\nContent-Disposition: form-data; name=\"text\"\r\n\r\nhel",
      "headers": {"Content-Type": "multipart/form-data; boundary=XYZ"}}, 400, "InvalidParameter"),
    ("upload-json", "POST", REF, {"json": {"text": "t"}}, 415, "UnsupportedMediaType"),
    ("upload-too-short", "POST", REF, {"files": {"file": ("a.wav", wav_bytes(0.1))}, "data": {"text": "t"}},
     400, "InvalidParameter"),
    ("upload-too-long", "POST", REF, {"files": {"file": ("a.pcm", pcm_bytes(31.0, 16000))},
                                      "data": {"text": "t"}}, 400, "InvalidParameter"),
    ("upload-wav-8khz", "POST", REF, {"files": {"file": ("a.wav", wav_bytes(1.0, 8000))},
                                      "data": {"text": "t"}}, 400, "InvalidParameter"),
    ("upload-pcm-8khz", "POST", REF, {"files": {"file": ("a.pcm", pcm_bytes(1.0, 8000))},
                                      "data": {"text": "t", "sample_rate": "8000"}}, 400, "InvalidParameter"),
    ("upload-bad-pcm-rate", "POST", REF, {"files": {"file": ("a.pcm", pcm_bytes())},
                                          "data": {"text": "t", "sample_rate": "fast"}}, 400, "InvalidParameter"),
    ("limit-zero", "GET", REF + "?limit=0", {}, 400, "InvalidParameter"),
    ("limit-text", "GET", REF + "?limit=abc", {}, 400, "InvalidParameter"),
    ("order-bad", "GET", REF + "?order=up", {}, 400, "InvalidParameter"),
    ("unknown-route", "GET", "/api/v1/nothing", {}, 404, "NotFound"),
    ("get-unknown-id", "GET", REF + "/nope", {}, 404, "NotFound"),
    ("delete-unknown-id", "DELETE", REF + "/nope", {}, 404, "NotFound"),
    ("put-speech", "PUT", SPEECH, {"json": {}}, 405, "MethodNotAllowed"),
    ("get-speech", "GET", SPEECH, {}, 405, "MethodNotAllowed"),
    ("delete-list", "DELETE", REF, {}, 405, "MethodNotAllowed"),
    ("ws-path-without-upgrade", "GET", "/api-ws/v1/audio/speech", {}, 426, "UpgradeRequired"),
    # schemathesis found it: any method there was a 426; an upgrade is a GET, so the others are 405s
    ("post-ws-path", "POST", "/api-ws/v1/audio/speech", {"json": {}}, 405, "MethodNotAllowed"),
    ("trace-ws-path", "TRACE", "/api-ws/v1/audio/speech", {}, 405, "MethodNotAllowed"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_and_changes_nothing(server, voice: str, case) -> None:
    _, method, path, kwargs, status, code = case
    kwargs = dict(kwargs)
    if isinstance(kwargs.get("json"), dict) and isinstance(kwargs["json"].get("input"), dict):
        body = json.loads(json.dumps(kwargs["json"]))
        if body["input"].get("reference_audio_id") == "VOICE":
            body["input"]["reference_audio_id"] = voice
        kwargs["json"] = body
    path = path.replace("VOICE", voice)
    extra = kwargs.pop("headers", None)
    if extra is None:
        headers = dict(AUTH)
    elif not extra or "Authorization" in extra:
        headers = dict(extra)  # no token / a wrong one
    else:
        headers = {**AUTH, **extra}
    before = _snapshot(server)
    r = requests.request(method, server.url + path, headers=headers, timeout=10, **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["code"] == code and body["message"] and body["request_id"]
    assert _snapshot(server) == before
    if status == 405:
        assert r.headers["allow"]
    if status == 401:
        assert body["message"] == "invalid or missing token"


@pytest.mark.parametrize("path", [REF, "/v1/audio/voices"])
@pytest.mark.parametrize("limit", ["29193144716635516422348776221349773312", str(2**63 - 1), "9" * 5000])
def test_a_huge_list_limit_is_served_as_the_maximum(server, voice: str, path: str, limit: str) -> None:
    """schemathesis found it: a limit past SQLite's 64 bits (or past int()'s 4300 digits) was a 500."""
    r = requests.get(f"{server.url}{path}?limit={limit}", headers=AUTH, timeout=10)
    assert r.status_code == 200, r.text
    listed = r.json() if path == REF else r.json()["data"]
    assert voice in {v["id"] for v in listed}


def test_nested_json_on_the_openai_route_is_a_400(server) -> None:
    r = requests.post(f"{server.url}/v1/audio/speech", data=b'{"a":' * 50_000, timeout=10,
                      headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text


def test_at_least_30_cases() -> None:
    assert len(CASES) >= 30


@pytest.mark.parametrize("filename,data,extra", [
    ("a.wav", wav_bytes(1.0, 8000), {}),
    ("a.pcm", pcm_bytes(1.0, 8000), {"sample_rate": "8000"}),
])
def test_low_rate_upload_names_both_rates(server, filename: str, data: bytes, extra: dict[str, str]) -> None:
    calls = server.app.extract_prompt.calls
    r = upload(requests, server.url, data, filename, text="t", extra=extra)
    assert r.status_code == 400, r.text
    assert "8000 Hz" in r.json()["message"] and "16000 Hz" in r.json()["message"]
    assert server.app.extract_prompt.calls == calls  # refused at decoding, before any feature extraction


def test_extractor_refusal_is_400_and_stores_nothing(tmp_path) -> None:
    """Whatever the extractor finds unusable (PromptAudioError) is the client's 400, never a 500."""
    extractor = FakeExtractor()
    with running_server(tmp_path, extractor=extractor) as srv:
        srv.data_dir = tmp_path
        before = _snapshot(srv)
        for reason in ("prompt audio produced no speech tokens", "prompt audio is shorter than 0.1 s",
                       "prompt audio contains NaN or infinite samples"):
            extractor.refuse = reason
            r = upload(requests, srv.url)
            assert r.status_code == 400, r.text
            assert r.json()["code"] == "InvalidParameter" and reason in r.json()["message"]
        assert _snapshot(srv) == before
        assert extractor.calls == 3


# ---- raw sockets: framing-level limits, timeouts, pipelining ----

def _raw(server, data: bytes, read_timeout: float = 3.0) -> bytes:
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.settimeout(read_timeout)
        try:
            sock.sendall(data)
        except OSError:
            pass
        out = b""
        try:
            while chunk := sock.recv(65536):
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return out


def _responses(raw: bytes) -> list[tuple[int, bytes]]:
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    client.send(h11.EndOfMessage())
    client.receive_data(raw)
    out, status, body = [], 0, b""
    while True:
        ev = client.next_event()
        if isinstance(ev, h11.Response):
            status, body = ev.status_code, b""
        elif isinstance(ev, h11.Data):
            body += ev.data
        elif isinstance(ev, h11.EndOfMessage):
            out.append((status, body))
            if client.our_state is not h11.DONE or client.their_state is not h11.DONE:
                break
            client.start_next_cycle()
            client.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
            client.send(h11.EndOfMessage())
        else:
            break
    return out


def test_oversized_body_413_before_reading_it(server, voice: str) -> None:
    before = _snapshot(server)
    head = (f"POST {REF} HTTP/1.1\r\nHost: x\r\nAuthorization: {AUTH['Authorization']}\r\n"
            f"Content-Type: multipart/form-data; boundary=B\r\nContent-Length: {MAX_BODY + 1}\r\n\r\n").encode()
    [(status, body)] = _responses(_raw(server, head + b"x" * 1000))
    assert status == 413 and json.loads(body)["code"] == "PayloadTooLarge"
    assert _snapshot(server) == before


def test_too_large_headers_431(server) -> None:
    raw = _raw(server, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 431")


def test_too_many_headers_431(server) -> None:
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(150))
    assert _raw(server, b"GET /health HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n").startswith(b"HTTP/1.1 431")


def test_garbage_request_line_400(server) -> None:
    assert _raw(server, b"\x00\x01 nonsense\r\n\r\n").startswith(b"HTTP/1.1 400")


def test_slowloris_header_timeout(server) -> None:
    start = time.monotonic()
    raw = _raw(server, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ", read_timeout=5)
    assert raw.startswith(b"HTTP/1.1 408") and time.monotonic() - start < 3


def test_idle_keep_alive_connection_closed(server) -> None:
    start = time.monotonic()
    raw = _raw(server, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", read_timeout=5)
    assert _responses(raw) == [(200, b'{"status": "ok"}')]
    assert 0.8 < time.monotonic() - start < 3  # closed by the idle timer, not the client


def test_pipelined_requests_answered_in_order(server, voice: str) -> None:
    auth = AUTH["Authorization"].encode()
    reqs = (b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /api/v1/audio/reference_audio/" + voice.encode() + b" HTTP/1.1\r\nHost: x\r\nAuthorization: "
            + auth + b"\r\n\r\n"
            b"GET /nope HTTP/1.1\r\nHost: x\r\nAuthorization: " + auth + b"\r\n\r\n"
            b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    got = _responses(_raw(server, reqs))
    assert [s for s, _ in got] == [200, 200, 404, 200]
    assert json.loads(got[1][1])["id"] == voice


def test_http10_stream_is_close_delimited(server, voice: str) -> None:
    body = json.dumps(speech_body(voice, text="short", stream=True)).encode()
    raw = _raw(server, b"POST /api/v1/audio/speech HTTP/1.0\r\nAuthorization: " + AUTH["Authorization"].encode()
               + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"chunked" not in head.lower()
    assert payload.count(b"data: ") >= 2 and b'"finish_reason":"stop"' in payload
