"""Security: tokens (constant-time, never echoed, never logged) and no path from user input to the store.

Tokens go everywhere a client might put one: the Authorization header under odd schemes, other headers, a
cookie, the query string, a JSON or multipart field, the WebSocket subprotocol offer, a malformed header
line; right and wrong ones. No response body or header, and no log line, ever holds one. Ids and upload
file names go in with "../", absolute paths, NUL bytes, 5,000 characters and unicode: an id that is not a
voice id's shape never reaches the local store (404 at once), and files are named by the server alone.
"""
from __future__ import annotations

import base64
import hmac
import http.client
import io
import json
import logging
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import websocket

from server import auth
from tests.server_helpers import AUTH, MODEL, TOKEN, run_task, running_server, speech_body, upload, wav_bytes

SECOND = "second-token"  # the server's other token
WRONG = "wrong-token-7f3a"
SECRETS = (TOKEN, SECOND, WRONG)
REF = "/api/v1/audio/reference_audio"
WS = "/api-ws/v1/audio/speech"
STORED = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}\.(wav|mp3|pcm|bin|npz)")


def b64url(token: str) -> str:
    return base64.urlsafe_b64encode(token.encode()).decode().rstrip("=")


def _forms(token: str) -> list[str]:
    """Every way a token could show up in text."""
    raw = token.encode()
    return [token, b64url(token), base64.b64encode(raw).decode(), raw.hex()]


def assert_no_secret(*texts: str | bytes) -> None:
    blob = "\n".join(t.decode("latin-1") if isinstance(t, bytes) else t for t in texts)
    for secret in SECRETS:
        for form in _forms(secret):
            assert form not in blob, f"{form!r} leaked"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    root = tmp_path_factory.mktemp("root")
    with running_server(root / "data") as srv:
        srv.root = root
        yield srv


@pytest.fixture(scope="module")
def voice(server) -> str:
    return upload(requests, server.url).json()["id"]


@pytest.fixture
def server_log() -> Iterator[io.StringIO]:
    """Everything the server's own loggers write, at DEBUG, as JSON lines (the test's clients excluded)."""
    from server.log_lines import make_handler

    stream, root = io.StringIO(), logging.getLogger()
    handler = make_handler("json", stream)
    handler.addFilter(lambda r: r.name.split(".")[0] in ("server", "scheduler", "frontend", "protocol", "asyncio"))
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


# ---------------------------------------------------------------- constant time


@pytest.mark.parametrize("presented", [TOKEN, SECOND, WRONG, "", "x" * 500, TOKEN[:-1]])
def test_every_token_is_compared_in_constant_time_whatever_matches(monkeypatch: pytest.MonkeyPatch,
                                                                   presented: str) -> None:
    calls: list[tuple[bytes, bytes]] = []
    compare = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return compare(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    tokens = (TOKEN, SECOND, "third")
    ok = auth.token_ok(f"Bearer {presented}", tokens)
    assert ok == (presented in tokens) and len(calls) == 3  # no early exit on a match
    calls.clear()
    assert auth.ws_authorized({}, ["cosyserve", f"bearer.{b64url(presented)}"], tokens) == (presented in tokens)
    assert len(calls) == (3 if presented else 0)  # an empty entry decodes to no token at all


# ---------------------------------------------------------------- never echoed, never logged


def _http_cases(voice: str) -> list[tuple[str, str, dict[str, Any], int]]:
    """(method, path, requests kwargs, expected status)."""
    cases: list[tuple[str, str, dict[str, Any], int]] = []
    for token, ok in ((TOKEN, True), (SECOND, True), (WRONG, False)):
        good = 200 if ok else 401
        for value, status in ((f"Bearer {token}", good), (f"bearer {token}", good), (f"BEARER   {token}", good),
                              (f"Basic {token}", 401), (f"Basic {base64.b64encode(token.encode()).decode()}", 401),
                              (f"Token {token}", 401), (token, 401), (f"Bearer {token} extra", 401),
                              (f"Bearer {b64url(token)}", 401), (f"Bearer: {token}", 401)):
            cases.append(("GET", REF, {"headers": {"Authorization": value}}, status))
        cases += [
            ("GET", REF, {"headers": {"X-Api-Key": token, "Cookie": f"token={token}"}}, 401),
            ("GET", f"{REF}?token={token}&access_token={token}&api_key={token}", {}, 401),  # never read
            ("GET", f"{REF}?token={token}", {"headers": AUTH}, 200),
            ("POST", "/api/v1/audio/speech", {"json": {**speech_body(voice), "token": token}}, 401),
            ("POST", REF, {"files": {"file": ("a.wav", wav_bytes())},
                           "data": {"text": "t", "token": token, "access_token": token,
                                    "authorization": f"Bearer {token}"}}, 401),
            ("POST", REF, {"headers": AUTH, "files": {"file": ("a.wav", wav_bytes())},
                           "data": {"text": "t", "token": token, "authorization": f"Bearer {token}"}}, 200),
            ("POST", "/v1/audio/speech", {"headers": {"Authorization": f"Basic {token}"},
                                          "json": {"model": "tts-1", "voice": voice, "input": "hi"}}, 401),
            ("GET", f"/v1/models?api_key={token}", {}, 401),
            ("GET", "/metrics", {"headers": {"Authorization": f"Bearer {token}x"}}, 401),
            ("GET", f"{REF}/{token}", {"headers": AUTH}, 404),
        ]
    return cases


def test_no_token_in_any_response_or_log_line(server, voice: str, server_log: io.StringIO) -> None:
    seen: list[str | bytes] = []
    for method, path, kwargs, status in _http_cases(voice):
        r = requests.request(method, server.url + path, timeout=10, **kwargs)
        assert r.status_code == status, (method, path, kwargs.get("headers"), r.text)
        if path != f"{REF}/{TOKEN}" and path != f"{REF}/{SECOND}" and path != f"{REF}/{WRONG}":
            seen += [r.content, json.dumps(dict(r.headers))]
        else:  # an id is the client's own text; still never logged (checked below)
            assert r.json()["code"] == "NotFound"
    assert_no_secret(*seen, server_log.getvalue())
    assert server_log.getvalue().count('"logger": "server.access"') >= len(_http_cases(voice))


def _upgrade(server, headers: dict[str, str], query: str = "") -> requests.Response:
    return requests.get(server.url + WS + query, timeout=10, headers={
        "Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", **headers})


def test_no_token_in_any_websocket_answer_or_log_line(server, voice: str, server_log: io.StringIO) -> None:
    seen: list[str | bytes] = []
    for token, ok in ((TOKEN, True), (WRONG, False)):
        for headers, query in (({"Sec-WebSocket-Protocol": f"cosyserve, bearer.{b64url(token)}"}, ""),
                               ({"Authorization": f"Bearer {WRONG}",  # the header, when sent, decides alone
                                 "Sec-WebSocket-Protocol": f"cosyserve, bearer.{b64url(token)}"}, ""),
                               ({}, f"?token={token}&access_token={token}"),
                               ({"Sec-WebSocket-Protocol": f"bearer.{token}"}, "")):  # not base64url: no token
            r = _upgrade(server, headers, query)
            allowed = ok and "Authorization" not in headers and not query and "cosyserve" in str(headers)
            if allowed:  # requests cannot speak WebSocket; the switch itself is the answer
                assert r.status_code == 101 and r.headers["sec-websocket-protocol"] == "cosyserve"
            else:
                assert r.status_code == 401 and r.json()["code"] == "Unauthorized", (headers, query)
                seen.append(r.content)
            seen.append(json.dumps(dict(r.headers)))
        ws = websocket.create_connection(server.url.replace("http", "ws") + WS, timeout=10,
                                         subprotocols=["cosyserve", f"bearer.{b64url(TOKEN)}"])
        ws.send(run_task("t1", voice, text_in_run_task=token))
        seen.append(ws.recv())
        seen.append(json.dumps(ws.getheaders()))
        ws.close()
    assert_no_secret(*seen, server_log.getvalue())


def test_a_token_in_a_malformed_header_line_is_not_echoed(server, server_log: io.StringIO) -> None:
    for line in (f"Authorization: Bearer {TOKEN}\x00", f"Authori zation: Bearer {TOKEN}", f"Authorization : {TOKEN}"):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.connect()
        conn.sock.sendall(f"GET {REF} HTTP/1.1\r\nHost: x\r\n{line}\r\n\r\n".encode("latin-1"))
        response = conn.sock.recv(65536)
        conn.close()
        assert response.startswith(b"HTTP/1.1 400") and b"malformed HTTP request" in response
        assert_no_secret(response)
    assert_no_secret(server_log.getvalue())


# ---------------------------------------------------------------- no path from user input to the store

BAD_IDS = ["../../etc/passwd", "..", "/etc/passwd", "..\\..\\windows\\win.ini", "a\x00b", "\x00",
           "x" * 5000, "你好", "😀", "00000000-0000-4000-8000-00000000000g",
           "00000000-0000-4000-8000-000000000000/../../x", "{00000000-0000-4000-8000-000000000000}",
           "00000000-0000-4000-8000-000000000000\n", "urn:uuid:00000000-0000-4000-8000-000000000000"]


@pytest.fixture
def store_calls(server, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    """Each call the server makes on its store, with its argument."""
    calls: list[tuple[str, Any]] = []
    store = server.app.store
    for name in ("get", "load_prompt", "delete"):
        method = getattr(store, name)
        monkeypatch.setattr(store, name, lambda arg, _m=method, _n=name: calls.append((_n, arg)) or _m(arg))
    return calls


def _quoted(voice_id: str) -> str:
    return requests.utils.quote(voice_id, safe="")


def test_a_bad_id_never_reaches_the_store(server, voice: str, store_calls: list) -> None:
    valid_upper = voice.upper()
    for bad in [*BAD_IDS, valid_upper]:
        for method in ("GET", "DELETE"):
            r = requests.request(method, f"{server.url}{REF}/{_quoted(bad)}", headers=AUTH, timeout=10)
            assert r.status_code == 404 and r.json()["code"] == "NotFound", (bad, r.text)
            shown = r.json()["message"]
            assert len(shown) < 100 and "\x00" not in shown
        r = requests.post(f"{server.url}/api/v1/audio/speech", headers=AUTH, json=speech_body(bad), timeout=10)
        assert r.status_code == 404 and r.json()["code"] == "NotFound", (bad, r.text)
        r = requests.post(f"{server.url}/v1/audio/speech", headers=AUTH, timeout=10,
                          json={"model": "tts-1", "voice": bad, "input": "hi"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "voice_not_found"
        ws = websocket.create_connection(server.url.replace("http", "ws") + WS, timeout=10,
                                         header=[f"Authorization: Bearer {TOKEN}"])
        ws.send(run_task("t", bad))
        failed = json.loads(ws.recv())
        ws.close()
        assert failed["header"]["event"] == "task-failed" and failed["header"]["error_code"] == "NotFound"
    assert store_calls == []  # not one lookup with any of them
    for raw_path in (f"{REF}/../../etc/passwd", f"{REF}/..%2F..%2Fetc%2Fpasswd", f"{REF}/%2e%2e"):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)  # the path exactly as written
        conn.request("GET", raw_path, headers=AUTH)
        assert conn.getresponse().status == 404
        conn.close()
    assert store_calls == []
    assert requests.get(f"{server.url}{REF}/{voice}", headers=AUTH, timeout=10).status_code == 200
    assert store_calls and all(arg == voice for _, arg in store_calls)  # a real id does reach it


def _multipart(filename: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"text\"\r\n\r\nhello\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"").encode() + filename + \
        b"\"\r\nContent-Type: audio/wav\r\n\r\n" + wav_bytes() + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


BAD_FILENAMES = [b"../../evil.wav", b"/etc/passwd", b"/tmp/evil.wav", b"..\\..\\evil.wav", b"C:\\Windows\\evil.wav",
                 b"a\x00b.wav", b"x" * 1000 + b".wav", "你好😀.wav".encode(), b"", b".", b"..", b"voices.sqlite3"]


def test_upload_file_names_are_never_used_for_paths(server) -> None:
    data_dir: Path = server.app.config.data_dir
    before = {p.name for p in server.root.iterdir()}
    for filename in BAD_FILENAMES:
        body, content_type = _multipart(filename)
        r = requests.post(f"{server.url}{REF}", headers={**AUTH, "Content-Type": content_type}, data=body,
                          timeout=10)
        assert r.status_code == 200, (filename[:40], r.text)
        assert uuid.UUID(r.json()["id"]) and r.json()["bytes"] == len(wav_bytes())
    body, content_type = _multipart(b"x" * 20_000 + b".wav")  # past the part-header limit: refused, not stored
    r = requests.post(f"{server.url}{REF}", headers={**AUTH, "Content-Type": content_type}, data=body, timeout=10)
    assert r.status_code == 400 and r.json()["code"] == "InvalidParameter"
    assert {p.name for p in server.root.iterdir()} == before  # nothing beside the data directory
    assert sorted(p.name for p in data_dir.iterdir() if not p.name.startswith("voices.sqlite3")) == ["voices"]
    stored = [p.name for p in (data_dir / "voices").iterdir()]
    assert stored and all(STORED.fullmatch(name) for name in stored), stored
    listing = requests.get(f"{server.url}{REF}?limit=1000", headers=AUTH, timeout=10).json()
    assert len(listing) >= len(BAD_FILENAMES)
    assert requests.get(f"{server.url}{REF}/{listing[0]['id']}", headers=AUTH, timeout=10).status_code == 200


def test_an_error_never_repeats_a_harmful_id(server) -> None:
    r = requests.get(f"{server.url}{REF}/{_quoted('x' * 5000)}", headers=AUTH, timeout=10)
    assert r.json()["message"] == "reference audio not found: (not a voice id)"
    r = requests.post(f"{server.url}/api/v1/audio/speech", headers=AUTH, json=speech_body("a\x00b"), timeout=10)
    assert r.json()["message"] == "reference audio not found: (not a voice id)"
    r = requests.post(f"{server.url}/api/v1/audio/speech", headers=AUTH, json=speech_body("nope"), timeout=10)
    assert r.json()["message"] == "reference audio not found: nope"  # short and printable: said back
    assert MODEL  # the speech body's model is the real one: the 404 is about the voice alone
