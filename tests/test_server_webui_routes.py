"""The WebUI's own routes on a real socket (FakeEngine): the static files and the MP3 download helper."""
from __future__ import annotations

import http.client
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import requests
import soundfile as sf

from server import webui, webui_mp3
from tests.server_helpers import AUTH, running_server

WEBUI_DIR = Path(webui.__file__).parent / "webui"
MP3 = "/webui/encode/mp3"
TEST_IDS = ("token", "voice-upload-file", "voice-upload-text", "voice-upload-submit", "voice-record",
            "voice-select", "voice-delete", "text", "mode", "instruct", "format", "speak", "stop", "download",
            "player-state", "ttfp-ms", "error", "chunks", "rtf")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with running_server(tmp_path_factory.mktemp("data")) as srv:
        yield srv


def _raw_get(server, path: str) -> tuple[int, dict[str, str], bytes]:
    """GET with the path sent exactly as given (requests would resolve the dots itself)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_page_needs_no_token_and_carries_the_security_headers(server) -> None:
    r = requests.get(f"{server.url}/", timeout=5)
    assert r.status_code == 200 and r.headers["content-type"] == "text/html; charset=utf-8"
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    assert "connect-src 'self' ws: wss:" in csp and "media-src 'self' blob:" in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.content == (WEBUI_DIR / "index.html").read_bytes()


@pytest.mark.parametrize("name", sorted(p.name for p in WEBUI_DIR.iterdir()))
def test_every_file_is_served_with_its_type(server, name: str) -> None:
    r = requests.get(f"{server.url}/webui/{name}", timeout=5)
    want = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
            ".html": "text/html; charset=utf-8"}[Path(name).suffix]
    assert r.status_code == 200 and r.headers["content-type"] == want
    assert r.headers["x-content-type-options"] == "nosniff" and "content-security-policy" in r.headers
    assert r.content == (WEBUI_DIR / name).read_bytes()


def test_module_imports_and_page_references_resolve(server) -> None:
    """Every `./x.js` a module imports and every /webui/ file the page names is served (no 404 at load)."""
    names = set()
    for js in WEBUI_DIR.glob("*.js"):
        names |= set(re.findall(r'from "\./([\w.-]+)"', js.read_text("utf-8")))
        names |= set(re.findall(r'"/webui/([\w.-]+)"', js.read_text("utf-8")))
    names |= set(re.findall(r'"/webui/([\w.-]+)"', (WEBUI_DIR / "index.html").read_text("utf-8")))
    assert {"app.js", "style.css", "recorder-worklet.js", "player.js"} <= names
    for name in names:
        assert requests.get(f"{server.url}/webui/{name}", timeout=5).status_code == 200, name


def test_page_has_the_test_ids_and_no_inline_code() -> None:
    html = (WEBUI_DIR / "index.html").read_text("utf-8")
    ids = set(re.findall(r'data-testid="([\w-]+)"', html))
    assert set(TEST_IDS) <= ids, set(TEST_IDS) - ids
    assert not re.search(r"<script(?![^>]*\bsrc=)", html)  # the CSP blocks inline script: there is none
    assert not re.search(r"\son\w+=|\sstyle=|<style", html)
    assert not re.search(r"https?://", html)  # no CDN, no external font


@pytest.mark.parametrize("path", [
    "/webui/../server/auth.py", "/webui/..%2fauth.py", "/webui/%2e%2e%2fwebui.py", "/webui/../../etc/passwd",
    "/webui//etc/passwd", "/webui/webui.py", "/webui/.", "/webui/..", "/webui/index.html%00.js",
    "/webui/%2fetc%2fpasswd", "/../etc/passwd", "/webui/app.js/../../auth.py",
])
def test_no_path_escapes_the_webui_folder(server, path: str) -> None:
    status, _, body = _raw_get(server, path)
    assert status in (401, 404), (path, status)
    assert b"import" not in body and b"root:" not in body  # neither Python source nor /etc/passwd
    assert "code" in json.loads(body)


def test_unknown_file_is_404_json(server) -> None:
    r = requests.get(f"{server.url}/webui/nope.js", timeout=5)
    assert r.status_code == 404 and r.json()["code"] == "NotFound"


def test_page_is_get_only_and_the_api_still_wants_the_token(server) -> None:
    assert requests.post(f"{server.url}/", timeout=5).status_code == 405
    assert requests.get(f"{server.url}/api/v1/audio/reference_audio", timeout=5).status_code == 401
    assert requests.post(f"{server.url}{MP3}?sample_rate=24000", data=b"\0\0", timeout=5).status_code == 401


def _pcm(seconds: float, rate: int) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype("<i2").tobytes()


@pytest.mark.parametrize("rate,bit_rate", [(24000, "64k"), (16000, "32k"), (48000, "192k")])
def test_mp3_helper_encodes_the_pcm_it_is_given(server, rate: int, bit_rate: str) -> None:
    pcm = _pcm(1.5, rate)
    r = requests.post(f"{server.url}{MP3}?sample_rate={rate}&bit_rate={bit_rate}", data=pcm, headers=AUTH,
                      timeout=10)
    assert r.status_code == 200 and r.headers["content-type"] == "audio/mpeg"
    assert r.content == webui_mp3.encode_pcm(pcm, rate, webui_mp3.BIT_RATES_KBPS[bit_rate])  # LAME is deterministic
    audio, sr = sf.read(io.BytesIO(r.content), dtype="float32")
    assert sr == rate
    assert abs(len(audio) / sr - 1.5) < 2 * 1152 / rate  # the encoder's priming and last-frame padding only


@pytest.mark.parametrize("query,body,field", [
    ("sample_rate=12345", b"\0\0", "sample_rate"),
    ("", b"\0\0", "sample_rate"),
    ("sample_rate=24000&bit_rate=7k", b"\0\0", "bit_rate"),
    ("sample_rate=24000", b"\0\0\0", "odd number of bytes"),
    ("sample_rate=24000", b"", "empty"),
    ("sample_rate=%C2%B2", b"\0\0", "sample_rate"),  # "²" is a digit to str.isdigit, not to int(): was a 500
    ("sample_rate=" + "9" * 5000, b"\0\0", "sample_rate"),  # past int()'s 4300 digits: was a 500
    ("sample_rate=24000&bit_rate=", b"\0\0", "bit_rate"),  # schemathesis: read as absent (192k), as no other route
])
def test_mp3_helper_refuses_bad_input_with_400(server, query: str, body: bytes, field: str) -> None:
    r = requests.post(f"{server.url}{MP3}?{query}", data=body, headers=AUTH, timeout=5)
    assert r.status_code == 400 and r.json()["code"] == "InvalidParameter"
    assert field in r.json()["message"]


def test_mp3_helper_is_post_only(server) -> None:
    assert requests.get(f"{server.url}{MP3}?sample_rate=24000", headers=AUTH, timeout=5).status_code == 405
